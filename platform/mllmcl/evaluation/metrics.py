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


def fwt(before: Sequence[float | None], zero_shot: Sequence[float | None]) -> float | None:
    """Forward transfer (GEM, Lopez-Paz & Ranzato 2017): mean over j >= 1 of
    ``before[j] - zero_shot[j]``, where ``before[j]`` is the score on task j after training
    stage j-1 (before task j is trained: ``R[j-1][j]``) and ``zero_shot[j]`` the untrained base
    model's. Positive: what was learnt helps tasks not yet seen. None for one task or a
    missing score (a run that did not probe ahead)."""
    T = len(before)
    if len(zero_shot) != T:
        raise ValueError(f"{T} forward scores but {len(zero_shot)} zero-shot scores")
    if T < 2:
        return None
    pairs = [(before[j], zero_shot[j]) for j in range(1, T)]
    if any(b is None or z is None for b, z in pairs):
        return None
    return sum(b - z for b, z in pairs) / (T - 1)


def summary(R: Matrix) -> dict[str, float]:
    return {"MFT": mft(R), "MFN": mfn(R), "MAA": maa(R), "BWT": bwt(R), "forgetting": forgetting(R)}


@dataclass
class AccuracyMatrix:
    """Scores (percent) per stage and task; grows one row per training stage."""

    tasks: list[str]
    rows: list[list[float | None]] = field(default_factory=list)
    zero_shot: list[float | None] | None = None  # the untrained base model's score on each task
    forward: list[float | None] | None = None  # forward[j]: task j after stage j-1, before it is trained

    def set_forward(self, j: int, before: float | None, zero_shot: float | None) -> None:
        """Record task j's score before it was trained (j >= 1) and the base model's (any j)."""
        T = len(self.tasks)
        if self.forward is None:
            self.forward = [None] * T
        if self.zero_shot is None:
            self.zero_shot = [None] * T
        if before is not None:
            if j == 0:
                raise ValueError("task 0 has no stage before it: no forward score")
            self.forward[j] = float(before)
        if zero_shot is not None:
            self.zero_shot[j] = float(zero_shot)

    def fwt(self) -> float | None:
        if self.forward is None or self.zero_shot is None:
            return None
        return fwt(self.forward, self.zero_shot)

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
        return {**summary(self.rows), "FWT": self.fwt()}

    def metrics_so_far(self) -> dict[str, float]:
        """The metrics of the stream up to the last completed stage (the leading square sub-matrix):
        what a sweep compares trials on after each task."""
        n = len(self.rows)
        if n == 0:
            raise ValueError("no completed stage yet")
        return summary([row[:n] for row in self.rows])

    def to_dict(self) -> dict:
        return {"tasks": list(self.tasks), "rows": self.rows, "zero_shot": self.zero_shot, "forward": self.forward,
                "convention": "rows[t][j] = score (percent) on task j after training stage t; null = not seen; "
                              "forward[j] = score on task j after stage j-1 (before training on it); "
                              "zero_shot[j] = the untrained base model's"}

    @classmethod
    def from_dict(cls, d: dict) -> "AccuracyMatrix":
        return cls(tasks=list(d["tasks"]), rows=[list(r) for r in d["rows"]], zero_shot=d.get("zero_shot"),
                   forward=d.get("forward"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format_table(self, digits: int = 1) -> str:
        w = max(6, *(len(t) for t in self.tasks)) + 1
        head = "stage".ljust(12) + "".join(t.rjust(w) for t in self.tasks)
        lines = [head]
        fmt = lambda v: f"{v:{w}.{digits}f}" if v is not None else "-".rjust(w)  # noqa: E731
        if self.zero_shot is not None:
            lines.append("zero-shot".ljust(12) + "".join(fmt(v) for v in self.zero_shot))
        if self.forward is not None:
            lines.append("before".ljust(12) + "".join(fmt(v) for v in self.forward))
        for t, row in enumerate(self.rows):
            cells = "".join((f"{v:{w}.{digits}f}" if v is not None else "-".rjust(w)) for v in row)
            lines.append(f"after {self.tasks[t]}".ljust(12) + cells)
        return "\n".join(lines)


def track_matrices(tasks: Sequence[str], tracks: Sequence[str]) -> dict[str, AccuracyMatrix]:
    return {t: AccuracyMatrix(tasks=list(tasks)) for t in tracks}


def add_stage_record(matrices: dict[str, AccuracyMatrix], record: dict) -> None:
    """A finished stage's record (as the manifest keeps it) into each track's matrix, never mixed:
    ``scores`` (the native track), ``tracks`` (the others), ``forward`` (the next task before it
    is trained, every track) and ``zero_shot`` (the base model's, per task and track). A stage
    scored before the other tracks existed adds to the native matrix only."""
    native = matrices["native"]
    native.add_row(record["scores"])
    k = len(native.rows) - 1
    for t, m in matrices.items():
        if t != "native" and t in (record.get("tracks") or {}):
            m.add_row(record["tracks"][t])
    for name, by_track in (record.get("zero_shot") or {}).items():
        for t, m in matrices.items():
            m.set_forward(m.tasks.index(name), None, by_track[t])
    forward = record.get("forward") or {}
    if forward:
        j = native.tasks.index(forward["task"])
        if j != k + 1:
            raise ValueError(f"stage {k}: a forward score for {forward['task']!r}, which is not the next task")
        for t, m in matrices.items():
            m.set_forward(j, forward[t], None)
