"""Recovery from real faults: the stream job (``jobs/domain_stream.py``, run as a user runs it, from
a folder that is not the repository) SIGKILLed in the middle of a fit, of an evaluation and of
a manifest write, then resubmitted; a truncated checkpoint; a second driver on a live run. Each
resubmitted run must end with the accuracy matrix of an undisturbed run and redo no finished
work (adapters written before the kill are not rewritten; a killed fit resumes from its
checkpoint).

The kills come from ``MLLMCL_CHAOS_KILL`` (mllmcl/chaos.py): the process SIGKILLs itself at a
named point, which is what an OOM kill or a lost node does at that moment (no cleanup runs).
The local backend trains in the driver, so killing the driver kills the fit too.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mllmcl.config import load_config
from mllmcl.errors import ConfigError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("default_assets")]

REPO = Path(__file__).parents[1]
TASKS = "data.tasks=[RS,Med]"


@pytest.fixture(scope="module")
def overrides(stream_overrides):
    # the pre-trained default base on 40 questions a task: it learns in a few steps, so that a matrix
    # of a run that trained differently (from scratch, on other weights) would differ
    return [*stream_overrides, "model.path=tiny", "data.root=synthetic", "data.limit=24", "train.lr=1e-2",
            "scaling.backend=local", "method.name=mr_lora", TASKS, "scaling.checkpoint_every=1", "train.max_steps=8"]


@pytest.fixture(scope="module")
def reference(overrides, tmp_path_factory):
    """The undisturbed run's accuracy matrix."""
    from mllmcl import run_stream

    root = tmp_path_factory.mktemp("chaos-reference")
    rows = run_stream(load_config(None, [*overrides, f"storage.root={root}"]), "reference").matrix.rows
    assert any(v for row in rows for v in row if v), rows  # the base learns here: matrices can tell runs apart
    return rows


