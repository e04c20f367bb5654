"""The sweep's results table (CSV) and the plot of the objective against the task index."""

from __future__ import annotations

import csv
import io

from mllmcl.tuning.spec import SweepSpec


def results_csv(rows: list[dict], spec: SweepSpec) -> str:
    keys = [p.key for p in spec.space]
    metrics = ["objective", *spec.reported_metrics]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial_id", *keys, *metrics, "tasks_done", "stop_reason"])
    for r in rows:
        w.writerow([r["trial_id"], *(r["config"].get(k) for k in keys),
                    *("" if r.get(m) is None else f"{r[m]:.4f}" for m in metrics), r["tasks_done"], r["stop_reason"]])
    return buf.getvalue()


def format_table(rows: list[dict], spec: SweepSpec) -> str:
    """A Markdown table of the trials (printed by jobs/sweep.py)."""
    keys = [p.key for p in spec.space]
    metrics = ["objective", *spec.reported_metrics]
    lines = ["| trial | " + " | ".join(keys + metrics) + " | tasks | stop reason |",
             "|" + "---|" * (len(keys) + len(metrics) + 3)]
    for r in rows:
        cfg = [f"{r['config'].get(k):.3g}" if isinstance(r["config"].get(k), float) else str(r["config"].get(k))
               for k in keys]
        vals = ["–" if r.get(m) is None else f"{r[m]:.2f}" for m in metrics]
        lines.append(f"| {r['trial_id']} | " + " | ".join(cfg + vals) + f" | {r['tasks_done']} | {r['stop_reason']} |")
    return "\n".join(lines)


def objective_plot_png(rows: list[dict], title: str, n_tasks: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for r in rows:
        hist = r.get("history") or []
        if not hist:
            continue
        xs, ys = [h["task"] for h in hist], [h["objective"] for h in hist]
        style = "-" if r["stop_reason"] == "completed" else "--"
        ax.plot(xs, ys, style, marker="o", label=r["trial_id"])
    ax.set_xlabel("task index (tasks trained)")
    ax.set_ylabel("objective")
    ax.set_xticks(range(1, n_tasks + 1))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=7, ncol=2)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
