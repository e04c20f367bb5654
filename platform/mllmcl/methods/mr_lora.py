"""mr_lora: MR-LoRA — one LoRA expert per task trained from the frozen base, plus an
MLLM router (the base model + a router LoRA, :mod:`mllmcl.routing.mllm`) that names the
expert for each question. ``method.router`` swaps the router and keeps the experts:
``mllm`` (the paper's, default), ``text_prototype``, ``mm_prototype``, ``ridge`` or
``oracle`` (the bound); the router options below apply to the routers that have them
(``router_samples_per_task``: all but the oracle; ``router_ridge_lambda``: ridge).

Stage k trains expert k on task k only, then a fresh router LoRA on
``method.router_samples_per_task`` train samples of every seen task (cumulative),
labelled with the letter of the task's expert. At test time the router answers a
letter; an answer that does not parse falls back to ``method.router_fallback``
(``random``: a seeded random seen expert, as the reference; ``last``: the newest
expert; ``first``: expert A) and is counted. At stage 0 there is one expert and no
router. Expert predictions are cached by the runner, so later stages only re-route.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mllmcl import storage
from mllmcl.methods import register
from mllmcl.methods.base import (Answers, CLMethod, MethodOptions, ServingPlan, Stage, expert_plan, fit_router,
                                 request, routed_answer)
from mllmcl.routing import FALLBACK_RULES, get_router, load_router, registered_routers
from mllmcl.routing.mllm import MLLMRouterSettings
from mllmcl.routing.mm_prototype import MMPrototypeSettings
from mllmcl.routing.oracle import OracleSettings
from mllmcl.routing.ridge import RidgeSettings
from mllmcl.routing.text_prototype import TextPrototypeSettings


@dataclass(frozen=True)
class MRLoRAOptions(MethodOptions):
    router: str = "mllm"  # mllm | text_prototype | mm_prototype | ridge | oracle
    router_samples_per_task: int = 20  # train samples per seen task in the router's fine-tune (or its prototype)
    router_ridge_lambda: float = 1.0  # ridge: the regulariser λ
    router_epochs: float = 30.0
    router_lr: float = 2e-3
    router_rank: int = 16
    router_batch_size: int = 16
    router_fallback: str = "random"  # random | last | first: expert used when the router's answer does not parse

    def check(self) -> list[str]:
        p = []
        if self.router not in registered_routers():
            p.append(f"method.router={self.router!r}: expected one of {', '.join(registered_routers())}")
        if self.router_ridge_lambda <= 0:
            p.append(f"method.router_ridge_lambda={self.router_ridge_lambda}: must be > 0")
        if self.router_samples_per_task < 1:
            p.append(f"method.router_samples_per_task={self.router_samples_per_task}: must be >= 1")
        if self.router_epochs <= 0:
            p.append(f"method.router_epochs={self.router_epochs}: must be > 0")
        if not 0 < self.router_lr < 1:
            p.append(f"method.router_lr={self.router_lr}: must be in (0, 1)")
        if self.router_rank < 1:
            p.append(f"method.router_rank={self.router_rank}: must be >= 1")
        if self.router_batch_size < 1:
            p.append(f"method.router_batch_size={self.router_batch_size}: must be >= 1")
        if self.router_fallback not in FALLBACK_RULES:
            p.append(f"method.router_fallback={self.router_fallback!r}: expected random, last or first")
        return p


@register("mr_lora")
class MRLoRA(CLMethod):
    Options = MRLoRAOptions
    routed = True

    @property
    def router(self):
        return get_router(self.options.router)

    def router_settings(self):
        m, cfg = self.options, self.cfg
        if m.router == "text_prototype":
            return TextPrototypeSettings(samples_per_task=m.router_samples_per_task, seed=cfg.run.seed)
        if m.router == "mm_prototype":
            return MMPrototypeSettings(samples_per_task=m.router_samples_per_task, seed=cfg.run.seed)
        if m.router == "ridge":
            return RidgeSettings(samples_per_task=m.router_samples_per_task, lam=m.router_ridge_lambda,
                                 seed=cfg.run.seed)
        if m.router == "oracle":
            return OracleSettings()
        return MLLMRouterSettings(samples_per_task=m.router_samples_per_task, epochs=m.router_epochs,
                                  lr=m.router_lr, rank=m.router_rank, batch_size=m.router_batch_size,
                                  fallback=m.router_fallback, seed=cfg.run.seed, warmup_ratio=cfg.train.warmup_ratio,
                                  dropout=cfg.lora.dropout, target_modules=tuple(cfg.lora.target_modules))

    def plan(self, stage: Stage):
        return [request(stage, "expert", stage.task.train, stage.expert_uri()),
                *self.router.training(stage, self.router_settings())]

    def finish(self, stage: Stage, predictor) -> None:
        fit_router(stage, self.router, self.router_settings(), predictor)

    def answer(self, stage: Stage, predictor) -> Answers:
        router = load_router(storage.read_json(stage.router_record_uri()), stage.layout.run_dir)
        seed = self.cfg.run.seed
        answers = routed_answer(stage, predictor, router,
                                lambda j: np.random.default_rng([seed, 31337, stage.k, j]))
        if self.options.router == "mllm":
            answers.info["router_fallback_rule"] = self.options.router_fallback
        return answers

    def serving(self, stage: Stage) -> ServingPlan:
        return expert_plan(stage, self.router, self.router_settings())
