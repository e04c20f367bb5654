"""LoRA on the language model only (PEFT), from :class:`mllmcl.settings.LoraSettings`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mllmcl.models.families import PROJECTOR_LINEARS
from mllmcl.settings import LANGUAGE_MODEL_LINEARS, LoraSettings

if TYPE_CHECKING:  # PEFT (and transformers under it) load when a LoRA is built, not with this module
    from peft import LoraConfig, PeftModel

__all__ = ["LANGUAGE_MODEL_LINEARS", "LoraSettings", "attach_lora", "language_model_target_regex", "peft_config"]


def language_model_target_regex(modules=LANGUAGE_MODEL_LINEARS) -> str:
    return r".*language_model.*\.(" + "|".join(modules) + r")$"


def peft_config(settings: LoraSettings) -> "LoraConfig":
    """PEFT's config of a LoRA: the language model's ``target_modules``, and a trained copy of the
    vision projector when ``train_projector`` (as MR-LoRA)."""
    from peft import LoraConfig

    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=language_model_target_regex(settings.target_modules), bias="none",
                      modules_to_save=list(PROJECTOR_LINEARS) if settings.train_projector else None)


def attach_lora(model, settings: LoraSettings, adapter_name: str = "default") -> "PeftModel":
    """Wrap ``model`` with a fresh LoRA adapter on the language model's linear layers."""
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, peft_config(settings))
        model.set_adapter(adapter_name)
        return model
    return get_peft_model(model, peft_config(settings), adapter_name=adapter_name)
