"""A finished (or partly finished) run, as something to serve: which stage, which experts,
which router, which base model, and each expert's answer budget. Built from the run's
own manifest and config only; experts load only from the adapters this lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from mllmcl import storage
from mllmcl.config import Config, config_from_dict
from mllmcl.data.streams import get_stream_spec
from mllmcl.data.types import Stream, Task, TaskSpec
from mllmcl.errors import ConfigError
from mllmcl.methods import get_method
from mllmcl.methods.base import NotServable, Stage
from mllmcl.paths import absolute
from mllmcl.storage.layout import RunLayout
from mllmcl.storage.manifest import Manifest


@dataclass(frozen=True)
class ServedRun:
    run_uri: str
    run_id: str
    method: str
    stream: str
    stage: int
    model_path: str
    dtype: str
    experts: dict[str, str | None]  # name -> adapter URI (None = base model), router letter order
    router: str | None
    specs: tuple[TaskSpec, ...]  # the seen tasks (the router prompt describes them)
    max_new_tokens: dict[str, int]  # expert -> answer budget (as the stream runner evaluated)
    router_fallback: str
    seed: int
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


def load_run_config(layout: RunLayout) -> Config:
    if not storage.exists(layout.config):
        raise ConfigError([f"{layout.run_dir}: no config.yaml (not a run folder)"])
    return config_from_dict(yaml.safe_load(storage.read_text(layout.config))["config"])


def spec_stream(cfg: Config, manifest: Manifest) -> Stream:
    """The run's stream with task specs only (no data is read)."""
    spec = get_stream_spec(manifest.stream)
    tasks = tuple(Task(spec=spec.task(n), index=i, root="", train=(), test=()) for i, n in enumerate(manifest.tasks))
    return Stream(name=spec.name, root="", tasks=tasks)


def load_served_run(run_uri: str, stage: int = -1, *, model_path: str = "", dtype: str = "",
                    base_only: bool = False) -> ServedRun:
    layout = split_run_uri(run_uri)
    manifest = Manifest.load(layout)
    if manifest is None:
        raise ConfigError([f"{layout.run_dir}: no manifest.json (no such run, or it has not finished a stage)"])
    cfg = load_run_config(layout)
    done = [s["k"] for s in manifest.stages if s.get("status") == "complete"]
    if not done:
        raise ConfigError([f"run {layout.run_id!r} has no complete stage to serve"])
    k = max(done) if stage < 0 else stage
    if k not in done:
        raise ConfigError([f"stage {stage} of run {layout.run_id!r} is not complete (complete stages: {sorted(done)})"])
    stream = spec_stream(cfg, manifest)
    st = Stage(k, stream, layout, cfg)
    if base_only:
        experts, router = {"base": None}, None
    else:
        try:
            plan = get_method(manifest.method)(cfg, stream).serving(st)
        except NotServable as e:
            raise ConfigError([f"run {layout.run_id!r} ({manifest.method}): {e}"]) from None
        experts, router = dict(plan.experts), plan.router
    missing = [u for u in [*experts.values(), router] if u is not None and not
               storage.exists(storage.join(u, "meta.json"))]
    if missing:
        raise ConfigError([f"{u}: adapter missing or incomplete" for u in missing])
    budget = cfg.eval.max_new_tokens
    seen = [t.spec for t in st.seen]
    by_name = {t.name: t for t in seen}
    max_new = {name: budget or (by_name[name].max_new_tokens if name in by_name else max(t.max_new_tokens for t in seen))
               for name in experts}
    return ServedRun(run_uri=layout.run_dir, run_id=layout.run_id, method=manifest.method, stream=stream.name,
                     stage=k, model_path=model_path or cfg.model.path, dtype=dtype or cfg.model.dtype,
                     experts=experts, router=router, specs=tuple(seen), max_new_tokens=max_new,
                     router_fallback=cfg.method.router_fallback, seed=cfg.run.seed, eval_max_new_tokens=budget)
