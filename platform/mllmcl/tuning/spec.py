"""A sweep definition (YAML) as a typed spec, validated in full before any trial starts.

```yaml
name: mr_lora_dcl
base: jobs/configs/dcl/mr_lora_tiny.yaml   # a preset (relative to the repo or this file)
overrides: [train.epochs=2]                 # fixed for every trial (the budget)
space:                                      # any dotted config key
  train.lr: {loguniform: [5.0e-4, 5.0e-3]}
  lora.rank: {choice: [8, 16]}
  method.router_epochs: {grid: [10, 30]}
  method.router_samples_per_task: {randint: [10, 30]}   # inclusive
objective: {metric: MAA, mode: max}         # or metrics: {MAA: 1.0, BWT: 0.5}
scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # in tasks; or fifo
search: {type: random}                      # or optuna; multi-objective: metrics [MAA, BWT], modes [max, max]
num_samples: 6
max_concurrent: 2
trial_resources: {cpus: 0, memory_gb: 1.0}
storage: artifacts                          # local folder or s3:// prefix
```
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mllmcl.config import Config, load_config, load_yaml, local_paths
from mllmcl.errors import ConfigError
from mllmcl.paths import absolute, is_relative, output_location_problems

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
STREAM_METRICS = ("MFT", "MFN", "MAA", "BWT", "forgetting")  # reported after every task by every method
ROUTED_METRICS = ("router_accuracy",)  # only by methods with a router (mr_lora, disco_select)
SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("random", "optuna")
REPO = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Param:
    key: str  # dotted config key
    kind: str  # one of DISTRIBUTIONS
    values: tuple  # (low, high) or the options

    def tune_domain(self):
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "randint":
            return tune.randint(self.values[0], self.values[1] + 1)  # inclusive upper bound
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))

    def probes(self) -> list:
        """Values that must all be valid for the config (bounds, or every option)."""
        if self.kind == "randint":
            return [int(v) for v in self.values]
        return list(self.values)


@dataclass(frozen=True)
class Objective:
    weights: dict[str, float]  # metric -> weight; one metric = weight 1
    mode: str = "max"
    name: str = "objective"

    def value(self, metrics: dict) -> float:
        return float(sum(w * float(metrics[m]) for m, w in self.weights.items()))

    @property
    def label(self) -> str:
        if len(self.weights) == 1 and next(iter(self.weights.values())) == 1.0:
            return next(iter(self.weights))
        return " + ".join(f"{w:g}·{m}" for m, w in self.weights.items())


@dataclass(frozen=True)
class SchedulerSpec:
    type: str = "asha"
    grace_period: int = 1  # tasks every trial completes before it can be stopped
    reduction_factor: float = 2.0


@dataclass(frozen=True)
class SearchSpec:
    type: str = "random"
    metrics: tuple[str, ...] = ()  # optuna multi-objective
    modes: tuple[str, ...] = ()
    seed: int = 0

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1


@dataclass(frozen=True)
class SweepSpec:
    name: str
    base: str | None
    overrides: tuple[str, ...]
    space: tuple[Param, ...]
    objective: Objective
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    search: SearchSpec = field(default_factory=SearchSpec)
    num_samples: int = 6
    max_concurrent: int = 2
    trial_cpus: float = 0.0
    trial_memory_gb: float = 1.0
    storage: str = "artifacts"
    source: str = ""

    def base_config(self, extra: list[str] | None = None) -> Config:
        return load_config(self.base, [*self.overrides, *(extra or [])])

    def trial_overrides(self, params: dict) -> list[str]:
        """The overrides of one trial: the fixed ones, the thread split, the sampled values."""
        return [*self.overrides, *self.thread_overrides(), *(f"{k}={json.dumps(v)}" for k, v in params.items())]

    def thread_overrides(self) -> list[str]:
        """Concurrent trials share the node's cores: unless the sweep sets it, every trial's workers
        use cores / max_concurrent torch threads (not all cores each, which oversubscribes the
        CPU). Part of the trial's config, so the best preset reproduces the trial exactly."""
        import os

        if any(o.startswith("scaling.threads_per_worker=") for o in self.overrides) or self.max_concurrent <= 1:
            return []
        return [f"scaling.threads_per_worker={max(1, (os.cpu_count() or 1) // self.max_concurrent)}"]

    def config_for(self, params: dict, extra: list[str] | None = None) -> Config:
        return load_config(self.base, [*self.trial_overrides(params), *(extra or [])])

    def n_tasks(self) -> int:
        """Tasks in the swept stream (the scheduler's time budget)."""
        from mllmcl.data.streams import get_stream_spec

        cfg = self.base_config()
        return len(cfg.data.tasks or ()) or len(get_stream_spec(cfg.data.stream).tasks)

    def sweep_root(self) -> str:
        from mllmcl.storage import join

        return join(self.storage, "sweeps", self.name)

    @property
    def reported_metrics(self) -> tuple[str, ...]:
        return STREAM_METRICS + self.objective_extra

    @property
    def objective_extra(self) -> tuple[str, ...]:
        from mllmcl.methods import get_method

        try:
            method = self.base_config().method.name
        except ConfigError:
            return ()
        return ROUTED_METRICS if getattr(get_method(method), "routed", False) else ()


