"""Ray Tune sweeps over the stream: spec validation before any trial, a sweep that
reports after every task, writes its results and best preset, and resumes after an
interruption without redoing finished trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mllmcl.errors import ConfigError
from mllmcl.tuning import load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweeps_are_valid(path):
    spec = load_spec(path)
    assert spec.space and spec.num_samples >= 1 and spec.base_config().data.stream == "dcl"
    assert any("python jobs/sweep.py" in line for line in path.read_text().splitlines()[:5])


def test_shipped_sweeps_cover_the_methods():
    assert {load_spec(p).base_config().method.name for p in SWEEPS} >= {"mr_lora", "lora_ft", "replay", "olora"}


def test_bad_sweep_files_fail_before_any_trial_with_every_problem():
    with pytest.raises(ConfigError) as e:
        parse_spec({"base": "jobs/configs/dcl/lora_ft_tiny.yaml", "bogus": 1,
                    "space": {"train.lrr": {"loguniform": [1e-4, 1e-2]}, "lora.rank": {"choice": [8, "x"]},
                              "train.epochs": {"normal": [1, 2]}, "train.lr": {"uniform": [0.1, 0.01]}},
                    "objective": {"metric": "router_accuracy", "mode": "up"}})
    msg = str(e.value)
    for needle in ("bogus: unknown key", "train.lrr: unknown key", "lora.rank: expected an integer",
                   "unknown distribution 'normal'", "low 0.1 must be below high 0.01",
                   "objective metric 'router_accuracy': the stream does not report it for method 'lora_ft'",
                   "objective.mode='up'"):
        assert needle in msg, needle
    with pytest.raises(ConfigError, match="search space is empty"):
        parse_spec({"base": "jobs/configs/dcl/mr_lora_tiny.yaml", "space": {}, "objective": {"metric": "MAA"}})
    with pytest.raises(ConfigError, match="'accuracy'"):
        parse_spec({"base": "jobs/configs/dcl/mr_lora_tiny.yaml", "space": {"train.lr": {"choice": [0.001]}},
                    "objective": {"metrics": {"accuracy": 1.0}}})
    # router accuracy is reported by routed methods, so it is a valid objective there
    spec = parse_spec({"base": "jobs/configs/dcl/mr_lora_tiny.yaml", "space": {"train.lr": {"choice": [0.001]}},
                       "objective": {"metric": "router_accuracy"}})
    assert spec.objective.weights == {"router_accuracy": 1.0}


def test_sweep_job_refuses_a_bad_file_without_starting_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: jobs/configs/dcl/lora_ft_tiny.yaml\nspace: {}\nobjective: {metric: MAA}\n")
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "sweep.py"), "--storage", str(tmp_path), str(bad),
                          "train.lr=0.001", "--max-concurrent", "1"],  # options and overrides intermixed
                         capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 2 and "search space is empty" in out.stderr
    assert "Ray" not in out.stderr.replace("Ray Tune", "")  # nothing started
    assert not (tmp_path / "sweeps").exists()


def test_pareto_front():
    from mllmcl.tuning.tune_run import pareto_front

    rows = [{"trial_id": t, "MAA": a, "BWT": b, "stop_reason": "completed"}
            for t, a, b in (("a", 90, -5), ("b", 85, -1), ("c", 80, -6), ("d", 90, -1))]
    rows.append({"trial_id": "e", "MAA": 99, "BWT": 0, "stop_reason": "stopped by the scheduler after task 1"})
    assert pareto_front(rows, ("MAA", "BWT"), ("max", "max")) == ["d"]
    assert sorted(pareto_front(rows, ("MAA", "BWT"), ("max", "min"))) == ["a", "c"]  # a dominates d here


def test_a_sweep_where_no_trial_completes_says_why(tmp_path, monkeypatch, capsys):
    """Every trial failed: the job exits 1 and names the first trial's error in one line (the
    error inside Ray's wrapper, not the wrapper's first line)."""
    import importlib.util

    from ray.exceptions import RayTaskError

    from mllmcl.tuning import tune_run

    wrapped = RayTaskError("stream_trial", "Traceback (most recent call last):\n  ...", FileNotFoundError(
        "[Errno 2] No such file: '/x/runs/t1/tasks/0_RS/expert/meta.json'"))
    reasons = [tune_run._stop_reason(type("R", (), {"error": wrapped, "metrics": {}})(), 2)] * 2
    assert reasons[0] == "error: FileNotFoundError: [Errno 2] No such file: '/x/runs/t1/tasks/0_RS/expert/meta.json'"
    rows = [{"trial_id": t, "config": {}, "tasks_done": 0, "stop_reason": r, "history": [], "objective": None}
            for t, r in zip(("a1", "b2"), reasons)]
    monkeypatch.setattr(tune_run, "run_sweep", lambda spec, resume=True: tune_run.SweepResult(
        str(tmp_path), rows, None, [], 0, 4))
    spec = importlib.util.spec_from_file_location("sweep_job", REPO / "jobs" / "sweep.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main([str(SWEEPS[0]), "--storage", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: no trial completed the stream; trial a1 failed with FileNotFoundError: [Errno 2] No "
                       "such file: '/x/runs/t1/tasks/0_RS/expert/meta.json' (2 of 2 trials failed)")


# --------------------------------------------------------------------------- on Ray

def _write_sweep(path: Path, stream_overrides, storage: Path, num_samples: int, backend: str = "local",
                 tasks: str = "[RS,Med]", scheduler: str = "asha", search: dict | None = None,
                 space: dict | None = None, extra: tuple[str, ...] = ()) -> Path:
    data = {"name": path.stem, "overrides": [*stream_overrides, f"data.tasks={tasks}", "method.name=lora_ft",
                                             f"scaling.backend={backend}", "train.max_steps=30", *extra],
            "space": space or {"train.lr": {"loguniform": [5e-3, 3e-2]}, "lora.rank": {"choice": [4, 8]}},
            "objective": {"metric": "MAA", "mode": "max"},
            "scheduler": {"type": scheduler, "grace_period": 1, "reduction_factor": 2},
            "search": search or {"type": "random", "seed": 1}, "num_samples": num_samples, "max_concurrent": 1,
            "trial_resources": {"cpus": 0, "memory_gb": 0.5}, "storage": str(storage)}
    path.write_text(yaml.safe_dump(data))
    return path


HOPELESS_LR = 1e-9  # learns nothing in 30 steps: the base model's score after task 1


def test_sweep_reports_every_task_and_writes_results(ray_session, tmp_path, stream_overrides, mlflow_server,
                                                      default_assets):
    """Trials run the stream (local backend inside each trial, for speed), one at a time in grid
    order; ASHA stops the hopeless last configuration after task 1 (the two trials before it
    set the bar); the best preset reproduces its reported objective through the stream job.
    Tracked in a real MLflow server: the trials' runs are nested under the sweep's run."""
    from mlflow.tracking import MlflowClient

    from mllmcl.config import load_config
    from mllmcl.tuning.tune_run import run_sweep
    from mllmcl import run_stream

    # the pre-trained default base (built once per session) on 40 test questions: 30 LoRA steps at
    # these rates learn RS measurably there (25-30%), on the plumbing base nothing does (all 0)
    spec = load_spec(_write_sweep(tmp_path / "asha.yaml", stream_overrides, tmp_path / "store", 1,
                                  space={"train.lr": {"grid": [5e-3, 1e-2, HOPELESS_LR]}},
                                  extra=("model.path=tiny", "data.root=synthetic", "data.limit=40",
                                         f"tracking.mlflow_uri={mlflow_server}", "tracking.experiment=sweeps")))
    res = run_sweep(spec)
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("sweeps").experiment_id
    parent = [r for r in client.search_runs([exp]) if r.info.run_name == "asha"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    parent = parent[0]
    assert parent.data.metrics["best_objective"] == pytest.approx(res.best["objective"])
    assert {"results.json", "best.yaml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    trials = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_trial = {t.info.run_name: t for t in trials}
    assert sorted(by_trial) == sorted(r["trial_id"] for r in res.rows)  # one nested run per trial
    for r in res.rows:
        t = by_trial[r["trial_id"]]
        assert float(t.data.params["train.lr"]) == pytest.approx(r["config"]["train.lr"])  # Tune's setup_mlflow
        assert t.data.params["method.name"] == "lora_ft"  # the stream's own config
        done = r["stop_reason"] == "completed"
        assert t.info.status == ("FINISHED" if done else "KILLED"), (r, t.info.status)
        acc = client.get_metric_history(t.info.run_id, "acc/RS")
        assert [m.step for m in acc] == ([0, 1] if done else [0])
        if done:
            assert t.data.metrics["MAA"] == pytest.approx(r["MAA"])
    assert len(res.rows) == 3
    by_lr = {r["config"]["train.lr"]: r for r in res.rows}
    hopeless = by_lr[HOPELESS_LR]
    assert hopeless["stop_reason"] == "stopped by the scheduler after task 1", res.rows
    assert [h["task"] for h in hopeless["history"]] == [1] and hopeless["tasks_done"] == 1
    assert by_lr[5e-3]["stop_reason"] == "completed"  # the first trial at a rung always goes on
    for r in res.rows:
        tasks = [h["task"] for h in r["history"]]
        if r["stop_reason"] == "completed":
            assert tasks == [1, 2]  # one report per task
            run = Path(res.root) / "runs" / r["trial_id"]
            assert json.loads((run / "manifest.json").read_text())["status"] == "complete"
            assert (run / "metrics" / "metrics.json").exists()  # the run finished before its last report
        else:
            assert r["stop_reason"] == "stopped by the scheduler after task 1" and tasks == [1]
    assert res.task_trainings == sum(r["tasks_done"] for r in res.rows) < res.task_trainings_without_stopping == 6
    root = Path(res.root)
    assert {"results.json", "results.csv", "best.yaml", "objective_by_task.png"} <= {p.name for p in root.iterdir()}
    assert (root / "objective_by_task.png").read_bytes()[:4] == b"\x89PNG"
    csv_lines = (root / "results.csv").read_text().splitlines()
    assert set(csv_lines[0].split(",")) >= {"trial_id", "train.lr", "objective", "stop_reason"}
    assert len(csv_lines) == 4
    best = res.best
    completed = [r for r in res.rows if r["stop_reason"] == "completed"]
    assert best["objective"] == max(r["objective"] for r in completed) and best["objective"] > 0
    cfg = load_config(root / "best.yaml", [f"storage.root={tmp_path / 'repro'}"])
    assert cfg.train.lr == pytest.approx(best["config"]["train.lr"])
    again = run_stream(cfg, "repro")
    assert again.metrics["MAA"] == pytest.approx(best["MAA"])


@pytest.mark.s3
def test_multi_objective_optuna_search_on_s3_reports_the_pareto_set(ray_session, tmp_path, stream_overrides,
                                                                     s3_bucket):
    """Optuna over two metrics; Tune's state, the trials' runs and the results all in S3."""
    from mllmcl import storage
    from mllmcl.tuning.tune_run import pareto_front, run_sweep

    spec = load_spec(_write_sweep(tmp_path / "pareto.yaml", stream_overrides, s3_bucket, 2,
                                  scheduler="fifo", search={"type": "optuna", "metrics": ["MAA", "BWT"],
                                                            "modes": ["max", "max"], "seed": 0}))
    res = run_sweep(spec)
    assert len(res.rows) == 2 and res.pareto
    assert res.pareto == pareto_front(res.rows, ("MAA", "BWT"), ("max", "max"))
    assert res.root.startswith("s3://")
    saved = storage.read_json(f"{res.root}/results.json")
    assert saved["pareto"] == res.pareto
    for r in res.rows:
        assert storage.read_json(f"{res.root}/runs/{r['trial_id']}/manifest.json")["status"] == "complete"
    assert storage.exists(f"{res.root}/best.yaml") and storage.list_dir(f"{res.root}/tune")


def test_interrupted_sweep_resumes_without_redoing_finished_trials(ray_session, tmp_path, stream_overrides):
    """The sweep's driver is interrupted (Ctrl-C) after its first trial finishes; rerunning the
    job restores the sweep: finished trials are kept (their runs untouched), the rest complete.
    The grid is over task orders (as sweeps/orders_dcl.yaml's), so the sweep's table.md is one
    row, mean ± std over the three orders."""
    import statistics

    from mllmcl.tuning.tune_run import run_sweep

    orders = ["paper", "reverse", ["Med", "RS"]]  # the last is the reverse, named: a third run of two tasks
    path = _write_sweep(tmp_path / "resumable.yaml", stream_overrides, tmp_path / "store", 1, scheduler="fifo",
                        space={"data.order": {"grid": orders}})
    runs = tmp_path / "store" / "sweeps" / "resumable" / "runs"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "sweep.py"), str(path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def complete() -> list[Path]:
        return [m for m in runs.glob("*/manifest.json") if json.loads(m.read_text()).get("status") == "complete"]

    try:
        deadline = time.time() + 300
        while not complete() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert complete(), "no trial finished before the deadline"
        time.sleep(2)  # let Tune record the result
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    finished = {m.parent.name: m.stat().st_mtime_ns for m in complete()}
    res = run_sweep(load_spec(path))
    assert len(res.rows) == 3
    assert [r["stop_reason"] for r in res.rows] == ["completed"] * 3
    assert len(finished) < 3, "the sweep was not interrupted midway"
    for trial_id, mtime in finished.items():  # not rerun
        assert (runs / trial_id / "manifest.json").stat().st_mtime_ns == mtime
    assert res.task_trainings <= res.task_trainings_without_stopping
    recorded = [json.loads((runs / r["trial_id"] / "metrics" / "metrics.json").read_text())["order"] for r in res.rows]
    assert sorted(map(str, recorded)) == sorted(map(str, orders))
    table = (Path(res.root) / "table.md").read_text().splitlines()
    assert table[0].startswith("| method | orders |") and len(table) == 3, table
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    maa = [r["MAA"] for r in res.rows]
    assert cells[:2] == ["lora_ft", "3"]
    assert cells[header.index("MAA")] == f"{statistics.fmean(maa):.2f} ± {statistics.stdev(maa):.2f}"
