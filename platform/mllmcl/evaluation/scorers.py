"""Per-task scoring rules of the MLLM-CL reference implementation (BENCHMARK.md), and the two
task-independent tracks beside them (exact match and token F1, normalised as SQuAD does).

Each scorer takes the prediction text and the sample and returns a score in [0, 1].
"""

from __future__ import annotations

import os
import re
import string
from collections import Counter
from typing import Sequence

from mllmcl.data.types import Sample
from mllmcl.evaluation.extract import extract_choice, extract_number, parse_choices

UNANSWERABLE = "unanswerable"


def _unanswerable(p: str) -> bool:
    return UNANSWERABLE in p.lower()


def rs_ad(p: str, a: str) -> float:
    """RS and AD: token-boundary rule for one-word answers, substring otherwise."""
    if _unanswerable(p):
        return 0.0
    p, a = p.strip().lower(), a.strip().lower()
    if " " in a:
        return float(a in p)
    a = a.replace(".", "")
    if " " in p:
        return float(any(x in p for x in (" " + a, a + " ", a + ".", a + ",")))
    return float(a in p)


def med(p: str, a: str) -> float:
    if _unanswerable(p):
        return 0.0
    return float(a.strip().lower() in p.strip().lower())


SCI_EXACT_PREFIXES = ("AI2D", "TQA", "VQA", "SciVerse")


def sci(p: str, a: str, image: str, prompt: str) -> float:
    """Sci: exact match for AI2D/TQA/VQA/SciVerse images; MapQA partial credit or substring."""
    if _unanswerable(p):
        return 0.0
    p, a = p.strip().lower(), a.strip().lower()
    prefix = os.path.basename(image).split("_", 1)[0]
    if prefix in SCI_EXACT_PREFIXES:
        return float(p == a)
    if "which states" in prompt.lower():
        gold = [x.strip() for x in a.split(",") if x.strip()]
        pred = {x.strip() for x in p.split(",") if x.strip()}
        return sum(g in pred for g in gold) / len(gold) if gold else 0.0
    return float(a in p)


def fin(p: str, a: str) -> float:
    if _unanswerable(p):
        return 0.0
    return float(p.strip().lower().replace(" ", "").replace(".", "") == a.strip().lower())


HME = "Handwritten Mathematical Expression Recognition"


def ocrbench(p: str, answers: tuple[str, ...], answer_type: str | None) -> float:
    """OCRBench: any acceptable answer contained in the prediction."""
    for a in answers:
        if answer_type == HME:
            aa = a.strip().replace("\n", " ").replace(" ", "")
            pp = p.strip().replace("\n", " ").replace(" ", "")
        else:
            aa = a.lower().strip().replace("\n", " ")
            pp = p.lower().strip().replace("\n", " ")
        if aa in pp:
            return 1.0
    return 0.0


def _count_norm(s: str) -> str:
    return s.lower().strip().replace(" ", "").replace("\n", "").replace(".", "")


def count(p: str, a: str) -> float:
    """CV-Bench count: normalised answer contained in the normalised prediction."""
    return float(_count_norm(a) in _count_norm(p))


def math(p: str, a: str, prompt: str, meta: dict) -> float:
    """MathVista-style: extract a choice or a number from free text, then compare."""
    qtype = meta.get("question_type")
    choices = meta.get("choices") or parse_choices(prompt)
    if qtype == "multi_choice" or (qtype is None and choices):
        gold = a.strip()
        if len(gold) != 1 or not gold.isalpha():  # answer given as the option text
            lowered = [c.strip().lower() for c in choices]
            if gold.lower() in lowered:
                gold = "ABCDEFGH"[lowered.index(gold.lower())]
        return float(extract_choice(p, choices) == gold.upper())
    pred = extract_number(p)
    if pred is None:
        return 0.0
    try:
        gold_v = float(a.strip())
    except ValueError:
        return float(p.strip().lower() == a.strip().lower())
    precision = meta.get("precision")
    if meta.get("answer_type") == "integer":
        return float(round(pred) == round(gold_v) and abs(pred - round(pred)) < 1e-9)
    if precision is not None:
        return float(round(pred, int(precision)) == round(gold_v, int(precision)))
    return float(abs(pred - gold_v) <= 1e-6 * max(1.0, abs(gold_v)))


def choice(p: str, a: str, prompt: str) -> float:
    """Multiple choice by letter (MMT-Bench GUI), scored offline."""
    return float(extract_choice(p, parse_choices(prompt)) == a.strip().strip("()").upper())


def score(scorer: str, sample: Sample, prediction: str, prompt: str) -> float:
    """Score one prediction with the named rule."""
    a = sample.target
    if scorer == "rs_ad":
        return rs_ad(prediction, a)
    if scorer == "med":
        return med(prediction, a)
    if scorer == "sci":
        return sci(prediction, a, sample.image_rel, prompt)
    if scorer == "fin":
        return fin(prediction, a)
    if scorer == "ocrbench":
        return ocrbench(prediction, sample.answers, sample.meta.get("answer_type"))
    if scorer == "count":
        return count(prediction, a)
    if scorer == "math":
        return math(prediction, a, prompt, dict(sample.meta))
    if scorer == "choice":
        return choice(prediction, a, prompt)
    raise KeyError(f"unknown scorer {scorer!r}: expected one of {sorted(SCORERS)}")


SCORERS: tuple[str, ...] = ("rs_ad", "med", "sci", "fin", "ocrbench", "count", "math", "choice")


# --------------------------------------------------------------------------- the other tracks

TRACKS: tuple[str, ...] = ("native", "exact", "f1")  # native: the task's own rule (above)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1 if the normalised prediction equals any normalised acceptable answer."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(a) for a in answers))


def _f1(prediction: str, answer: str) -> float:
    p, a = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not p or not a:
        return float(p == a)
    common = sum((Counter(p) & Counter(a)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(a)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD's token F1 (bag of normalised tokens), the best over the acceptable answers."""
    return max((_f1(prediction, a) for a in answers), default=0.0)


def track_scores(spec_scorer: str, sample: Sample, prediction: str, prompt: str) -> dict[str, float]:
    """One prediction on every track: the task's native rule, exact match and token F1."""
    return {"native": score(spec_scorer, sample, prediction, prompt),
            "exact": exact_match(prediction, sample.answers), "f1": token_f1(prediction, sample.answers)}
