"""The artifact layout of a run (same under a local folder or an S3 prefix)::

    <root>/runs/<run_id>/
      manifest.json                 status of every stage; written last
      config.yaml                   resolved config + provenance
      tasks/<k>_<task>/expert/      PEFT adapter dir + meta.json
      tasks/<k>_<task>/router/      router adapter after stage k (MR-LoRA)
      tasks/<k>_<task>/checkpoints/ Ray Train checkpoints
      eval/stage_<k>/<task>.parquet per-sample predictions
      eval/zero_shot/<task>.parquet
      metrics/accuracy_matrix.json, metrics.json
      report/report.html, accuracy_matrix.png
"""

from __future__ import annotations

from dataclasses import dataclass

from mllmcl.storage.fs import join


def relative_adapter(uri: str | None, run_dir: str) -> str:
    """An adapter as predictions name it: its path inside the run (``base`` for no adapter)."""
    if uri is None:
        return "base"
    return uri[len(run_dir):].strip("/") if uri.startswith(run_dir) else uri


@dataclass(frozen=True)
class RunLayout:
    root: str
    run_id: str

    @property
    def run_dir(self) -> str:
        return join(self.root, "runs", self.run_id)

    def path(self, *parts: str) -> str:
        return join(self.run_dir, *parts)

    @property
    def manifest(self) -> str:
        return self.path("manifest.json")

    @property
    def config(self) -> str:
        return self.path("config.yaml")

    def task_dir(self, k: int, task: str) -> str:
        return self.path("tasks", f"{k}_{task}")

    def expert_dir(self, k: int, task: str) -> str:
        return join(self.task_dir(k, task), "expert")

    def router_dir(self, k: int, task: str) -> str:
        return join(self.task_dir(k, task), "router")

    def checkpoints_dir(self, k: int, task: str) -> str:
        return join(self.task_dir(k, task), "checkpoints")

    def predictions(self, stage: int | str, task: str) -> str:
        folder = stage if isinstance(stage, str) else f"stage_{stage}"
        return self.path("eval", folder, f"{task}.parquet")

    @property
    def accuracy_matrix(self) -> str:
        return self.path("metrics", "accuracy_matrix.json")

    @property
    def metrics(self) -> str:
        return self.path("metrics", "metrics.json")

    @property
    def report_html(self) -> str:
        return self.path("report", "report.html")

    @property
    def heatmap(self) -> str:
        return self.path("report", "accuracy_matrix.png")
