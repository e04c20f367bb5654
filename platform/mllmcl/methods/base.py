"""The one small protocol every CL method implements, its options, and the stage it receives.

A method says what to fine-tune at stage k (zero or more :class:`TrainRequest`), may
finish the stage with the model at hand (``finish``: fit a router, store prototypes...),
then says how to answer every seen task's test split with what has been trained so far,
and what answers requests after the stage (``serving``). Its state (JSON) is saved in the
manifest after each stage so that a resumed run continues it.

A method is one module: its class (subclass :class:`CLMethod`, ``@register`` it), its
options (a frozen dataclass subclassing :class:`MethodOptions`, named ``Options`` on the
class: the ``method.*`` keys of a config), its adapter kind if it trains something other
than a PEFT LoRA (``mllmcl.training.adapter_kinds``), and its adapter format if the
engine must load something other than PEFT (``adapter_format``, see
:mod:`mllmcl.engine.formats`). CONTRIBUTING.md walks through one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from mllmcl.data.prompts import eval_prompt
from mllmcl.data.types import Sample, Stream, Task
from mllmcl.settings import (DataConfig, EvalConfig, LoraConfig, LoraSettings, ModelConfig, RunSection, TrainConfig,
                             TrainSettings)
from mllmcl.storage.layout import RunLayout, relative_adapter
from mllmcl.storage.manifest import ServingRecord
from mllmcl.training.request import TrainRequest


class RunConfig(Protocol):
    """What a method reads of the run's config (:class:`mllmcl.config.Config` is one): the
    settings sections and its own options."""

    data: DataConfig
    model: ModelConfig
    lora: LoraConfig
    train: TrainConfig
    eval: EvalConfig
    run: RunSection
    method: MethodOptions


@dataclass(frozen=True)
class MethodOptions:
    """A method's options: the ``method.*`` keys of a config besides ``name``. Subclass it with the
    method's fields (typed, with defaults); ``check`` reports bad values, ``check_with`` rules that
    involve other sections of the config (both as ``method.<key>=...: why`` lines)."""

    name: str = ""

    def check(self) -> list[str]:
        return []

    def check_with(self, cfg: RunConfig) -> list[str]:
        return []


@dataclass
class Stage:
    k: int
    stream: Stream
    layout: RunLayout
    cfg: RunConfig
    trained: dict[str, dict] = field(default_factory=dict)  # output URI -> its fit's log (steps, seconds...)
    router_fit_seconds: float | None = None  # set by fit_router: the router's fine-tunes + fit, this stage
    # the next task, answered (never trained on or fitted to) for forward transfer: the runner sets it
    # after the stage's fits and ``finish``, for ``answer`` only (eval.forward_transfer)
    probe: Task | None = None

    @property
    def task(self) -> Task:
        return self.stream.tasks[self.k]

    @property
    def seen(self) -> Sequence[Task]:
        return self.stream.tasks[: self.k + 1]

    @property
    def answered(self) -> Sequence[Task]:
        """The tasks ``answer`` answers: the seen ones, then the probe (if any)."""
        return [*self.seen, self.probe] if self.probe is not None else self.seen

    def expert_uri(self, k: int | None = None) -> str:
        k = self.k if k is None else k
        return self.layout.expert_dir(k, self.stream.tasks[k].name)

    def router_uri(self, k: int | None = None) -> str:
        k = self.k if k is None else k
        return self.layout.router_dir(k, self.stream.tasks[k].name)

    def router_record_uri(self, k: int | None = None) -> str:
        k = self.k if k is None else k
        return self.layout.path("tasks", f"{k}_{self.stream.tasks[k].name}", "router.json")


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
    model), in the router's expert order, and the router's record when the method routes each
    request to one expert; without a router there is one expert."""

    experts: dict[str, str | None]
    router: dict | None = None

    def to_record(self, run_dir: str) -> ServingRecord:
        """As the manifest keeps it: adapters relative to the run's folder (the run may move)."""
        return ServingRecord({n: None if u is None else relative_adapter(u, run_dir) for n, u in self.experts.items()},
                             self.router)


class NotServable(ValueError):
    """The method's stage cannot be served as a router + expert ensemble (the message says why)."""


class Predictor(Protocol):
    """The stream's view of its evaluation worker (the engine): cached generation with any adapter
    of the run, and the router backend (``complete``, ``embed``)."""

    def generate(self, samples: Sequence[Sample], adapters: Sequence[str | None], max_new_tokens: int) -> list[str]: ...

    def complete(self, prompts: Sequence[str], images: Sequence, adapter: str | None,
                 max_new_tokens: int) -> list[str]: ...

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """L2-normalised text embeddings from the base model (no adapter)."""

    def features(self, prompts: Sequence[str], images: Sequence) -> dict[str, list[list[float]]]:
        """Pooled image and hidden-state features of (question, image) pairs from the base model."""


class CLMethod:
    """Base class with the protocol's defaults: no options, no finishing step, no state of its own
    (everything a stage produced lives in the run's storage), PEFT adapters."""

    name: str
    Options: type[MethodOptions] = MethodOptions
    routed = False  # one expert per task + a router: reports router_accuracy (a sweep may optimise it)
    adapter_format = None  # the engine's format for this method's adapters (None: PEFT)

    def __init__(self, cfg: RunConfig, stream: Stream):
        self.cfg = cfg
        self.options = cfg.method

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
            lora: LoraSettings | None = None, train: TrainSettings | None = None, adapter_kind: type | None = None,
            adapter_args: dict | None = None, depends_on: Sequence[str] = (), **meta) -> TrainRequest:
    cfg = stage.cfg
    return TrainRequest(stage=stage.k, task=stage.task.name, kind=kind, samples=list(samples), output_uri=output_uri,
                        lora=lora or cfg.lora.settings(), train=train or cfg.train.settings(cfg.run.seed + stage.k, stage.k),
                        init_adapter=init_adapter, meta=meta, adapter_kind=adapter_kind,
                        adapter_args=adapter_args or {}, depends_on=tuple(depends_on))


