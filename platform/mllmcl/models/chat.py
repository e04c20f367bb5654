"""Prompt formats per model family (the text around the image and the question)."""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class ChatFormat:
    """LLaVA-1.5 ("vicuna_v1"-style) single-turn format: ``USER: <image>\\nQ ASSISTANT: A</s>``."""

    name: str = "llava-1.5"
    system: str = ""

    def prompt(self, question: str) -> str:
        head = f"{self.system} " if self.system else ""
        return f"{head}USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"

    def full(self, question: str, answer: str) -> str:
        return f"{self.prompt(question)} {answer}"


FORMATS = {"llava": ChatFormat("llava-1.5")}


def chat_format_for(model_type: str) -> ChatFormat:
    if model_type not in FORMATS:
        raise KeyError(f"no chat format for model_type {model_type!r}: supported {sorted(FORMATS)}")
    return FORMATS[model_type]
