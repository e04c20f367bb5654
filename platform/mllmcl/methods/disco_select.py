"""disco_select: one LoRA expert per task (trained from the frozen base, as MR-LoRA's),
chosen at test time by identity: the cosine similarity between the question's text
embedding and each seen task's prototype (DISCO / HiDe-style task-identity selection),
the ``text_prototype`` router (:mod:`mllmcl.routing.text_prototype`).

The embedding is the base model's own language model, mean-pooled over the question's
tokens (no download, works for every backbone); a task's prototype is the mean embedding
of ``method.prototype_samples_per_task`` of its train questions, computed once, after
the task is trained, and stored in the run (``tasks/<k>_<task>/prototype.json``). This is
a second, cheaper router to compare with MR-LoRA's MLLM router: selection accuracy is
reported under the same keys (``router_accuracy``...).
"""

from __future__ import annotations

from dataclasses import dataclass

from mllmcl import storage
from mllmcl.methods import register
from mllmcl.methods.base import (Answers, CLMethod, MethodOptions, ServingPlan, Stage, expert_plan, fit_router,
                                 request, routed_answer)
from mllmcl.routing import load_router
from mllmcl.routing.text_prototype import TextPrototypeRouter, TextPrototypeSettings


@dataclass(frozen=True)
class DiscoSelectOptions(MethodOptions):
    prototype_samples_per_task: int = 100  # train questions averaged into a task's prototype

    def check(self) -> list[str]:
        if self.prototype_samples_per_task < 1:
            return [f"method.prototype_samples_per_task={self.prototype_samples_per_task}: must be >= 1"]
        return []


@register("disco_select")
class DiscoSelect(CLMethod):
    Options = DiscoSelectOptions
    routed = True

    def router_settings(self) -> TextPrototypeSettings:
        return TextPrototypeSettings(samples_per_task=self.options.prototype_samples_per_task, seed=self.cfg.run.seed)

    def plan(self, stage: Stage):
        return [request(stage, "expert", stage.task.train, stage.expert_uri())]

    def finish(self, stage: Stage, predictor) -> None:
        fit_router(stage, TextPrototypeRouter, self.router_settings(), predictor)

    def answer(self, stage: Stage, predictor) -> Answers:
        router = load_router(storage.read_json(stage.router_record_uri()), stage.layout.run_dir)
        answers = routed_answer(stage, predictor, router)
        answers.info["selector"] = "text-prototype cosine"
        return answers

    def serving(self, stage: Stage) -> ServingPlan:
        return expert_plan(stage, TextPrototypeRouter, self.router_settings())  # the service routes the same
