"""Backbones: the tiny LLaVA preset, Hugging Face checkpoints by path, LoRA helpers.

The names below load their modules (transformers, PEFT) on first use: a method module that only
needs the LoRA target names, or a job that refuses its config, never imports them."""

_WHERE = {"TINY": "loading", "Backbone": "loading", "load_backbone": "loading", "resolve_checkpoint": "loading",
          "LoraSettings": "lora", "attach_lora": "lora"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"mllmcl.models.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'mllmcl.models' has no attribute {name!r}")