def _start_job(overrides, root: Path, run_id: str, kill: str | None = None, root_uri: str | None = None,
               env: dict | None = None) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if k != "MLLMCL_CHAOS_KILL"}
    full.update(env or {})
    if kill:
        full["MLLMCL_CHAOS_KILL"] = kill
    return subprocess.Popen([sys.executable, str(REPO / "jobs" / "domain_stream.py"), *overrides,
                             f"storage.root={root_uri or root}", f"run.id={run_id}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full, cwd=root.parent)


def _job(*args, **kwargs) -> subprocess.CompletedProcess:
    proc = _start_job(*args, **kwargs)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _adapters(run: Path) -> dict[str, int]:
    """Every adapter weight file of the run and when it was written."""
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in (run / "tasks").rglob("*.safetensors")
            if "checkpoints_" not in str(p)}


def _matrix(run: Path) -> list:
    return json.loads((run / "metrics" / "accuracy_matrix.json").read_text())["rows"]


@pytest.mark.parametrize("kill,expect", [
    # a kill during a fit: test_a_driver_killed_in_a_fit_with_its_newest_checkpoint_truncated
    ("eval@6", "eval"),  # stage 1's evaluation (stage 0 makes 4 generate calls here)
    ("write:manifest.json@2", "manifest"),  # half-way through recording stage 1 complete
], ids=["during-evaluation", "during-a-manifest-write"])
def test_a_driver_killed_and_resubmitted_ends_as_an_undisturbed_run(overrides, reference, tmp_path, kill, expect):
    root = tmp_path / "store"
    root.mkdir()
    first = _job(overrides, root, "chaos", kill)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    run = root / "runs" / "chaos"
    manifest = json.loads((run / "manifest.json").read_text())
    assert [s["k"] for s in manifest["stages"]] == [0], manifest["stages"]  # the kill came in stage 1
    lease = json.loads((run / "lease.json").read_text())  # left behind by the killed driver
    before = _adapters(run)
    assert "tasks/1_Med/expert/adapter_model.safetensors" in before  # stage 1's fits were done before the kill
    if expect == "manifest":
        assert list(run.glob("manifest.json.tmp-*"))  # the torn write, beside the intact manifest

    second = _job(overrides, root, "chaos")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"taking over the lease of PID {lease['pid']}" in second.stderr
    assert _matrix(run) == reference  # the matrix of the undisturbed run
    after = _adapters(run)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing written before the kill is redone
    done = json.loads((run / "manifest.json").read_text())
    assert done["status"] == "complete" and done["stages"][0] == manifest["stages"][0]  # stage 0 as recorded
    assert all(t.get("reused") for t in done["stages"][1]["train"])  # stage 1's fits not retrained
    assert not (run / "lease.json").exists()  # released at the end


def test_a_driver_killed_in_a_fit_with_its_newest_checkpoint_truncated(overrides, reference, tmp_path):
    """Killed after stage 1's expert's 4th step (checkpoints 3 and 4 kept), checkpoint 4 cut short
    as an interrupted copy would leave it: the resubmitted fit warns, naming the file, resumes
    from checkpoint 3 (not from step 0), and the run ends as the undisturbed one, stage 0 untouched."""
    root = tmp_path / "store"
    root.mkdir()
    first = _job(overrides, root, "torn", "step:Med:expert@4")
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    run = root / "runs" / "torn"
    before = _adapters(run)
    assert "tasks/0_RS/expert/adapter_model.safetensors" in before
    assert "tasks/1_Med/expert/adapter_model.safetensors" not in before  # killed inside the fit
    ckpts = run / "tasks" / "1_Med" / "checkpoints_expert"
    assert sorted(p.name for p in ckpts.glob("checkpoint_*")) == ["checkpoint_000003", "checkpoint_000004"]
    bad = ckpts / "checkpoint_000004" / "adapter.safetensors"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # a copy cut short
    lease = json.loads((run / "lease.json").read_text())

    second = _job(overrides, root, "torn")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"taking over the lease of PID {lease['pid']}" in second.stderr
    warning = [line for line in second.stderr.splitlines() if "is unreadable" in line]
    assert warning and "checkpoint_000004" in warning[0] and "adapter.safetensors" in warning[0], second.stderr[-3000:]
    meta = json.loads((run / "tasks" / "1_Med" / "expert" / "meta.json").read_text())
    assert meta["resumed_from_step"] == 3
    assert _matrix(run) == reference
    assert {k: v for k, v in _adapters(run).items() if k in before} == before  # stage 0 not redone


def test_a_second_driver_is_refused_while_the_first_holds_the_run(overrides, tmp_path):
    """A live holder (another process on this host) refuses the run, naming it, and nothing is
    written; once that process is gone, or a remote holder's lease has expired, the run starts."""
    from mllmcl import run_stream
    from mllmcl.storage.layout import RunLayout
    from mllmcl.storage.lease import RunLease

    cfg = load_config(None, [*overrides, f"storage.root={tmp_path}", "data.tasks=[RS]", "run.lease_seconds=30"])
    run = tmp_path / "runs" / "held"
    run.mkdir(parents=True)
    holder = subprocess.Popen(["sleep", "60"])
    try:
        now = time.time()
        (run / "lease.json").write_text(json.dumps({"holder": "other", "host": socket.gethostname(),
                                                    "pid": holder.pid, "since": now, "renewed": now,
                                                    "expires": now + 30}))
        with pytest.raises(ConfigError, match=f"held by another driver: PID {holder.pid} on {socket.gethostname()}"):
            run_stream(cfg, "held")
        assert sorted(p.name for p in run.iterdir()) == ["lease.json"]  # nothing of the run written
        remote = {"holder": "remote", "host": "node-b", "pid": 1, "since": now, "renewed": now, "expires": now + 30}
        (run / "lease.json").write_text(json.dumps(remote))
        with pytest.raises(ConfigError, match="PID 1 on node-b"):
            RunLease(RunLayout(str(tmp_path), "held"), 30).acquire()
        (run / "lease.json").write_text(json.dumps({**remote, "expires": now - 1}))  # not renewed in time
        lease = RunLease(RunLayout(str(tmp_path), "held"), 30).acquire()
        assert json.loads((run / "lease.json").read_text())["pid"] == os.getpid()
        lease.release()
    finally:
        holder.kill()
        holder.wait()
    (run / "lease.json").write_text(json.dumps({"holder": "other", "host": socket.gethostname(), "pid": holder.pid,
                                                "since": now, "renewed": now, "expires": time.time() + 30}))
    res = run_stream(cfg, "held")  # the holder's process is gone: taken over at once
    assert res.matrix.complete and not (run / "lease.json").exists()


@pytest.mark.s3
def test_a_run_on_s3_outlives_the_storage_server_stopping_for_a_while(overrides, reference, s3_server, s3_bucket,
                                                                      tmp_path):
    """SeaweedFS frozen (SIGSTOP: it accepts connections and answers nothing) for 3 request
    timeouts in the middle of a run on S3, then thawed: the run's requests time out, retry with
    backoff, and the run completes with the undisturbed matrix; nothing is retrained."""
    import threading

    from mllmcl import storage

    env_run = f"{s3_bucket}/chaos"
    manifest = f"{env_run}/runs/frozen/manifest.json"
    os.environ["MLLMCL_S3_TIMEOUT_S"], os.environ["MLLMCL_S3_MAX_ATTEMPTS"] = "3", "12"
    froze: dict = {}

    def freeze_after_stage_0():
        deadline = time.time() + 300
        while time.time() < deadline and not froze.get("stop"):
            try:
                if storage.exists(manifest) and storage.read_json(manifest)["stages"]:
                    break
            except Exception:  # noqa: BLE001 - the job writes it meanwhile
                pass
            time.sleep(0.3)
        froze["at"] = time.time()
        os.kill(s3_server["server"].pid, signal.SIGSTOP)
        time.sleep(10)  # > 3 request timeouts
        os.kill(s3_server["server"].pid, signal.SIGCONT)
        froze["for"] = time.time() - froze["at"]

    watcher = threading.Thread(target=freeze_after_stage_0)
    try:
        watcher.start()
        job = _job(overrides, Path(tmp_path), "frozen", None, root_uri=env_run,
                   env={"MLLMCL_S3_TIMEOUT_S": "3", "MLLMCL_S3_MAX_ATTEMPTS": "12"})
        ended = time.time()
    finally:
        froze["stop"] = True
        watcher.join()
        os.kill(s3_server["server"].pid, signal.SIGCONT)
        del os.environ["MLLMCL_S3_TIMEOUT_S"], os.environ["MLLMCL_S3_MAX_ATTEMPTS"]
    assert froze.get("for", 0) >= 10 and ended > froze["at"] + froze["for"], froze  # frozen mid-run
    assert job.returncode == 0, job.stderr[-3000:]
    done = storage.read_json(manifest)
    assert done["status"] == "complete"
    assert json.loads(storage.read_text(f"{env_run}/runs/frozen/metrics/accuracy_matrix.json"))["rows"] == reference


@pytest.mark.s3
def test_a_run_on_s3_whose_storage_server_goes_away_fails_cleanly_and_resumes(overrides, reference, s3_server,
                                                                             s3_bucket, tmp_path):
    """SeaweedFS SIGKILLed once stage 0 is recorded (its ports refuse connections from then on),
    with one attempt per request: the job stops at its next request with one clear error that
    names the failed request and the run id to resume with, stage 0 as recorded. The server is
    started again on its data; the same command resumes the run: stage 0 is not redone, and the
    matrix is the undisturbed run's. (With retries a shorter outage is waited out: the test above.)"""
    from mllmcl import storage

    server = s3_server["server"]
    root_uri = f"{s3_bucket}/gone"
    run = f"{root_uri}/runs/gone"
    proc = _start_job(overrides, Path(tmp_path), "gone", root_uri=root_uri,
                      env={"MLLMCL_S3_TIMEOUT_S": "3", "MLLMCL_S3_MAX_ATTEMPTS": "1"})
    try:
        deadline = time.time() + 300
        recorded = None
        while recorded is None and time.time() < deadline and proc.poll() is None:
            try:
                manifest = storage.read_json(f"{run}/manifest.json")
                recorded = manifest if manifest["stages"] else None
            except (FileNotFoundError, ValueError):  # not written yet, or being written
                pass
            time.sleep(0.2)
        assert recorded is not None, proc.communicate(timeout=60)
        stage0 = {p: storage.modified(f"{run}/tasks/0_RS/expert/{p}") for p in storage.list_dir(f"{run}/tasks/0_RS/expert")}
        server.kill()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if server.proc.poll() is not None:
            server.start()
    assert proc.returncode == 2, err[-3000:]  # one clear error, not a crash
    assert "Traceback" not in err, err[-3000:]
    assert "error: storage: " in err and "s3://" in err and "failed after 1 attempt(s)" in err, err[-3000:]
    assert "run.id=gone to resume" in err, err[-3000:]

    server.wait_ready(bucket=s3_bucket.split("/")[2], timeout=120)
    assert storage.read_json(f"{run}/manifest.json")["stages"] == recorded["stages"]  # stage 0 as recorded
    again = _job(overrides, Path(tmp_path), "gone", root_uri=root_uri)
    assert again.returncode == 0, again.stderr[-3000:]
    assert storage.read_json(f"{run}/manifest.json")["status"] == "complete"
    assert json.loads(storage.read_text(f"{run}/metrics/accuracy_matrix.json"))["rows"] == reference
    assert {p: storage.modified(f"{run}/tasks/0_RS/expert/{p}") for p in stage0} == stage0  # stage 0 not redone
