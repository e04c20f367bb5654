"""Driver side of one fine-tuning job: a Ray Train ``TorchTrainer`` over N workers
(``scaling.backend=ray``), or the same per-worker loop in this process (``local``)."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass

from mllmcl.settings import ScalingConfig
from mllmcl.training.request import FitConfig, TrainRequest

log = logging.getLogger(__name__)

INJECT_ENV = "MLLMCL_INJECT_WORKER_FAILURE"  # "<task>:<step>:<rank>" (tests only)


@dataclass
class TrainOutcome:
    output_uri: str
    steps: int
    final_loss: float | None
    seconds: float  # the whole fit, as the driver waited for it
    loop_seconds: float | None = None  # the training steps alone (the rest: start-up, loading, saving)


def _storage(uri: str):
    """(storage_path, storage_filesystem) for Ray Train's RunConfig."""
    from mllmcl import storage

    if uri.startswith("s3://"):
        fs, path = storage.filesystem_for(uri)
        return path, fs
    return os.path.abspath(uri), None


def _inject_failure(request: TrainRequest) -> dict | None:
    spec = os.environ.get(INJECT_ENV)
    if not spec:
        return None
    task, step, rank = spec.split(":")
    if task != request.task or request.kind == "router":
        return None
    marker = os.path.join(tempfile.gettempdir(), f"mllmcl-injected-{os.getpid()}-{task}-{step}-{rank}")
    return {"step": int(step), "rank": int(rank), "marker": marker}


def fit_config(request: TrainRequest, model_path: str, scaling: ScalingConfig, *, dtype: str = "float32",
               mixed_precision: str = "auto", gradient_checkpointing: bool = False,
               history_uri: str = "") -> FitConfig:
    return FitConfig(request=request, model_path=model_path, dtype=dtype, threads=scaling.threads_per_worker,
                     mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
                     checkpoint_every=scaling.checkpoint_every,
                     strategy=scaling.strategy, zero_stage=scaling.zero_stage, offload=scaling.offload,
                     inject_failure=_inject_failure(request), history_uri=history_uri)


def run_training(request: TrainRequest, model_path: str, checkpoints_uri: str, *, scaling: ScalingConfig,
                 dtype: str = "float32", mixed_precision: str = "auto",
                 gradient_checkpointing: bool = False, history_uri: str = "") -> TrainOutcome:
    """Fine-tune one adapter with ``scaling``'s workers (Ray Train, or this process with
    ``backend=local``); checkpoints go under ``checkpoints_uri``; resumes a half-done fit;
    ``history_uri``: where the per-step loss, learning rate and samples/s are written."""
    fit = fit_config(request, model_path, scaling, dtype=dtype, mixed_precision=mixed_precision,
                     gradient_checkpointing=gradient_checkpointing, history_uri=history_uri)
    if scaling.backend == "local":
        return run_local_training(fit, checkpoints_uri)
    return run_ray_training(fit, scaling, checkpoints_uri)


def run_local_training(fit: FitConfig, checkpoints_uri: str) -> TrainOutcome:
    import dataclasses

    import torch

    from mllmcl.training.worker import LocalSession, train_adapter

    session = LocalSession(checkpoints_uri)
    if fit.inject_failure:  # in the driver's process: raise, do not exit
        fit = dataclasses.replace(fit, inject_failure={**fit.inject_failure, "raise": True})
    t0 = time.time()
    threads = torch.get_num_threads()
    try:
        train_adapter(fit, session)
    finally:
        torch.set_num_threads(threads)  # the loop sets the thread count; leave the caller's process as it was
    metrics = session.last_metrics
    return TrainOutcome(output_uri=fit.request.output_uri, steps=int(metrics.get("steps", 0)),
                        final_loss=metrics.get("loss"), seconds=time.time() - t0, loop_seconds=metrics.get("seconds"))


def run_ray_training(fit: FitConfig, sc: ScalingConfig, checkpoints_uri: str) -> TrainOutcome:
    """A Ray Train ``TorchTrainer``; a failed worker group restarts from the last checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from mllmcl.cluster import forwarded_env
    from mllmcl.training.worker import train_worker

    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker or 1.0
    storage_path, fs = _storage(checkpoints_uri.rsplit("/", 1)[0])
    name = checkpoints_uri.rstrip("/").rsplit("/", 1)[-1]
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"fit": fit},
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=sc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             # Ray Train's own INFO lines (worker group started, every checkpoint and
                             # report) stay in Ray's log files; its warnings and errors reach the terminal
                             logging_config=LoggingConfig(log_level=os.environ.get("MLLMCL_RAY_TRAIN_LOG_LEVEL",
                                                                                   "WARNING")),
                             worker_runtime_env={"env_vars": forwarded_env()}),
    )
    t0 = time.time()
    result = trainer.fit()
    metrics = result.metrics or {}
    return TrainOutcome(output_uri=fit.request.output_uri, steps=int(metrics.get("steps", 0)),
                        final_loss=metrics.get("loss"), seconds=time.time() - t0, loop_seconds=metrics.get("seconds"))
