"""Prompt formats per model family: the text around the image and the question.

Prompts carry one ``<image>`` placeholder; the collator replaces it with the family's
image block (``chat.image_block(n)``) once it knows how many tokens the image takes.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class ChatFormat:
    name: str
    template: str  # single user turn with ``{image}`` and ``{question}``, ending where the answer starts
    answer_sep: str = " "  # between the prompt and the answer
    image_start: str = ""
    image_token: str = IMAGE_TOKEN  # repeated once per image token
    image_end: str = ""

    def prompt(self, question: str) -> str:
        return self.template.replace("{image}", IMAGE_TOKEN).replace("{question}", question)

    def full(self, question: str, answer: str) -> str:
        return f"{self.prompt(question)}{self.answer_sep}{answer}"

    def image_block(self, n_tokens: int) -> str:
        return f"{self.image_start}{self.image_token * n_tokens}{self.image_end}"


# LLaVA-1.5 ("vicuna_v1" conversation): ``USER: <image>\nQ ASSISTANT: A</s>``
LLAVA_15 = ChatFormat("llava-1.5", "USER: {image}\n{question} ASSISTANT:")
# Qwen2-VL / Qwen2.5-VL instruct (ChatML, the processor's chat template with the default system turn)
QWEN_VL = ChatFormat("qwen-vl-chatml",
                     "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                     "<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n",
                     answer_sep="", image_start="<|vision_start|>", image_token="<|image_pad|>",
                     image_end="<|vision_end|>")
# InternVL in transformers' format (InternVL3-*-hf, converted InternVL2.5): ChatML without a system
# turn (the processor's chat template puts ``<IMG_CONTEXT>\n`` before the text), the image block as
# InternVLProcessor writes it, ``<img>`` + ``<IMG_CONTEXT>`` x tokens + ``</img>``
INTERNVL = ChatFormat("internvl-chatml", "<|im_start|>user\n{image}\n{question}<|im_end|>\n<|im_start|>assistant\n",
                      answer_sep="", image_start="<img>", image_token="<IMG_CONTEXT>", image_end="</img>")
