"""A run's results, read back from its folder (local or ``s3://``): what a notebook works with.

    run = load_run("artifacts/runs/dcl-mr_lora-...")
    run.matrix.format_table(); run.metrics["MAA"]; run.predictions(stage=4, task="Med")
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from mllmcl import storage
from mllmcl.errors import ConfigError
from mllmcl.evaluation.metrics import AccuracyMatrix, add_stage_record, track_matrices
from mllmcl.evaluation.scorers import TRACKS
from mllmcl.evaluation.predictions import PredictionRow, read_predictions
from mllmcl.paths import absolute


@dataclass(frozen=True)
class RunRecord:
    run_dir: str
    run_id: str
    method: str
    stream: str
    tasks: tuple[str, ...]
    config: dict  # the resolved config as the run stored it
    provenance: dict
    manifest: dict
    metrics: dict | None  # None until the run is complete

    @property
    def complete(self) -> bool:
        return self.manifest.get("status") == "complete"

    @property
    def stages(self) -> list[dict]:
        return [s for s in self.manifest.get("stages", []) if s.get("status") == "complete"]

    @property
    def matrix(self) -> AccuracyMatrix:
        """The accuracy matrix so far (one row per complete stage; native scoring track)."""
        return self.track_matrix("native")

    def track_matrix(self, track: str) -> AccuracyMatrix:
        """The accuracy matrix so far on a scoring track (native, exact, f1), with the forward and
        zero-shot scores the stages recorded."""
        if track not in TRACKS:
            raise ValueError(f"unknown scoring track {track!r}: expected one of {TRACKS}")
        matrices = track_matrices(self.tasks, ("native", track) if track != "native" else ("native",))
        for s in sorted(self.stages, key=lambda s: s["k"]):
            add_stage_record(matrices, s)
        return matrices[track]

    def predictions(self, stage: int, task: str) -> list[PredictionRow]:
        """Per-sample predictions on ``task`` after ``stage`` (prompt, prediction, answer, score, expert)."""
        return read_predictions(storage.join(self.run_dir, "eval", f"stage_{stage}", f"{task}.parquet"))


def load_run(uri: str) -> RunRecord:
    """The run at ``<storage root>/runs/<run id>`` (a local folder, relative to here, or ``s3://``)."""
    run_dir = absolute(str(uri)).rstrip("/")
    manifest_uri, config_uri = storage.join(run_dir, "manifest.json"), storage.join(run_dir, "config.yaml")
    if not storage.exists(manifest_uri):
        raise ConfigError([f"{run_dir}: no manifest.json (no such run, or it has not finished a stage)"])
    manifest = storage.read_json(manifest_uri)
    stored = yaml.safe_load(storage.read_text(config_uri)) if storage.exists(config_uri) else {}
    metrics_uri = storage.join(run_dir, "metrics", "metrics.json")
    return RunRecord(run_dir=run_dir, run_id=manifest["run_id"], method=manifest["method"],
                     stream=manifest["stream"], tasks=tuple(manifest["tasks"]), config=stored.get("config", {}),
                     provenance=stored.get("provenance", {}), manifest=manifest,
                     metrics=storage.read_json(metrics_uri) if storage.exists(metrics_uri) else None)
