"""``mm_prototype``: a training-free multimodal prototype router (the reading of RePRo, "Is Our
Benchmark Enough?", 2026, that METHODS-NEXT.md gives: its internals were not published).

A question's feature is the frozen base model's pooled image feature (the projector's output
at the image's positions, :meth:`mllmcl.engine.Engine.features`) and its pooled text
embedding (:meth:`~mllmcl.engine.Engine.embed`), each L2-normalised, concatenated. A task's
prototype is the mean feature of ``samples_per_task`` of its train samples, computed once
after the task is trained (``tasks/<k>_<task>/mm_prototype.json``); a question goes to the
seen task whose prototype is closest in cosine similarity. No training, no replay, no fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mllmcl.routing.base import register_router
from mllmcl.routing.prototype import PrototypeRouter, unit


@dataclass(frozen=True)
class MMPrototypeSettings:
    samples_per_task: int = 20
    seed: int = 0  # the run's seed


def mm_features(backend, prompts: Sequence[str], images: Sequence) -> np.ndarray:
    """[normalised pooled image feature, normalised text embedding], normalised: one row per question."""
    image = unit(np.asarray(backend.features(list(prompts), list(images))["image"], dtype=np.float64))
    text = unit(np.asarray(backend.embed(list(prompts)), dtype=np.float64))
    return unit(np.concatenate([image, text], axis=1))


@register_router("mm_prototype")
class MMPrototypeRouter(PrototypeRouter):
    file_name, salt = "mm_prototype.json", 4271

    @classmethod
    def features(cls, backend, prompts, images) -> np.ndarray:
        return mm_features(backend, prompts, images)

    def flops_per_question(self, shape: dict) -> float:
        # one base forward over image + question, one language-model pass over the question, T dot products
        return 2.0 * (shape["params"] * shape["prompt_tokens"] + shape["lm_params"] * shape["text_tokens"]
                      + len(self.experts) * 2 * shape["hidden"])
