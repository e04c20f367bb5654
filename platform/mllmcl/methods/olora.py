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


def stack_on_previous(backbone_model, lora, previous: str | None, read_previous=None):
    """The PEFT model of one stage of a concatenated-LoRA method (O-LoRA, and the methods built
    on it: sefe, keeplora): a fresh LoRA ``NEW`` (``lora``: the run's :class:`LoraSettings`) and,
    where ``previous`` (the previous stage's adapter URI) is set, that concatenated adapter loaded
    frozen as ``OLD`` beside it — both in the forward, only ``NEW`` trainable.
    ``read_previous(folder)``, if given, is called with the previous adapter's local folder (to
    read the files a method keeps there beside the PEFT weights)."""
    from peft import PeftModel, get_peft_model

    from mllmcl.models.adapters import local_adapter
    from mllmcl.models.lora import peft_config

    config = peft_config(lora)
    if not previous:
        return get_peft_model(backbone_model, config, adapter_name=NEW)
    with local_adapter(previous) as local:
        model = PeftModel.from_pretrained(backbone_model, local, adapter_name=OLD, is_trainable=False)
        if read_previous is not None:
            read_previous(local)
    model.add_adapter(NEW, config)
    model.base_model.set_adapter([OLD, NEW])  # both in the forward; only NEW trains
    for name, p in model.named_parameters():
        p.requires_grad_(f".{NEW}." in name)
    return model


def save_stacked(model, uri: str, meta: dict, extra=None) -> None:
    """Publish a :func:`stack_on_previous` model's stage adapter at ``uri`` as one PEFT folder:
    ``NEW`` alone at the first stage, else ``OLD`` and ``NEW`` concatenated
    (:func:`concatenate_lora`). ``extra(folder)``, if given, writes a method's own files into
    the folder before it is published."""
    from safetensors.torch import save_file

    from mllmcl.models.adapters import publish_adapter

    core = unwrap(model)
    with tempfile.TemporaryDirectory(prefix="adapter-") as tmp:
        if OLD not in core.peft_config:
            core.save_pretrained(tmp, selected_adapters=[NEW], safe_serialization=True)
            folder = os.path.join(tmp, NEW)
        else:
            config, weights = concatenate_lora(core)
            folder = tmp
            config.save_pretrained(folder)
            save_file(weights, os.path.join(folder, "adapter_model.safetensors"))
        if extra is not None:
            extra(folder)
        publish_adapter(folder, uri, meta)


def stacked_request(stage: Stage, samples, adapter_kind: type, adapter_args: dict, **meta):
    """Stage k's one fit for a :func:`stack_on_previous` kind: ``adapter_args`` plus ``previous``,
    stage k-1's adapter (None at stage 0), which the fit waits for."""
    previous = stage.expert_uri(stage.k - 1) if stage.k > 0 else None
    return request(stage, "lora", samples, stage.expert_uri(), adapter_kind=adapter_kind,
                   adapter_args={**adapter_args, "previous": previous},
                   depends_on=[previous] if previous else [], **meta)


class OLoraKind:
    """``adapter_args``: ``lambda1``, ``lambda2``, ``previous`` (URI of the earlier tasks' adapter or None)."""

    def __init__(self, request):
        self.request = request
        args = request.adapter_args
        self.lambda1 = float(args.get("lambda1", 0.5))
        self.lambda2 = float(args.get("lambda2", 0.0))
        self.previous = args.get("previous")

    def build(self, backbone_model):
        return stack_on_previous(backbone_model, self.request.lora, self.previous)

    def extra_loss(self, model) -> torch.Tensor | None:
        terms = []
        if self.previous and self.lambda1:
            terms.append(self.lambda1 * orthogonality_loss(model))
        if self.lambda2:
            terms.append(self.lambda2 * l2_loss(model))
        return sum(terms) if terms else None

    def save(self, model, uri: str, meta: dict) -> None:
        save_stacked(model, uri, {**meta, "olora_lambda1": self.lambda1, "olora_lambda2": self.lambda2})


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
        return [stacked_request(stage, stage.task.train, OLoraKind,
                                {"lambda1": m.olora_lambda1, "lambda2": m.olora_lambda2}, olora_tasks=stage.k + 1)]

    def answer(self, stage: Stage, predictor) -> Answers:
        return answer_with(stage, predictor, stage.expert_uri())

    def serving(self, stage: Stage) -> ServingPlan:
        return ServingPlan({self.name: stage.expert_uri()})  # the summed task LoRAs, one PEFT adapter
