"""Offline, rule-based answer extraction (replaces the reference's LLM extractor)."""

from __future__ import annotations

import re

LETTERS = "ABCDEFGH"
_CHOICE_LINE = re.compile(r"^\s*\(?([A-H])[\).:]\s+(.+?)\s*$", re.MULTILINE)
_NUMBER_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
                 "eight": 8, "nine": 9, "ten": 10}


def parse_choices(prompt: str) -> list[str]:
    """Option texts from lines like ``A. text``, ``(B) text`` or ``C: text``, in letter order."""
    found: dict[str, str] = {}
    for letter, text in _CHOICE_LINE.findall(prompt):
        found.setdefault(letter, text)
    out = []
    for letter in LETTERS:
        if letter not in found:
            break
        out.append(found[letter])
    return out


def extract_choice(prediction: str, choices: list[str]) -> str | None:
    """The option letter a free-text prediction names, or None.

    Tries, in order: an explicit "answer is X" / "(X)" / "X." / a lone letter; then the
    text of exactly one option contained in the prediction.
    """
    p = prediction.strip()
    n = len(choices) or 4
    valid = LETTERS[:n]
    patterns = [
        rf"answer\s*(?:is|:)?\s*\(?([{valid}])\)?(?![a-z])",
        rf"\(([{valid}])\)",
        rf"^([{valid}])(?:[\.\):,]|\s|$)",
        rf"(?:^|\s)([{valid}])[\.\)]?\s*$",
    ]
    for pat in patterns:
        m = re.search(pat, p, flags=re.IGNORECASE if pat.startswith("answer") else 0)
        if m:
            return m.group(1).upper()
    if choices:
        low = p.lower()
        hits = [i for i, c in enumerate(choices) if c.strip() and c.strip().lower() in low]
        if len(hits) == 1:
            return LETTERS[hits[0]]
        exact = [i for i, c in enumerate(choices) if c.strip().lower() == low.strip(" .")]
        if len(exact) == 1:
            return LETTERS[exact[0]]
    return None


def extract_number(prediction: str) -> float | None:
    """The last number in a prediction (digits, or a number word), or None."""
    nums = re.findall(r"-?\d+(?:,\d{3})*(?:\.\d+)?", prediction)
    if nums:
        return float(nums[-1].replace(",", ""))
    words = re.findall(r"[a-z]+", prediction.lower())
    for w in reversed(words):
        if w in _NUMBER_WORDS:
            return float(_NUMBER_WORDS[w])
    return None
