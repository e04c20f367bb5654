"""The MR-LoRA router's prompt, its training samples and the parsing of its answer.

The prompt describes each expert in one line tagged with a letter, shows the user's
question, and asks for the letter only; the router is the base MLLM plus a router LoRA
trained on ~20 samples per seen task (cumulative, from the train splits only).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Sequence

import numpy as np

from mllmcl.data.types import Sample, TaskSpec

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def router_prompt(experts: Sequence[TaskSpec], question: str) -> str:
    lines = "\n".join(f"{LETTERS[i]}: {t.description}" for i, t in enumerate(experts))
    return ("Choose the expert that should answer the question about this image.\n"
            f"Experts:\n{lines}\nQuestion: {question}\nAnswer with the expert's letter only.")


def parse_letter(answer: str, n_experts: int) -> int | None:
    """Expert index named by the router's answer, or None when it does not parse."""
    valid = LETTERS[:n_experts]
    m = re.match(rf"\s*\(?([{valid}])\)?(?:[\s\.:,]|$)", answer)
    return LETTERS.index(m.group(1)) if m else None


def router_training_samples(tasks: Sequence, per_task: int, seed: int) -> list[Sample]:
    """``per_task`` train samples of each seen task, relabelled with the letter of its expert.

    The draw for task i depends only on (seed, i), so stage k's set contains stage k-1's.
    """
    experts = [t.spec for t in tasks]
    out: list[Sample] = []
    for i, task in enumerate(tasks):
        rng = np.random.default_rng([seed, 7919, i])
        n = min(per_task, len(task.train))
        pick = sorted(rng.choice(len(task.train), n, replace=False).tolist())
        for j in pick:
            s = task.train[j]
            out.append(replace(s, uid=f"router:{s.uid}", question=router_prompt(experts, s.question),
                               answer=LETTERS[i], meta={}))
    return out
