"""Greedy generation over a test split in batches, and scoring of a whole task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from mllmcl.data.prompts import eval_prompt
from mllmcl.data.release import load_image
from mllmcl.data.types import Sample, TaskSpec
from mllmcl.evaluation.predictions import PredictionRow, encode_answer
from mllmcl.evaluation.scorers import score
from mllmcl.models.batching import Collator, PixelCache


@torch.no_grad()
def generate(model, collator: Collator, pixels: PixelCache, samples: Sequence[Sample], *, batch_size: int = 64,
             max_new_tokens: int = 32, adapter_names: Sequence[str] | None = None, progress: bool = False,
             desc: str = "generate") -> list[str]:
    """Greedy-decode an answer for every sample; ``adapter_names`` picks a PEFT adapter per row."""
    model.eval()
    tok = collator.tok
    out: list[str] = []
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = samples[start:start + batch_size]
        batch = collator.prompt_batch([eval_prompt(s) for s in chunk], pixels.get([s.image for s in chunk]))
        kwargs = {}
        if adapter_names is not None:
            kwargs["adapter_names"] = list(adapter_names[start:start + batch_size])
        gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kwargs)
        new = gen[:, batch["input_ids"].shape[1]:]
        out.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
    return out


@dataclass
class TaskEval:
    task: str
    accuracy: float  # percent
    rows: list[PredictionRow]


def score_predictions(spec: TaskSpec, samples: Sequence[Sample], predictions: Sequence[str], stage: int = -1,
                      experts: Sequence[str | None] | None = None) -> TaskEval:
    rows = []
    for i, (s, p) in enumerate(zip(samples, predictions)):
        prompt = eval_prompt(s)
        rows.append(PredictionRow(question_id=s.uid, task=s.task, prompt=prompt, prediction=p,
                                  answer=encode_answer(s.answers), score=score(spec.scorer, s, p, prompt),
                                  expert=experts[i] if experts else None, stage=stage))
    acc = 100.0 * sum(r.score for r in rows) / max(1, len(rows))
    return TaskEval(task=spec.name, accuracy=acc, rows=rows)


def evaluate_task(model, collator: Collator, pixels: PixelCache, spec: TaskSpec, samples: Sequence[Sample], *,
                  batch_size: int = 64, max_new_tokens: int | None = None, stage: int = -1,
                  progress: bool = False) -> TaskEval:
    preds = generate(model, collator, pixels, samples, batch_size=batch_size,
                     max_new_tokens=max_new_tokens or spec.max_new_tokens, progress=progress,
                     desc=f"eval {spec.name}")
    return score_predictions(spec, samples, preds, stage=stage)


def pixel_cache_for(collator: Collator, max_bytes: int = 2 << 30) -> PixelCache:
    return PixelCache(collator.images, load_image, max_bytes=max_bytes)
