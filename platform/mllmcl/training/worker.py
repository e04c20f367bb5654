"""The per-worker fine-tuning loop: one rank of DDP fine-tuning one adapter, under Ray
Train (:class:`RayTrainSession`) or in the driver's process (:class:`LocalSession`).

Checkpoints (adapter weights, optimizer, scheduler, step, RNG) are reported every
``checkpoint_every`` steps (default: once per epoch, at most 10 per fit); a restarted worker group resumes
from the last one. Rank 0 writes the finished adapter to the run's storage.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from mllmcl import chaos
from mllmcl.errors import StorageError
from mllmcl.training.request import FitConfig

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
HISTORY_FILE = "history.json"  # the steps so far (loss, lr, samples/s), kept in every checkpoint
AUTO_CHECKPOINTS = 10
ADAPTER_WEIGHTS = "adapter.safetensors"


def _save_state(model, optimizer, scheduler, step: int, folder: str) -> None:
    from safetensors.torch import save_file

    from mllmcl.training.adapter_kinds import trainable_state

    save_file(trainable_state(model), os.path.join(folder, ADAPTER_WEIGHTS))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "rng": torch.get_rng_state()}, os.path.join(folder, STATE_FILE))


class UnreadableCheckpoint(RuntimeError):
    """A checkpoint file that cannot be read (truncated, corrupt): its name and why."""


def _read(folder: str, name: str, reader):
    try:
        return reader(os.path.join(folder, name))
    except Exception as e:  # noqa: BLE001 - any reader's failure on a bad file
        raise UnreadableCheckpoint(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")


def _load_state(model, optimizer, scheduler, folder: str) -> int:
    from safetensors.torch import load_file

    from mllmcl.training.adapter_kinds import load_trainable_state

    weights = _read(folder, ADAPTER_WEIGHTS, load_file)
    state = _read(folder, STATE_FILE, lambda p: torch.load(p, weights_only=True))  # tensors and ints only
    load_trainable_state(model, weights)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def _maybe_inject_failure(spec: dict | None, step: int, rank: int) -> None:
    """Test hook: kill this worker process once at a given step (see MLLMCL_INJECT_WORKER_FAILURE)."""
    if not spec or spec["step"] != step or spec["rank"] != rank:
        return
    marker = Path(spec["marker"])
    if marker.exists():
        return
    marker.write_text(f"killed rank {rank} at step {step} pid {os.getpid()}\n")
    if spec.get("raise"):
        raise RuntimeError(f"injected failure at step {step} (test hook)")
    # Ray Train collects a worker's reports when its controller polls (every health-check interval):
    # a worker killed at once may take its last reports with it, and a fit of a few fast steps then
    # restarts from step 0. The tests are about resuming from a registered checkpoint, so the
    # injected kill lets the controller collect what was reported first.
    time.sleep(float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")) * 4)
    os._exit(1)


class RayTrainSession:
    """One rank of a Ray Train worker group."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world, self.local_world = ctx.get_world_rank(), ctx.get_world_size(), \
            ctx.get_local_world_size()

    @property
    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare(self, model):
        import ray.train.torch

        if self.world > 1:
            return ray.train.torch.prepare_model(model, parallel_strategy="ddp")
        return model.to(self.device)

    def checkpoints(self) -> list[tuple[str, object]]:
        """(name, opener) of the fit's checkpoints, newest first: the one Ray Train hands back,
        then the older ones it keeps beside it (``num_to_keep``), for when the newest is unreadable."""
        import pyarrow.fs as pafs
        import ray.train
        from ray.train import Checkpoint

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return []
        found = [ckpt]
        parent = ckpt.path.rstrip("/").rsplit("/", 1)[0]
        try:
            infos = ckpt.filesystem.get_file_info(pafs.FileSelector(parent, recursive=False))
            older = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                            and i.base_name.startswith("checkpoint_") and i.path.rstrip("/") != ckpt.path.rstrip("/")),
                           reverse=True)
            found += [Checkpoint(path=p, filesystem=ckpt.filesystem) for p in older if p < ckpt.path]
        except OSError:
            pass
        return [(c.path, c.as_directory) for c in found]

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import ray.train
        from ray.train import Checkpoint

        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)


