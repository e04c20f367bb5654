"""The fine-tuning loop on one worker: batches of samples -> LoRA (or any trainable) update.

Plain PyTorch so it runs the same in-process, inside a Ray Train worker, or in a test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from mllmcl.data.types import Sample
from mllmcl.models.batching import Collator, PixelCache


@dataclass(frozen=True)
class TrainSettings:
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 16
    lr: float = 2e-3
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0

    def num_steps(self, n_samples: int) -> int:
        per_epoch = math.ceil(n_samples / self.batch_size)
        steps = max(1, int(round(self.epochs * per_epoch)))
        return min(steps, self.max_steps) if self.max_steps else steps


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


def fit(model, collator: Collator, pixels: PixelCache, samples: Sequence[Sample], settings: TrainSettings, *,
        extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None, progress: bool = False,
        desc: str = "train") -> list[float]:
    """Train ``model``'s trainable parameters on ``samples``; return the loss per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    torch.manual_seed(settings.seed)
    steps = settings.num_steps(len(samples))
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    sched = cosine_with_warmup(opt, steps, settings.warmup_ratio)
    model.train()
    losses = []
    for idx in tqdm(batch_order(len(samples), settings.batch_size, steps, settings.seed), desc=desc,
                    disable=not progress, leave=False):
        chunk = [samples[i] for i in idx]
        batch = collator.train_batch([s.question for s in chunk], [s.target for s in chunk],
                                     pixels.get([s.image for s in chunk]))
        loss = model(**batch).loss
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        loss.backward()
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
    model.eval()
    return losses
