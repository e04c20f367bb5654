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

from mllmcl import storage
from mllmcl.data.prompts import eval_prompt
from mllmcl.routing.base import Route, Router, RouterStage, register_router, sample_indices


@dataclass(frozen=True)
class MMPrototypeSettings:
    samples_per_task: int = 20
    seed: int = 0  # the run's seed


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def mm_features(backend, prompts: Sequence[str], images: Sequence) -> np.ndarray:
    """[normalised pooled image feature, normalised text embedding], normalised: one row per question."""
    image = _unit(np.asarray(backend.features(list(prompts), list(images))["image"], dtype=np.float64))
    text = _unit(np.asarray(backend.embed(list(prompts)), dtype=np.float64))
    return _unit(np.concatenate([image, text], axis=1))


def prototype_uri(stage: RouterStage, k: int) -> str:
    return storage.join(stage.layout.task_dir(k, stage.stream.tasks[k].name), "mm_prototype.json")


@register_router("mm_prototype")
class MMPrototypeRouter(Router):
    @classmethod
    def fit(cls, stage: RouterStage, settings: MMPrototypeSettings, backend) -> dict:
        uri = prototype_uri(stage, stage.k)
        if not storage.exists(uri):
            if backend is None:
                raise FileNotFoundError(f"{uri}: no prototype stored, and no model here to compute it")
            train = stage.task.train
            pick = sample_indices(len(train), settings.samples_per_task, settings.seed, 4271, stage.k)
            feats = mm_features(backend, [eval_prompt(train[j]) for j in pick], [train[j].image for j in pick])
            storage.write_json(uri, {"task": stage.task.name, "samples": len(pick), "uids": [train[j].uid for j in pick],
                                     "embedding": _unit(feats.mean(axis=0)).tolist()})
        run_dir = stage.layout.run_dir
        return {"kind": cls.kind, "experts": [t.name for t in stage.seen],
                "prototypes": [prototype_uri(stage, i)[len(run_dir):].strip("/") for i in range(stage.k + 1)]}

    def __init__(self, record: dict, run_dir: str):
        super().__init__(record, run_dir)
        self._prototypes: np.ndarray | None = None

    def files(self) -> list[str]:
        return [self.path(p) for p in self.record["prototypes"]]

    def prototypes(self) -> np.ndarray:
        if self._prototypes is None:
            self._prototypes = np.asarray([storage.read_json(self.path(p))["embedding"]
                                           for p in self.record["prototypes"]])
        return self._prototypes

    def select(self, backend, questions: list[str], images: list, rng=None, truth=None) -> list[Route]:
        sims = mm_features(backend, questions, images) @ self.prototypes().T
        return [Route(int(i), "", False) for i in sims.argmax(axis=1).tolist()]

    def flops_per_question(self, shape: dict) -> float:
        # one base forward over image + question, one language-model pass over the question, T dot products
        return 2.0 * (shape["params"] * shape["prompt_tokens"] + shape["lm_params"] * shape["text_tokens"]
                      + len(self.experts) * 2 * shape["hidden"])
