"""Zero-shot evaluation of a base model on every task of a stream (the "Zero-shot" row).

Writes, under ``<storage.root>/runs/<run_id>/``: ``config.yaml``, per-sample
predictions ``eval/zero_shot/<task>.parquet``, ``metrics/metrics.json``, the
heat-map and an HTML report, then ``manifest.json`` last.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import yaml

from mllmcl import storage
from mllmcl.config import Config
from mllmcl.data.source import load_configured_stream
from mllmcl.evaluation.generate import evaluate_task, pixel_cache_for
from mllmcl.evaluation.metrics import AccuracyMatrix
from mllmcl.evaluation.plots import heatmap_png
from mllmcl.evaluation.predictions import write_predictions
from mllmcl.evaluation.report import render_report
from mllmcl.models import load_backbone
from mllmcl.provenance import provenance
from mllmcl.storage.layout import RunLayout

log = logging.getLogger(__name__)


@dataclass
class ZeroShotResult:
    run_dir: str
    tasks: list[str]
    scores: dict[str, float]
    mean: float
    seconds: float


def run_zero_shot(cfg: Config, run_id: str) -> ZeroShotResult:
    t0 = time.time()
    layout = RunLayout(cfg.storage.root, run_id)
    stream = load_configured_stream(cfg.data, progress=cfg.run.progress)  # validates data before any work
    backbone = load_backbone(cfg.model.path, cfg.model.dtype)
    prov = provenance(cfg.to_dict(), seed=cfg.run.seed, workers=1, method="zero_shot", data_root=stream.root)
    storage.write_text(layout.config, yaml.safe_dump({"config": cfg.to_dict(), "provenance": prov}, sort_keys=False))
    pixels = pixel_cache_for(backbone.collator)
    scores = {}
    for task in stream:
        ev = evaluate_task(backbone.model, backbone.collator, pixels, task.spec, task.test,
                           batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens or None,
                           progress=cfg.run.progress)
        write_predictions(ev.rows, layout.predictions("zero_shot", task.name))
        scores[task.name] = ev.accuracy
        log.info("zero-shot %s: %.1f%% on %d samples", task.name, ev.accuracy, len(task.test))
    tasks = stream.task_names
    matrix = AccuracyMatrix(tasks=tasks, zero_shot=[scores[t] for t in tasks])
    mean = sum(scores.values()) / len(scores)
    metrics = {"method": "zero_shot", "stream": cfg.data.stream, "tasks": tasks, "zero_shot": scores,
               "MFT": mean, "accuracy_matrix": matrix.to_dict()}
    storage.write_json(layout.accuracy_matrix, matrix.to_dict())
    storage.write_json(layout.metrics, metrics)
    storage.write_bytes(layout.heatmap, heatmap_png(matrix, title=f"{cfg.data.stream} zero-shot"))
    storage.write_text(layout.report_html, render_report(
        f"{cfg.data.stream.upper()} zero-shot — {run_id}", matrix, {"mean zero-shot (MFT)": mean},
        {k: v for k, v in prov.items() if k != "libraries"},
        notes=["Zero-shot evaluates the base model on every task; the published table reports its mean as MFT."]))
    seconds = time.time() - t0
    storage.write_json(layout.manifest, {"run_id": run_id, "status": "complete", "method": "zero_shot",
                                         "stages": {"zero_shot": {"status": "complete", "tasks": tasks}},
                                         "seconds": round(seconds, 1)})
    return ZeroShotResult(run_dir=layout.run_dir, tasks=tasks, scores=scores, mean=mean, seconds=seconds)
