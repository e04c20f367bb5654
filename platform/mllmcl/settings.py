"""Typed settings: frozen dataclasses, YAML, dotted overrides (the bottom of the config stack).

The sections of a run's configuration (data, model, LoRA, training, evaluation, scaling,
storage, run), the fine-tuning settings of one fit (:class:`LoraSettings`,
:class:`TrainSettings`) and the machinery that builds any typed dataclass from a mapping
and ``key=value`` overrides, reporting every problem at once in a
:class:`~mllmcl.errors.ConfigError`. The run's whole config, with the method's own options,
is :class:`mllmcl.config.Config`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from mllmcl.errors import ConfigError

# every linear layer of a Llama-style language model; the vision tower, the
# projector and lm_head are never wrapped.
LANGUAGE_MODEL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------- one fit

@dataclass(frozen=True)
class LoraSettings:
    """One LoRA adapter's shape (``mllmcl.models.lora.peft_config`` makes PEFT's config of it)."""

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LANGUAGE_MODEL_LINEARS
    train_projector: bool = False  # also train a copy of the vision projector, saved in the adapter (as MR-LoRA)


@dataclass(frozen=True)
class TrainSettings:
    """The optimisation of one fit."""

    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 16  # the effective (global) batch
    lr: float = 2e-3
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    grad_accum: int = 1

    def num_steps(self, n_samples: int) -> int:
        per_epoch = math.ceil(n_samples / self.batch_size)
        steps = max(1, int(round(self.epochs * per_epoch)))
        return min(steps, self.max_steps) if self.max_steps else steps

    def steps_per_epoch(self, n_samples: int) -> int:
        return math.ceil(n_samples / self.batch_size)


# --------------------------------------------------------------------------- sections

@dataclass(frozen=True)
class DataConfig:
    """Where the stream's data lives. ``root: synthetic`` builds the offline twin."""

    stream: str = "dcl"
    root: str = "synthetic"
    tasks: tuple[str, ...] = ()  # empty = the stream's full order
    order: str | tuple[str, ...] = "paper"  # paper | reverse | random:<seed> | a permutation of the tasks
    verify_images: str = "exists"  # none | exists | decode
    checksum_images: bool = False  # data_release.json: hash every image's bytes (default: names + sizes)
    limit: int = 0  # cap samples per split (0 = all); for smoke tests
    synthetic_train: int = 1000
    synthetic_test: int = 200
    synthetic_image_size: int = 64
    synthetic_seed: int = 0

    def task_names_in_stream(self) -> list[str]:
        """The tasks ``data.tasks`` selects (all of the stream's), before ``data.order``."""
        from mllmcl.data.streams import STREAMS

        return list(self.tasks) or STREAMS[self.stream].task_names

    def task_names(self) -> list[str]:
        """The stream's tasks as the run meets them: ``data.tasks`` in ``data.order``."""
        from mllmcl.data.streams import ordered

        return ordered(self.task_names_in_stream(), self.order)

    def check(self) -> list[str]:
        from mllmcl.data.streams import STREAMS

        p = []
        if self.stream not in STREAMS:
            p.append(f"data.stream={self.stream!r}: unknown stream, expected one of {sorted(STREAMS)}")
        else:
            from mllmcl.data.streams import order_problems

            bad = [t for t in self.tasks if t not in STREAMS[self.stream].task_names]
            if bad:
                p.append(f"data.tasks: unknown task(s) {bad} for stream {self.stream!r}, "
                         f"expected names from {STREAMS[self.stream].task_names}")
            else:
                p += order_problems(self.task_names_in_stream(), self.order)
        if self.verify_images not in ("none", "exists", "decode"):
            p.append(f"data.verify_images={self.verify_images!r}: expected one of none, exists, decode")
        for k in ("limit", "synthetic_train", "synthetic_test"):
            if getattr(self, k) < 0:
                p.append(f"data.{k}={getattr(self, k)}: must be >= 0")
        return p


