"""Per-sample predictions: scored against a task's rule, and kept as Parquet (question_id,
prompt, prediction, answer, score, expert, stage)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import pyarrow as pa

from mllmcl.data.parquet import read_table, write_table
from mllmcl.data.prompts import eval_prompt
from mllmcl.data.types import Sample, TaskSpec
from mllmcl.evaluation.scorers import score

PREDICTION_SCHEMA = pa.schema([
    ("question_id", pa.string()),
    ("task", pa.string()),
    ("prompt", pa.string()),
    ("prediction", pa.string()),
    ("answer", pa.string()),  # JSON-encoded when the sample accepts several answers
    ("score", pa.float64()),
    ("expert", pa.string()),
    ("stage", pa.int32()),
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
    accuracy: float  # percent
    rows: list[PredictionRow]


def score_predictions(spec: TaskSpec, samples: Sequence[Sample], predictions: Sequence[str], stage: int = -1,
                      experts: Sequence[str | None] | None = None) -> TaskEval:
    """Every prediction scored by the task's rule, as prediction rows and the task's accuracy."""
    rows = []
    for i, (s, p) in enumerate(zip(samples, predictions)):
        prompt = eval_prompt(s)
        rows.append(PredictionRow(question_id=s.uid, task=s.task, prompt=prompt, prediction=p,
                                  answer=encode_answer(s.answers), score=score(spec.scorer, s, p, prompt),
                                  expert=experts[i] if experts else None, stage=stage))
    acc = 100.0 * sum(r.score for r in rows) / max(1, len(rows))
    return TaskEval(task=spec.name, accuracy=acc, rows=rows)