def _resolve_base(base: Any, source: Path | None) -> str | None:
    if base is None:
        return None
    for root in ([source.parent] if source else []) + [Path.cwd(), REPO]:
        p = (root / str(base)).resolve()
        if p.exists():
            return str(p)
    return str(base)  # load_config reports it missing


def parse_spec(data: Any, source: Path | None = None, overrides: list[str] | None = None) -> SweepSpec:
    """Build and validate a spec; every problem is reported at once (ConfigError)."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError([f"{source or 'sweep'}: expected a mapping at the top level"])
    known = {"name", "base", "overrides", "space", "objective", "scheduler", "search", "num_samples",
             "max_concurrent", "trial_resources", "storage"}
    problems += [f"{k}: unknown key in the sweep file (expected one of {sorted(known)})" for k in data
                 if k not in known]
    name = str(data.get("name") or (source.stem if source else "sweep"))
    base = _resolve_base(data.get("base"), source)
    fixed = data.get("overrides") or []
    if not isinstance(fixed, list) or not all(isinstance(o, str) for o in fixed):
        problems.append("overrides: expected a list of key=value strings")
        fixed = []
    fixed = [*fixed, *(overrides or [])]

    space: list[Param] = []
    raw_space = data.get("space")
    if not isinstance(raw_space, dict) or not raw_space:
        problems.append("space: the search space is empty (give at least one dotted key with a distribution)")
        raw_space = {}
    for key, dist in raw_space.items():
        if not isinstance(dist, dict) or len(dist) != 1:
            problems.append(f"space.{key}: expected one distribution, e.g. {{loguniform: [1e-4, 1e-2]}}")
            continue
        kind, values = next(iter(dist.items()))
        if kind not in DISTRIBUTIONS:
            problems.append(f"space.{key}: unknown distribution {kind!r} (expected one of {list(DISTRIBUTIONS)})")
            continue
        if not isinstance(values, list) or not values:
            problems.append(f"space.{key}.{kind}: expected a non-empty list")
            continue
        if kind in ("loguniform", "uniform", "randint"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                problems.append(f"space.{key}.{kind}: expected [low, high] numbers, got {values}")
                continue
            if values[0] >= values[1] if kind != "randint" else values[0] > values[1]:
                problems.append(f"space.{key}.{kind}: low {values[0]} must be below high {values[1]}")
                continue
            if kind == "loguniform" and values[0] <= 0:
                problems.append(f"space.{key}.loguniform: bounds must be > 0, got {values}")
                continue
        space.append(Param(str(key), kind, tuple(values)))

    obj = data.get("objective") or {}
    weights: dict[str, float] = {}
    if isinstance(obj, dict) and "metric" in obj:
        weights = {str(obj["metric"]): 1.0}
    elif isinstance(obj, dict) and isinstance(obj.get("metrics"), dict) and obj["metrics"]:
        weights = {str(k): float(v) for k, v in obj["metrics"].items()}
    else:
        problems.append("objective: expected {metric: MAA, mode: max} or {metrics: {MAA: 1.0, BWT: 0.5}, mode: max}")
    mode = str(obj.get("mode", "max")) if isinstance(obj, dict) else "max"
    if mode not in ("max", "min"):
        problems.append(f"objective.mode={mode!r}: expected max or min")
    objective = Objective(weights, mode)

    sched = data.get("scheduler") or {}
    scheduler = SchedulerSpec(type=str(sched.get("type", "asha")), grace_period=int(sched.get("grace_period", 1)),
                              reduction_factor=float(sched.get("reduction_factor", 2.0)))
    if scheduler.type not in SCHEDULERS:
        problems.append(f"scheduler.type={scheduler.type!r}: expected one of {list(SCHEDULERS)}")
    if scheduler.grace_period < 1 or scheduler.reduction_factor <= 1:
        problems.append("scheduler: grace_period must be >= 1 task and reduction_factor > 1")

    srch = data.get("search") or {}
    search = SearchSpec(type=str(srch.get("type", "random")), metrics=tuple(srch.get("metrics") or ()),
                        modes=tuple(srch.get("modes") or ()), seed=int(srch.get("seed", 0)))
    if search.type not in SEARCHERS:
        problems.append(f"search.type={search.type!r}: expected one of {list(SEARCHERS)}")
    if search.metrics and len(search.modes) != len(search.metrics):
        problems.append("search: give one mode (max/min) per metric")
    if search.multi_objective and search.type != "optuna":
        problems.append("search: several metrics (multi-objective) need search.type=optuna")
    if search.multi_objective and scheduler.type == "asha":
        problems.append("search: a multi-objective search has no single metric for ASHA; use scheduler.type=fifo")
    if search.type == "optuna" and any(p.kind == "grid" for p in space):
        problems.append("space: grid is not supported with search.type=optuna (use choice)")

    # paths are anchored here, in the caller's working directory: trials run in folders of their own
    store = str(data.get("storage", "artifacts"))
    problems += output_location_problems({"storage": store})
    store = absolute(store)
    try:
        given = load_config(base, fixed, resolve=False)
        fixed += [f"{k}={absolute(v)}" for k, v in local_paths(given).items() if k != "storage.root" and is_relative(v)]
    except ConfigError:
        pass  # reported below, with the base config's other problems

    resources = data.get("trial_resources") or {}
    spec = SweepSpec(name=name, base=base, overrides=tuple(fixed), space=tuple(space), objective=objective,
                     scheduler=scheduler, search=search, num_samples=int(data.get("num_samples", 6)),
                     max_concurrent=int(data.get("max_concurrent", 2)),
                     trial_cpus=float(resources.get("cpus", 0.0)),
                     trial_memory_gb=float(resources.get("memory_gb", 1.0)),
                     storage=store, source=str(source or ""))
    if spec.num_samples < 1 or spec.max_concurrent < 1:
        problems.append("num_samples and max_concurrent must be >= 1")

    # the base config and every value of the space must make a valid config
    try:
        base_cfg = spec.base_config()
    except ConfigError as e:
        problems += [f"base/overrides: {p}" for p in e.problems]
        base_cfg = None
    if base_cfg is not None:
        for p in space:
            for v in p.probes():
                try:
                    spec.config_for({p.key: v})
                except ConfigError as e:
                    problems += [f"space.{p.key}={v!r}: {q}" for q in e.problems]
                    break
        reported = spec.reported_metrics
        for m in [*weights, *search.metrics]:
            if m not in reported:
                problems.append(f"objective metric {m!r}: the stream does not report it for method "
                                f"{base_cfg.method.name!r} (reported: {list(reported)})")
        n_tasks = spec.n_tasks()
        if scheduler.type == "asha" and scheduler.grace_period > n_tasks:
            problems.append(f"scheduler.grace_period={scheduler.grace_period} exceeds the stream's {n_tasks} tasks")
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    return spec


def load_spec(path: str | Path, overrides: list[str] | None = None, **settings) -> SweepSpec:
    """Read a sweep file; ``overrides`` are dotted config overrides for every trial, ``settings``
    replace top-level sweep keys (num_samples, max_concurrent, storage, name)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError([f"{path}: sweep file not found"])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML: {e}"]) from None
    if isinstance(data, dict):
        data.update({k: v for k, v in settings.items() if v is not None})
    return parse_spec(data, path, overrides)


def best_preset(spec: SweepSpec, params: dict, header: str) -> str:
    """A ready-to-run YAML preset: the base preset with the sweep's fixed overrides and the best values."""
    from mllmcl.config import apply_overrides

    data = load_yaml(spec.base) if spec.base else {}
    problems: list[str] = []
    data = apply_overrides(data, spec.trial_overrides(params), problems)
    if problems:
        raise ConfigError(problems)
    run = data.get("run") or {}
    run.pop("id", None)  # a new run id per use
    if run:
        data["run"] = run
    else:
        data.pop("run", None)
    body = yaml.safe_dump(data, sort_keys=False)
    return "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + body
