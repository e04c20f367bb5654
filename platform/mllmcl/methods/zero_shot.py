"""zero_shot: the base model on every task, nothing trained (the table's first row)."""

from mllmcl.methods import register
from mllmcl.methods.base import Answers, Stage, answer_with


@register("zero_shot")
class ZeroShot:
    def __init__(self, cfg, stream):
        self.cfg = cfg

    def plan(self, stage: Stage):
        return []

    def answer(self, stage: Stage, predictor) -> Answers:
        return answer_with(stage, predictor, None)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
