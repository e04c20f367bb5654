"""bench/gpu_check.sh, as a user runs it: the --tiny check (the GPU check's code path on CPU) runs
the 2-task MR-LoRA stream twice through the platform's runner where the packages the GPU
image lacks (Ray, DeepSpeed, MLflow, boto3, FastAPI) cannot be imported, and reports both
runs; activation checkpointing does not change the results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# installed here, absent from the GPU machine's image (bench/gpu_check.sh: torch, transformers, peft, pyarrow)
ABSENT = ("ray", "deepspeed", "mlflow", "boto3", "botocore", "fastapi")

# On PYTHONPATH, run at start-up: the import system's path finder no longer finds these packages, so
# `import ray` fails and `importlib.util.find_spec("deepspeed")` is None, as where they are not installed
# (transformers and accelerate ask find_spec before importing their optional integrations).
HIDE = '''
import sys
from importlib.machinery import PathFinder

ABSENT = {absent!r}


class Hidden(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            return None
        return PathFinder.find_spec(name, path, target)


sys.meta_path[:] = [Hidden if f is PathFinder else f for f in sys.meta_path]
'''


def _env(tmp_path: Path) -> dict:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE.format(absent=ABSENT))
    # the session's cache (conftest.py): the check builds its tiny base and synthetic release there
    return {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(site)}


def _gpu_check(args, env, timeout=600):
    return subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_packages_are_hidden(tmp_path):
    """The hiding itself works (else the slow test below proves nothing)."""
    r = subprocess.run([sys.executable, "-c", "import importlib.util as u, sys; "
                        "print([m for m in sys.argv[1:] if u.find_spec(m) is not None]); import ray", *ABSENT],
                       env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]" and "No module named 'ray'" in r.stderr, (r.stdout, r.stderr)


def test_help_explains_the_options(tmp_path):
    r = _gpu_check(["--help"], _env(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr
    for needle in ("--tiny", "--out", "--checkpointing", "MFU", "planner"):
        assert needle in r.stdout


def test_refuses_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the check would run")
    r = _gpu_check([], _env(tmp_path), timeout=120)
    assert r.returncode != 0 and "no CUDA device" in r.stderr and "--tiny" in r.stderr


@pytest.mark.slow
def test_tiny_check_runs_the_stream_twice_without_ray(tmp_path):
    out = tmp_path / "r.json"
    r = _gpu_check(["--tiny", "--out", str(out), "--root", str(tmp_path / "runs")], _env(tmp_path))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["tiny"] and not report["errors"]
    assert not set(ABSENT) & set(report["third_party_modules"])
    runs = report["runs"]
    assert [run["gradient_checkpointing"] for run in runs] == [False, True]
    for run in runs:
        assert run["status"] == "complete"
        t = run["train"]
        assert t["samples_per_s"] > 0 and t["tokens_per_s"] > 0 and t["mfu"] is None  # CPU: no MFU
        assert {f["kind"] for f in run["fits"]} == {"expert", "router"}
        assert all(f["loop_seconds"] > 0 and f["tokens"] > 0 for f in run["fits"])
        m = run["accuracy_matrix"]
        assert m["tasks"] == ["RS", "Med"] and len(m["rows"]) == 2 and all(len(row) == 2 for row in m["rows"])
        cells = [v for row in m["rows"] for v in row if v is not None]
        assert len(cells) == 3 and all(0 <= v <= 100 for v in cells)  # lower triangle: seen tasks only
        planner = run["memory"]["planner"]
        assert planner["fits"]["expert"]["total_gib"] > 0 and planner["eval_replica_gib"] > 0
        assert run["memory"]["peak_gib"] is None  # CPU
        e = run["eval"]
        assert e["generated_tokens"] > 0 and e["tokens_per_s"] > 0 and e["answers"] > 0
    # checkpointing recomputes the same forward pass (its dropout masks too: the RNG state is restored)
    # in the same order: on CPU in float32 the adapters are byte-identical, and so are every answer and
    # the matrix (random weights answer little; the adapters and losses are what carry the check)
    a, b = runs
    assert a["adapters_digest"] == b["adapters_digest"]
    assert [f["loss"] for f in a["fits"]] == [f["loss"] for f in b["fits"]]
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert a["predictions_digest"] == b["predictions_digest"]
    assert all(report["same_results"][k] for k in ("accuracy_matrix", "predictions", "adapters"))
    for needle in ("samples/s", "MFU n/a", "planner", "generated tokens/s", "after Med"):
        assert needle in r.stdout
