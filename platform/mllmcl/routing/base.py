"""The router interface: what every router of the platform is and does.

A router picks, for each question, the expert (a task's adapter) that answers it. It is

- **fitted** at a stage on the seen tasks' train samples only: ``training(stage, settings)``
  names the adapters it needs fine-tuned (the MLLM router's LoRA; none for a training-free
  router), run by the stream runner like any fit, then ``fit(stage, settings, backend)``
  does what needs no fine-tuning (task prototypes, ...) and returns its **record**;
- **stored** in the run: the record (``tasks/<k>_<task>/router.json``, paths relative to
  the run's folder) is all a later process needs (``load_router(record, run_dir)``): the
  stream's evaluation, batch evaluation and the service route with the same object;
- **asked** with ``route(backend, questions, images)``: per question a :class:`Route`
  (expert index, the router's raw output, whether the fallback rule chose);
- **costed**: the fit's seconds (its fine-tunes and ``fit``, measured by whoever fits it:
  :func:`mllmcl.methods.base.fit_router`) and the measured seconds of every ``route`` call
  (:attr:`Router.seconds`, :attr:`Router.questions`). The record holds no timing, so a
  run's stored artifacts stay the same from run to run.

``backend`` is anything with ``complete(prompts, images, adapter, max_new_tokens) -> texts``
and ``embed(texts) -> vectors``: an :class:`mllmcl.engine.Engine`, or the stream's cached
view of its evaluation worker. Routers register by kind (``@register_router("mllm")``).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from typing import Protocol, Sequence

from mllmcl import storage
from mllmcl.data.types import Stream, Task
from mllmcl.storage.layout import RunLayout
from mllmcl.registry import Registry

FALLBACK_RULES = ("random", "last", "first")


@dataclass(frozen=True)
class Route:
    index: int  # expert index (the record's expert order)
    answer: str  # the router's raw output
    fallback: bool  # the output named no expert; ``index`` comes from the fallback rule

    def to_dict(self) -> dict:
        return asdict(self)


class RouterStage(Protocol):
    """What a router reads of the stage it is fitted at (:class:`mllmcl.methods.base.Stage` is one):
    the stage index, the stream, the seen tasks (train splits only), the run's layout."""

    k: int
    stream: Stream
    layout: RunLayout

    @property
    def task(self) -> Task: ...

    @property
    def seen(self) -> Sequence[Task]: ...

    def router_uri(self, k: int | None = None) -> str: ...


class RouterBackend(Protocol):
    def complete(self, prompts: Sequence[str], images: Sequence, adapter: str | None,
                 max_new_tokens: int) -> list[str]: ...

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...

    def features(self, prompts: Sequence[str], images: Sequence) -> dict[str, list[list[float]]]: ...


def sample_indices(n: int, per_task: int, *seed: int) -> list[int]:
    """``per_task`` of a task's ``n`` train samples, drawn by ``seed`` alone (sorted indices): a
    router's fitting samples for that task, the same whichever tasks come after it."""
    import numpy as np

    k = min(per_task, n)
    return sorted(np.random.default_rng(list(seed)).choice(n, k, replace=False).tolist())


def fallback_index(rule: str, n_experts: int, seed: int, question: str, rng=None) -> int:
    """The expert for a router output that names none (the one place the rule lives).

    ``first`` / ``last``: expert A / the newest expert. ``random``: a seeded draw from
    ``rng`` when the caller has one (the stream runner: seeded by stage and task, as the
    reference), else from the question's text, so a service sends one question to one
    expert every time (it does not know the task).
    """
    if rule == "first":
        return 0
    if rule == "last":
        return n_experts - 1
    if rng is not None:
        return int(rng.integers(n_experts))
    digest = hashlib.sha256(f"{seed}|{question}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n_experts


class Router:
    """Base class: a router restored from its record (see the module's docstring)."""

    kind = ""
    max_new_tokens = 0  # tokens the router's model generates per question (0: it generates none)

    def __init__(self, record: dict, run_dir: str):
        self.record = record
        self.run_dir = run_dir
        self.experts: list[str] = list(record["experts"])
        self.seconds = 0.0  # measured time of every route() call
        self.questions = 0

    # ------------------------------------------------------------------ fitting (the stream's side)

    @classmethod
    def training(cls, stage: RouterStage, settings) -> list:
        """The fine-tunes (``TrainRequest``) this router needs at ``stage``; none by default."""
        return []

    @classmethod
    def fit(cls, stage: RouterStage, settings, backend: RouterBackend | None) -> dict:
        """Training-free fitting after the stage's fine-tunes; returns the router's record."""
        raise NotImplementedError

    # ------------------------------------------------------------------ routing

    def path(self, relative: str) -> str:
        return storage.join(self.run_dir, relative)

    def files(self) -> list[str]:
        """The stored files routing reads (a service checks them before it deploys)."""
        return []

    def prepare(self, backend) -> None:
        """Load what routing needs into a long-lived backend (a replica's engine)."""

    def prompts(self, questions: Sequence[str]) -> list[str] | None:
        """The texts the router's model reads (a service checks them against the context), if any."""
        return None

    needs_truth = False  # routes by each question's true task (the oracle): an evaluation bound, not a router

    def route(self, backend: RouterBackend, questions: Sequence[str], images: Sequence, rng=None,
              truth: Sequence[int] | None = None) -> list[Route]:
        """The expert of each question. ``truth``: each question's task index, given by the stream's
        evaluation (only the oracle reads it); a request to a service carries none."""
        if self.needs_truth and truth is None and len(self.experts) > 1:
            raise ValueError(f"the {self.kind!r} router routes by each question's task, which this request does "
                             f"not name (name one of {self.experts} as the model, or serve a run with a real router)")
        t0 = time.perf_counter()
        out = [Route(0, "", False)] * len(questions) if len(self.experts) == 1 else \
            self.select(backend, list(questions), list(images), rng, truth)
        self.seconds += time.perf_counter() - t0
        self.questions += len(questions)
        return out

    def select(self, backend: RouterBackend, questions: list[str], images: list, rng=None,
               truth: Sequence[int] | None = None) -> list[Route]:
        raise NotImplementedError

    def cost_prompts(self, questions: Sequence[str]) -> list[str]:
        """The texts whose token counts the router's compute depends on (its model's prompts)."""
        return list(questions)

    def flops_per_question(self, shape: dict) -> float | None:
        """The router's compute per question, counted from the base model's ``shape`` (``params``,
        ``lm_params``, ``hidden``, ``prompt_tokens``, ``text_tokens``: what the stream's engine
        measured), as 2 FLOPs per parameter and token; None where it cannot be counted."""
        return None

    def seconds_per_question(self) -> float | None:
        """The measured routing time per question so far (None before any)."""
        return self.seconds / self.questions if self.questions else None


_ROUTERS = Registry("router", __name__.rsplit(".", 1)[0], attribute="kind")
register_router = _ROUTERS.register  # class decorator: a router by kind (its records name it)


def registered_routers() -> list[str]:
    return _ROUTERS.names()


def get_router(kind: str) -> type[Router]:
    return _ROUTERS.get(kind)


def load_router(record: dict, run_dir: str) -> Router:
    """The router a record describes (a stage's ``router.json``), its paths under ``run_dir``."""
    return get_router(record["kind"])(record, run_dir)
