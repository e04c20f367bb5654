"""disco: DISCO as MCITlib implements it — per-task LoRA experts in every adapted layer, mixed
softly at every layer by the question's similarity to each task's text prototype.

Every adapted linear layer of the language model (``lora.target_modules``) holds one LoRA
expert per task, of rank ``method.disco_expert_rank`` (default ``lora.rank`` split over the
stream's tasks, at least 1). Stage ``t`` trains expert ``t`` alone (base and earlier experts
frozen, out of the training forward). After the task, its prototype is the frozen base's
mean instruction feature over ``method.disco_anchor_samples`` of its train questions. At test
time every adapted layer adds ``sum_i w_i B_i A_i x``, ``w = softmax_i(cos(text, prototype_i)
/ method.disco_temperature)`` (0.05), per question, from the question's own feature; no task
identity. ``Answers.info["mix_top_accuracy"]``: how often the largest weight is on the
question's own task. The layer, format and kind are shared with ``hide``
(:mod:`mllmcl.methods._task_experts`).

**disco vs disco_select.** ``disco_select`` (:mod:`mllmcl.methods.disco_select`) is our older
reading: one independent PEFT LoRA per task (trained from the base, as MR-LoRA's), and at
test time an *argmax* over the prototypes (the ``text_prototype`` router, features from
``Engine.embed``: the question's text alone) picks *one* expert, which answers the whole
question; it is routed, so the service serves it as router + expert ensemble, and it reports
``router_accuracy``. ``disco`` is MCITlib's DISCO: a *soft* mixture of every seen task's
expert, weighted by a sharp softmax (T 0.05), *inside every adapted layer* of one adapter
(its own format), never a hard choice; a question near two prototypes gets both experts.
``mix_top_accuracy`` is the argmax of its weights, comparable to disco_select's
``router_accuracy`` (their features differ: see below).

Departures from the reference:

- the prototype's text feature is not a frozen CLIP text encoder's pooled output of the
  question text: it is the base model's final hidden state mean-pooled over the question read
  with its image (``Engine.batch_features``' ``hidden``), the one text feature the decoding
  path can compute from its prompt batch exactly as the prototypes were computed (so the image
  also shapes it; disco_select's ``embed`` reads the text alone but cannot be recomputed from
  the decoding batch);
- the prototype averages a seeded sample of the task's train questions, after training;
- expert scaling is ``lora.alpha / lora.rank`` (the stream's LoRA scaling), for every expert.
"""

from __future__ import annotations

from dataclasses import dataclass

from mllmcl.methods import register
from mllmcl.methods._task_experts import (TaskExpertsFormat, expert_settings, mixed_answer, not_servable,
                                          plan_experts, store_anchors)
from mllmcl.methods.base import Answers, CLMethod, MethodOptions, NotServable, Stage

ANCHOR_SALT = 7927  # the prototypes' sample draw: seed, this, stage


@dataclass(frozen=True)
class DiscoOptions(MethodOptions):
    disco_expert_rank: int = 0  # each task's expert rank; 0 = lora.rank // tasks in the stream (at least 1)
    disco_anchor_samples: int = 100  # train questions averaged into a task's prototype
    disco_temperature: float = 0.05  # softmax temperature of the prototype similarities

    def check(self) -> list[str]:
        p = []
        if self.disco_expert_rank < 0:
            p.append(f"method.disco_expert_rank={self.disco_expert_rank}: must be >= 1 (or 0: lora.rank // tasks)")
        if self.disco_anchor_samples < 1:
            p.append(f"method.disco_anchor_samples={self.disco_anchor_samples}: must be >= 1")
        if not self.disco_temperature > 0:
            p.append(f"method.disco_temperature={self.disco_temperature}: must be > 0")
        return p

    def check_with(self, cfg) -> list[str]:
        if cfg.lora.train_projector:
            return ["lora.train_projector: not supported by disco (its experts live in the language model's "
                    "layers only); use it with mr_lora, lora_ft, replay or joint"]
        return []


@register("disco")
class Disco(CLMethod):
    Options = DiscoOptions
    adapter_format = TaskExpertsFormat

    def __init__(self, cfg, stream):
        super().__init__(cfg, stream)
        o = self.options
        self.settings = expert_settings(cfg, len(stream), "disco", o.disco_expert_rank, o.disco_temperature)

    def plan(self, stage: Stage):
        return plan_experts(stage, self.settings)

    def finish(self, stage: Stage, predictor) -> None:
        store_anchors(stage, predictor, self.settings, self.name, self.options.disco_anchor_samples, ANCHOR_SALT)

    def answer(self, stage: Stage, predictor) -> Answers:
        return mixed_answer(stage, predictor, self.settings, self.name)

    def serving(self, stage: Stage):
        raise NotServable(not_servable(self.name))
