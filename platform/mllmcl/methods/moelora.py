"""moelora: MoELoRA — a mixture of LoRA experts with a learned per-token gate in every
targeted linear layer of the language model, fine-tuned task after task (as ``lora_ft``,
each stage continues the previous stage's adapter).

``method.moe_experts`` experts of rank ``lora.rank / moe_experts`` each (the same
parameter budget as the LoRA baselines, plus the gates); ``method.moe_gate`` is
``softmax`` (dense mixture) or ``topk`` (softmax over the ``method.moe_top_k`` best
experts per token). See :mod:`mllmcl.models.moelora`.
"""

from dataclasses import asdict

from mllmcl.methods import register
from mllmcl.methods.base import Answers, CLMethod, NotServable, Stage, answer_with, request
from mllmcl.models.moelora import MoELoraSettings


def moe_settings(cfg) -> MoELoraSettings:
    m, lora = cfg.method, cfg.lora
    return MoELoraSettings(experts=m.moe_experts, expert_rank=max(1, lora.rank // m.moe_experts),
                           alpha=float(lora.alpha), dropout=lora.dropout, gate=m.moe_gate, top_k=m.moe_top_k,
                           target_modules=tuple(lora.target_modules))


@register("moelora")
class MoELoRA(CLMethod):
    def plan(self, stage: Stage):
        init = stage.expert_uri(stage.k - 1) if stage.k > 0 else None
        moe = asdict(moe_settings(self.cfg))
        moe["target_modules"] = list(moe["target_modules"])
        return [request(stage, "lora", stage.task.train, stage.expert_uri(), init_adapter=init, recipe="moelora",
                        recipe_args={"moe": moe})]

    def answer(self, stage: Stage, predictor) -> Answers:
        return answer_with(stage, predictor, stage.expert_uri())

    def serving(self, stage: Stage):
        raise NotServable("moelora adapters are not PEFT adapters, so PEFT cannot batch them across experts; "
                          "evaluate MoELoRA runs with the stream runner")
