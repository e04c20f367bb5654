"""Adapter kinds: how a training worker builds the trainable model for a
:class:`~mllmcl.training.request.TrainRequest`, which extra loss it adds, and how it saves
the result. :class:`LoraKind` (a PEFT LoRA, fresh or continued from ``init_adapter``) is
the default; a method with an adapter of its own defines its kind in its module
(``mllmcl.methods.olora``, ``mllmcl.methods.moelora``) with the same three methods::

    class MyKind:
        def __init__(self, request): ...          # request.adapter_args holds its options
        def build(self, backbone_model): ...      # -> the model to train
        def extra_loss(self, model): ...          # -> a regulariser, or None
        def save(self, model, uri, meta): ...     # the finished adapter (+ meta.json) at uri
"""

from __future__ import annotations

import torch


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


class LoraKind:
    """A PEFT LoRA of ``request.lora``, fresh or continued from ``request.init_adapter``."""

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
