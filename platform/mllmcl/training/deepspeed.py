"""DeepSpeed ZeRO for the per-worker loop (``scaling.strategy=deepspeed``).

The same loop as DDP (:func:`mllmcl.training.loop.train_steps`): the model runs through
the DeepSpeed engine, a :class:`DeepSpeedStepper` applies the update (gradient clipping and
the learning-rate schedule in DeepSpeed's step), and checkpoints are DeepSpeed's own — every
rank writes its shard of the partitioned optimizer state, and Ray Train merges the ranks'
files into one checkpoint — so a restarted worker group resumes where it stopped.

ZeRO-2 is the default (``scaling.zero_stage``); stage 3 partitions the parameters too, and
``scaling.offload=cpu`` keeps the optimizer state (and with stage 3 the parameters) in host
memory. bf16 on GPU (``train.mixed_precision=auto|bf16``) with fp32 master weights; fp32 on
CPU, where DeepSpeed runs over gloo.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile

import torch

TAG = "state"


def deepspeed_config(batch_size: int, world: int, zero_stage: int, offload: str, grad_clip: float,
                     bf16: bool) -> dict:
    """DeepSpeed's config for one fit. The loop forms the micro-batches itself and marks the
    accumulation boundary, so DeepSpeed sees one accumulation step per optimizer step."""
    micro = max(1, math.ceil(batch_size / world))
    zero: dict = {"stage": zero_stage}
    if offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * world,
        "zero_optimization": zero,
        "gradient_clipping": grad_clip or 0.0,
        "bf16": {"enabled": bool(bf16)},
        "zero_allow_untested_optimizer": True,  # the loop's AdamW, not DeepSpeed's fused/CPU Adam
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def _ensure_process_group() -> None:
    """A one-process group when Ray Train (or a test) did not make one: DeepSpeed needs it."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    fd, path = tempfile.mkstemp(prefix="mllmcl-pg-")
    os.close(fd)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method=f"file://{path}",
                            rank=0, world_size=1)


class DeepSpeedStepper:
    def __init__(self, engine):
        self.engine = engine

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # gradients of earlier micro-batches stay local; the last one reduces them across ranks
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop already weights each micro-batch

    def step(self) -> None:
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()  # clip, optimizer step, schedule, zero grads


class DeepSpeedRun:
    """The DeepSpeed engine of one fit, with its checkpoints."""

    def __init__(self, model, optimizer, scheduler, *, batch_size: int, world: int, zero_stage: int, offload: str,
                 grad_clip: float, bf16: bool):
        prebuilt = os.path.join(sys.prefix, "torch_extensions")  # `make install` builds DeepSpeed's CPU comm op
        if os.path.isdir(prebuilt):  # there; otherwise it compiles on first use into torch's extension cache
            os.environ.setdefault("TORCH_EXTENSIONS_DIR", prebuilt)
        import deepspeed

        _ensure_process_group()
        if world == 1:  # launchers (Ray Train, torchrun) set it; a lone process is local rank 0
            os.environ.setdefault("LOCAL_RANK", "0")
        self.zero_stage = zero_stage
        self.config = deepspeed_config(batch_size, world, zero_stage, offload, grad_clip, bf16)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=self.config, dist_init_required=False)
        self.stepper = DeepSpeedStepper(self.engine)

    def save(self, folder: str, step: int) -> None:
        """Every rank writes its shard (collective)."""
        self.engine.save_checkpoint(folder, tag=TAG, client_state={"step": step}, save_latest=False)

    def load(self, folder: str) -> int:
        path, client = self.engine.load_checkpoint(folder, tag=TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"{folder}: no DeepSpeed checkpoint {TAG!r} to resume from")
        return int(client["step"])

    @contextlib.contextmanager
    def full_parameters(self, module):
        """The trainable parameters gathered on every rank (ZeRO-3 partitions them), e.g. to save."""
        if self.zero_stage < 3:
            yield
            return
        import deepspeed

        params = [p for p in module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
