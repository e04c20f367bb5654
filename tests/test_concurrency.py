"""The concurrent schedule on Ray (the default) against ``run.schedule=sequential``: the same
adapters byte for byte and the same accuracy matrix, fits that ran at the same time and
evaluation shards on two replicas in the manifest, and a driver stopped mid-schedule (later
fits in flight) that resumes to the same result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mllmcl import run_stream
from mllmcl.config import load_config

TWO = "data.tasks=[RS,Med]"


def _cfg(root, overrides, *extra):
    return load_config(None, [*overrides, f"storage.root={root}", TWO, *extra])


def _adapters(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.glob("tasks/*/*/adapter_model.safetensors"))}


def _overlap(a: dict, b: dict) -> bool:
    return a["started"] < b["ended"] and b["started"] < a["ended"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("concurrency")


@pytest.fixture(scope="module")
def sequential(ray_session, root, stream_overrides):
    return run_stream(_cfg(root, stream_overrides, "method.name=mr_lora", "run.schedule=sequential"), "mr-seq")


def test_mr_lora_concurrent_matches_sequential_and_ran_fits_at_once(root, stream_overrides, sequential):
    res = run_stream(_cfg(root, stream_overrides, "method.name=mr_lora", "scaling.eval_replicas=2"), "mr-con")
    assert res.matrix.rows == sequential.matrix.rows
    seq, con = Path(sequential.run_dir), Path(res.run_dir)
    assert len(_adapters(con)) == 3 and _adapters(con) == _adapters(seq)  # expert 0, expert 1, router 1
    for k, task in ((0, "RS"), (1, "RS"), (1, "Med")):
        assert (con / "eval" / f"stage_{k}" / f"{task}.parquet").read_bytes() == \
               (seq / "eval" / f"stage_{k}" / f"{task}.parquet").read_bytes()
    stages = json.loads((con / "manifest.json").read_text())["stages"]
    fits = [t for s in stages for t in s["train"]]
    assert len(fits) == 3 and any(_overlap(a, b) for i, a in enumerate(fits) for b in fits[i + 1:])
    assert {s["replica"] for s in stages[1]["eval_shards"]} == {0, 1}  # both replicas answered stage 1
    assert sum(s["rows"] for s in stages[1]["eval_shards"]) > 0
    before = json.loads((seq / "manifest.json").read_text())["stages"]
    seq_fits = sorted((t for s in before for t in s["train"]), key=lambda t: t["started"])
    assert all(a["ended"] <= b["started"] for a, b in zip(seq_fits, seq_fits[1:]))  # one at a time
    assert before[0]["eval_ended"] <= seq_fits[-1]["started"]  # stage 0 evaluated before stage 1 trains


def test_a_driver_stopped_mid_schedule_resumes_to_the_same_result(root, stream_overrides, sequential):
    cfg = _cfg(root, stream_overrides, "method.name=mr_lora")
    first = run_stream(cfg, "mr-stopped", stop_after=0)  # stage 1's expert and router were started beside stage 0
    run = Path(first.run_dir)
    assert [s["k"] for s in json.loads((run / "manifest.json").read_text())["stages"]] == [0]
    resumed = run_stream(cfg, "mr-stopped")
    assert 0 not in resumed.trained_stages
    assert resumed.matrix.rows == sequential.matrix.rows
    assert _adapters(run) == _adapters(Path(sequential.run_dir))