class LocalSession:
    """The whole fine-tuning in this process (``scaling.backend=local``): one rank, and
    checkpoints kept in the run's storage under ``checkpoints_uri`` (``latest.json`` names
    the newest, written after it), so a half-done fit resumes as under Ray Train."""

    rank, world, local_world = 0, 1, 1

    def __init__(self, checkpoints_uri: str):
        self.uri = checkpoints_uri
        self.last_metrics: dict = {}

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def prepare(self, model):
        return model.to(self.device)

    def checkpoints(self) -> list[tuple[str, object]]:
        """(name, opener) of the fit's checkpoints, newest first (the newest and the one before it)."""
        from mllmcl import storage

        pointer = storage.join(self.uri, "latest.json")
        if not storage.exists(pointer):
            return []
        latest = storage.read_json(pointer)
        names = [latest["checkpoint"]] + ([latest["previous"]] if latest.get("previous") else [])

        def opener(name: str):
            @contextlib.contextmanager
            def open_() -> Iterator[str]:
                with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
                    storage.download_dir(storage.join(self.uri, name), tmp)
                    yield tmp
            return open_

        return [(storage.join(self.uri, n), opener(n)) for n in names]

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        from mllmcl import storage

        self.last_metrics = dict(metrics)
        if checkpoint_dir is None:
            return
        pointer = storage.join(self.uri, "latest.json")
        latest = storage.read_json(pointer) if storage.exists(pointer) else {}
        name = f"checkpoint_{int(metrics['step']):06d}"
        storage.upload_dir(checkpoint_dir, storage.join(self.uri, name))
        previous = latest.get("checkpoint") if latest.get("checkpoint") != name else latest.get("previous")
        # the newest and the one before it are kept (as Ray Train's num_to_keep=2): a resumed fit falls
        # back to the older when the newer is unreadable
        storage.write_json(pointer, {"checkpoint": name, "previous": previous, **metrics})
        for old in {latest.get("previous")} - {name, previous, None}:
            storage.delete_dir(storage.join(self.uri, old))


@dataclass
class FitData:
    """What an adapter kind's ``prepare(model, data)`` may read: the fit's samples, how they are
    batched and preprocessed, where the model runs. Called on every rank before the first step
    (and again when a fit resumes, before its checkpoint is loaded): it must give every rank the
    same result. A kind may keep it for ``save`` (e.g. statistics of the trained model)."""

    collator: object
    pixels: object
    samples: list
    device: torch.device
    autocast: object
    rank: int
    world: int


def train_worker(config: dict) -> None:
    """Ray Train's per-worker entry point."""
    from ray.train.v2._internal.execution import context

    # Ray Train logs every report at INFO on a logger named after its file (not under
    # ``ray.train``, so RunConfig's LoggingConfig misses it): a line per checkpoint in the
    # user's terminal. Its warnings and errors still show.
    logging.getLogger(context.__file__).setLevel(os.environ.get("MLLMCL_RAY_TRAIN_LOG_LEVEL", "WARNING"))
    train_adapter(config["fit"], RayTrainSession())


