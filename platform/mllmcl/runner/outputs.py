"""What a finished run writes besides its stages: the accuracy matrix, the metrics and the report."""

from __future__ import annotations

from mllmcl import storage
from mllmcl.evaluation.metrics import AccuracyMatrix
from mllmcl.evaluation.plots import heatmap_png
from mllmcl.evaluation.report import render_report
from mllmcl.storage.layout import RunLayout


def run_metrics(cfg, tasks: list[str], matrix: AccuracyMatrix, oracle_rows: list[dict], info: list[dict], *,
                generated: int, cache_hits: int) -> dict:
    """The run's numbers (deterministic: timings stay in the manifest's stage entries)."""
    m = {"method": cfg.method.name, "stream": cfg.data.stream, "tasks": tasks, **matrix.metrics(),
         "final": dict(zip(tasks, matrix.rows[-1])), "accuracy_matrix": matrix.to_dict(),
         "eval_generated": generated, "eval_cache_hits": cache_hits}
    if any("router_accuracy" in i for i in info):
        m["router_accuracy_per_stage"] = [i.get("router_accuracy") for i in info]
        m["router_accuracy"] = info[-1].get("router_accuracy")
        m["router_fallbacks_per_stage"] = [i.get("router_fallbacks") for i in info]
        m["router"] = info[-1].get("router")
        m["oracle_per_stage"] = oracle_rows
        last = oracle_rows[-1]
        m["oracle_final"] = sum(last.values()) / len(last) if last else None
    return m


def write_outputs(layout: RunLayout, cfg, stream_name: str, run_id: str, matrix: AccuracyMatrix, metrics: dict,
                  provenance: dict) -> None:
    storage.write_json(layout.accuracy_matrix, matrix.to_dict())
    storage.write_json(layout.metrics, metrics)
    storage.write_bytes(layout.heatmap, heatmap_png(matrix, title=f"{stream_name.upper()} · {cfg.method.name}"))
    headline = {k: metrics[k] for k in ("MFT", "MFN", "MAA", "BWT", "forgetting")}
    if "router_accuracy" in metrics:
        headline["router accuracy (final stage)"] = metrics["router_accuracy"]
        headline["oracle routing (final stage)"] = metrics["oracle_final"]
    storage.write_text(layout.report_html, render_report(
        f"{stream_name.upper()} · {cfg.method.name} · {run_id}", matrix, headline,
        {k: v for k, v in provenance.items() if k != "libraries"}))
