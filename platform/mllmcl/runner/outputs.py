"""What a finished run writes besides its stages: the accuracy matrix, the metrics and the report."""

from __future__ import annotations

from mllmcl import storage
from mllmcl.evaluation.metrics import AccuracyMatrix
from mllmcl.evaluation.plots import confusion_png, heatmap_png
from mllmcl.evaluation.report import render_report
from mllmcl.storage.layout import RunLayout


def run_metrics(cfg, tasks: list[str], matrix: AccuracyMatrix, oracle_rows: list[dict], info: list[dict], *,
                generated: int, cache_hits: int, tracks: dict[str, AccuracyMatrix] | None = None) -> dict:
    """The run's numbers (deterministic: timings stay in the manifest's stage entries).

    The top-level metrics and ``accuracy_matrix`` are the native track (each task's own rule, as
    MLLM-CL scores); ``tracks`` holds the same for exact match and token F1, each from its own
    matrix (a run resumed from stages scored before the tracks existed has none)."""
    m = {"method": cfg.method.name, "stream": cfg.data.stream, "tasks": tasks, "order": cfg.data.order,
         **matrix.metrics(), "final": dict(zip(tasks, matrix.rows[-1])), "accuracy_matrix": matrix.to_dict(),
         "eval_generated": generated, "eval_cache_hits": cache_hits}
    m["order"] = list(m["order"]) if isinstance(m["order"], tuple) else m["order"]
    m["tracks"] = {t: {**mt.metrics(), "accuracy_matrix": mt.to_dict()} for t, mt in (tracks or {}).items()
                   if mt.complete}
    if any("router_accuracy" in i for i in info):
        m["router_accuracy_per_stage"] = [i.get("router_accuracy") for i in info]
        m["router_accuracy"] = info[-1].get("router_accuracy")
        m["router_fallbacks_per_stage"] = [i.get("router_fallbacks") for i in info]
        m["router"] = info[-1].get("router")
        m["router_confusion"] = info[-1].get("router_confusion")  # seen task -> expert -> questions, final stage
        m["router_flops_per_question_per_stage"] = [i.get("router_flops_per_question") for i in info]
        m["router_flops_per_question"] = info[-1].get("router_flops_per_question")
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
    headline["FWT"] = "not measured (eval.forward_transfer=false)" if metrics.get("FWT") is None else metrics["FWT"]
    headline["task order"] = f"{metrics['order']}: {' → '.join(metrics['tasks'])}"
    if "router_accuracy" in metrics:
        headline["router accuracy (final stage)"] = metrics["router_accuracy"]
        headline["oracle routing (final stage)"] = metrics["oracle_final"]
    tracks = {t: AccuracyMatrix.from_dict(v["accuracy_matrix"]) for t, v in metrics.get("tracks", {}).items()}
    images = ["accuracy_matrix.png"]
    if metrics.get("router_confusion"):
        storage.write_bytes(layout.path("report", "router_confusion.png"), confusion_png(
            metrics["router_confusion"], title=f"{metrics['router']} router, final stage: task → chosen expert"))
        images.append("router_confusion.png")
    storage.write_text(layout.report_html, render_report(
        f"{stream_name.upper()} · {cfg.method.name} · {run_id}", matrix, headline,
        {k: v for k, v in provenance.items() if k != "libraries"}, tracks=tracks, images=images))
