"""Experiment tracking against a real ``mlflow server`` (127.0.0.1, sqlite store) and TensorBoard
event files: what a stream run logs arrives there — parameters, every fit's per-step curves,
each stage's accuracy row, the final metrics and the report — and a run that stops and resumes
logs into the same MLflow run without logging anything twice."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from mllmcl.config import load_config
from mllmcl.errors import ConfigError

pytestmark = pytest.mark.slow

TASKS = ["RS", "Med"]


def tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a folder's event files (TFRecord framing: length, crc, event, crc)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            n = struct.unpack("<Q", data[i:i + 8])[0]
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_a_stream_is_tracked_in_mlflow_and_tensorboard_across_a_resume(mlflow_server, stream_overrides, tmp_path):
    from mlflow.tracking import MlflowClient

    from mllmcl import run_stream

    cfg = load_config(None, [*stream_overrides, "scaling.backend=local", "method.name=mr_lora",
                             f"data.tasks=[{','.join(TASKS)}]", f"storage.root={tmp_path}",
                             f"tracking.mlflow_uri={mlflow_server}", "tracking.tensorboard=true"])
    run_stream(cfg, "tracked", stop_after=0)  # a driver that stops after stage 0 ...
    run_dir = tmp_path / "runs" / "tracked"
    state = json.loads((run_dir / "tracking.json").read_text())
    res = run_stream(cfg, "tracked")  # ... and its resubmission
    assert json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"] == state["mlflow_run_id"]

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("mllmcl-dcl")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_name for r in runs] == ["tracked"]  # one MLflow run for the driver and its resubmission
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["mllmcl.method"] == "mr_lora"
    params = run.data.params
    assert params["train.lr"] == str(cfg.train.lr) and params["method.name"] == "mr_lora"
    assert params["provenance.seed"] == "0" and "provenance.data_release.digest" in params

    manifest = json.loads((run_dir / "manifest.json").read_text())
    fits = [t for s in manifest["stages"] for t in s["train"]]
    curves = sorted(k for k in run.data.metrics if k.startswith("fit/") and k.endswith("/loss"))
    assert len(curves) == len(fits) >= 3, curves  # 2 experts + the router's fits
    total = 0
    for key in curves:
        name = key[len("fit/"):-len("/loss")]
        history = client.get_metric_history(run.info.run_id, key)
        steps = [m.step for m in history]
        want = json.loads((run_dir / "fits" / f"{name.split('_')[0]}_{name.split('_', 2)[2].rsplit('_', 1)[0]}_"
                                              f"{name.rsplit('_', 1)[1]}.steps.json").read_text())
        assert steps == [h["step"] for h in want] == list(range(1, len(want) + 1)), key  # every step, once
        assert [m.value for m in history] == pytest.approx([h["loss"] for h in want])
        lrs = client.get_metric_history(run.info.run_id, key.replace("/loss", "/lr"))
        assert len(lrs) == len(steps) and all(m.value > 0 for m in lrs)
        assert all(m.value > 0 for m in client.get_metric_history(run.info.run_id, key.replace("/loss",
                                                                                               "/samples_per_s")))
        total += len(steps)
    stream_curve = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in stream_curve) == list(range(1, total + 1))  # one curve across all fits

    matrix = res.matrix
    for j, task in enumerate(TASKS):
        history = client.get_metric_history(run.info.run_id, f"acc/{task}")
        assert sorted((m.step, m.value) for m in history) == [(k, pytest.approx(matrix[k][j]))
                                                              for k in range(j, len(TASKS))]  # each row once
    for key in ("MFT", "MFN", "MAA", "BWT"):
        assert run.data.metrics[key] == pytest.approx(res.metrics[key])
    artifacts = {a.path for folder in ("report", "metrics") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"report/accuracy_matrix.png", "report/report.html", "metrics/metrics.json"} <= artifacts

    scalars = tb_scalars(run_dir / "tensorboard")
    assert sorted(s for s, _ in scalars["train/loss"]) == list(range(1, total + 1))
    assert [v for _, v in sorted(scalars["acc/RS"])] == pytest.approx([matrix[0][0], matrix[1][0]])
    assert scalars["MFN"][0][1] == pytest.approx(res.metrics["MFN"])


def test_an_unreachable_tracking_server_stops_the_run_before_it_trains(stream_overrides, tmp_path, monkeypatch):
    from mllmcl import run_stream

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cfg = load_config(None, [*stream_overrides, "scaling.backend=local", "data.tasks=[RS]", f"storage.root={tmp_path}",
                             "tracking.mlflow_uri=http://127.0.0.1:9"])
    with pytest.raises(ConfigError, match="tracking.mlflow_uri='http://127.0.0.1:9'"):
        run_stream(cfg, "untracked")
    assert not (tmp_path / "runs" / "untracked" / "tasks").exists()  # nothing trained


def test_tracking_settings_are_checked():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["tracking.parent_run_id=abc", "tracking.wandb_mode=cloud",
                           "tracking.tensorboard_dir=s3://b/tb"])
    for words in ("set tracking.mlflow_uri too", "wandb_mode='cloud'", "a local folder"):
        assert words in str(e.value)
