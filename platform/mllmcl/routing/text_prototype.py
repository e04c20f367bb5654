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

from mllmcl import storage
from mllmcl.data.prompts import eval_prompt
from mllmcl.routing.base import Route, Router, RouterStage, register_router


@dataclass(frozen=True)
class TextPrototypeSettings:
    samples_per_task: int = 100
    seed: int = 0  # the run's seed


def prototype_uri(stage: RouterStage, k: int) -> str:
    return storage.join(stage.layout.task_dir(k, stage.stream.tasks[k].name), "prototype.json")


@register_router("text_prototype")
class TextPrototypeRouter(Router):
    @classmethod
    def fit(cls, stage: RouterStage, settings: TextPrototypeSettings, backend) -> dict:
        uri = prototype_uri(stage, stage.k)
        if not storage.exists(uri):
            if backend is None:
                raise FileNotFoundError(f"{uri}: no prototype stored, and no model here to compute it")
            train = stage.task.train
            n = min(settings.samples_per_task, len(train))
            rng = np.random.default_rng([settings.seed, 6151, stage.k])
            pick = sorted(rng.choice(len(train), n, replace=False).tolist())
            emb = np.asarray(backend.embed([eval_prompt(train[j]) for j in pick]), dtype=np.float64)
            proto = emb.mean(axis=0)
            proto /= max(np.linalg.norm(proto), 1e-12)
            storage.write_json(uri, {"task": stage.task.name, "samples": n, "uids": [train[j].uid for j in pick],
                                     "embedding": proto.tolist()})
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
        q = np.asarray(backend.embed(questions), dtype=np.float64)
        return [Route(int(i), "", False) for i in (q @ self.prototypes().T).argmax(axis=1).tolist()]

    def flops_per_question(self, shape: dict) -> float:
        # one language-model pass over the question, T dot products
        return 2.0 * (shape["lm_params"] * shape["text_tokens"] + len(self.experts) * shape["hidden"])
