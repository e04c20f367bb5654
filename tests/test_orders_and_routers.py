"""The field's questions on a small stream, in-process (scaling.backend=local): task orders
recorded and compared as mean ± std, forward transfer in every run, the other scoring tracks
stored per sample, MR-LoRA's experts re-routed by another router, and the router table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mllmcl import compare_runs, run_stream
from mllmcl.config import load_config
from mllmcl.evaluation.predictions import read_predictions

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ["scaling.backend=local", "train.lr=0.01", "train.max_steps=30", "method.router_epochs=10"]


def _cfg(root, overrides, *extra):
    return load_config(None, [*overrides, *LOCAL, f"storage.root={root}", *extra])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("orders")


@pytest.fixture(scope="module")
def reversed_mr_lora(root, stream_overrides):
    return run_stream(_cfg(root, stream_overrides, "method.name=mr_lora", "data.tasks=[RS,Med]", "data.order=reverse"),
                      "mr-reverse")


def test_a_reversed_order_is_recorded_with_forward_transfer_and_every_track(reversed_mr_lora):
    run = Path(reversed_mr_lora.run_dir)
    m = json.loads((run / "metrics" / "metrics.json").read_text())
    assert m["tasks"] == ["Med", "RS"] and m["order"] == "reverse"  # keyed by name, in the run's order
    assert json.loads((run / "manifest.json").read_text())["tasks"] == ["Med", "RS"]
    assert (run / "tasks" / "0_Med" / "expert").is_dir() and (run / "tasks" / "1_RS" / "expert").is_dir()
    matrix = m["accuracy_matrix"]
    assert matrix["forward"][0] is None and matrix["forward"][1] is not None  # RS answered after stage 0 only
    assert all(v is not None for v in matrix["zero_shot"])
    assert m["FWT"] == pytest.approx(matrix["forward"][1] - matrix["zero_shot"][1])
    forward = read_predictions(str(run / "eval" / "forward" / "RS.parquet"))
    assert {r.stage for r in forward} == {0} and {r.expert for r in forward} == {"tasks/0_Med/expert"}
    base = read_predictions(str(run / "eval" / "zero_shot" / "Med.parquet"))
    assert {r.expert for r in base} == {"base"}
    rows = read_predictions(str(run / "eval" / "stage_1" / "RS.parquet"))
    assert all(r.exact in (0.0, 1.0) and 0.0 <= r.f1 <= 1.0 for r in rows)
    for track in ("exact", "f1"):  # per track: its own matrix and metrics, never the native numbers
        t = m["tracks"][track]
        cells = [[read_predictions(str(run / "eval" / f"stage_{k}" / f"{task}.parquet")) for task in ("Med", "RS")[:k + 1]]
                 for k in range(2)]
        expected = [[100.0 * sum(r.track(track) for r in c) / len(c) for c in row] for row in cells]
        got = [[v for v in row if v is not None] for row in t["accuracy_matrix"]["rows"]]
        assert [len(r) for r in got] == [1, 2] and all(g == pytest.approx(e) for g, e in zip(got, expected))
        assert set(t) >= {"MFT", "MFN", "MAA", "BWT", "FWT"}
    confusion = m["router_confusion"]  # the final stage's: task -> chosen expert -> questions
    assert list(confusion) == ["Med", "RS"] and all(list(c) == ["Med", "RS"] for c in confusion.values())
    assert sum(confusion["RS"].values()) == len(rows)
    per_task = json.loads((run / "manifest.json").read_text())["stages"][1]["info"]["router_accuracy_per_task"]
    assert per_task["RS"] == pytest.approx(100.0 * confusion["RS"]["RS"] / len(rows))
    assert m["router_flops_per_question"] > 0
    html = (run / "report" / "report.html").read_text()
    assert "router_confusion.png" in html and (run / "report" / "router_confusion.png").exists()
    assert "FWT" in html and "exact match" in html and "reverse: Med → RS" in html


def test_orders_group_into_mean_and_std(root, stream_overrides, reversed_mr_lora):
    runs = []
    for order in ("paper", "reverse"):
        res = run_stream(_cfg(root, stream_overrides, "method.name=zero_shot", "data.tasks=[RS,Med]",
                              f"data.order={order}"), f"zs-{order}")
        runs.append(res)
    table = compare_runs([r.run_dir for r in runs])
    header, row = table.splitlines()[0], table.splitlines()[2]
    assert header.startswith("| method | orders | RS | Med | MFT | MFN | MAA | BWT | FWT | router |")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:2] == ["zero_shot", "2"]
    mfn = [r.metrics["MFN"] for r in runs]
    import statistics

    assert cells[5] == f"{statistics.fmean(mfn):.2f} ± {statistics.stdev(mfn):.2f}"
    # runs that differ in more than the order stay apart: one row each
    mixed = compare_runs([runs[0].run_dir, reversed_mr_lora.run_dir])
    assert "| method | RS | Med | MFT" in mixed and len(mixed.splitlines()) == 4
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "compare.py"), *[r.run_dir for r in runs], "--track", "f1",
                          "--html", str(root / "cmp")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| zero_shot | 2 |" in out.stdout and (root / "cmp" / "comparison.png").exists()
    page = (root / "cmp" / "comparison.html").read_text()
    assert "f1 track" in page and "order paper" in page and "order reverse" in page


def test_experts_rerouted_by_ridge_and_the_router_table(root, reversed_mr_lora):
    from mllmcl.evaluation.compare import router_table
    from mllmcl.runner.reroute import reroute

    res = reroute(reversed_mr_lora.run_dir, "ridge")
    assert res.trained_stages == []  # no expert retrained, and the ridge router trains nothing
    run = Path(res.run_dir)
    assert run.name == "mr-reverse-ridge" and (run / "tasks" / "1_RS" / "ridge.npz").exists()
    for k, task in enumerate(["Med", "RS"]):
        a = Path(reversed_mr_lora.run_dir) / "tasks" / f"{k}_{task}" / "expert" / "adapter_model.safetensors"
        assert (run / "tasks" / f"{k}_{task}" / "expert" / "adapter_model.safetensors").read_bytes() == a.read_bytes()
    manifest = json.loads((run / "manifest.json").read_text())
    assert all(t.get("reused") for s in manifest["stages"] for t in s["train"])  # the experts were copied, not fitted
    assert res.metrics["router"] == "ridge" and res.metrics["oracle_final"] == reversed_mr_lora.metrics["oracle_final"]
    table = router_table([reversed_mr_lora.run_dir, res.run_dir])
    assert table.splitlines()[0].startswith("| router | stream | routing acc. (final) | MFN")
    assert "| mllm | dcl |" in table and "| ridge | dcl |" in table
