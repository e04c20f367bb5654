"""Parquet export of a task split (pyarrow)."""

from __future__ import annotations

import json
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from mllmcl import storage
from mllmcl.data.types import Sample, Task

SPLIT_SCHEMA = pa.schema([
    ("uid", pa.string()),
    ("task", pa.string()),
    ("split", pa.string()),
    ("image", pa.string()),
    ("image_rel", pa.string()),
    ("question", pa.string()),
    ("answers", pa.list_(pa.string())),
    ("answer_is_list", pa.bool_()),
    ("meta_json", pa.string()),
])


def samples_to_table(samples: Sequence[Sample]) -> pa.Table:
    return pa.table({
        "uid": [s.uid for s in samples],
        "task": [s.task for s in samples],
        "split": [s.split for s in samples],
        "image": [s.image for s in samples],
        "image_rel": [s.image_rel for s in samples],
        "question": [s.question for s in samples],
        "answers": [list(s.answers) for s in samples],
        "answer_is_list": [isinstance(s.answer, tuple) for s in samples],
        "meta_json": [json.dumps(dict(s.meta), sort_keys=True) for s in samples],
    }, schema=SPLIT_SCHEMA)


def table_to_samples(table: pa.Table) -> list[Sample]:
    out = []
    for row in table.to_pylist():
        answers = tuple(row["answers"])
        out.append(Sample(uid=row["uid"], task=row["task"], split=row["split"], image=row["image"],
                          image_rel=row["image_rel"], question=row["question"],
                          answer=answers if row["answer_is_list"] else answers[0],
                          meta=json.loads(row["meta_json"])))
    return out


def write_table(table: pa.Table, uri: str) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())


def read_table(uri: str) -> pa.Table:
    return pq.read_table(pa.BufferReader(storage.read_bytes(uri)))


def export_split(task: Task, split: str, uri: str) -> pa.Table:
    """Write ``task``'s ``split`` to ``uri`` as Parquet and return the table."""
    table = samples_to_table(task.split(split))
    write_table(table, uri)
    return table
