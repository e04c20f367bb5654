"""Per-sample predictions: scored against a task's rule (``score``) and on the two other tracks
(``exact``: exact match, ``f1``: token F1), and kept as Parquet (question_id, prompt, prediction,
answer, score, exact, f1, expert, stage)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import pyarrow as pa

from mllmcl.data.parquet import read_table, write_table
from mllmcl.data.prompts import eval_prompt
from mllmcl.data.types import Sample, TaskSpec
from mllmcl.evaluation.scorers import TRACKS, track_scores

PREDICTION_SCHEMA = pa.schema([
    ("question_id", pa.string()),
    ("task", pa.string()),
    ("prompt", pa.string()),
    ("prediction", pa.string()),
    ("answer", pa.string()),  # JSON-encoded when the sample accepts several answers
    ("score", pa.float64()),  # the task's native rule
    ("expert", pa.string()),
    ("stage", pa.int32()),
    ("exact", pa.float64()),  # exact match (SQuAD-normalised)
    ("f1", pa.float64()),  # token F1 (SQuAD-normalised)
])


@dataclass(frozen=True)
class PredictionRow:
    question_id: str
    task: str
    prompt: str
    prediction: str
    answer: str
    score: float
    expert: str | None = None
    stage: int = -1
    exact: float | None = None  # None in files written before the tracks existed
    f1: float | None = None

    def track(self, name: str) -> float | None:
        return self.score if name == "native" else getattr(self, name)


def encode_answer(answers: tuple[str, ...]) -> str:
    return answers[0] if len(answers) == 1 else json.dumps(list(answers))


def rows_to_table(rows: Sequence[PredictionRow]) -> pa.Table:
    cols = {f.name: [getattr(r, f.name) for r in rows] for f in PREDICTION_SCHEMA}
    return pa.table(cols, schema=PREDICTION_SCHEMA)


def write_predictions(rows: Sequence[PredictionRow], uri: str) -> None:
    write_table(rows_to_table(rows), uri)


def read_predictions(uri: str) -> list[PredictionRow]:
    return [PredictionRow(**r) for r in read_table(uri).to_pylist()]


@dataclass
class TaskEval:
    task: str
    accuracy: float  # percent, the native rule
    rows: list[PredictionRow]

    def tracks(self) -> dict[str, float]:
        """The task's score (percent) on every track; ``native`` is :attr:`accuracy`."""
        n = max(1, len(self.rows))
        return {t: self.accuracy if t == "native" else 100.0 * sum(r.track(t) or 0.0 for r in self.rows) / n
                for t in TRACKS}


def score_predictions(spec: TaskSpec, samples: Sequence[Sample], predictions: Sequence[str], stage: int = -1,
                      experts: Sequence[str | None] | None = None) -> TaskEval:
    """Every prediction scored by the task's rule, as prediction rows and the task's accuracy."""
    rows = []
    for i, (s, p) in enumerate(zip(samples, predictions)):
        prompt = eval_prompt(s)
        scores = track_scores(spec.scorer, s, p, prompt)
        rows.append(PredictionRow(question_id=s.uid, task=s.task, prompt=prompt, prediction=p,
                                  answer=encode_answer(s.answers), score=scores["native"],
                                  expert=experts[i] if experts else None, stage=stage, exact=scores["exact"],
                                  f1=scores["f1"]))
    acc = 100.0 * sum(r.score for r in rows) / max(1, len(rows))
    return TaskEval(task=spec.name, accuracy=acc, rows=rows)