def train_adapter(fit: FitConfig, session) -> None:
    from mllmcl.data.release import load_image
    from mllmcl.models import load_backbone
    from mllmcl.models.batching import PixelCache
    from mllmcl.training.adapter_kinds import LoraKind
    from mllmcl.training.loop import make_optimizer, train_steps

    rank, world = session.rank, session.world
    threads = fit.threads or max(1, (os.cpu_count() or 1) // max(1, session.local_world))
    torch.set_num_threads(threads)
    request = fit.request
    settings = request.train
    torch.manual_seed(settings.seed)

    backbone = load_backbone(fit.model_path, fit.dtype)
    kind = (request.adapter_kind or LoraKind)(request)
    if fit.gradient_checkpointing:  # the language model's and the vision tower's layers (non-reentrant)
        backbone.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = kind.build(backbone.model)
    device = session.device
    use_cuda = device.type == "cuda"
    mp = fit.mixed_precision
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, torch.bfloat16 if (mp == "auto" and use_cuda)
                                                                      else None)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else None
    pixels = PixelCache(backbone.collator.images, load_image)
    if hasattr(kind, "prepare"):  # a pass over the task's data before training (every rank, the same result)
        model = model.to(device)
        kind.prepare(model, FitData(backbone.collator, pixels, request.samples, device, autocast, rank, world))

    steps = settings.num_steps(len(request.samples))
    # default: once per epoch, but at most AUTO_CHECKPOINTS per fit (a router trains 30 epochs of 3 steps)
    every = fit.checkpoint_every or max(settings.steps_per_epoch(len(request.samples)),
                                              math.ceil(steps / AUTO_CHECKPOINTS))
    ds = None  # scaling.strategy=deepspeed: the DeepSpeed engine of this fit
    if fit.strategy == "deepspeed":
        from mllmcl.training.deepspeed import DeepSpeedRun

        model = model.to(device)
        optimizer, scheduler = make_optimizer(model, settings, steps)
        bf16 = use_cuda and amp_dtype is torch.bfloat16
        ds = DeepSpeedRun(model, optimizer, scheduler, batch_size=settings.batch_size, world=world,
                          zero_stage=fit.zero_stage, offload=fit.offload,
                          grad_clip=settings.grad_clip, bf16=bf16)
        if bf16:
            autocast = None  # DeepSpeed runs the model in bf16 itself
        train_model, stepper = ds.engine, ds.stepper
    else:
        model = session.prepare(model)
        optimizer, scheduler = make_optimizer(model, settings, steps)
        train_model, stepper = model, None
    start = 0
    history: list[dict] = []  # rank 0's record of every step (a resumed fit's: from its checkpoint)
    for name, open_checkpoint in session.checkpoints():  # newest first; an unreadable one is skipped
        try:
            with open_checkpoint() as d:
                start = ds.load(d) if ds is not None else _load_state(model, optimizer, scheduler, d)
                if os.path.exists(os.path.join(d, HISTORY_FILE)):
                    import json

                    with open(os.path.join(d, HISTORY_FILE)) as f:
                        history = [h for h in json.load(f) if h["step"] <= start]
            break
        except StorageError:  # the storage did not answer: not a bad checkpoint (the run resumes later)
            raise
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt checkpoint: the one before it
            log.warning("%s/%s: checkpoint %s is unreadable (%s); resuming from the one before it",
                        request.task, request.kind, name, e)
            start, history = 0, []
    if start:
        log.info("rank %d resumes %s/%s at step %d of %d", rank, request.task, request.kind, start, steps)

    all_reduce = None
    if world > 1:
        import torch.distributed as dist

        def all_reduce(t):
            dist.all_reduce(t)
            return t

    t0 = time.time()
    recent: list[float] = []
    clock = {"t": time.time(), "lr": optimizer.param_groups[0]["lr"]}  # the lr the next step uses

    def on_step(step: int, loss: float) -> None:
        recent.append(loss)
        done = step + 1
        now = time.time()
        history.append({"step": done, "loss": loss, "lr": clock["lr"],
                        "samples_per_s": len(request.samples[:settings.batch_size]) / max(now - clock["t"], 1e-9)})
        clock.update(t=now, lr=optimizer.param_groups[0]["lr"])
        if done % every == 0 or done == steps:
            metrics = {"step": done, "loss": sum(recent) / len(recent), "steps": steps,
                       "seconds": time.time() - t0}
            recent.clear()
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    _write_json(os.path.join(tmp, HISTORY_FILE), history)
                if ds is not None:  # every rank writes its optimizer shard; Ray Train merges the files
                    ds.save(tmp, done)
                    session.report(metrics, tmp)
                else:
                    if rank == 0:
                        _save_state(model, optimizer, scheduler, done, tmp)
                    session.report(metrics, tmp if rank == 0 else None)
            clock["t"] = time.time()  # a checkpoint's time is not a step's
        chaos.point(f"step:{request.task}:{request.kind}")  # tests: a kill after this step (and its checkpoint)
        _maybe_inject_failure(fit.inject_failure, done, rank)

    if start < steps:
        train_steps(train_model, backbone.collator, pixels, request.samples, settings, optimizer, scheduler,
                    start_step=start, rank=rank, world=world, all_reduce=all_reduce, autocast=autocast,
                    extra_loss=kind.extra_loss, on_step=on_step, stepper=stepper,
                    objective=getattr(kind, "objective", None), device=device)
    with ds.full_parameters(model) if ds is not None else contextlib.nullcontext():
        if rank == 0:
            _save_final(kind, model, fit, steps, world, start)
    if rank == 0 and fit.history_uri:
        from mllmcl import storage

        storage.write_json(fit.history_uri, history)


def _write_json(path: str, obj) -> None:
    import json

    with open(path, "w") as f:
        json.dump(obj, f)


def _save_final(kind, model, fit: FitConfig, steps: int, world: int, resumed_from: int) -> None:
    """Rank 0 writes the finished adapter and what trained it to the run's storage
    (``resumed_from_step``: the checkpoint's step this fit continued from; 0 = trained from the start)."""
    request = fit.request
    meta = {"task": request.task, "stage": request.stage, "kind": request.kind, "steps": steps,
            "resumed_from_step": resumed_from,
            "samples": len(request.samples), "workers": world, "effective_batch": request.train.batch_size,
            "strategy": fit.strategy, "train": asdict(request.train), "lora": asdict(request.lora),
            "init_adapter": request.init_adapter, "base_model": fit.model_path, **request.meta}
    kind.save(model, request.output_uri, meta)
