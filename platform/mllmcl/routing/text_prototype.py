"""``text_prototype``: a training-free selector by task identity (DISCO / HiDe-style).

A task's prototype is the mean text embedding (the base model's language model,
mean-pooled, :meth:`mllmcl.engine.Engine.embed`) of ``samples_per_task`` of its train
questions, computed once, after the task is trained, and stored in the run
(``tasks/<k>_<task>/prototype.json``). A question goes to the expert whose prototype is
closest in cosine similarity. No fallback: every question names an expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mllmcl.routing.base import register_router
from mllmcl.routing.prototype import PrototypeRouter


@dataclass(frozen=True)
class TextPrototypeSettings:
    samples_per_task: int = 100
    seed: int = 0  # the run's seed


@register_router("text_prototype")
class TextPrototypeRouter(PrototypeRouter):
    file_name, salt = "prototype.json", 6151

    @classmethod
    def features(cls, backend, prompts, images) -> np.ndarray:
        return np.asarray(backend.embed(list(prompts)), dtype=np.float64)

    def flops_per_question(self, shape: dict) -> float:
        # one language-model pass over the question, T dot products
        return 2.0 * (shape["lm_params"] * shape["text_tokens"] + len(self.experts) * shape["hidden"])
