"""olora: O-LoRA (Wang et al., 2023) — a new LoRA per task, kept orthogonal to the earlier ones.

Stage k trains a fresh LoRA of rank ``lora.rank`` on task k while the LoRAs of tasks
0..k-1 stay frozen and active in the forward pass; the loss adds
``method.olora_lambda1 * sum_layers ||A_old A_new^T||_F^2`` (the new task's A rows
orthogonal to every earlier task's) and ``method.olora_lambda2 * sum ||theta_new||_2``.
The stage's adapter is the concatenation of all task LoRAs (rank ``(k+1) * lora.rank``),
i.e. at inference every task's LoRA is active and their outputs sum. No task identity
is used at test time.
"""

from mllmcl.methods import register
from mllmcl.methods.base import Answers, CLMethod, ServingPlan, Stage, answer_with, request


@register("olora")
class OLoRA(CLMethod):
    def plan(self, stage: Stage):
        m = self.cfg.method
        previous = stage.expert_uri(stage.k - 1) if stage.k > 0 else None
        return [request(stage, "lora", stage.task.train, stage.expert_uri(), recipe="olora",
                        recipe_args={"lambda1": m.olora_lambda1, "lambda2": m.olora_lambda2, "previous": previous},
                        olora_tasks=stage.k + 1)]

    def answer(self, stage: Stage, predictor) -> Answers:
        return answer_with(stage, predictor, stage.expert_uri())

    def serving(self, stage: Stage) -> ServingPlan:
        return ServingPlan({self.name: stage.expert_uri()})  # the summed task LoRAs, one PEFT adapter
