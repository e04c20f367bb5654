"""``mllm``: MR-LoRA's router, the base MLLM plus a router LoRA that answers the expert's letter.

At stage k (k > 0) a fresh router LoRA is fine-tuned on ``samples_per_task`` train samples of
every seen task (cumulative, train splits only), each relabelled with the letter of its
task's expert. At test time the prompt lists the experts' descriptions with their letters
(:func:`mllmcl.data.prompts.router_prompt`); an answer that does not parse falls back to
the rule (:func:`mllmcl.routing.base.fallback_index`) and is counted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from mllmcl import storage
from mllmcl.data.prompts import LETTERS, parse_letter, router_prompt
from mllmcl.data.streams import get_stream_spec
from mllmcl.data.types import Sample
from mllmcl.routing.base import Route, Router, RouterStage, fallback_index, register_router
from mllmcl.settings import LANGUAGE_MODEL_LINEARS, LoraSettings, TrainSettings
from mllmcl.storage.layout import relative_adapter
from mllmcl.training.request import TrainRequest

__all__ = ["LETTERS", "MAX_NEW_TOKENS", "MLLMRouter", "MLLMRouterSettings", "parse_letter", "router_prompt",
           "router_training_samples"]

MAX_NEW_TOKENS = 4  # the router answers a letter


@dataclass(frozen=True)
class MLLMRouterSettings:
    samples_per_task: int = 20
    epochs: float = 30.0
    lr: float = 2e-3
    rank: int = 16
    batch_size: int = 16
    fallback: str = "random"  # random | last | first
    seed: int = 0  # the run's seed
    warmup_ratio: float = 0.03
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LANGUAGE_MODEL_LINEARS


def router_training_samples(tasks: Sequence, per_task: int, seed: int) -> list[Sample]:
    """``per_task`` train samples of each seen task, relabelled with the letter of its expert.

    The draw for task i depends only on (seed, i), so stage k's set contains stage k-1's.
    """
    experts = [t.spec for t in tasks]
    out: list[Sample] = []
    for i, task in enumerate(tasks):
        rng = np.random.default_rng([seed, 7919, i])
        n = min(per_task, len(task.train))
        pick = sorted(rng.choice(len(task.train), n, replace=False).tolist())
        for j in pick:
            s = task.train[j]
            out.append(replace(s, uid=f"router:{s.uid}", question=router_prompt(experts, s.question),
                               answer=LETTERS[i], meta={}))
    return out


@register_router("mllm")
class MLLMRouter(Router):
    @classmethod
    def training(cls, stage: RouterStage, settings: MLLMRouterSettings) -> list[TrainRequest]:
        if stage.k == 0:
            return []
        samples = router_training_samples(stage.seen, settings.samples_per_task, settings.seed)
        lora = LoraSettings(rank=settings.rank, alpha=2 * settings.rank, dropout=settings.dropout,
                            target_modules=tuple(settings.target_modules))
        train = TrainSettings(epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                              warmup_ratio=settings.warmup_ratio, seed=settings.seed + 1000 + stage.k)
        return [TrainRequest(stage=stage.k, task=stage.task.name, kind="router", samples=samples,
                             output_uri=stage.router_uri(), lora=lora, train=train,
                             meta={"experts": [t.name for t in stage.seen]})]

    @classmethod
    def fit(cls, stage: RouterStage, settings: MLLMRouterSettings, backend=None) -> dict:
        return {"kind": cls.kind, "stream": stage.stream.name, "experts": [t.name for t in stage.seen],
                "adapter": relative_adapter(stage.router_uri(), stage.layout.run_dir) if stage.k > 0 else None,
                "fallback": settings.fallback, "seed": settings.seed, "max_new_tokens": MAX_NEW_TOKENS}

    def __init__(self, record: dict, run_dir: str):
        super().__init__(record, run_dir)
        spec = get_stream_spec(record["stream"])
        self.specs = [spec.task(n) for n in self.experts]
        self.adapter = self.path(record["adapter"]) if record.get("adapter") else None
        self.fallback = record.get("fallback", "random")
        self.seed = int(record.get("seed", 0))
        self.max_new_tokens = int(record.get("max_new_tokens", MAX_NEW_TOKENS))

    def files(self) -> list[str]:
        return [storage.join(self.adapter, "meta.json")] if self.adapter is not None else []

    def prepare(self, backend) -> None:
        if self.adapter is not None and hasattr(backend, "load"):
            backend.load(self.adapter, name="router")

    def prompts(self, questions: Sequence[str]) -> list[str]:
        return [router_prompt(self.specs, q) for q in questions]

    def select(self, backend, questions: list[str], images: list, rng=None, truth=None) -> list[Route]:
        raw = backend.complete(self.prompts(questions), images, self.adapter, self.max_new_tokens)
        out = []
        for q, answer in zip(questions, raw):
            idx = parse_letter(answer, len(self.experts))
            out.append(Route(idx, answer, False) if idx is not None else
                       Route(fallback_index(self.fallback, len(self.experts), self.seed, q, rng), answer, True))
        return out

    def cost_prompts(self, questions: Sequence[str]) -> list[str]:
        return self.prompts(questions)

    def flops_per_question(self, shape: dict) -> float:
        # the base model (+ a router LoRA, negligible) reads the router prompt with the image and writes a letter
        return 2.0 * shape["params"] * (shape["prompt_tokens"] + self.max_new_tokens)
