"""The fine-tuning loop: batches of samples -> update of the trainable (LoRA) weights.

Plain PyTorch so it runs the same in-process, inside a Ray Train worker (one rank of
DDP), or in a test. With ``world > 1`` every rank walks the same global batch order and
takes its slice of each global batch; the loss is the token-weighted mean over the
*global* batch, so N workers compute the same update as one worker with the same
effective batch (up to floating-point summation order).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from mllmcl.data.types import Sample
from mllmcl.models.batching import IGNORE_INDEX, Collator, PixelCache
from mllmcl.settings import TrainSettings

__all__ = ["CrossEntropy", "TrainSettings", "batch_order", "fit", "make_optimizer", "train_steps"]


def cosine_with_warmup(optimizer, total: int, warmup_ratio: float):
    warm = max(1, int(round(total * warmup_ratio)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Deterministic shuffled batches, epoch after epoch, until ``steps`` batches."""
    g = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g).tolist()
        for i in range(0, n, batch_size):
            out.append(perm[i:i + batch_size])
            if len(out) == steps:
                break
    return out


def make_optimizer(model, settings: TrainSettings, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return opt, cosine_with_warmup(opt, total_steps, settings.warmup_ratio)


class TorchStepper:
    """Plain PyTorch (and DDP) updates: backward per micro-batch, then clip, step, schedule."""

    def __init__(self, params, optimizer, scheduler, grad_clip: float):
        self.params, self.optimizer, self.scheduler, self.grad_clip = params, optimizer, scheduler, grad_clip

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def step(self) -> None:
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def _answer_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class CrossEntropy:
    """The default objective: next-token cross-entropy on the answer tokens, each token
    weighing the same across micro-batches and ranks.

    An objective (an adapter kind's ``objective`` attribute, e.g. φ-DPO's preference loss)
    builds a micro-batch from samples (``batch``), says what it weighs (``weight``: the units
    its loss is a mean over, summed over the global batch) and computes its mean loss there."""

    def batch(self, collator: Collator, samples: Sequence[Sample], pixels: PixelCache) -> dict:
        return collator.train_batch([s.question for s in samples], [s.target for s in samples],
                                    pixels.get([s.image for s in samples]))

    def weight(self, batch: dict) -> int:
        return _answer_tokens(batch["labels"])

    def loss(self, model, batch: dict) -> torch.Tensor:
        return model(**batch).loss.float()


def train_steps(model, collator: Collator, pixels: PixelCache, samples: Sequence[Sample], settings: TrainSettings,
                optimizer, scheduler, *, start_step: int = 0, rank: int = 0, world: int = 1,
                all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                extra_loss: Callable[[torch.nn.Module], torch.Tensor | None] | None = None,
                autocast: Callable | None = None, on_step: Callable[[int, float], None] | None = None,
                stepper=None, objective=None, device: torch.device | None = None, progress: bool = False,
                desc: str = "train") -> list[float]:
    """Run steps ``start_step .. num_steps-1``; return the (global) loss of each step run.

    ``stepper`` applies the update (default :class:`TorchStepper`; DeepSpeed brings its own,
    see :mod:`mllmcl.training.deepspeed`); ``objective`` builds micro-batches and their loss
    (default :class:`CrossEntropy`); its tensors go to ``device`` (the model's, when given: DDP
    moves a batch itself, a single worker's model and DeepSpeed's engine do not).
    """
    objective = objective or CrossEntropy()
    steps = settings.num_steps(len(samples))
    order = batch_order(len(samples), settings.batch_size, steps, settings.seed)
    if stepper is None:
        stepper = TorchStepper([p for p in model.parameters() if p.requires_grad], optimizer, scheduler,
                               settings.grad_clip)
    model.train()
    losses = []
    for step in tqdm(range(start_step, steps), desc=desc, disable=not progress, leave=False,
                     initial=start_step, total=steps):
        mine = order[step][rank::world]
        micro = [mine[i::settings.grad_accum] for i in range(settings.grad_accum)]
        micro = [m for m in micro if m]
        batches = [objective.batch(collator, [samples[i] for i in m], pixels) for m in micro]
        if device is not None:
            batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                       for b in batches]
        weights = [objective.weight(b) for b in batches]
        local_tokens = torch.tensor(float(sum(weights)))
        global_tokens = all_reduce(local_tokens.clone()) if all_reduce else local_tokens
        step_loss = torch.zeros(())
        for j, (b, n) in enumerate(zip(batches, weights)):
            ctx = autocast() if autocast else contextlib.nullcontext()
            with ctx:
                mean = objective.loss(model, b)
            # sum of token losses / global token count; DDP averages gradients over ranks, so scale by world
            loss = mean * n / global_tokens.clamp(min=1.0) * world
            if extra_loss is not None and j == len(batches) - 1:
                # a regulariser of the trainable weights, the same on every rank: DDP's average keeps it
                # as is; added to the last micro-batch's loss so that DDP sees one backward per forward
                reg = extra_loss(model)
                if reg is not None:
                    loss = loss + reg
            stepper.backward(loss, last=j == len(batches) - 1)
            step_loss += loss.detach() / world
        stepper.step()
        value = float(all_reduce(step_loss.clone()) if all_reduce else step_loss)
        losses.append(value)
        if on_step is not None:
            on_step(step, value)
    model.eval()
    return losses



def fit(model, collator: Collator, pixels: PixelCache, samples: Sequence[Sample], settings: TrainSettings, *,
        extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None, objective=None, progress: bool = False,
        desc: str = "train") -> list[float]:
    """Train ``model``'s trainable parameters on ``samples`` in this process; return the loss per step."""
    torch.manual_seed(settings.seed)
    opt, sched = make_optimizer(model, settings, settings.num_steps(len(samples)))
    return train_steps(model, collator, pixels, samples, settings, opt, sched, extra_loss=extra_loss,
                       objective=objective, progress=progress, desc=desc)
