"""zero_shot: the base model on every task, nothing trained (the table's first row)."""

from mllmcl.methods import register
from mllmcl.methods.base import Answers, CLMethod, ServingPlan, Stage, answer_with


@register("zero_shot")
class ZeroShot(CLMethod):
    def plan(self, stage: Stage):
        return []

    def answer(self, stage: Stage, predictor) -> Answers:
        return answer_with(stage, predictor, None)

    def serving(self, stage: Stage) -> ServingPlan:
        return ServingPlan({"base": None})
