"""hide: HiDe-LLaVA (Guo et al., ACL 2025), hierarchical decoupling of per-task LoRA experts:
fused in the lower layers, mixed by task anchors in the last decoder layer.

Every adapted linear layer of the language model (``lora.target_modules``) holds one LoRA
expert per task, of rank ``method.hide_expert_rank`` (default ``lora.rank`` split over the
stream's tasks, at least 1; the reference's DCL run: rank 160 over 5 tasks). Stage ``t``
trains expert ``t`` alone: the base and the earlier experts are frozen, and the training
forward is the base plus expert ``t`` (as the reference trains its per-task experts). After
the task, its two anchors are the frozen base's mean image feature and mean instruction
feature over ``method.hide_anchor_samples`` of its train questions.

At test time (stage ``k``, experts ``0..k``), with no task identity:

- every layer but the last decoder layer adds ``(sum_i B_i)(sum_i A_i) x``: the A's and the
  B's are summed separately (W += (ΣB)(ΣA)), cross terms ``B_i A_j`` included, as the
  reference's fusion;
- the last decoder layer's adapted linears add ``sum_i w_i B_i A_i x`` with ``w = softmax_i(
  (cos(image, image_anchor_i) + cos(text, text_anchor_i)) / 2 / method.hide_temperature)``
  (0.1, the reference's), per question, from the question's own features.

``Answers.info["mix_top_accuracy"]``: how often the largest weight is on the question's own
task (compare with disco_select's ``router_accuracy``). The layer, format and kind are shared
with ``disco`` (:mod:`mllmcl.methods._task_experts`, where the stage folder's layout is).

Departures from the reference:

- the instruction feature is not a frozen CLIP text encoder's pooled output of the question
  text: it is the base model's final hidden state mean-pooled over the question read with its
  image (``Engine.batch_features``' ``hidden``), the one text feature the decoding path can
  compute from its prompt batch exactly as the anchors were computed; the image feature is the
  projector's output mean-pooled over the image's positions (the reference's CLIP image
  embedding plays that part);
- the anchors are computed after the task is trained, from a seeded sample of its train
  questions through the frozen base (the reference keeps running means while training; with
  a frozen feature extractor the two are the same mean, over a subset here);
- the lower layers add the fused low-rank update on the fly instead of merging it into W (the
  same function; the engine keeps several stages loaded at once);
- expert scaling is ``lora.alpha / lora.rank`` (the stream's LoRA scaling), for every expert.
"""

from __future__ import annotations

from dataclasses import dataclass

from mllmcl.methods import register
from mllmcl.methods._task_experts import (TaskExpertsFormat, expert_settings, mixed_answer, not_servable,
                                          plan_experts, store_anchors)
from mllmcl.methods.base import Answers, CLMethod, MethodOptions, NotServable, Stage

ANCHOR_SALT = 7919  # the anchors' sample draw: seed, this, stage


@dataclass(frozen=True)
class HiDeOptions(MethodOptions):
    hide_expert_rank: int = 0  # each task's expert rank; 0 = lora.rank // tasks in the stream (at least 1)
    hide_anchor_samples: int = 100  # train questions averaged into a task's two anchors
    hide_temperature: float = 0.1  # softmax temperature of the last layer's anchor similarities

    def check(self) -> list[str]:
        p = []
        if self.hide_expert_rank < 0:
            p.append(f"method.hide_expert_rank={self.hide_expert_rank}: must be >= 1 (or 0: lora.rank // tasks)")
        if self.hide_anchor_samples < 1:
            p.append(f"method.hide_anchor_samples={self.hide_anchor_samples}: must be >= 1")
        if not self.hide_temperature > 0:
            p.append(f"method.hide_temperature={self.hide_temperature}: must be > 0")
        return p

    def check_with(self, cfg) -> list[str]:
        if cfg.lora.train_projector:
            return ["lora.train_projector: not supported by hide (its experts live in the language model's layers "
                    "only); use it with mr_lora, lora_ft, replay or joint"]
        return []


@register("hide")
class HiDe(CLMethod):
    Options = HiDeOptions
    adapter_format = TaskExpertsFormat

    def __init__(self, cfg, stream):
        super().__init__(cfg, stream)
        o = self.options
        self.settings = expert_settings(cfg, len(stream), "hide", o.hide_expert_rank, o.hide_temperature)

    def plan(self, stage: Stage):
        return plan_experts(stage, self.settings)

    def finish(self, stage: Stage, predictor) -> None:
        store_anchors(stage, predictor, self.settings, self.name, self.options.hide_anchor_samples, ANCHOR_SALT)

    def answer(self, stage: Stage, predictor) -> Answers:
        return mixed_answer(stage, predictor, self.settings, self.name)

    def serving(self, stage: Stage):
        raise NotServable(not_servable(self.name))
