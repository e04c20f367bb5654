"""The router zoo on one run's experts: a finished MR-LoRA run routed again by other routers.

MR-LoRA's experts are trained from the frozen base on their own task, so they are the same
whichever router a run uses. ``reroute(run, router)`` makes a sibling run,
``<run id>-<router>``, under the same storage root, with the run's config and
``method.router=<router>``; it starts with the run's experts, their fit records and the
prediction cache copied in (an adapter already written is reused, as on resume), so only
the new router is fitted and only answers of experts the old router never asked are
generated. The sibling is an ordinary run: its manifest, metrics, report and service.
"""

from __future__ import annotations

import logging

import yaml

from mllmcl import storage
from mllmcl.config import config_from_dict
from mllmcl.errors import ConfigError
from mllmcl.paths import absolute
from mllmcl.runner.stream import StreamResult, run_stream
from mllmcl.storage.layout import RunLayout

log = logging.getLogger(__name__)


def _copy(src: str, dst: str) -> int:
    """Every file under ``src`` to the same place under ``dst`` (local or s3://); files copied."""
    if not storage.exists(src):
        return 0
    if not storage.is_dir(src):
        storage.write_bytes(dst, storage.read_bytes(src))
        return 1
    return sum(_copy(storage.join(src, name), storage.join(dst, name)) for name in storage.list_dir(src))


def reroute(run: str, router: str, overrides: list[str] | None = None) -> StreamResult:
    """Route the finished MR-LoRA run at ``run`` (a folder or s3:// prefix) with ``router``."""
    run_dir = absolute(str(run)).rstrip("/")
    manifest_uri, config_uri = storage.join(run_dir, "manifest.json"), storage.join(run_dir, "config.yaml")
    if not storage.exists(manifest_uri) or not storage.exists(config_uri):
        raise ConfigError([f"{run_dir}: no manifest.json and config.yaml (not a run folder)"])
    manifest = storage.read_json(manifest_uri)
    stored = yaml.safe_load(storage.read_text(config_uri))["config"]
    problems = []
    if manifest.get("method") != "mr_lora":
        problems.append(f"{run_dir}: a {manifest.get('method')!r} run; only MR-LoRA's experts can be re-routed")
    if manifest.get("status") != "complete":
        problems.append(f"{run_dir}: the run is not complete (finish it first: the same command resumes it)")
    if problems:
        raise ConfigError(problems)
    source = manifest["run_id"]
    root = run_dir.rsplit("/runs/", 1)[0]  # where the run is now (it may have moved since it ran)
    stored["run"] = {**stored.get("run", {}), "id": f"{source}-{router}"}
    stored["method"] = {**stored["method"], "router": router}
    stored["storage"] = {**stored.get("storage", {}), "root": root}
    cfg = config_from_dict(stored, list(overrides or []))
    src, dst = RunLayout(root, source), RunLayout(cfg.storage.root, cfg.run.id)
    copied = 0
    for k, task in enumerate(manifest["tasks"]):
        copied += _copy(src.expert_dir(k, task), dst.expert_dir(k, task))
        copied += _copy(src.path("fits", f"{k}_expert_0.json"), dst.path("fits", f"{k}_expert_0.json"))
    copied += _copy(src.path("eval", "cache"), dst.path("eval", "cache"))
    log.info("re-routing %s (%s's experts) with the %s router: %d files copied to %s", source, manifest["method"],
             router, copied, dst.run_dir)
    return run_stream(cfg, cfg.run.id)
