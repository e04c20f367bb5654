"""Routers: the MR-LoRA MLLM router (base model + router LoRA) and helpers."""

from mllmcl.routing.router import LETTERS, parse_letter, router_prompt, router_training_samples

__all__ = ["LETTERS", "parse_letter", "router_prompt", "router_training_samples"]
