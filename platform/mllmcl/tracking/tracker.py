"""One stream run's tracking: the backends its settings switch on, what it logged already
(``tracking.json`` in the run folder, so a resumed run logs into the same MLflow run and logs
nothing twice), and the calls the stream runner makes."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from mllmcl import storage
from mllmcl.errors import ConfigError
from mllmcl.settings import TrackingConfig, flatten

log = logging.getLogger(__name__)

STATE_FILE = "tracking.json"
FINAL_KEYS = ("MFT", "MFN", "MAA", "BWT", "FWT", "forgetting", "router_accuracy", "oracle_final", "eval_generated")


def fit_name(stage: int, task: str, kind: str, n: int) -> str:
    return f"{stage}_{task}_{kind}_{n}"


class RunTracker:
    """Fans every call out to the run's backends (none: every call does nothing). A backend that
    fails mid-run (a tracking server gone) is warned about and dropped: the run, which costs
    more than its curves, goes on; what it logs stays in the run folder."""

    def __init__(self, backends: list, state_uri: str | None = None, state: dict | None = None,
                 tensorboard_sync: tuple[str, str] | None = None):
        self.backends = backends
        self.state_uri = state_uri
        self.state = state or {}
        self.state.setdefault("fits", [])
        self.state.setdefault("stages", [])
        self.state.setdefault("train_step", 0)
        self.tensorboard_sync = tensorboard_sync  # (local folder, run-folder URI): an s3:// run's copy

    @property
    def enabled(self) -> bool:
        return bool(self.backends)

    def _each(self, call: str, *args) -> None:
        for b in list(self.backends):
            try:
                getattr(b, call)(*args)
            except Exception as e:  # noqa: BLE001 - tracking never takes a run down
                log.warning("tracking: %s failed (%s: %s); this run logs no more to %s", call, type(e).__name__,
                            str(e).splitlines()[0][:200] if str(e) else "", b.name)
                self.backends.remove(b)

    def _save(self) -> None:
        if self.state_uri is not None and self.enabled:
            storage.write_json(self.state_uri, self.state)

    def log_config(self, config: dict, provenance: dict) -> None:
        if not self.enabled or self.state.get("params"):
            return
        params = {**flatten(config), **{f"provenance.{k}": v for k, v in flatten(provenance).items()}}
        self._each("params", params)
        self.state["params"] = True
        self._save()

    def log_fit(self, name: str, history: list[dict]) -> None:
        """A fit's per-step loss, learning rate and samples/s (``history``: the worker's records)."""
        if not self.enabled or name in self.state["fits"]:
            return
        rows = []
        start = self.state["train_step"]
        for h in history:
            step = int(h["step"])
            for key in ("loss", "lr", "samples_per_s"):
                if h.get(key) is not None:
                    rows.append((f"fit/{name}/{key}", h[key], step))
            if h.get("loss") is not None:
                rows.append(("train/loss", h["loss"], start + step))
        self._each("metrics", rows)
        self.state["train_step"] = start + max((int(h["step"]) for h in history), default=0)
        self.state["fits"].append(name)
        self._save()

    def log_stage(self, k: int, row: dict[str, float], so_far: dict[str, float], info: dict) -> None:
        """Row k of the accuracy matrix (each seen task) and the stream's metrics after task k."""
        if not self.enabled or k in self.state["stages"]:
            return
        rows = [(f"acc/{task}", v, k) for task, v in row.items()]
        rows += [(f"stage/{key}", v, k) for key, v in so_far.items() if isinstance(v, (int, float))]
        if info.get("router_accuracy") is not None:
            rows.append(("stage/router_accuracy", info["router_accuracy"], k))
        self._each("metrics", rows)
        self.state["stages"].append(k)
        self._save()
        self._sync_tensorboard()

    def log_final(self, metrics: dict, artifacts: list[str], step: int) -> None:
        """The run's final metrics and its artifacts (URIs: local files or s3://)."""
        if not self.enabled or self.state.get("final"):
            return
        self._each("metrics", [(k, metrics[k], step) for k in FINAL_KEYS if isinstance(metrics.get(k), (int, float))])
        with tempfile.TemporaryDirectory(prefix="mllmcl-artifacts-") as tmp:
            for uri in artifacts:
                if not storage.exists(uri):
                    continue
                local = uri
                if storage.is_remote(uri):
                    local = os.path.join(tmp, uri.rstrip("/").rsplit("/", 1)[-1])
                    with open(local, "wb") as f:
                        f.write(storage.read_bytes(uri))
                self._each("artifact", local, "report" if "/report/" in uri else "metrics")
        self.state["final"] = True
        self._save()
        self._sync_tensorboard()

    def end(self, status: str) -> None:
        self._each("end", status)
        self._sync_tensorboard()

    def _sync_tensorboard(self) -> None:
        if self.tensorboard_sync is not None and any(b.name == "tensorboard" for b in self.backends):
            storage.upload_dir(*self.tensorboard_sync)

    @property
    def mlflow_run_id(self) -> str | None:
        return self.state.get("mlflow_run_id")


