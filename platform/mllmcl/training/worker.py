"""The Ray Train per-worker loop: one rank of DDP fine-tuning one adapter.

Checkpoints (adapter weights, optimizer, scheduler, step, RNG) are reported every
``checkpoint_every`` steps (default: once per epoch); a restarted worker group resumes
from the last one. Rank 0 writes the finished adapter to the run's storage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
ADAPTER_WEIGHTS = "adapter.safetensors"


def build_trainable(backbone_model, request):
    """Attach a fresh LoRA, or load ``init_adapter``'s weights as the trainable adapter."""
    from peft import PeftModel

    from mllmcl.models.adapters import fetch_adapter
    from mllmcl.models.lora import attach_lora

    if request.init_adapter:
        local = fetch_adapter(request.init_adapter)
        return PeftModel.from_pretrained(backbone_model, local, is_trainable=True)
    return attach_lora(backbone_model, request.lora)


def _save_state(model, optimizer, scheduler, step: int, folder: str) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    core = model.module if hasattr(model, "module") else model
    weights = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(core).items()}
    save_file(weights, os.path.join(folder, ADAPTER_WEIGHTS))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "rng": torch.get_rng_state()}, os.path.join(folder, STATE_FILE))


def _load_state(model, optimizer, scheduler, folder: str) -> int:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    core = model.module if hasattr(model, "module") else model
    set_peft_model_state_dict(core, load_file(os.path.join(folder, ADAPTER_WEIGHTS)))
    state = torch.load(os.path.join(folder, STATE_FILE), weights_only=True)  # tensors and ints only
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def _maybe_inject_failure(config: dict, step: int, rank: int) -> None:
    """Test hook: kill this worker process once at a given step (see MLLMCL_INJECT_WORKER_FAILURE)."""
    spec = config.get("inject_failure")
    if not spec or spec["step"] != step or spec["rank"] != rank:
        return
    marker = Path(spec["marker"])
    if marker.exists():
        return
    marker.write_text(f"killed rank {rank} at step {step} pid {os.getpid()}\n")
    os._exit(1)


def train_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from mllmcl.data.release import load_image
    from mllmcl.models import load_backbone
    from mllmcl.models.adapters import save_adapter
    from mllmcl.models.batching import PixelCache
    from mllmcl.training.loop import make_optimizer, train_steps
    from mllmcl.training.request import TrainRequest

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = int(config["threads"]) or max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size()))
    torch.set_num_threads(threads)
    request = TrainRequest.from_config(config["request"])
    settings = request.train
    torch.manual_seed(settings.seed)

    backbone = load_backbone(config["model_path"], config["dtype"])
    model = build_trainable(backbone.model, request)
    device = ray.train.torch.get_device()
    if world > 1:
        model = ray.train.torch.prepare_model(model, parallel_strategy="ddp")
    else:
        model.to(device)
    use_cuda = device.type == "cuda"
    mp = config.get("mixed_precision", "auto")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, torch.bfloat16 if (mp == "auto" and use_cuda)
                                                                      else None)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else None

    steps = settings.num_steps(len(request.samples))
    every = config["checkpoint_every"] or settings.steps_per_epoch(len(request.samples))
    optimizer, scheduler = make_optimizer(model, settings, steps)
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = _load_state(model, optimizer, scheduler, d)
        log.info("rank %d resumes %s/%s at step %d of %d", rank, request.task, request.kind, start, steps)

    pixels = PixelCache(backbone.processor, load_image)
    all_reduce = None
    if world > 1:
        import torch.distributed as dist

        def all_reduce(t):
            dist.all_reduce(t)
            return t

    t0 = time.time()
    recent: list[float] = []

    def on_step(step: int, loss: float) -> None:
        recent.append(loss)
        done = step + 1
        if done % every == 0 or done == steps:
            metrics = {"step": done, "loss": sum(recent) / len(recent), "steps": steps,
                       "seconds": time.time() - t0}
            recent.clear()
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    _save_state(model, optimizer, scheduler, done, tmp)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if rank == 0 else None)
        _maybe_inject_failure(config, done, rank)

    if start < steps:
        train_steps(model, backbone.collator, pixels, request.samples, settings, optimizer, scheduler,
                    start_step=start, rank=rank, world=world, all_reduce=all_reduce, autocast=autocast,
                    on_step=on_step)
    if rank == 0:
        core = model.module if hasattr(model, "module") else model
        meta = {"task": request.task, "stage": request.stage, "kind": request.kind, "steps": steps,
                "samples": len(request.samples), "workers": world, "effective_batch": settings.batch_size,
                "train": config["request"]["train"], "lora": config["request"]["lora"],
                "init_adapter": request.init_adapter, "base_model": config["model_path"], **request.meta}
        save_adapter(core, request.output_uri, meta)
