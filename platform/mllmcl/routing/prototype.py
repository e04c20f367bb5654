"""What the prototype routers share: a task's prototype is the normalised mean feature of
``samples_per_task`` of its train samples (drawn by the run's seed and the router's own salt),
computed once after the task is trained and stored as ``tasks/<k>_<task>/<file_name>``; a
question goes to the seen task whose prototype is closest in cosine similarity. No training,
no replay, no fallback. A subclass names its file, its salt and its ``features``."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mllmcl import storage
from mllmcl.data.prompts import eval_prompt
from mllmcl.routing.base import Route, Router, RouterStage, sample_indices


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class PrototypeRouter(Router):
    file_name: str
    salt: int

    @classmethod
    def features(cls, backend, prompts: Sequence[str], images: Sequence) -> np.ndarray:
        """One feature row per question (float64)."""
        raise NotImplementedError

    @classmethod
    def prototype_uri(cls, stage: RouterStage, k: int) -> str:
        return storage.join(stage.layout.task_dir(k, stage.stream.tasks[k].name), cls.file_name)

    @classmethod
    def fit(cls, stage: RouterStage, settings, backend) -> dict:
        uri = cls.prototype_uri(stage, stage.k)
        if not storage.exists(uri):
            if backend is None:
                raise FileNotFoundError(f"{uri}: no prototype stored, and no model here to compute it")
            train = stage.task.train
            pick = sample_indices(len(train), settings.samples_per_task, settings.seed, cls.salt, stage.k)
            feats = cls.features(backend, [eval_prompt(train[j]) for j in pick], [train[j].image for j in pick])
            storage.write_json(uri, {"task": stage.task.name, "samples": len(pick), "uids": [train[j].uid for j in pick],
                                     "embedding": unit(feats.mean(axis=0)).tolist()})
        run_dir = stage.layout.run_dir
        return {"kind": cls.kind, "experts": [t.name for t in stage.seen],
                "prototypes": [cls.prototype_uri(stage, i)[len(run_dir):].strip("/") for i in range(stage.k + 1)]}

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
        sims = self.features(backend, questions, images) @ self.prototypes().T
        return [Route(int(i), "", False) for i in sims.argmax(axis=1).tolist()]
