"""The run's configuration: the typed sections of :mod:`mllmcl.settings` and the CL method's
own options (a typed dataclass registered with the method), from YAML presets and dotted
overrides.

Every problem in a config (unknown keys, wrong types, bad values, of every section and of
the method's options) is collected and reported at once in a
:class:`~mllmcl.errors.ConfigError`, before anything starts.

    cfg = load_config("jobs/configs/dcl/mr_lora_tiny.yaml", ["train.lr=1e-3", "run.id=demo"])

The method section is flat in YAML (``method: {name: mr_lora, router_epochs: 30}``); its keys
besides ``name`` are the options of that method. An option of another registered method
(a budget shared by a sweep over ``method.name``) is ignored with a warning; a key no method
has is an error.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from mllmcl.errors import ConfigError
from mllmcl.methods import get_method, method_options, registered_methods
from mllmcl.methods.base import MethodOptions
from mllmcl.paths import SYNTHETIC_DATA, TINY_MODEL, absolute, is_uri
from mllmcl.settings import (DataConfig, EvalConfig, LoraConfig, LoraSettings, ModelConfig, RunSection,  # noqa: F401
                             ScalingConfig, StorageConfig, TrackingConfig, TrainConfig, TrainSettings, _build,
                             _to_plain, apply_overrides, build_dataclass, load_yaml, parse_override)

__all__ = ["Config", "DataConfig", "EvalConfig", "LoraConfig", "LoraSettings", "ModelConfig", "RunSection",
           "ScalingConfig", "StorageConfig", "TrackingConfig", "TrainConfig", "TrainSettings", "absolute_paths",
           "apply_overrides",
           "build_dataclass", "config_from_dict", "known_methods", "load_config", "load_yaml", "local_paths",
           "parse_override"]

log = logging.getLogger(__name__)

DEFAULT_METHOD = "mr_lora"


def default_method() -> MethodOptions:
    return method_options(DEFAULT_METHOD)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    method: MethodOptions = field(default_factory=default_method)  # the method's own options class
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    run: RunSection = field(default_factory=RunSection)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def check(self) -> list[str]:
        out: list[str] = []
        for f in fields(self):
            out += getattr(self, f.name).check()
        if self.train.epochs_per_task:
            from mllmcl.data.streams import get_stream_spec

            try:
                n = len(self.data.tasks) or len(get_stream_spec(self.data.stream).task_names)
            except KeyError:
                n = None  # the stream name is reported by data.check
            if n is not None and len(self.train.epochs_per_task) != n:
                out.append(f"train.epochs_per_task has {len(self.train.epochs_per_task)} values for {n} tasks "
                           f"(one per task of the stream, in order)")
        return out + self.method.check_with(self)

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def known_methods() -> set[str]:
    """Method names a config may use (the methods' registry)."""
    return set(registered_methods())


# --------------------------------------------------------------------------- building

def _method_section(data, problems: list[str]) -> MethodOptions | None:
    """The method's options from the ``method`` mapping; None when its name is unknown (reported)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"method: expected a mapping, got {type(data).__name__}")
        return None
    name = data.get("name", DEFAULT_METHOD)
    if name not in registered_methods():
        problems.append(f"method.name={name!r}: unknown method, expected one of {registered_methods()}")
        return None
    own = {f.name for f in fields(get_method(name).Options)}
    owners: dict[str, str] = {}  # option -> the first other method that has it
    for m in registered_methods():
        for f in fields(get_method(m).Options):
            owners.setdefault(f.name, m)
    foreign = sorted(k for k in data if k not in own and k in owners)
    unknown = sorted(k for k in data if k not in own and k not in owners)
    for k in unknown:
        problems.append(f"method.{k}: unknown option of method {name!r} (its options: "
                        f"{', '.join(sorted(own - {'name'})) or 'none'})")
    if foreign:  # still checked by their own method (a bad value is a mistake wherever it is given)
        for owner in sorted({owners[k] for k in foreign}):
            given = {k: data[k] for k in foreign if owners[k] == owner}
            problems += _build(get_method(owner).Options, given | {"name": owner}, "method", problems).check()
        log.warning("method %s ignores %s", name, ", ".join(f"method.{k} (an option of {owners[k]})" for k in foreign))
    return _build(get_method(name).Options, {k: v for k, v in data.items() if k in own} | {"name": name},
                  "method", problems)


def config_from_dict(data: dict, overrides: list[str] | None = None) -> Config:
    problems: list[str] = []
    data = apply_overrides(data or {}, list(overrides or []), problems)
    method = data.pop("method", None) if isinstance(data, dict) else None
    cfg = _build(Config, data, "", problems)
    options = _method_section(method, problems)
    if options is not None:
        cfg = dataclasses.replace(cfg, method=options)
        problems += cfg.check()
    else:  # the method's rules need its options: check the other sections only
        problems += [p for f in fields(cfg) if f.name != "method" for p in getattr(cfg, f.name).check()]
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                resolve: bool = True) -> Config:
    """Load a YAML preset (or the defaults) and apply dotted ``key=value`` overrides; with
    ``resolve`` (the default) local paths are made absolute against the working directory
    (:func:`absolute_paths`)."""
    data = load_yaml(path) if path else {}
    cfg = config_from_dict(data, overrides)
    return absolute_paths(cfg) if resolve else cfg


# --------------------------------------------------------------------------- paths

def local_paths(cfg: Config) -> dict[str, str]:
    """The config's local paths as given (dotted key -> value): what :func:`absolute_paths` anchors."""
    out = {"storage.root": cfg.storage.root}
    if cfg.data.root != SYNTHETIC_DATA:
        out["data.root"] = cfg.data.root
    if cfg.model.path != TINY_MODEL:
        out["model.path"] = cfg.model.path
    out["tracking.tensorboard_dir"] = cfg.tracking.tensorboard_dir
    if ":" not in cfg.tracking.mlflow_uri:  # a plain folder (MLflow's file store), not a URI
        out["tracking.mlflow_uri"] = cfg.tracking.mlflow_uri
    return {k: v for k, v in out.items() if v and not is_uri(v)}


def absolute_paths(cfg: Config, cwd: str | None = None) -> Config:
    """``cfg`` with every local path (storage root, data root, model path; plain, ``~`` or
    ``file://``) absolute against ``cwd`` (default: the working directory). Ray workers,
    actors, replicas and trials run elsewhere: they must never see a relative path."""
    paths = {k: absolute(v, cwd) for k, v in local_paths(cfg).items()}
    if not paths:
        return cfg
    return dataclasses.replace(
        cfg, storage=dataclasses.replace(cfg.storage, root=paths.get("storage.root", cfg.storage.root)),
        data=dataclasses.replace(cfg.data, root=paths.get("data.root", cfg.data.root)),
        model=dataclasses.replace(cfg.model, path=paths.get("model.path", cfg.model.path)),
        tracking=dataclasses.replace(cfg.tracking,
                                     tensorboard_dir=paths.get("tracking.tensorboard_dir", cfg.tracking.tensorboard_dir),
                                     mlflow_uri=paths.get("tracking.mlflow_uri", cfg.tracking.mlflow_uri)))
