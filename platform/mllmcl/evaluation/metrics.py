"""The accuracy matrix and the paper's CL metrics, as pure functions.

``R[t][j]`` is the score (percent) on task j after training stage t, for t >= j;
entries with j > t are ``None`` (not yet seen). T = number of tasks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Sequence

Matrix = Sequence[Sequence[float | None]]


def _check(R: Matrix) -> int:
    T = len(R)
    if T == 0:
        raise ValueError("empty accuracy matrix")
    for t, row in enumerate(R):
        if len(row) != T:
            raise ValueError(f"row {t} has {len(row)} entries, expected {T}")
        for j in range(t + 1):
            if row[j] is None or (isinstance(row[j], float) and math.isnan(row[j])):
                raise ValueError(f"R[{t}][{j}] is missing: every seen task must be scored")
    return T


def mft(R: Matrix) -> float:
    """Mean fine-tune accuracy: mean of A[i][i] (right after learning each task)."""
    T = _check(R)
    return sum(R[i][i] for i in range(T)) / T


def mfn(R: Matrix) -> float:
    """Mean final accuracy: mean of the last row."""
    T = _check(R)
    return sum(R[T - 1][i] for i in range(T)) / T


def maa(R: Matrix) -> float:
    """Mean average accuracy: mean over stages of the mean over seen tasks."""
    T = _check(R)
    return sum(sum(R[t][i] for i in range(t + 1)) / (t + 1) for t in range(T)) / T


def bwt(R: Matrix) -> float:
    """Backward transfer: mean over i < T of A[T][i] - A[i][i]; negative means forgetting."""
    T = _check(R)
    if T < 2:
        return 0.0
    return sum(R[T - 1][i] - R[i][i] for i in range(T - 1)) / (T - 1)


def forgetting(R: Matrix) -> float:
    """Average forgetting: mean over i < T of max_{t<T} A[t][i] - A[T][i] (>= 0)."""
    T = _check(R)
    if T < 2:
        return 0.0
    return sum(max(R[t][i] for t in range(i, T - 1)) - R[T - 1][i] for i in range(T - 1)) / (T - 1)


def summary(R: Matrix) -> dict[str, float]:
    return {"MFT": mft(R), "MFN": mfn(R), "MAA": maa(R), "BWT": bwt(R), "forgetting": forgetting(R)}


@dataclass
class AccuracyMatrix:
    """Scores (percent) per stage and task; grows one row per training stage."""

    tasks: list[str]
    rows: list[list[float | None]] = field(default_factory=list)
    zero_shot: list[float] | None = None

    def add_row(self, scores: dict[str, float]) -> None:
        t = len(self.rows)
        if t >= len(self.tasks):
            raise ValueError(f"matrix already has {t} rows for {len(self.tasks)} tasks")
        missing = [j for j in self.tasks[: t + 1] if j not in scores]
        if missing:
            raise ValueError(f"stage {t}: scores missing for seen task(s) {missing}")
        extra = [j for j in scores if j not in self.tasks[: t + 1]]
        if extra:
            raise ValueError(f"stage {t}: task(s) {extra} are not seen yet; a stage scores tasks 0..{t} only")
        self.rows.append([float(scores[j]) if i <= t else None for i, j in enumerate(self.tasks)])

    @property
    def complete(self) -> bool:
        return len(self.rows) == len(self.tasks)

    def __getitem__(self, t: int) -> list[float | None]:
        return self.rows[t]

    def metrics(self) -> dict[str, float]:
        if not self.complete:
            raise ValueError(f"matrix has {len(self.rows)} of {len(self.tasks)} rows; metrics need every stage")
        return summary(self.rows)

    def metrics_so_far(self) -> dict[str, float]:
        """The metrics of the stream up to the last completed stage (the leading square sub-matrix):
        what a sweep compares trials on after each task."""
        n = len(self.rows)
        if n == 0:
            raise ValueError("no completed stage yet")
        return summary([row[:n] for row in self.rows])

    def to_dict(self) -> dict:
        return {"tasks": list(self.tasks), "rows": self.rows, "zero_shot": self.zero_shot,
                "convention": "rows[t][j] = score (percent) on task j after training stage t; null = not seen"}

    @classmethod
    def from_dict(cls, d: dict) -> "AccuracyMatrix":
        return cls(tasks=list(d["tasks"]), rows=[list(r) for r in d["rows"]], zero_shot=d.get("zero_shot"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format_table(self, digits: int = 1) -> str:
        w = max(6, *(len(t) for t in self.tasks)) + 1
        head = "stage".ljust(12) + "".join(t.rjust(w) for t in self.tasks)
        lines = [head]
        if self.zero_shot is not None:
            lines.append("zero-shot".ljust(12) + "".join(f"{v:{w}.{digits}f}" for v in self.zero_shot))
        for t, row in enumerate(self.rows):
            cells = "".join((f"{v:{w}.{digits}f}" if v is not None else "-".rjust(w)) for v in row)
            lines.append(f"after {self.tasks[t]}".ljust(12) + cells)
        return "\n".join(lines)
