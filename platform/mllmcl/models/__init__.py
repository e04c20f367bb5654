"""Backbones: the tiny LLaVA preset, Hugging Face checkpoints by path, LoRA helpers."""

from mllmcl.models.loading import TINY, Backbone, load_backbone, resolve_checkpoint
from mllmcl.models.lora import LoraSettings, attach_lora

__all__ = ["TINY", "Backbone", "LoraSettings", "attach_lora", "load_backbone", "resolve_checkpoint"]
