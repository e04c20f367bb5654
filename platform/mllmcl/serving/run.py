"""A finished (or partly finished) run, as something to serve: which stage, which experts,
which router, which base model, and each expert's answer budget. Built from the run's
own manifest (each stage records what serves it) and config file only, without knowing
the method; experts load only from the adapters this lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from mllmcl import storage
from mllmcl.data.streams import get_stream_spec
from mllmcl.data.types import TaskSpec
from mllmcl.errors import ConfigError
from mllmcl.paths import absolute
from mllmcl.storage.layout import RunLayout
from mllmcl.routing import load_router
from mllmcl.storage.manifest import Manifest, ServingRecord


@dataclass(frozen=True)
class ServedRun:
    run_uri: str
    run_id: str
    method: str
    stream: str
    stage: int
    model_path: str
    dtype: str
    experts: dict[str, str | None]  # name -> adapter URI (None = base model), the router's expert order
    router: dict | None  # the router's record (mllmcl.routing.load_router), None: one expert
    specs: tuple[TaskSpec, ...]  # the seen tasks
    max_new_tokens: dict[str, int]  # expert -> answer budget (as the stream runner evaluated)
    eval_max_new_tokens: int = 0  # the run's eval.max_new_tokens (0 = each task's own budget)

    @property
    def routed(self) -> bool:
        return self.router is not None

    def to_dict(self) -> dict:
        return {"run": self.run_uri, "run_id": self.run_id, "method": self.method, "stream": self.stream,
                "stage": self.stage, "experts": list(self.experts), "routed": self.routed}


def split_run_uri(uri: str) -> RunLayout:
    """``<root>/runs/<run_id>`` (local folder, absolute or relative to here, or ``s3://``) as a layout
    whose paths are absolute: replicas and Ray Data actors read them from folders of their own."""
    uri = absolute(str(uri)).rstrip("/")
    parent, _, run_id = uri.rpartition("/")
    root, _, runs = parent.rpartition("/")
    if runs != "runs" or not run_id:
        raise ConfigError([f"--run {uri!r}: expected <storage root>/runs/<run id>"])
    return RunLayout(root, run_id)


def load_run_config(layout: RunLayout) -> dict:
    """The run's resolved config as stored (a mapping: serving needs no method's options)."""
    if not storage.exists(layout.config):
        raise ConfigError([f"{layout.run_dir}: no config.yaml (not a run folder)"])
    return yaml.safe_load(storage.read_text(layout.config))["config"]


def load_served_run(run_uri: str, stage: int = -1, *, model_path: str = "", dtype: str = "",
                    base_only: bool = False) -> ServedRun:
    layout = split_run_uri(run_uri)
    manifest = Manifest.load(layout)
    if manifest is None:
        raise ConfigError([f"{layout.run_dir}: no manifest.json (no such run, or it has not finished a stage)"])
    cfg = load_run_config(layout)
    complete = {s["k"]: s for s in manifest.stages if s.get("status") == "complete"}
    if not complete:
        raise ConfigError([f"run {layout.run_id!r} has no complete stage to serve"])
    k = max(complete) if stage < 0 else stage
    if k not in complete:
        raise ConfigError([f"stage {stage} of run {layout.run_id!r} is not complete (complete stages: "
                           f"{sorted(complete)})"])
    spec = get_stream_spec(manifest.stream)
    seen = [spec.task(n) for n in manifest.tasks[: k + 1]]
    if base_only:
        experts, router = {"base": None}, None
    else:
        if complete[k].get("serving") is None:
            raise ConfigError([f"run {layout.run_id!r} was made before stages recorded what serves them: run its "
                               f"job again with the same run.id to record it (nothing is retrained)"])
        record = ServingRecord.from_dict(complete[k]["serving"])
        if record.refused is not None:
            raise ConfigError([f"run {layout.run_id!r} ({manifest.method}): {record.refused}"])
        experts = {n: None if rel is None else layout.path(rel) for n, rel in record.experts.items()}
        router = record.router
    needed = [storage.join(u, "meta.json") for u in experts.values() if u is not None]
    if router is not None:
        needed += load_router(router, layout.run_dir).files()
    missing = [u for u in needed if not storage.exists(u)]
    if missing:
        raise ConfigError([f"{u}: missing (an adapter or router file of the stage)" for u in missing])
    budget = int((cfg.get("eval") or {}).get("max_new_tokens") or 0)
    by_name = {t.name: t for t in seen}
    max_new = {name: budget or (by_name[name].max_new_tokens if name in by_name else max(t.max_new_tokens for t in seen))
               for name in experts}
    model = cfg.get("model") or {}
    return ServedRun(run_uri=layout.run_dir, run_id=layout.run_id, method=manifest.method, stream=spec.name,
                     stage=k, model_path=model_path or model.get("path", "tiny"),
                     dtype=dtype or model.get("dtype", "float32"), experts=experts, router=router,
                     specs=tuple(seen), max_new_tokens=max_new, eval_max_new_tokens=budget)
