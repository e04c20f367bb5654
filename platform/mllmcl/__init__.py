"""mllmcl: continual learning of multimodal LLMs on Ray.

The public surface, for notebooks and the jobs in ``jobs/``::

    import mllmcl

    cfg = mllmcl.load_config("jobs/configs/dcl/mr_lora_tiny.yaml", ["train.epochs=2"])
    result = mllmcl.run_stream(cfg, "dcl-demo")        # or resume it: same call, same id
    run = mllmcl.load_run(result.run_dir)              # config, manifest, matrix, metrics, predictions
    print(mllmcl.compare_runs([result.run_dir, "artifacts/runs/dcl-lora_ft"]))

- configs: :class:`Config` and its sections, :func:`load_config`, the method registry
  (:func:`registered_methods`) and the router registry (:func:`registered_routers`);
- running: :func:`run_stream` -> :class:`StreamResult`;
- results: :func:`load_run` -> :class:`RunRecord`, :func:`compare_runs`, :class:`AccuracyMatrix`;
- sweeps: :func:`load_spec`, :func:`run_sweep` (Ray Tune over whole streams);
- serving: :func:`load_served_run` (``jobs/serve.py`` deploys it), :func:`evaluate_run` (batch
  evaluation of new data through a run's router and experts).

Everything else lives in the subpackages, layered (``pyproject.toml``'s import-linter
contract): ``runner`` / ``serving`` > ``config`` > ``methods`` > ``routing`` > ``engine`` /
``training`` > ``evaluation`` / ``models`` > ``settings`` > ``data`` > ``storage``. The names
below load on first use, so ``import mllmcl`` stays cheap.
"""

import os as _os
import warnings as _warnings

# Nothing is ever fetched from a model hub at run time: a hub id must fail fast.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Terminals show the stream's progress, not a weight-loading bar per process and fit
# (HF_HUB_DISABLE_PROGRESS_BARS=0 brings them back).
_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# PEFT 0.21 reads an attribute that transformers 5.24 deprecated, on every LoRA it wraps:
# one FutureWarning per fit and worker about library internals, nothing a user can act on.
# Only this exact message is silenced.
_warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

__version__ = "0.1.0"

_PUBLIC = {
    "Config": "mllmcl.config", "load_config": "mllmcl.config",
    "DataConfig": "mllmcl.settings", "ModelConfig": "mllmcl.settings", "LoraConfig": "mllmcl.settings",
    "TrainConfig": "mllmcl.settings", "EvalConfig": "mllmcl.settings", "ScalingConfig": "mllmcl.settings",
    "StorageConfig": "mllmcl.settings", "RunSection": "mllmcl.settings",
    "MethodOptions": "mllmcl.methods.base", "registered_methods": "mllmcl.methods",
    "registered_routers": "mllmcl.routing",
    "run_stream": "mllmcl.runner.stream", "StreamResult": "mllmcl.runner.stream",
    "load_run": "mllmcl.evaluation.runs", "RunRecord": "mllmcl.evaluation.runs",
    "compare_runs": "mllmcl.evaluation.compare", "AccuracyMatrix": "mllmcl.evaluation.metrics",
    "load_served_run": "mllmcl.serving.run", "evaluate_run": "mllmcl.serving.evaluate",
    "load_spec": "mllmcl.tuning.spec", "run_sweep": "mllmcl.tuning.tune_run",
    "ConfigError": "mllmcl.errors", "DataError": "mllmcl.errors", "MllmclError": "mllmcl.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mllmcl' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
