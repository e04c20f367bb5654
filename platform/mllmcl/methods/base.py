"""The one small protocol every CL method implements, and the stage it receives.

A method says what to fine-tune at stage k (zero or more :class:`TrainRequest`), then
how to answer every seen task's test split with what has been trained so far. Its state
(JSON) is saved in the manifest after each stage so that a resumed run continues it.
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


class Predictor(Protocol):
    """Generates with the base model or any adapter of the run (the stream's model worker)."""

    def generate(self, samples: Sequence[Sample], adapters: Sequence[str | None], max_new_tokens: int,
                 questions: Sequence[str] | None = None) -> list[str]: ...


class Method(Protocol):
    name: str

    def plan(self, stage: Stage) -> list[TrainRequest]:
        """Adapters to fine-tune at this stage, in order."""

    def answer(self, stage: Stage, predictor: Predictor) -> Answers:
        """Answer every seen task's test split (task identity is never given to a model)."""

    def state_dict(self) -> dict:
        """JSON-able state to save after the stage."""

    def load_state_dict(self, state: dict) -> None:
        """Restore the state saved after a completed stage."""


def request(stage: Stage, kind: str, samples: Sequence[Sample], output_uri: str, *, init_adapter: str | None = None,
            lora=None, train=None, **meta) -> TrainRequest:
    cfg = stage.cfg
    return TrainRequest(stage=stage.k, task=stage.task.name, kind=kind, samples=list(samples), output_uri=output_uri,
                        lora=lora or cfg.lora.settings(), train=train or cfg.train.settings(cfg.run.seed + stage.k),
                        init_adapter=init_adapter, meta=meta)


def max_tokens(stage: Stage, task: Task) -> int:
    return stage.cfg.eval.max_new_tokens or task.spec.max_new_tokens


def answer_with(stage: Stage, predictor: Predictor, adapter: str | None) -> Answers:
    """Every seen task answered by one adapter (or the base model)."""
    preds, experts = {}, {}
    for task in stage.seen:
        preds[task.name] = predictor.generate(task.test, [adapter] * len(task.test), max_tokens(stage, task))
        experts[task.name] = [adapter] * len(task.test)
    return Answers(preds, experts)
