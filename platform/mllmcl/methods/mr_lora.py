"""mr_lora: MR-LoRA — one LoRA expert per task trained from the frozen base, plus an
MLLM router (the base model + a router LoRA) that names the expert for each question.

Stage k trains expert k on task k only, then a fresh router LoRA on
``method.router_samples_per_task`` train samples of every seen task (cumulative),
labelled with the letter of the task's expert. At test time the router answers a
letter; an answer that does not parse falls back to ``method.router_fallback``
(``random``: a seeded random seen expert, as the reference; ``last``: the newest
expert; ``first``: expert A) and is counted. At stage 0 there is one expert and no
router. Expert predictions are cached by the runner, so later stages only re-route.
"""

from __future__ import annotations

import numpy as np

from mllmcl.data.prompts import eval_prompt
from mllmcl.methods import register
from mllmcl.methods.base import Answers, CLMethod, ServingPlan, Stage, request, routed_answer
from mllmcl.models.lora import LoraSettings
from mllmcl.routing.router import parse_letter, router_prompt, router_training_samples
from mllmcl.training.loop import TrainSettings

ROUTER_MAX_NEW_TOKENS = 4


@register("mr_lora")
class MRLoRA(CLMethod):
    routed = True

    def router_settings(self, stage: Stage) -> tuple[LoraSettings, TrainSettings]:
        m, lora = self.cfg.method, self.cfg.lora
        return (LoraSettings(rank=m.router_rank, alpha=2 * m.router_rank, dropout=lora.dropout,
                             target_modules=tuple(lora.target_modules)),
                TrainSettings(epochs=m.router_epochs, batch_size=m.router_batch_size, lr=m.router_lr,
                              warmup_ratio=self.cfg.train.warmup_ratio, seed=self.cfg.run.seed + 1000 + stage.k))

    def plan(self, stage: Stage):
        reqs = [request(stage, "expert", stage.task.train, stage.expert_uri())]
        if stage.k > 0:
            samples = router_training_samples(stage.seen, self.cfg.method.router_samples_per_task, self.cfg.run.seed)
            lora, train = self.router_settings(stage)
            reqs.append(request(stage, "router", samples, stage.router_uri(), lora=lora, train=train,
                                experts=[t.name for t in stage.seen]))
        return reqs

    def route(self, stage: Stage, predictor, task_index: int) -> tuple[list[int], list[str], int]:
        """(expert index per test sample, raw router answers, number of fallbacks)."""
        task = stage.seen[task_index]
        n = len(task.test)
        if stage.k == 0:
            return [0] * n, ["A"] * n, 0
        specs = [t.spec for t in stage.seen]
        questions = [router_prompt(specs, eval_prompt(s)) for s in task.test]
        raw = predictor.generate(task.test, [stage.router_uri()] * n, ROUTER_MAX_NEW_TOKENS, questions=questions)
        rng = np.random.default_rng([self.cfg.run.seed, 31337, stage.k, task_index])
        fallback = self.cfg.method.router_fallback
        choices, n_fallback = [], 0
        for answer in raw:
            idx = parse_letter(answer, len(specs))
            if idx is None:
                n_fallback += 1
                idx = {"first": 0, "last": stage.k}.get(fallback, None)
                if idx is None:
                    idx = int(rng.integers(stage.k + 1))
            choices.append(idx)
        return choices, raw, n_fallback

    def answer(self, stage: Stage, predictor) -> Answers:
        def choose(j: int):
            choices, _, n_fallback = self.route(stage, predictor, j)
            return choices, n_fallback

        answers = routed_answer(stage, predictor, choose)
        answers.info["router_fallback_rule"] = self.cfg.method.router_fallback
        return answers

    def serving(self, stage: Stage) -> ServingPlan:
        experts = {t.name: stage.expert_uri(i) for i, t in enumerate(stage.seen)}
        return ServingPlan(experts, router=stage.router_uri() if stage.k > 0 else None)
