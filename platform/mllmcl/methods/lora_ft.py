"""lora_ft: one LoRA fine-tuned task after task (each stage starts from the previous one)."""

from mllmcl.methods import register
from mllmcl.methods.base import Answers, Stage, answer_with, request


@register("lora_ft")
class LoraFT:
    def __init__(self, cfg, stream):
        self.cfg = cfg

    def training_samples(self, stage: Stage):
        return list(stage.task.train)

    def plan(self, stage: Stage):
        init = stage.expert_uri(stage.k - 1) if stage.k > 0 else None
        return [request(stage, "lora", self.training_samples(stage), stage.expert_uri(), init_adapter=init)]

    def answer(self, stage: Stage, predictor) -> Answers:
        return answer_with(stage, predictor, stage.expert_uri())

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