def open_run_tracker(tracking: TrackingConfig, run_dir: str, run_id: str, stream: str,
                     tags: dict[str, Any] | None = None) -> RunTracker:
    """The run's tracker (backends from ``tracking``; a resumed run's MLflow run from its
    ``tracking.json``). A backend that cannot start is an error before anything trains."""
    if not tracking.enabled:
        return RunTracker([])
    state_uri = storage.join(run_dir, STATE_FILE)
    state = storage.read_json(state_uri) if storage.exists(state_uri) else {}
    experiment = tracking.experiment or f"mllmcl-{stream}"
    name = tracking.run_name or run_id
    backends, problems, sync = [], [], None
    if tracking.mlflow_uri:
        try:
            from mllmcl.tracking.backends import MlflowBackend

            same = state.get("mlflow_uri") == tracking.mlflow_uri
            existing = tracking.run_id or (state.get("mlflow_run_id") if same else "")
            if not same:  # another server: what was logged to the old one is logged again here
                state = {}
            b = MlflowBackend(tracking.mlflow_uri, experiment, name, run_id=existing,
                              parent_run_id=tracking.parent_run_id, tags={"mllmcl.run_id": run_id, **(tags or {})})
            state.update(mlflow_uri=tracking.mlflow_uri, mlflow_run_id=b.run_id)
            backends.append(b)
        except ImportError:
            problems.append("tracking.mlflow_uri: the mlflow package is not installed (pip install mlflow)")
        except Exception as e:  # noqa: BLE001 - the server's own words
            problems.append(f"tracking.mlflow_uri={tracking.mlflow_uri!r}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:300] if str(e) else ''}")
    if tracking.tensorboard or tracking.tensorboard_dir:
        from mllmcl.tracking.backends import TensorBoardBackend

        if tracking.tensorboard_dir:
            folder = os.path.join(tracking.tensorboard_dir, run_id)
        elif storage.is_remote(run_dir):
            folder = tempfile.mkdtemp(prefix=f"mllmcl-tensorboard-{run_id}-")
            sync = (folder, storage.join(run_dir, "tensorboard"))
            if storage.exists(sync[1]):  # a resumed run's files: appended to, not replaced
                storage.download_dir(sync[1], folder)
        else:
            folder = storage.join(run_dir, "tensorboard")
        backends.append(TensorBoardBackend(folder))
    if tracking.wandb:
        try:
            from mllmcl.tracking.backends import WandbBackend

            folder = run_dir if not storage.is_remote(run_dir) else tempfile.mkdtemp(prefix="mllmcl-wandb-")
            backends.append(WandbBackend(experiment, name, folder, tracking.wandb_mode))
        except ImportError:
            problems.append("tracking.wandb=true: the wandb package is not installed (pip install wandb)")
    if problems:
        raise ConfigError(problems)
    return RunTracker(backends, state_uri, state, sync)


def experiment_name(tracking: TrackingConfig, stream: str) -> str:
    return tracking.experiment or f"mllmcl-{stream}"


class SweepTracker:
    """A sweep's parent MLflow run: the sweep's settings as parameters, its results as artifacts;
    each trial's stream run is nested under it (``tracking.parent_run_id``). Its id is kept in
    the sweep folder, so a restored sweep keeps its parent."""

    def __init__(self, tracking: TrackingConfig, sweep_root: str, name: str, stream: str, params: dict):
        from mllmcl.tracking.backends import MlflowBackend

        self.state_uri = storage.join(sweep_root, STATE_FILE)
        state = storage.read_json(self.state_uri) if storage.exists(self.state_uri) else {}
        existing = state.get("mlflow_run_id") if state.get("mlflow_uri") == tracking.mlflow_uri else ""
        try:
            self.backend = MlflowBackend(tracking.mlflow_uri, experiment_name(tracking, stream), name,
                                         run_id=existing or "", tags={"mllmcl.sweep": name})
        except ImportError:
            raise ConfigError(["tracking.mlflow_uri: the mlflow package is not installed (pip install mlflow)"])
        except Exception as e:  # noqa: BLE001 - the server's own words
            raise ConfigError([f"tracking.mlflow_uri={tracking.mlflow_uri!r}: {type(e).__name__}: "
                               f"{str(e).splitlines()[0][:300] if str(e) else ''}"])
        self.run_id = self.backend.run_id
        if not existing:
            self.backend.params({f"sweep.{k}": v for k, v in flatten(params).items()})
        storage.write_json(self.state_uri, {"mlflow_uri": tracking.mlflow_uri, "mlflow_run_id": self.run_id})

    def finish(self, metrics: dict[str, float], artifacts: list[str], stopped: tuple[str, ...] = ()) -> None:
        """The sweep's own numbers and files; the runs of trials the scheduler stopped (``stopped``:
        their names; their processes ended mid-stream, as RUNNING or as FAILED by the interruption)
        and any other still RUNNING are marked KILLED."""
        client = self.backend.client
        self.backend.metrics([(k, v, 0) for k, v in metrics.items() if isinstance(v, (int, float))])
        with tempfile.TemporaryDirectory(prefix="mllmcl-sweep-") as tmp:
            for uri in artifacts:
                if storage.exists(uri):
                    local = os.path.join(tmp, uri.rstrip("/").rsplit("/", 1)[-1])
                    with open(local, "wb") as f:
                        f.write(storage.read_bytes(uri))
                    self.backend.artifact(local)
        exp = client.get_run(self.run_id).info.experiment_id
        for child in client.search_runs([exp], f"tags.mlflow.parentRunId = '{self.run_id}'"):
            if child.info.status == "RUNNING" or child.info.run_name in stopped:
                client.set_terminated(child.info.run_id, status="KILLED")
        self.backend.end("complete")
