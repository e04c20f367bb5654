"""lora_ft: one LoRA fine-tuned task after task (each stage starts from the previous one)."""

from mllmcl.methods import register
from mllmcl.methods.base import Answers, CLMethod, ServingPlan, Stage, answer_with, request


@register("lora_ft")
class LoraFT(CLMethod):
    def training_samples(self, stage: Stage):
        return list(stage.task.train)

    def plan(self, stage: Stage):
        init = stage.expert_uri(stage.k - 1) if stage.k > 0 else None
        return [request(stage, "lora", self.training_samples(stage), stage.expert_uri(), init_adapter=init)]

    def answer(self, stage: Stage, predictor) -> Answers:
        return answer_with(stage, predictor, stage.expert_uri())

    def serving(self, stage: Stage) -> ServingPlan:
        return ServingPlan({self.name: stage.expert_uri()})
