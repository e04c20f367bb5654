"""Prompts: the answer-format instructions the reference appends to some questions at
evaluation, and the MR-LoRA router's prompt and the parsing of its answer.

Med asks for a single word or phrase; Fin asks for yes/no directly when the answer
is yes/no, otherwise for the option letter (BENCHMARK.md). The synthetic streams
put the same instruction in their training conversations, so train and test match.
"""

from __future__ import annotations

import re
from typing import Sequence

from mllmcl.data.types import Sample, TaskSpec

MED_INSTRUCTION = "Answer the question using a single word or phrase."
YES_NO_INSTRUCTION = "Please answer yes or no directly."
LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def instruction_for(task: str, answer: str) -> str | None:
    if task == "Med":
        return MED_INSTRUCTION
    if task == "Fin":
        return YES_NO_INSTRUCTION if answer.strip().lower() in ("yes", "no") else LETTER_INSTRUCTION
    return None


def with_instruction(task: str, question: str, answer: str) -> str:
    inst = instruction_for(task, answer)
    if inst is None or question.rstrip().endswith(inst):
        return question
    return f"{question.rstrip()}\n{inst}"


def eval_prompt(sample: Sample) -> str:
    """The question text shown to a model at test time."""
    if sample.split != "test":
        return sample.question
    return with_instruction(sample.task, sample.question, sample.target)


# --------------------------------------------------------------------------- the MR-LoRA router's prompt

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def router_prompt(experts: Sequence[TaskSpec], question: str) -> str:
    """The MLLM router's prompt: one line per expert tagged with its letter, the user's question,
    and the request for the letter only (the tiny base's tokenizer is trained on it too)."""
    lines = "\n".join(f"{LETTERS[i]}: {t.description}" for i, t in enumerate(experts))
    return ("Choose the expert that should answer the question about this image.\n"
            f"Experts:\n{lines}\nQuestion: {question}\nAnswer with the expert's letter only.")


def parse_letter(answer: str, n_experts: int) -> int | None:
    """Expert index named by the router's answer, or None when it does not parse."""
    valid = LETTERS[:n_experts]
    m = re.match(rf"\s*\(?([{valid}])\)?(?:[\s\.:,]|$)", answer)
    return LETTERS.index(m.group(1)) if m else None
