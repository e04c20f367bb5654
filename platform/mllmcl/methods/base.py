"""The one small protocol every CL method implements, and the stage it receives.

A method says what to fine-tune at stage k (zero or more :class:`TrainRequest`), may
finish the stage with the model at hand (``finish``), then says how to answer every seen
task's test split with what has been trained so far. Its state (JSON) is saved in the
manifest after each stage so that a resumed run continues it. Subclass :class:`CLMethod`
and register the class (see CONTRIBUTING.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from mllmcl.config import Config
from mllmcl.data.types import Sample, Stream, Task
from mllmcl.storage.layout import RunLayout
from mllmcl.training.request import TrainRequest


@dataclass
class Stage:
    k: int
    stream: Stream
    layout: RunLayout
    cfg: Config

    @property
    def task(self) -> Task:
        return self.stream.tasks[self.k]

    @property
    def seen(self) -> Sequence[Task]:
        return self.stream.tasks[: self.k + 1]

    def expert_uri(self, k: int | None = None) -> str:
        k = self.k if k is None else k
        return self.layout.expert_dir(k, self.stream.tasks[k].name)

    def router_uri(self, k: int | None = None) -> str:
        k = self.k if k is None else k
        return self.layout.router_dir(k, self.stream.tasks[k].name)


@dataclass
class Answers:
    """Per seen task: the prediction for every test sample and the adapter that produced it."""

    predictions: dict[str, list[str]]
    experts: dict[str, list[str | None]]
    info: dict[str, Any] = field(default_factory=dict)
    oracle: dict[str, list[str]] | None = None  # routed methods: expert j's answers on task j


@dataclass(frozen=True)
class ServingPlan:
    """What answers a request after a stage: named experts (adapter URI, or None for the base
    model), in the order the router names them (A, B, ...), and the router adapter when the
    method routes each request to one expert (MR-LoRA); without a router there is one expert."""

    experts: dict[str, str | None]
    router: str | None = None


class NotServable(ValueError):
    """The method's stage cannot be served as a router + expert ensemble (the message says why)."""


class Predictor(Protocol):
    """Generates with the base model or any adapter of the run (the stream's model worker)."""

    def generate(self, samples: Sequence[Sample], adapters: Sequence[str | None], max_new_tokens: int,
                 questions: Sequence[str] | None = None) -> list[str]: ...

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """L2-normalised text embeddings from the base model (no adapter)."""


class Method(Protocol):
    name: str

    def plan(self, stage: Stage) -> list[TrainRequest]:
        """Adapters to fine-tune at this stage, in order."""

    def finish(self, stage: Stage, predictor: Predictor) -> None:
        """After this stage's fine-tuning, before evaluation: build what inference needs beyond the
        trained adapters (e.g. task prototypes), writing it to the run's storage."""

    def answer(self, stage: Stage, predictor: Predictor) -> Answers:
        """Answer every seen task's test split (task identity is never given to a model)."""

    def serving(self, stage: Stage) -> ServingPlan:
        """The adapters that answer requests after this stage (``mllmcl.serving``)."""

    def state_dict(self) -> dict:
        """JSON-able state to save after the stage."""

    def load_state_dict(self, state: dict) -> None:
        """Restore the state saved after a completed stage."""


class CLMethod:
    """Base class with the protocol's defaults: no finishing step and no state of its own
    (everything a stage produced lives in the run's storage)."""

    name: str
    routed = False  # one expert per task + a router: reports router_accuracy (a sweep may optimise it)

    def __init__(self, cfg: Config, stream: Stream):
        self.cfg = cfg

    def plan(self, stage: Stage) -> list[TrainRequest]:
        raise NotImplementedError

    def finish(self, stage: Stage, predictor: Predictor) -> None:
        pass

    def answer(self, stage: Stage, predictor: Predictor) -> Answers:
        raise NotImplementedError

    def serving(self, stage: Stage) -> ServingPlan:
        raise NotServable(f"method {self.name!r} does not say how to serve its stages")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def request(stage: Stage, kind: str, samples: Sequence[Sample], output_uri: str, *, init_adapter: str | None = None,
            lora=None, train=None, recipe: str = "lora", recipe_args: dict | None = None, **meta) -> TrainRequest:
    cfg = stage.cfg
    return TrainRequest(stage=stage.k, task=stage.task.name, kind=kind, samples=list(samples), output_uri=output_uri,
                        lora=lora or cfg.lora.settings(), train=train or cfg.train.settings(cfg.run.seed + stage.k, stage.k),
                        init_adapter=init_adapter, meta=meta, recipe=recipe, recipe_args=recipe_args or {})


def max_tokens(stage: Stage, task: Task) -> int:
    return stage.cfg.eval.max_new_tokens or task.spec.max_new_tokens


def answer_with(stage: Stage, predictor: Predictor, adapter: str | None) -> Answers:
    """Every seen task answered by one adapter (or the base model)."""
    preds, experts = {}, {}
    for task in stage.seen:
        preds[task.name] = predictor.generate(task.test, [adapter] * len(task.test), max_tokens(stage, task))
        experts[task.name] = [adapter] * len(task.test)
    return Answers(preds, experts)


def routed_answer(stage: Stage, predictor: Predictor, choose) -> Answers:
    """Answers of a method with one expert per task and a router.

    ``choose(j)`` returns (expert index per test sample of seen task j, number of router
    fallbacks). Reports routing accuracy (overall and per task) and the oracle answers
    (expert j on task j); the expert answers come from the prediction cache when known.
    """
    experts = [stage.expert_uri(i) for i in range(stage.k + 1)]
    preds, used, oracle, per_task = {}, {}, {}, {}
    right = total = fallbacks = 0
    for j, task in enumerate(stage.seen):
        choices, n_fallback = choose(j)
        used[task.name] = [experts[c] for c in choices]
        preds[task.name] = predictor.generate(task.test, used[task.name], max_tokens(stage, task))
        oracle[task.name] = predictor.generate(task.test, [experts[j]] * len(task.test), max_tokens(stage, task))
        hits = sum(c == j for c in choices)
        per_task[task.name] = 100.0 * hits / max(1, len(choices))
        right, total, fallbacks = right + hits, total + len(choices), fallbacks + n_fallback
    info = {"router_accuracy": 100.0 * right / max(1, total), "router_accuracy_per_task": per_task,
            "router_fallbacks": fallbacks}
    return Answers(preds, used, info, oracle=oracle)
