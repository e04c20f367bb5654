"""LoRA on the language model only (PEFT), settings from config."""

from __future__ import annotations

from dataclasses import dataclass

from peft import LoraConfig, PeftModel, get_peft_model

from mllmcl.models.families import PROJECTOR_LINEARS

# every linear layer of a Llama-style language model; the vision tower, the
# projector and lm_head are never wrapped.
LANGUAGE_MODEL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def language_model_target_regex(modules=LANGUAGE_MODEL_LINEARS) -> str:
    return r".*language_model.*\.(" + "|".join(modules) + r")$"


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LANGUAGE_MODEL_LINEARS
    train_projector: bool = False  # also train a copy of the vision projector, saved in the adapter (as MR-LoRA)

    def peft_config(self) -> LoraConfig:
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=language_model_target_regex(self.target_modules), bias="none",
                          modules_to_save=list(PROJECTOR_LINEARS) if self.train_projector else None)


def attach_lora(model, settings: LoraSettings, adapter_name: str = "default") -> PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter on the language model's linear layers."""
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, settings.peft_config())
        model.set_adapter(adapter_name)
        return model
    return get_peft_model(model, settings.peft_config(), adapter_name=adapter_name)
