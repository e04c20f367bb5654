"""joint: one LoRA trained from the base on all tasks at once (the non-continual upper bound).

``method.joint_mode=cumulative`` (default) trains, at every stage, a fresh LoRA on the
union of tasks 1..k, so the accuracy matrix is complete; ``final`` trains once, on all
tasks, at the last stage, and earlier stages are answered by the base model.
"""

from dataclasses import dataclass

from mllmcl.methods import register
from mllmcl.methods.base import Answers, CLMethod, MethodOptions, ServingPlan, Stage, answer_with, request


@dataclass(frozen=True)
class JointOptions(MethodOptions):
    joint_mode: str = "cumulative"  # cumulative: tasks 1..k at every stage | final: all tasks, once, at the end

    def check(self) -> list[str]:
        if self.joint_mode not in ("cumulative", "final"):
            return [f"method.joint_mode={self.joint_mode!r}: expected cumulative or final"]
        return []


@register("joint")
class Joint(CLMethod):
    Options = JointOptions

    def _trains(self, stage: Stage) -> bool:
        return self.options.joint_mode == "cumulative" or stage.k == len(stage.stream.tasks) - 1

    def plan(self, stage: Stage):
        if not self._trains(stage):
            return []
        tasks = stage.seen if self.options.joint_mode == "cumulative" else stage.stream.tasks
        samples = [s for t in tasks for s in t.train]
        return [request(stage, "lora", samples, stage.expert_uri(), tasks=[t.name for t in tasks])]

    def answer(self, stage: Stage, predictor) -> Answers:
        return answer_with(stage, predictor, stage.expert_uri() if self._trains(stage) else None)

    def serving(self, stage: Stage) -> ServingPlan:
        return ServingPlan({self.name: stage.expert_uri() if self._trains(stage) else None})