def max_tokens(stage: Stage, task: Task) -> int:
    return stage.cfg.eval.max_new_tokens or task.spec.max_new_tokens


def answer_with(stage: Stage, predictor: Predictor, adapter: str | None) -> Answers:
    """Every seen task (and the probe) answered by one adapter (or the base model)."""
    preds, experts = {}, {}
    for task in stage.answered:
        preds[task.name] = predictor.generate(task.test, [adapter] * len(task.test), max_tokens(stage, task))
        experts[task.name] = [adapter] * len(task.test)
    return Answers(preds, experts)


def expert_plan(stage: Stage, router, settings) -> ServingPlan:
    """A routed method's serving plan: one expert per seen task, named by the task, and the
    router record the stage stored (none at stage 0: one expert, nothing to route). A stage of
    a run made before routers stored records gets its record now, from what the stage stored
    (``router.fit`` without a model: the router LoRA and prototypes are already there)."""
    from mllmcl import storage

    experts = {t.name: stage.expert_uri(i) for i, t in enumerate(stage.seen)}
    if stage.k == 0:
        return ServingPlan(experts)
    uri = stage.router_record_uri()
    if not storage.exists(uri):
        storage.write_json(uri, router.fit(stage, settings, None))
    return ServingPlan(experts, router=storage.read_json(uri))


def fit_router(stage: Stage, router, settings, predictor) -> None:
    """Fit a routed method's router after the stage's fine-tunes (its own fine-tunes ran among
    them), store its record in the run, and note its fit time on the stage."""
    from mllmcl import storage

    t0 = time.perf_counter()
    storage.write_json(stage.router_record_uri(), router.fit(stage, settings, predictor))
    tuned = [stage.trained.get(r.output_uri, {}).get("seconds") for r in router.training(stage, settings)]
    stage.router_fit_seconds = None if None in tuned else sum(tuned) + time.perf_counter() - t0


def routed_answer(stage: Stage, predictor: Predictor, router, rng_for=None) -> Answers:
    """Answers of a method with one expert per task and a router (:class:`mllmcl.routing.Router`).

    Every seen task's test questions are routed (``rng_for(j)``: the fallback's seeded draw
    for task j, if the router has one), answered by the chosen experts, and by expert j for
    the oracle. Reports routing accuracy (overall and per task), fallbacks and the router's
    cost; the expert answers come from the prediction cache when known. The probe (a task
    not seen yet, for forward transfer) is routed among the seen experts and answered, and
    counts in none of the routing numbers (it has no expert of its own).
    """
    experts = [stage.expert_uri(i) for i in range(stage.k + 1)]
    preds, used, oracle, per_task = {}, {}, {}, {}
    right = total = fallbacks = 0
    seconds, questions = router.seconds, router.questions
    for j, task in enumerate(stage.answered):
        routes = router.route(predictor, [eval_prompt(s) for s in task.test], [s.image for s in task.test],
                              rng_for(j) if rng_for is not None else None,
                              truth=[j] * len(task.test) if j <= stage.k else None if not router.needs_truth else
                              [stage.k] * len(task.test))  # the oracle's probe: the newest expert
        choices = [r.index for r in routes]
        used[task.name] = [experts[c] for c in choices]
        preds[task.name] = predictor.generate(task.test, used[task.name], max_tokens(stage, task))
        if j > stage.k:  # the probe
            continue
        seconds, questions = router.seconds, router.questions
        oracle[task.name] = predictor.generate(task.test, [experts[j]] * len(task.test), max_tokens(stage, task))
        hits = sum(c == j for c in choices)
        per_task[task.name] = 100.0 * hits / max(1, len(choices))
        right, total, fallbacks = right + hits, total + len(choices), fallbacks + sum(r.fallback for r in routes)
    info = {"router": router.kind, "router_accuracy": 100.0 * right / max(1, total),
            "router_accuracy_per_task": per_task, "router_fallbacks": fallbacks,
            "router_fit_seconds": stage.router_fit_seconds,
            "router_seconds_per_question": seconds / questions if questions else None,
            "router_flops_per_question": router_flops(router, predictor, stage.seen[-1].test[:8]),
            "router_confusion": confusion(stage, used)}
    return Answers(preds, used, info, oracle=oracle)


def router_flops(router, predictor, samples: Sequence[Sample]) -> float | None:
    """The router's compute per question, counted on a few test questions of the newest task."""
    if not samples or len(router.experts) == 1 or not hasattr(predictor, "shape"):
        return 0.0 if len(router.experts) == 1 else None
    prompts = router.cost_prompts([eval_prompt(s) for s in samples])
    return router.flops_per_question(predictor.shape(prompts, [s.image for s in samples]))


def confusion(stage: Stage, used: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """Seen task -> expert (by its task) -> how many of the task's questions were routed there."""
    names = {stage.expert_uri(i): t.name for i, t in enumerate(stage.seen)}
    return {t.name: {e.name: sum(names[u] == e.name for u in used[t.name]) for e in stage.seen}
            for t in stage.seen}
