"""What identifies a run, and whether a config may resume it."""

from __future__ import annotations

import yaml

from mllmcl import storage
from mllmcl.config import Config
from mllmcl.errors import ConfigError
from mllmcl.paths import SYNTHETIC_DATA, TINY_MODEL, absolute
from mllmcl.provenance import config_hash
from mllmcl.settings import RESUMABLE_CHANGES
from mllmcl.settings import flatten as _flatten
from mllmcl.storage.layout import RunLayout
from mllmcl.storage.manifest import Manifest


def identity(cfg: Config) -> dict:
    """The part of the config that defines what the run computes."""
    return {k: v for k, v in _flatten(cfg.to_dict()).items() if not k.startswith(RESUMABLE_CHANGES)}


def check_resume(manifest: Manifest, cfg: Config, layout: RunLayout) -> None:
    """Refuse to continue a run with settings that change its results (naming each difference)."""
    if manifest.config_hash == config_hash(identity(cfg)):
        return
    old = yaml.safe_load(storage.read_text(layout.config))["config"] if storage.exists(layout.config) else {}
    before, now = _flatten(old), identity(cfg)
    if before:  # a setting added to the platform after the run was made: the run had its default behaviour
        defaults = identity(Config())
        before.update({k: defaults[k] for k in now if k not in before and k in defaults})
        # runs made before paths were resolved at the boundary stored them as given (relative to here)
        for key, keep in (("data.root", SYNTHETIC_DATA), ("model.path", TINY_MODEL)):
            if isinstance(before.get(key), str) and before[key] != keep:
                before[key] = absolute(before[key])
        # runs made before each method owned its options stored every method's options; the
        # others' never applied to this run
        for key in [k for k in before if k.startswith("method.") and k not in now]:
            del before[key]
    diff = [f"{k}: run has {before.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(before) | set(now))
            if not k.startswith(RESUMABLE_CHANGES) and before.get(k) != now.get(k)]
    if not diff:
        return
    raise ConfigError([f"run {manifest.run_id!r} exists with a different config; use a new run.id or the same "
                       f"settings"] + diff)
