"""A short self-contained HTML report of a run: matrix, metrics, heat-map, provenance."""

from __future__ import annotations

import html

from mllmcl.evaluation.metrics import AccuracyMatrix


def matrix_html(matrix: AccuracyMatrix) -> str:
    head = "".join(f"<th>{html.escape(t)}</th>" for t in matrix.tasks)
    body = []
    cell = lambda v: f"<td>{v:.1f}</td>" if v is not None else "<td>–</td>"  # noqa: E731
    if matrix.zero_shot is not None:
        body.append("<tr><th>zero-shot</th>" + "".join(cell(v) for v in matrix.zero_shot) + "</tr>")
    forward = matrix.forward or [None] * len(matrix.tasks)
    for t, row in enumerate(matrix.rows):
        cells = "".join(cell(v) if v is not None or j != t + 1 or forward[j] is None
                        else f"<td><i>({forward[j]:.1f})</i></td>" for j, v in enumerate(row))
        body.append(f"<tr><th>after {html.escape(matrix.tasks[t])}</th>{cells}</tr>")
    return f"<table><tr><th>stage</th>{head}</tr>{''.join(body)}</table>"


TRACK_TITLES = {"exact": "exact match (SQuAD-normalised)", "f1": "token F1 (SQuAD-normalised)"}


def _tracks_html(tracks: dict[str, AccuracyMatrix]) -> str:
    """The other scoring tracks, folded: shown when the reader opens them."""
    out = []
    for name, m in tracks.items():
        nums = m.metrics()
        line = ", ".join(f"{k} {v:.2f}" for k, v in nums.items() if isinstance(v, (int, float)))
        out.append(f"<details><summary>{html.escape(TRACK_TITLES.get(name, name))}: {html.escape(line)}</summary>"
                   f"{matrix_html(m)}</details>")
    return "".join(out)


def render_report(title: str, matrix: AccuracyMatrix, metrics: dict, provenance: dict,
                  heatmap_name: str = "accuracy_matrix.png", notes: list[str] | None = None,
                  tracks: dict[str, AccuracyMatrix] | None = None, images: list[str] | None = None) -> str:
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
<h2>Accuracy matrix (%)</h2><p>Row = after training stage, column = evaluated task; <i>(in brackets)</i>: the
next task, before it is trained (forward transfer).</p>
{matrix_html(matrix)}
<h2>Metrics</h2><table>{mrows}</table>
{''.join(f'<img src="{html.escape(name)}" alt="{html.escape(name)}">' for name in (images or [heatmap_name]))}
{'<h2>Other scoring tracks</h2><p>The native rules above are what MLLM-CL reports; these score the same '
 'predictions by exact match and token F1.</p>' + _tracks_html(tracks) if tracks else ''}
{f'<h2>Notes</h2><ul>{notes_html}</ul>' if notes_html else ''}
<h2>Provenance</h2><table>{prov}</table>
</body></html>
"""