@dataclass(frozen=True)
class ModelConfig:
    """``path: tiny`` = the tiny preset built offline; else a local folder or s3:// prefix."""

    path: str = "tiny"
    dtype: str = "float32"

    def check(self) -> list[str]:
        p = []
        if self.dtype not in ("float32", "bfloat16", "float16"):
            p.append(f"model.dtype={self.dtype!r}: expected float32, bfloat16 or float16")
        if not self.path:
            p.append("model.path: must not be empty")
        return p


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    train_projector: bool = False  # each adapter also trains (and stores) its own copy of the vision projector

    def check(self) -> list[str]:
        p = []
        if self.rank < 1:
            p.append(f"lora.rank={self.rank}: must be >= 1")
        if self.alpha <= 0:
            p.append(f"lora.alpha={self.alpha}: must be > 0")
        if not 0 <= self.dropout < 1:
            p.append(f"lora.dropout={self.dropout}: must be in [0, 1)")
        if not self.target_modules:
            p.append("lora.target_modules: must name at least one module")
        return p

    def settings(self) -> LoraSettings:
        return LoraSettings(self.rank, self.alpha, self.dropout, tuple(self.target_modules), self.train_projector)


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 8.0
    epochs_per_task: tuple[float, ...] = ()  # one per task of the stream, in order (overrides epochs)
    max_steps: int = 0  # 0 = no cap
    batch_size: int = 16  # effective (global) batch: split over workers and accumulation steps
    grad_accum: int = 1
    mixed_precision: str = "auto"  # auto (bf16 on GPU) | bf16 | fp16 | no
    # recompute each layer's activations in the backward pass: activation memory of one layer instead
    # of all, for about a third more compute (jobs/plan.py shows both); the same adapters
    gradient_checkpointing: bool = False
    lr: float = 2e-3
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def check(self) -> list[str]:
        p = []
        if self.epochs <= 0:
            p.append(f"train.epochs={self.epochs}: must be > 0")
        if any(e <= 0 for e in self.epochs_per_task):
            p.append(f"train.epochs_per_task={list(self.epochs_per_task)}: every value must be > 0")
        if self.max_steps < 0:
            p.append(f"train.max_steps={self.max_steps}: must be >= 0")
        if self.batch_size < 1:
            p.append(f"train.batch_size={self.batch_size}: must be >= 1")
        if not 0 < self.lr < 1:
            p.append(f"train.lr={self.lr}: must be in (0, 1)")
        if not 0 <= self.warmup_ratio < 1:
            p.append(f"train.warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
        if self.grad_accum < 1:
            p.append(f"train.grad_accum={self.grad_accum}: must be >= 1")
        if self.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            p.append(f"train.mixed_precision={self.mixed_precision!r}: expected auto, bf16, fp16 or no")
        return p

    def settings(self, seed: int, stage: int | None = None) -> TrainSettings:
        """The fine-tuning settings; ``stage`` picks its entry of ``epochs_per_task``."""
        epochs = self.epochs_per_task[stage] if self.epochs_per_task and stage is not None else self.epochs
        return TrainSettings(epochs=epochs, max_steps=self.max_steps or None, batch_size=self.batch_size,
                             lr=self.lr, warmup_ratio=self.warmup_ratio, weight_decay=self.weight_decay,
                             grad_clip=self.grad_clip, seed=seed, grad_accum=self.grad_accum)


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 100
    max_new_tokens: int = 0  # 0 = the task's own limit (BENCHMARK.md)
    cache_predictions: bool = True  # reuse an adapter's answers to a test sample at later stages
    # stage k also answers task k+1 (never trained on) and the base model answers every task once:
    # forward transfer (FWT) in the metrics; costs one more task's test set per stage
    forward_transfer: bool = True

    def check(self) -> list[str]:
        p = []
        if self.batch_size < 1:
            p.append(f"eval.batch_size={self.batch_size}: must be >= 1")
        if self.max_new_tokens < 0:
            p.append(f"eval.max_new_tokens={self.max_new_tokens}: must be >= 0")
        return p


@dataclass(frozen=True)
class ScalingConfig:
    """Ray Train workers for each task's fine-tuning, and the evaluation actor's resources."""

    backend: str = "ray"  # ray: Ray Train + an evaluation actor; local: everything in this process (debugging)
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # 0 = 1 when use_gpu
    threads_per_worker: int = 0  # torch threads; 0 = the node's cores / workers on the node
    eval_cpus: float = 0.0  # per evaluation replica
    eval_gpus: float = 0.0
    eval_replicas: int = 1  # evaluation actors sharing each stage's test questions (each holds the base once)
    max_concurrent_fits: int = 0  # run.schedule=concurrent: fits at once; 0 = as many as the cluster can place
    max_failures: int = 2  # a failed worker group restarts from the last checkpoint this often
    checkpoint_every: int = 0  # steps between checkpoints; 0 = once per epoch, at most 10 per fit
    strategy: str = "ddp"  # ddp | deepspeed (ZeRO; same loop, DeepSpeed's checkpoints)
    zero_stage: int = 2  # deepspeed: 1, 2 (optimizer state + gradients partitioned) or 3 (+ parameters)
    offload: str = "none"  # deepspeed: none | cpu (optimizer state, and parameters with stage 3, in host memory)

    def check(self) -> list[str]:
        p = []
        if self.backend not in ("ray", "local"):
            p.append(f"scaling.backend={self.backend!r}: expected ray or local")
        if self.num_workers < 1:
            p.append(f"scaling.num_workers={self.num_workers}: must be >= 1")
        elif self.backend == "local" and self.num_workers != 1:
            p.append(f"scaling.num_workers={self.num_workers}: the local backend runs one worker (use backend=ray)")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0 or self.eval_cpus < 0 or self.eval_gpus < 0:
            p.append("scaling: resources must be >= 0")
        if self.max_failures < 0:
            p.append(f"scaling.max_failures={self.max_failures}: must be >= 0")
        if self.eval_replicas < 1:
            p.append(f"scaling.eval_replicas={self.eval_replicas}: must be >= 1")
        elif self.backend == "local" and self.eval_replicas != 1:
            p.append(f"scaling.eval_replicas={self.eval_replicas}: the local backend evaluates in this process "
                     f"(use backend=ray)")
        if self.max_concurrent_fits < 0:
            p.append(f"scaling.max_concurrent_fits={self.max_concurrent_fits}: must be >= 0 (0 = as many as fit)")
        if self.checkpoint_every < 0:
            p.append(f"scaling.checkpoint_every={self.checkpoint_every}: must be >= 0")
        if self.strategy not in ("ddp", "deepspeed"):
            p.append(f"scaling.strategy={self.strategy!r}: expected ddp or deepspeed")
        elif self.strategy == "deepspeed":
            if self.backend != "ray":
                p.append("scaling.strategy=deepspeed runs on Ray Train workers: use scaling.backend=ray")
            if self.zero_stage not in (1, 2, 3):
                p.append(f"scaling.zero_stage={self.zero_stage}: expected 1, 2 or 3")
            if self.offload not in ("none", "cpu"):
                p.append(f"scaling.offload={self.offload!r}: expected none or cpu")
            import importlib.util

            if importlib.util.find_spec("deepspeed") is None:
                p.append("scaling.strategy=deepspeed needs DeepSpeed: DS_BUILD_OPS=0 pip install -e '.[deepspeed]'")
        return p


@dataclass(frozen=True)
class StorageConfig:
    root: str = "artifacts"

    def check(self) -> list[str]:
        if not self.root:
            return ["storage.root: must not be empty"]
        if "://" in self.root and not self.root.startswith(("s3://", "file://")):
            return [f"storage.root={self.root!r}: only local paths, file:// and s3:// are supported"]
        return []


@dataclass(frozen=True)
class RunSection:
    id: str = ""  # empty = a fresh id from the time and config hash
    seed: int = 0
    progress: bool = True
    # concurrent: independent fits at once, evaluation beside later fits; sequential: one thing at a
    # time in stream order (online arrival). Both give the same adapters and matrix.
    schedule: str = "concurrent"
    # the driver's lease on the run (storage/lease.py): renewed every third of it; a dead driver's is
    # taken over once this old (at once on the same host); 0 = no lease
    lease_seconds: float = 60.0

    def check(self) -> list[str]:
        p = []
        if self.lease_seconds < 0:
            p.append(f"run.lease_seconds={self.lease_seconds}: must be >= 0 (0 = no lease)")
        if self.id and not all(c.isalnum() or c in "-_." for c in self.id):
            p.append(f"run.id={self.id!r}: use letters, digits, '-', '_' or '.' only")
        if self.schedule not in ("concurrent", "sequential"):
            p.append(f"run.schedule={self.schedule!r}: expected concurrent or sequential")
        return p


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking (:mod:`mllmcl.tracking`): where a run's parameters, per-step training
    curves, accuracy rows, final metrics and report also go, besides its own folder. Off by
    default; changing it never changes what a run computes (a run may resume with other settings)."""

    mlflow_uri: str = ""  # an MLflow tracking URI: http(s)://server, sqlite:///file.db, a folder; "" = off
    experiment: str = ""  # the MLflow experiment / W&B project; "" = mllmcl-<stream>
    run_name: str = ""  # "" = the run id
    parent_run_id: str = ""  # nest this run under an MLflow run (a sweep's trials under the sweep)
    run_id: str = ""  # log into this existing MLflow run instead of creating one (a Tune trial's)
    tensorboard: bool = False  # TensorBoard event files in the run folder (tensorboard/)
    tensorboard_dir: str = ""  # ... or in this local folder (<dir>/<run id>)
    wandb: bool = False  # Weights & Biases, where its package is installed
    wandb_mode: str = "offline"  # offline (files under the run folder, `wandb sync` later) or online

    @property
    def enabled(self) -> bool:
        return bool(self.mlflow_uri or self.tensorboard or self.tensorboard_dir or self.wandb)

    def check(self) -> list[str]:
        p = []
        if self.wandb_mode not in ("offline", "online"):
            p.append(f"tracking.wandb_mode={self.wandb_mode!r}: expected offline or online")
        if (self.parent_run_id or self.run_id) and not self.mlflow_uri:
            p.append("tracking.parent_run_id / tracking.run_id name MLflow runs: set tracking.mlflow_uri too")
        if self.tensorboard_dir and "://" in self.tensorboard_dir:
            p.append(f"tracking.tensorboard_dir={self.tensorboard_dir!r}: a local folder (with an s3:// storage.root "
                     f"the run folder's tensorboard/ gets a copy after every stage)")
        return p


# --------------------------------------------------------------------------- building

def _to_plain(obj):
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, where: str, problems: list[str]):
    """Check ``value`` against the annotation ``tp``; return the converted value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            sub: list[str] = []
            out = _coerce(value, a, where, sub)
            if not sub:
                return out
        problems.append(f"{where}: expected {' | '.join(_type_name(a) for a in args)}, got {value!r}")
        return None
    if origin is tuple:
        (inner, *_rest) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            problems.append(f"{where}: expected a list, got {type(value).__name__} {value!r}")
            return ()
        return tuple(_coerce(v, inner, f"{where}[{i}]", problems) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{where}: expected true/false, got {value!r}")
        return False
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.append(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return 0
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return 0.0
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return ""
    return value


# settings that may change when a run is resumed (they do not change its results)
RESUMABLE_CHANGES = ("run.progress", "run.schedule", "scaling.", "train.gradient_checkpointing", "eval.batch_size",
                     "storage.root", "data.checksum_images", "tracking.", "run.lease_seconds")


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested config mapping as dotted keys (``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _build(cls, data: Any, where: str, problems: list[str]):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for key in data:
        if key not in names:
            problems.append(f"{where + '.' if where else ''}{key}: unknown key (allowed: {', '.join(sorted(names))})")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        sub_where = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name], sub_where, problems)
        else:
            sub: list[str] = []
            value = _coerce(data[f.name], tp, sub_where, sub)
            if sub:  # keep the default so value checks do not report the same field twice
                problems.extend(sub)
            else:
                kwargs[f.name] = value
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError([f"override {text!r}: expected key=value, e.g. train.lr=1e-4"])
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([f"override {text!r}: bad key {key!r}"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str], problems: list[str]) -> dict:
    data = _to_plain(data)
    for text in overrides:
        try:
            path, value = parse_override(text)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {} if part not in node else node[part]
                if not isinstance(node[part], dict):
                    problems.append(f"override {text!r}: {part} is not a section")
                    break
            node = node[part]
        else:
            node[path[-1]] = value
    return data


def build_dataclass(cls, data: dict | None, overrides: list[str] | None = None):
    """Any typed config dataclass (with an optional ``check() -> problems``) from a mapping and
    dotted overrides; every problem is reported at once in a :class:`ConfigError`."""
    problems: list[str] = []
    data = apply_overrides(data or {}, list(overrides or []), problems)
    obj = _build(cls, data, "", problems)
    if hasattr(obj, "check"):
        problems += obj.check()
    if problems:
        raise ConfigError(problems)
    return obj


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError([f"config file {str(path)!r} not found"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML ({e})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping at the top level, got {type(data).__name__}"])
    return data
