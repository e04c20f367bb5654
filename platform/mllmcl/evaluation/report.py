"""A short self-contained HTML report of a run: matrix, metrics, heat-map, provenance."""

from __future__ import annotations

import html

from mllmcl.evaluation.metrics import AccuracyMatrix


def _matrix_html(matrix: AccuracyMatrix) -> str:
    head = "".join(f"<th>{html.escape(t)}</th>" for t in matrix.tasks)
    body = []
    if matrix.zero_shot is not None:
        body.append("<tr><th>zero-shot</th>" + "".join(f"<td>{v:.1f}</td>" for v in matrix.zero_shot) + "</tr>")
    for t, row in enumerate(matrix.rows):
        cells = "".join(f"<td>{v:.1f}</td>" if v is not None else "<td>–</td>" for v in row)
        body.append(f"<tr><th>after {html.escape(matrix.tasks[t])}</th>{cells}</tr>")
    return f"<table><tr><th>stage</th>{head}</tr>{''.join(body)}</table>"


def render_report(title: str, matrix: AccuracyMatrix, metrics: dict, provenance: dict,
                  heatmap_name: str = "accuracy_matrix.png", notes: list[str] | None = None) -> str:
    mrows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{v:.2f}</td></tr>" if isinstance(v, (int, float))
                    else f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in metrics.items())
    prov = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in provenance.items())
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in (notes or []))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}th{{background:#f4f4f4}}</style></head>
<body><h1>{html.escape(title)}</h1>
<h2>Accuracy matrix (%)</h2><p>Row = after training stage, column = evaluated task.</p>
{_matrix_html(matrix)}
<h2>Metrics</h2><table>{mrows}</table>
<img src="{html.escape(heatmap_name)}" alt="accuracy matrix heat-map">
{f'<h2>Notes</h2><ul>{notes_html}</ul>' if notes_html else ''}
<h2>Provenance</h2><table>{prov}</table>
</body></html>
"""
