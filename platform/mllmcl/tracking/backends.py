"""The tracking backends: each one library's client, behind four calls (params, metrics,
artifact, end). Imported only when a backend is switched on."""

from __future__ import annotations

import logging
import os
import time
from typing import Iterable

log = logging.getLogger(__name__)

MLFLOW_BATCH = 100  # MLflow accepts at most 100 params and 1000 metrics per log_batch


def _metric_key(key: str) -> str:
    """A metric name as every backend accepts it (MLflow: alphanumerics, _ - . space / only)."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


class MlflowBackend:
    """MLflow through ``MlflowClient`` (no global active run: safe beside other code that uses
    the fluent API, e.g. a Tune integration)."""

    name = "mlflow"

    def __init__(self, uri: str, experiment: str, run_name: str, *, run_id: str = "", parent_run_id: str = "",
                 tags: dict | None = None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        if run_id:  # an existing run (a resumed run's, or a Tune trial's)
            self.run_id = self.client.get_run(run_id).info.run_id
            if self.client.get_run(run_id).info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
            all_tags = dict(tags or {})
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id

    def params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + MLFLOW_BATCH])

    def metrics(self, rows: Iterable[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_metric_key(k), float(v), now, int(step)) for k, v, step in rows]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def artifact(self, local_path: str, folder: str = "") -> None:
        self.client.log_artifact(self.run_id, local_path, artifact_path=folder or None)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status={"complete": "FINISHED", "failed": "FAILED"}.get(
            status, "KILLED"))


class TensorBoardBackend:
    """TensorBoard event files (tensorboardX, which Ray Tune brings) in a local folder; the
    parameters as one text summary (TensorBoard's HParams would need a metric schema up front)."""

    name = "tensorboard"

    def __init__(self, folder: str):
        from tensorboardX import SummaryWriter

        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.writer = SummaryWriter(logdir=folder, flush_secs=10)

    def params(self, params: dict) -> None:
        table = "| key | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in sorted(params.items()))
        self.writer.add_text("config", table, 0)
        self.writer.flush()

    def metrics(self, rows: Iterable[tuple[str, float, int]]) -> None:
        for k, v, step in rows:
            self.writer.add_scalar(_metric_key(k), float(v), int(step))
        self.writer.flush()

    def artifact(self, local_path: str, folder: str = "") -> None:
        if local_path.endswith(".png"):
            import numpy as np
            from PIL import Image

            with Image.open(local_path) as im:
                self.writer.add_image(os.path.basename(local_path), np.asarray(im.convert("RGB")), 0,
                                      dataformats="HWC")
            self.writer.flush()

    def end(self, status: str) -> None:
        self.writer.close()


class WandbBackend:
    """Weights & Biases (``wandb``, when installed), offline unless told: files under ``folder``
    that ``wandb sync`` uploads later."""

    name = "wandb"

    def __init__(self, project: str, run_name: str, folder: str, mode: str, group: str = ""):
        import wandb

        os.makedirs(folder, exist_ok=True)
        self.run = wandb.init(project=project, name=run_name, dir=folder, mode=mode, group=group or None,
                              id=run_name, resume="allow", reinit="create_new")

    def params(self, params: dict) -> None:
        self.run.config.update(params, allow_val_change=True)

    def metrics(self, rows: Iterable[tuple[str, float, int]]) -> None:
        for k, v, step in rows:  # W&B's own step must only grow: each metric's step goes with it
            self.run.log({_metric_key(k): float(v), "step": int(step)})

    def artifact(self, local_path: str, folder: str = "") -> None:
        self.run.save(local_path, base_path=os.path.dirname(local_path), policy="now")

    def end(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "complete" else 1)
