"""Adapter recipes: how a training worker builds the trainable model for a
:class:`~mllmcl.training.request.TrainRequest`, which extra loss it adds, and how it saves
the result. A method picks one by name (``request.recipe``); its options travel in
``request.recipe_args``.

- ``lora``: a PEFT LoRA, fresh or continued from ``init_adapter``.
- ``olora``: O-LoRA. The earlier tasks' LoRA (one PEFT adapter of concatenated ranks)
  is loaded frozen and active, a fresh LoRA for the new task is trained beside it with
  ``lambda1 * sum ||A_old A_new^T||_F^2 + lambda2 * sum ||theta_new||_2``, and the saved
  adapter concatenates both (rank grows by ``lora.rank`` per task), so inference with
  that one adapter is the sum of every task's LoRA.
- ``moelora``: a MoELoRA adapter (:mod:`mllmcl.models.moelora`), fresh or continued.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Callable

import torch

_RECIPES: dict[str, Callable] = {}


def register_recipe(name: str):
    def deco(cls):
        _RECIPES[name] = cls
        cls.name = name
        return cls

    return deco


def get_recipe(name: str):
    if name not in _RECIPES:
        raise KeyError(f"unknown adapter recipe {name!r}: expected one of {sorted(_RECIPES)}")
    return _RECIPES[name]


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable parameters (what a checkpoint must hold), by name."""
    return {n: p.detach().cpu().contiguous() for n, p in unwrap(model).named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"checkpoint does not match the trainable parameters (missing {missing[:3]}, "
                         f"unexpected {extra[:3]})")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(p.dtype))


@register_recipe("lora")
class LoraRecipe:
    def __init__(self, request):
        self.request = request

    def build(self, backbone_model):
        from peft import PeftModel

        from mllmcl.models.adapters import local_adapter
        from mllmcl.models.lora import attach_lora

        if self.request.init_adapter:
            with local_adapter(self.request.init_adapter) as local:
                return PeftModel.from_pretrained(backbone_model, local, is_trainable=True)
        return attach_lora(backbone_model, self.request.lora)

    def extra_loss(self, model) -> torch.Tensor | None:
        return None

    def save(self, model, uri: str, meta: dict) -> None:
        from mllmcl.models.adapters import save_adapter

        save_adapter(unwrap(model), uri, meta)


# --------------------------------------------------------------------------- O-LoRA

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


@register_recipe("olora")
class OLoraRecipe:
    """``recipe_args``: ``lambda1``, ``lambda2``, ``previous`` (URI of the earlier tasks' adapter or None)."""

    def __init__(self, request):
        self.request = request
        args = request.recipe_args
        self.lambda1 = float(args.get("lambda1", 0.5))
        self.lambda2 = float(args.get("lambda2", 0.0))
        self.previous = args.get("previous")

    def build(self, backbone_model):
        from peft import PeftModel, get_peft_model

        from mllmcl.models.adapters import local_adapter

        config = self.request.lora.peft_config()
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


# --------------------------------------------------------------------------- MoELoRA

@register_recipe("moelora")
class MoELoraRecipe:
    """``recipe_args``: ``moe`` (the :class:`MoELoraSettings` as a dict)."""

    def __init__(self, request):
        from mllmcl.models.moelora import MoELoraSettings

        self.request = request
        self.settings = MoELoraSettings.from_dict(request.recipe_args["moe"])

    def build(self, backbone_model):
        from mllmcl.models.adapters import local_adapter
        from mllmcl.models.moelora import add_moelora, load_moelora, read_settings

        if self.request.init_adapter:
            with local_adapter(self.request.init_adapter) as local:
                if read_settings(local) != self.settings:
                    raise ValueError(f"{self.request.init_adapter}: MoELoRA settings differ from this run's")
                return load_moelora(backbone_model, local, trainable=True)
        return add_moelora(backbone_model, self.settings)

    def extra_loss(self, model) -> torch.Tensor | None:
        return None

    def save(self, model, uri: str, meta: dict) -> None:
        from mllmcl.models.adapters import publish_adapter
        from mllmcl.models.moelora import save_moelora

        with tempfile.TemporaryDirectory(prefix="adapter-") as tmp:
            save_moelora(unwrap(model), tmp, self.settings)
            publish_adapter(tmp, uri, meta)
