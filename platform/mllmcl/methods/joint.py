"""joint: one LoRA trained from the base on all tasks at once (the non-continual upper bound).

``method.joint_mode=cumulative`` (default) trains, at every stage, a fresh LoRA on the
union of tasks 1..k, so the accuracy matrix is complete; ``final`` trains once, on all
tasks, at the last stage, and earlier stages are answered by the base model.
"""

from mllmcl.methods import register
from mllmcl.methods.base import CLMethod, Answers, ServingPlan, Stage, answer_with, request


@register("joint")
class Joint(CLMethod):
    def _trains(self, stage: Stage) -> bool:
        return self.cfg.method.joint_mode == "cumulative" or stage.k == len(stage.stream.tasks) - 1

    def plan(self, stage: Stage):
        if not self._trains(stage):
            return []
        tasks = stage.seen if self.cfg.method.joint_mode == "cumulative" else stage.stream.tasks
        samples = [s for t in tasks for s in t.train]
        return [request(stage, "lora", samples, stage.expert_uri(), tasks=[t.name for t in tasks])]

    def answer(self, stage: Stage, predictor) -> Answers:
        return answer_with(stage, predictor, stage.expert_uri() if self._trains(stage) else None)

    def serving(self, stage: Stage) -> ServingPlan:
        return ServingPlan({self.name: stage.expert_uri() if self._trains(stage) else None})
