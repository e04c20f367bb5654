"""Several runs side by side, as in the paper's tables (per-task final accuracy, MFT, MFN, MAA, BWT)."""

from __future__ import annotations

from typing import Sequence

from mllmcl import storage
from mllmcl.errors import ConfigError
from mllmcl.paths import absolute


def load_run_metrics(run_dir: str) -> dict:
    path = storage.join(run_dir, "metrics", "metrics.json")
    if not storage.exists(path):
        raise FileNotFoundError(f"{run_dir}: no metrics/metrics.json (is the run complete?)")
    return storage.read_json(path)


def comparison_rows(metrics: Sequence[dict], labels: Sequence[str] | None = None) -> tuple[list[str], list[list]]:
    tasks: list[str] = []
    for m in metrics:
        for t in m["tasks"]:
            if t not in tasks:
                tasks.append(t)
    header = ["method", *tasks, "MFT", "MFN", "MAA", "BWT", "router"]
    rows = []
    for i, m in enumerate(metrics):
        label = labels[i] if labels else m["method"]
        final = m.get("final", {})
        router = m.get("router_accuracy")
        rows.append([label, *[final.get(t) for t in tasks], m["MFT"], m["MFN"], m["MAA"], m["BWT"], router])
    return header, rows


def markdown_table(metrics: Sequence[dict], labels: Sequence[str] | None = None) -> str:
    header, rows = comparison_rows(metrics, labels)
    fmt = lambda v: "–" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def compare_runs(runs: Sequence[str], labels: Sequence[str] | None = None) -> str:
    """The paper-style Markdown table of finished runs (folders or ``s3://`` prefixes); every run
    that is missing or unfinished, and a label count that does not match, reported at once."""
    metrics, problems = [], []
    for run in runs:
        try:
            metrics.append(load_run_metrics(absolute(str(run))))
        except FileNotFoundError as e:
            problems.append(str(e))
    if labels is not None and len(labels) != len(runs):
        problems.append(f"--labels names {len(labels)} rows for {len(runs)} runs")
    if problems:
        raise ConfigError(problems)
    return markdown_table(metrics, labels)
