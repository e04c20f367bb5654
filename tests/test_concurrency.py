"""The concurrent schedule on Ray (the default) against the sequential schedule, with the
driver of the concurrent run stopped after stage 0 (stage 1's fits, started beside it, end and
are kept) and resumed on two evaluation replicas: the same adapters byte for byte, the same
predictions and accuracy matrix, fits that ran at the same time and evaluation shards of both
replicas in the manifest.

The sequential reference runs on the local backend: ``run.schedule=sequential`` on Ray runs the
same in-order executor (``InlineExecutor``) with each fit on Ray Train, and a one-worker Ray
Train fit gives the in-process fit's bytes (this test holds both to the same adapters). Its
order (one job at a time, a stage evaluated before the next trains) is test_schedule.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mllmcl import run_stream
from mllmcl.config import load_config

TWO = "data.tasks=[RS,Med]"


def _cfg(root, overrides, *extra):
    # no forward-transfer answers: stage 0 would then answer Med too (cached), and stage 1 would have
    # too few new rows to shard over two replicas
    return load_config(None, [*overrides, f"storage.root={root}", TWO, "eval.forward_transfer=false", *extra])


def _adapters(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.glob("tasks/*/*/adapter_model.safetensors"))}


def _overlap(a: dict, b: dict) -> bool:
    return a["started"] < b["ended"] and b["started"] < a["ended"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("concurrency")


@pytest.fixture(scope="module")
def sequential(ray_session, root, stream_overrides):
    return run_stream(_cfg(root, stream_overrides, "method.name=mr_lora", "scaling.backend=local"), "mr-seq")


def test_mr_lora_concurrent_matches_sequential_also_stopped_mid_schedule(root, stream_overrides, sequential):
    cfg = _cfg(root, stream_overrides, "method.name=mr_lora")
    first = run_stream(cfg, "mr-con", stop_after=0)  # stage 1's fits started beside stage 0; the driver stops
    con = Path(first.run_dir)
    assert [s["k"] for s in json.loads((con / "manifest.json").read_text())["stages"]] == [0]
    res = run_stream(_cfg(root, stream_overrides, "method.name=mr_lora", "scaling.eval_replicas=2"), "mr-con")
    assert res.trained_stages == []  # resumed: the fits the first driver finished are kept, not redone
    assert res.matrix.rows == sequential.matrix.rows
    seq = Path(sequential.run_dir)
    assert len(_adapters(con)) == 3 and _adapters(con) == _adapters(seq)  # expert 0, expert 1, router 1
    for k, task in ((0, "RS"), (1, "RS"), (1, "Med")):
        assert (con / "eval" / f"stage_{k}" / f"{task}.parquet").read_bytes() == \
               (seq / "eval" / f"stage_{k}" / f"{task}.parquet").read_bytes()
    stages = json.loads((con / "manifest.json").read_text())["stages"]
    fits = [t for s in stages for t in s["train"]]
    assert len(fits) == 3 and all("started" in t for t in fits)  # a fit the first driver finished keeps its times
    assert any(_overlap(a, b) for i, a in enumerate(fits) for b in fits[i + 1:])  # fits ran at the same time
    assert {s["replica"] for s in stages[1]["eval_shards"]} == {0, 1}  # both replicas answered stage 1
    assert sum(s["rows"] for s in stages[1]["eval_shards"]) > 0
