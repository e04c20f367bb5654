"""``ridge``: a closed-form ridge classifier over the base model's hidden states (CF-Router,
ICLR 2026, as METHODS-NEXT.md sets it out).

A question's feature x is the frozen base model's final-layer hidden states, mean-pooled over
the image + question sequence (:meth:`mllmcl.engine.Engine.features`), with a constant 1
appended (the bias). Stage k adds task k analytically: with ``samples_per_task`` of its train
samples X_k and their one-hot expert labels Y_k, ``G_k = G_{k-1} + X_kᵀX_k`` and
``C_k = [C_{k-1} | 0] + X_kᵀY_k`` (one label column more per task), and the router is
``W_k = (G_k + λI)⁻¹ C_k``; a question goes to ``argmax x W_k``. Only the statistics of earlier
stages are read (``tasks/<k>_<task>/ridge.npz``), never their samples: no replay. λ
(``lam``) was not published; the default is 1 (features of the tiny base are O(1)).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from mllmcl import storage
from mllmcl.data.prompts import eval_prompt
from mllmcl.routing.base import Route, Router, RouterStage, register_router, sample_indices


@dataclass(frozen=True)
class RidgeSettings:
    samples_per_task: int = 20
    lam: float = 1.0
    seed: int = 0  # the run's seed


def ridge_features(backend, prompts, images) -> np.ndarray:
    x = np.asarray(backend.features(list(prompts), list(images))["hidden"], dtype=np.float64)
    return np.concatenate([x, np.ones((len(x), 1))], axis=1)


def accumulate(G: np.ndarray | None, C: np.ndarray | None, X: np.ndarray, label: int) -> tuple[np.ndarray, np.ndarray]:
    """The statistics with one more task (its samples ``X``, all labelled ``label``, the new column)."""
    d = X.shape[1]
    G = np.zeros((d, d)) if G is None else G
    C = np.zeros((d, 0)) if C is None else C
    if label != C.shape[1]:
        raise ValueError(f"task {label} added after {C.shape[1]} tasks: tasks arrive in order")
    Y = np.zeros((len(X), label + 1))
    Y[:, label] = 1.0
    return G + X.T @ X, np.concatenate([C, np.zeros((d, 1))], axis=1) + X.T @ Y


def solve(G: np.ndarray, C: np.ndarray, lam: float) -> np.ndarray:
    """W = (G + λI)⁻¹ C, the ridge solution."""
    return np.linalg.solve(G + lam * np.eye(G.shape[0]), C)


def stats_uri(stage: RouterStage, k: int) -> str:
    return storage.join(stage.layout.task_dir(k, stage.stream.tasks[k].name), "ridge.npz")


def _save(uri: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_bytes(uri, buf.getvalue())


def _load(uri: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(storage.read_bytes(uri))) as z:
        return {k: z[k] for k in z.files}


@register_router("ridge")
class RidgeRouter(Router):
    @classmethod
    def fit(cls, stage: RouterStage, settings: RidgeSettings, backend) -> dict:
        uri = stats_uri(stage, stage.k)
        if not storage.exists(uri):
            if backend is None:
                raise FileNotFoundError(f"{uri}: no ridge statistics stored, and no model here to compute them")
            G = C = None
            if stage.k > 0:  # the previous stage's statistics (it fitted them first: stages finish in order)
                prev = _load(stats_uri(stage, stage.k - 1))
                G, C = prev["G"], prev["C"]
            train = stage.task.train
            pick = sample_indices(len(train), settings.samples_per_task, settings.seed, 5381, stage.k)
            X = ridge_features(backend, [eval_prompt(train[j]) for j in pick], [train[j].image for j in pick])
            G, C = accumulate(G, C, X, stage.k)
            _save(uri, G=G, C=C, W=solve(G, C, settings.lam), lam=np.asarray(settings.lam))
        run_dir = stage.layout.run_dir
        return {"kind": cls.kind, "experts": [t.name for t in stage.seen], "lambda": settings.lam,
                "stats": uri[len(run_dir):].strip("/")}

    def __init__(self, record: dict, run_dir: str):
        super().__init__(record, run_dir)
        self._W: np.ndarray | None = None

    def files(self) -> list[str]:
        return [self.path(self.record["stats"])]

    def weights(self) -> np.ndarray:
        if self._W is None:
            self._W = _load(self.path(self.record["stats"]))["W"]
        return self._W

    def select(self, backend, questions: list[str], images: list, rng=None, truth=None) -> list[Route]:
        scores = ridge_features(backend, questions, images) @ self.weights()
        return [Route(int(i), "", False) for i in scores.argmax(axis=1).tolist()]

    def flops_per_question(self, shape: dict) -> float:
        # one base forward over image + question, one (d+1) x T product
        return 2.0 * (shape["params"] * shape["prompt_tokens"] + (shape["hidden"] + 1) * len(self.experts))
