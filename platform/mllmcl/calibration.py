"""Calibration of the synthetic streams: measure what they promise with a given backbone:

- zero-shot accuracy of the base on every task (should stay near chance);
- accuracy of each task's own LoRA expert, trained from the frozen base (>= 85%);
- accuracy on task k after one LoRA is trained on task k, then on task k+1 (forgetting).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

from mllmcl.data.release import load_image
from mllmcl.data.types import Stream
from mllmcl.engine import Engine, evaluate_task
from mllmcl.models.batching import PixelCache
from mllmcl.models.loading import Backbone
from mllmcl.models.lora import attach_lora
from mllmcl.settings import LoraSettings, TrainSettings
from mllmcl.training.loop import fit

log = logging.getLogger(__name__)

# chance level of each synthetic task's answer space (uniform guessing)
CHANCE = {"RS": 41.7, "Med": 41.7, "AD": 41.7, "Sci": 25.0, "Fin": 41.7,
          "OCR": 25.0, "Math": 25.0, "VP": 25.0, "APP": 25.0}


@dataclass
class CalibrationRow:
    stream: str
    task: str
    chance: float
    zero_shot: float
    expert: float
    after_next: float | None  # accuracy on this task after the same LoRA also trained on the next task
    next_task: str | None
    train_seconds: float


def calibrate(backbone: Backbone, stream: Stream, train: TrainSettings, lora: LoraSettings, *,
              eval_batch: int = 100, max_new_tokens: int = 16, progress: bool = True) -> list[CalibrationRow]:
    collator = backbone.collator
    pixels = PixelCache(collator.images, load_image)
    base = backbone.model

    def accuracy(model, task) -> float:
        return evaluate_task(Engine.from_model(model, collator, pixels), task.spec, task.test,
                             batch_size=eval_batch, max_new_tokens=max_new_tokens).accuracy

    rows = []
    for k, task in enumerate(stream.tasks):
        zs = accuracy(base, task)
        model = attach_lora(copy.deepcopy(base), lora)
        t0 = time.time()
        fit(model, collator, pixels, task.train, train, progress=progress, desc=f"expert {task.name}")
        secs = time.time() - t0
        own = accuracy(model, task)
        after, nxt = None, None
        if k + 1 < len(stream.tasks):
            nxt = stream.tasks[k + 1]
            fit(model, collator, pixels, nxt.train, train, progress=progress, desc=f"{task.name} -> {nxt.name}")
            after = accuracy(model, task)
        row = CalibrationRow(stream.name, task.name, CHANCE.get(task.name, float("nan")), zs, own, after,
                             nxt.name if nxt else None, round(secs, 1))
        log.info("%s", row)
        rows.append(row)
    return rows


def format_markdown(rows: list[CalibrationRow]) -> str:
    out = ["| stream | task | chance | zero-shot base | own expert | task k after LoRA on k then k+1 | train s |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        after = f"{r.after_next:.1f} (then {r.next_task})" if r.after_next is not None else "–"
        out.append(f"| {r.stream} | {r.task} | {r.chance:.1f} | {r.zero_shot:.1f} | {r.expert:.1f} | {after} | "
                   f"{r.train_seconds:.0f} |")
    return "\n".join(out)
