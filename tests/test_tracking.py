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


def wandb_records(path: Path):
    """The records of a W&B offline run file (``run-<id>.wandb``): a 7-byte header, then LevelDB's
    log framing in 32-KiB blocks (crc, length, type; a record may span blocks), each a protobuf
    ``Record``. W&B 0.31 has no Python reader of its own (its core is a Go binary)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    i, part = 7, b""
    while i + 7 <= len(data):
        left = block - i % block
        if left < 7:  # a block's tail too short for a header is padding
            i += left
            continue
        _, n, kind = struct.unpack("<IHB", data[i:i + 7])
        i += 7
        part += data[i:i + n]
        i += n
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            yield record
            part = b""


def test_a_stream_is_tracked_in_wandb_offline_across_a_resume(stream_overrides, tmp_path):
    """Where the wandb package is installed (it is not a dependency: CI's suite skips this): the
    offline run under the run folder gets the config, every fit's per-step curves, each stage's
    accuracy row once, the final metrics and the report files; the resubmitted driver logs into
    the same W&B run id (an offline run per driver, which `wandb sync` joins)."""
    pytest.importorskip("wandb")
    from mllmcl import run_stream

    cfg = load_config(None, [*stream_overrides, "scaling.backend=local", "method.name=mr_lora",
                             f"data.tasks=[{','.join(TASKS)}]", f"storage.root={tmp_path}", "tracking.wandb=true"])
    run_stream(cfg, "wb", stop_after=0)
    res = run_stream(cfg, "wb")
    run_dir = tmp_path / "runs" / "wb"
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-wb.wandb"))
    assert len(files) == 2, files  # one per driver, both of run id "wb"
    history: dict[str, list[float]] = {}
    config, saved = {}, set()
    for f in files:
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                for item in r.history.item:  # a key with "/" arrives split (nested_key)
                    history.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
            elif kind == "config":
                config.update({u.key: json.loads(u.value_json) for u in r.config.update})
            elif kind == "files":
                saved |= {Path(x.path).name for x in r.files.files}
    assert config["method.name"] == "mr_lora" and float(config["train.lr"]) == cfg.train.lr
    manifest = json.loads((run_dir / "manifest.json").read_text())
    fits = [t for s in manifest["stages"] for t in s["train"]]
    curves = [k for k in history if k.startswith("fit/") and k.endswith("/loss")]
    assert len(curves) == len(fits) >= 3, curves
    total = sum(len(history[k]) for k in curves)
    assert len(history["train/loss"]) == total == sum(len(history[k.replace("/loss", "/lr")]) for k in curves)
    for j, task in enumerate(TASKS):  # each stage's row once, across the two drivers
        assert history[f"acc/{task}"] == pytest.approx([res.matrix[k][j] for k in range(j, len(TASKS))])
    for key in ("MFT", "MFN", "MAA", "BWT"):
        assert history[key] == [pytest.approx(res.metrics[key])]
    assert {"report.html", "accuracy_matrix.png", "metrics.json"} <= saved
