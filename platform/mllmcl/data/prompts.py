"""Answer-format instructions the reference appends to some questions at evaluation.

Med asks for a single word or phrase; Fin asks for yes/no directly when the answer
is yes/no, otherwise for the option letter (BENCHMARK.md). The synthetic streams
put the same instruction in their training conversations, so train and test match.
"""

from __future__ import annotations

from mllmcl.data.types import Sample

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
