"""olora: O-LoRA (Wang et al., 2023) — a new LoRA per task, kept orthogonal to the earlier ones.

Stage k trains a fresh LoRA of rank ``lora.rank`` on task k while the LoRAs of tasks
0..k-1 stay frozen and active in the forward pass; the loss adds
``method.olora_lambda1 * sum_layers ||A_old A_new^T||_F^2`` (the new task's A rows
orthogonal to every earlier task's) and ``method.olora_lambda2 * sum ||theta_new||_2``.
The stage's adapter is the concatenation of all task LoRAs (rank ``(k+1) * lora.rank``),
i.e. at inference every task's LoRA is active and their outputs sum. No task identity
is used at test time. The adapter kind (:class:`OLoraKind`) builds, regularises and
saves it in the training workers; the result is one PEFT adapter.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass

import torch

from mllmcl.methods import register
from mllmcl.methods.base import Answers, CLMethod, MethodOptions, ServingPlan, Stage, answer_with, request
from mllmcl.training.adapter_kinds import unwrap

OLD, NEW = "old", "new"


def orthogonality_loss(model, old: str = OLD, new: str = NEW) -> torch.Tensor:
    """sum over LoRA layers of ||A_old A_new^T||_F^2 (PEFT stores A as rank x in)."""
    from peft.tuners.lora import LoraLayer

    total = torch.zeros(())
    for m in unwrap(model).modules():
        if isinstance(m, LoraLayer) and old in m.lora_A and new in m.lora_A:
            prod = m.lora_A[old].weight.float() @ m.lora_A[new].weight.float().T
            total = total + prod.pow(2).sum()
    return total


def l2_loss(model, new: str = NEW) -> torch.Tensor:
    """sum of the L2 norms of the new adapter's parameters (as the O-LoRA reference code)."""
    from peft.tuners.lora import LoraLayer

    total = torch.zeros(())
    for m in unwrap(model).modules():
        if isinstance(m, LoraLayer) and new in m.lora_A:
            total = total + m.lora_A[new].weight.float().norm(2) + m.lora_B[new].weight.float().norm(2)
    return total


def concatenate_lora(model, old: str = OLD, new: str = NEW):
    """(LoraConfig, state dict) of one adapter equal to the sum of ``old`` and ``new``.

    Ranks concatenate (A rows, B columns); ``new``'s B is rescaled when the two
    adapters' ``alpha / r`` differ, so the sum is exact.
    """
    from peft import get_peft_model_state_dict

    core = unwrap(model)
    c_old, c_new = core.peft_config[old], core.peft_config[new]
    s_old, s_new = c_old.lora_alpha / c_old.r, c_new.lora_alpha / c_new.r
    sd_old = get_peft_model_state_dict(core, adapter_name=old)
    sd_new = get_peft_model_state_dict(core, adapter_name=new)
    if set(sd_old) != set(sd_new):
        raise ValueError("O-LoRA: the old and new adapters wrap different layers")
    merged = {}
    for key, a in sd_old.items():
        b = sd_new[key]
        if ".lora_A." in key:
            merged[key] = torch.cat([a, b], dim=0)
        elif ".lora_B." in key:
            merged[key] = torch.cat([a, b * (s_new / s_old)], dim=1)
        else:
            raise ValueError(f"O-LoRA: unexpected adapter tensor {key}")
    rank = c_old.r + c_new.r
    config = dataclasses.replace(c_old, r=rank, lora_alpha=s_old * rank)
    return config, {k: v.detach().cpu().contiguous() for k, v in merged.items()}


class OLoraKind:
    """``adapter_args``: ``lambda1``, ``lambda2``, ``previous`` (URI of the earlier tasks' adapter or None)."""

    def __init__(self, request):
        self.request = request
        args = request.adapter_args
        self.lambda1 = float(args.get("lambda1", 0.5))
        self.lambda2 = float(args.get("lambda2", 0.0))
        self.previous = args.get("previous")

    def build(self, backbone_model):
        from peft import PeftModel, get_peft_model

        from mllmcl.models.adapters import local_adapter

        from mllmcl.models.lora import peft_config

        config = peft_config(self.request.lora)
        if not self.previous:
            return get_peft_model(backbone_model, config, adapter_name=NEW)
        with local_adapter(self.previous) as local:
            model = PeftModel.from_pretrained(backbone_model, local, adapter_name=OLD, is_trainable=False)
        model.add_adapter(NEW, config)
        model.base_model.set_adapter([OLD, NEW])  # both in the forward; only NEW trains
        for name, p in model.named_parameters():
            p.requires_grad_(f".{NEW}." in name)
        return model

    def extra_loss(self, model) -> torch.Tensor | None:
        terms = []
        if self.previous and self.lambda1:
            terms.append(self.lambda1 * orthogonality_loss(model))
        if self.lambda2:
            terms.append(self.lambda2 * l2_loss(model))
        return sum(terms) if terms else None

    def save(self, model, uri: str, meta: dict) -> None:
        from safetensors.torch import save_file

        from mllmcl.models.adapters import publish_adapter, save_adapter

        core = unwrap(model)
        meta = {**meta, "olora_lambda1": self.lambda1, "olora_lambda2": self.lambda2}
        if not self.previous:
            save_adapter(core, uri, meta, adapter_name=NEW)
            return
        config, weights = concatenate_lora(core)
        with tempfile.TemporaryDirectory(prefix="adapter-") as tmp:
            config.save_pretrained(tmp)
            save_file(weights, os.path.join(tmp, "adapter_model.safetensors"))
            publish_adapter(tmp, uri, meta)


@dataclass(frozen=True)
class OLoRAOptions(MethodOptions):
    olora_lambda1: float = 0.5  # weight of the orthogonality loss
    olora_lambda2: float = 0.0  # weight of the L2 loss of the new task's LoRA

    def check(self) -> list[str]:
        if self.olora_lambda1 < 0 or self.olora_lambda2 < 0:
            return [f"method.olora_lambda1={self.olora_lambda1}, method.olora_lambda2={self.olora_lambda2}: "
                    f"must be >= 0"]
        return []

    def check_with(self, cfg) -> list[str]:
        if cfg.lora.train_projector:
            return ["lora.train_projector: not supported by olora (its adapters are merged); "
                    "use it with mr_lora, lora_ft, replay or joint"]
        return []


@register("olora")
class OLoRA(CLMethod):
    Options = OLoRAOptions

    def plan(self, stage: Stage):
        m = self.options
        previous = stage.expert_uri(stage.k - 1) if stage.k > 0 else None
        return [request(stage, "lora", stage.task.train, stage.expert_uri(), adapter_kind=OLoraKind,
                        adapter_args={"lambda1": m.olora_lambda1, "lambda2": m.olora_lambda2, "previous": previous},
                        depends_on=[previous] if previous else [], olora_tasks=stage.k + 1)]

    def answer(self, stage: Stage, predictor) -> Answers:
        return answer_with(stage, predictor, stage.expert_uri())

    def serving(self, stage: Stage) -> ServingPlan:
        return ServingPlan({self.name: stage.expert_uri()})  # the summed task LoRAs, one PEFT adapter
