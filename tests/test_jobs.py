"""The entrypoints' refusals and their S3 path (the README tier runs the README's commands)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, env_extra=None, timeout=600):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_make_synthetic_writes_both_streams(tmp_path):
    out = tmp_path / "syn"
    r = _run(["jobs/make_synthetic.py", "--out", str(out), "--train", "4", "--test", "3"])
    assert r.returncode == 0, r.stderr
    assert "dcl: RS 4/3, Med 4/3, AD 4/3, Sci 4/3, Fin 4/3" in r.stdout
    assert "acl: OCR 4/3, Math 4/3, VP 4/3, APP 4/3" in r.stdout
    assert (out / "Ability_data" / "APP_test" / "test.json").exists()


def _check_run(run_dir: Path, tasks):
    metrics = json.loads((run_dir / "metrics" / "metrics.json").read_text())
    assert metrics["tasks"] == tasks and metrics["method"] == "zero_shot"
    rows = metrics["accuracy_matrix"]["rows"]
    assert len(rows) == len(tasks)
    assert metrics["MFT"] == pytest.approx(sum(rows[i][i] for i in range(len(tasks))) / len(tasks))
    for k in range(len(tasks)):
        for t in tasks[: k + 1]:
            assert (run_dir / "eval" / f"stage_{k}" / f"{t}.parquet").exists()
    assert (run_dir / "report" / "report.html").read_text().startswith("<!doctype html>")
    assert (run_dir / "report" / "accuracy_matrix.png").read_bytes()[:4] == b"\x89PNG"
    cfg = (run_dir / "config.yaml").read_text()
    assert "git_sha" in cfg and "mllmcl_version" in cfg and "libraries" in cfg
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"


def test_ability_stream_help_lists_methods():
    r = _run(["jobs/ability_stream.py", "--help"])
    assert r.returncode == 0 and "registered methods:" in r.stdout and "zero_shot" in r.stdout


def test_bad_config_fails_before_any_work(tmp_path):
    r = _run(["jobs/domain_stream.py", f"storage.root={tmp_path}", "train.lr=fast", "lora.rnk=8",
              "data.stream=ccl"])
    assert r.returncode == 2
    for needle in ("train.lr: expected a number", "lora.rnk: unknown key", "data.stream='ccl'"):
        assert needle in r.stderr, r.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_bad_data_fails_before_any_work(tmp_path, fixture_release):
    r = _run(["jobs/domain_stream.py", f"storage.root={tmp_path / 'out'}", f"data.root={fixture_release}",
              "run.id=x"])
    assert r.returncode == 2
    assert "AD: task folder for dcl/AD not found" in r.stderr
    assert "Fin: task folder for dcl/Fin not found" in r.stderr  # every problem, not just the first
    assert "local Ray" not in r.stderr  # failed before Ray started
    assert not (tmp_path / "out").exists()


@pytest.mark.s3
def test_job_writes_to_s3(s3_bucket, small_tiny_path, synthetic_small, tmp_path, ray_session):
    from mllmcl import storage

    r = _run(["jobs/ability_stream.py", f"storage.root={s3_bucket}", "run.id=zs3", f"model.path={small_tiny_path}",
              f"data.root={synthetic_small}", "data.tasks=[OCR,Math]", "method.name=zero_shot",
              "eval.max_new_tokens=4", "run.progress=false"],
             env_extra={"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address})
    assert r.returncode == 0, r.stderr
    local = tmp_path / "copy"
    storage.download_dir(f"{s3_bucket}/runs/zs3", str(local))
    _check_run(local, ["OCR", "Math"])
