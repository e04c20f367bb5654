"""The README is a test: its commands, exactly as written, run by a shell in a fresh copy of
the checkout (not the repository root), with the defaults untouched (the relative storage
root ``artifacts`` included) and only budget overrides appended (fewer tasks, samples,
epochs, trials). The session's temporary ``HOME`` and caches (conftest) stand in for a new
user's; the tiny base and the synthetic streams are built once per session and shared.

``test_the_readme_and_this_tier_agree`` keeps the two from drifting: every command of the
README's quick start and Ray-cluster blocks is run here (or listed with the reason it is
not), every command run here is in the README, and ``make demo`` runs the README's lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# the commands this tier runs, exactly as the README writes them
STREAM = "python jobs/domain_stream.py"
STREAM_ELSEWHERE = "python jobs/domain_stream.py method.name=zero_shot run.id=dcl-zero_shot storage.root=~/mllmcl"
ABILITY = "python jobs/ability_stream.py method.name=replay method.replay_per_task=50"
COMPARE = "python jobs/compare.py artifacts/runs/dcl-*"
SYNTHETIC = "python jobs/make_synthetic.py --out data/mllmcl-synthetic"
EVALUATE = "python jobs/evaluate.py --run artifacts/runs/<run_id> --data data/mllmcl-synthetic/Domain_data/Med"
SERVE = "python jobs/serve.py --run artifacts/runs/<run_id>"
SWEEP = "python jobs/sweep.py sweeps/lora_ft_dcl.yaml"
TOKEN = "ray get-auth-token --generate"
HEAD_TOKEN = "RAY_AUTH_MODE=token ray start --head --dashboard-host 127.0.0.1"
SUBMIT_TOKEN = ("RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- "
                "python jobs/domain_stream.py run.id=demo storage.root=$HOME/mllmcl")
HEAD_OPEN = "RAY_AUTH_MODE=disabled ray start --head --dashboard-host 127.0.0.1"
SUBMIT_OPEN = ("ray job submit --address http://127.0.0.1:8265 --working-dir . -- "
               "python jobs/domain_stream.py run.id=demo storage.root=$HOME/mllmcl")
PLAN_8 = "python jobs/plan.py --config jobs/configs/dcl/mr_lora_llava15_7b.yaml --gpu A100-40GB --nodes 1"
PLAN_40 = ("python jobs/plan.py --config jobs/configs/dcl/mr_lora_llava15_7b.yaml --gpu A100-40GB --nodes 5 "
           "scaling.gpus_per_worker=1 scaling.eval_gpus=1 scaling.eval_replicas=8")
RUN = [STREAM, STREAM_ELSEWHERE, ABILITY, COMPARE, SYNTHETIC, EVALUATE, SERVE, SWEEP, TOKEN, HEAD_TOKEN,
       SUBMIT_TOKEN, HEAD_OPEN, SUBMIT_OPEN, PLAN_8, PLAN_40]
NOT_RUN = {  # quick-start commands this tier does not run, and why
    "make demo": "its three commands are run below (test_make_demo_commands)",
    "make test": "the suite itself",
    "python3 -m venv .venv && . .venv/bin/activate": "the tier runs in the installed environment",
    "pip install torch==2.13.0": "the tier runs in the installed environment",
    "pip install -e '.[dev]'": "the tier runs in the installed environment",
    "pytest -q": "the suite itself",
}
QUIET = ("PlacementGroupCleaner", "Failed to query Ray Train Controller", "FutureWarning", "Loading weights",
         "Reporting training result", "is_gradient_checkpointing")
# the budget: a small stream, small splits, one epoch (everything else as the defaults say)
STREAM_BUDGET = "'data.tasks=[RS,Med]' data.limit=40 train.epochs=1 method.router_epochs=2 eval.max_new_tokens=8"


# --------------------------------------------------------------------------- the README's commands

def _blocks(text: str) -> list[list[str]]:
    """The commands of each ```bash block: continuation lines joined, trailing comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        commands, pending = [], ""
        for line in block.splitlines():
            line = pending + line.strip() if pending else line.rstrip()
            pending = ""
            if line.endswith("\\"):
                pending = line[:-1].rstrip() + " "
                continue
            line = re.sub(r"\s{2,}#.*$", "", line).strip()  # a comment after two spaces
            if line and not line.startswith("#"):
                commands.append(line)
        out.append(commands)
    return out


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    nxt = re.search(r"\n## ", text[start + len(heading):])
    return text[start:start + len(heading) + nxt.start()] if nxt else text[start:]


def _readme_commands() -> list[str]:
    return [c for b in _blocks(README.read_text()) for c in b]


def _demo_lines() -> list[str]:
    """What `make demo` runs, as `make -n` prints it (variables expanded), with the README's `python`."""
    out = subprocess.run(["make", "-n", "-s", "-C", str(ROOT), "demo", "PY=python", "VENV=" + sys.prefix],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line.strip() for line in out.stdout.splitlines() if "jobs/" in line]


def test_the_readme_and_this_tier_agree():
    text = README.read_text()
    quick = [c for b in _blocks(_section(text, "## Quick start")) for c in b]
    cluster = [c for b in _blocks(text[text.index("**On a running Ray cluster.**"):]) for c in b][:5]
    demo = _demo_lines()
    assert len(demo) == 3 and all(line in quick for line in demo), (demo, quick)  # make demo == the README
    for command in quick + cluster:
        assert command in RUN or command in NOT_RUN or command in demo, f"README command not run: {command!r}"
    everywhere = _readme_commands()
    for command in RUN:
        assert command in everywhere, f"the tier runs a command the README does not show: {command!r}"


# --------------------------------------------------------------------------- a new user's checkout

@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A fresh copy of the checkout's files (what `git clone` gives, with uncommitted work)."""
    return copy_checkout(tmp_path_factory.mktemp("clone") / "mllmcl")


def copy_checkout(dest: Path) -> Path:
    listing = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                             timeout=60)
    if listing.returncode == 0:
        for name in filter(None, listing.stdout.decode().split("\0")):
            src = ROOT / name
            if src.is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / name)
    else:  # not a git checkout (a release tarball): everything but what git would ignore
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".git", ".venv", "artifacts", "data", "__pycache__",
                                                                  ".pytest_cache", "*.egg-info"))
    return dest


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python`, `ray`: this venv
    env.update(extra)
    return env


def sh(command: str, cwd: Path, budget: str = "", timeout: int = 600, **env) -> subprocess.CompletedProcess:
    """The README's command line through a shell (globs, ~ and $HOME as typed), budget appended."""
    line = f"{command} {budget}".strip()
    out = subprocess.run(["bash", "-c", line], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env=_env(**env))
    out.line = line  # type: ignore[attr-defined]
    return out


def _ok(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, f"{out.line}\n--- stdout\n{out.stdout[-4000:]}\n--- stderr\n{out.stderr[-6000:]}"
    terminal = out.stdout + out.stderr
    noise = [word for word in QUIET if word in terminal]
    assert not noise, f"{out.line}: the terminal shows library noise {noise}:\n{terminal[-4000:]}"
    return out.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def default_run(checkout, default_assets) -> Path:
    """`python jobs/domain_stream.py` with the defaults: MR-LoRA through Ray Train, storage root
    `artifacts` relative to the folder the user runs it from."""
    out = _ok(sh(STREAM, checkout, STREAM_BUDGET))
    run_id = re.search(r"· run (\S+)", out).group(1)
    run = checkout / "artifacts" / "runs" / run_id
    assert f"artifacts: {run}" in out
    return run


def test_default_stream_writes_where_the_user_runs_it(checkout, default_run):
    """MR-LoRA on Ray Train (the default method; test_stream.py runs the other methods' Ray paths)."""
    import yaml

    assert default_run.name.startswith("dcl-mr_lora-")
    assert json.loads((default_run / "manifest.json").read_text())["status"] == "complete"
    for k, task in enumerate(["RS", "Med"]):  # the experts the Ray Train workers wrote
        meta = json.loads((default_run / "tasks" / f"{k}_{task}" / "expert" / "meta.json").read_text())
        assert (meta["task"], meta["kind"], meta["resumed_from_step"]) == (task, "expert", 0)
        assert (default_run / "tasks" / f"{k}_{task}" / "expert" / "adapter_config.json").exists()
    assert (default_run / "tasks" / "1_Med" / "router" / "adapter_config.json").exists()
    metrics = json.loads((default_run / "metrics" / "metrics.json").read_text())
    assert 0.0 <= metrics["router_accuracy"] <= 100.0 and len(metrics["router_accuracy_per_stage"]) == 2
    assert metrics["oracle_final"] is not None
    assert metrics["eval_cache_hits"] > 0  # RS expert's answers from stage 0 reused at stage 1
    assert (default_run / "report" / "report.html").exists() and (default_run / "report" / "accuracy_matrix.png").exists()
    recorded = yaml.safe_load((default_run / "config.yaml").read_text())["config"]
    assert recorded["storage"]["root"] == str(checkout / "artifacts")  # recorded absolute
    ray_tmp = Path(os.environ["RAY_TMPDIR"])
    assert not [p for p in ray_tmp.rglob("runs") if p.parent.name == "artifacts"], "a run landed in Ray's folder"


def test_a_storage_root_elsewhere_and_the_ability_stream(checkout, default_assets):
    _ok(sh(STREAM_ELSEWHERE, checkout, "'data.tasks=[RS,Med]' data.limit=20 eval.max_new_tokens=4"))
    elsewhere = Path(os.environ["HOME"]) / "mllmcl" / "runs" / "dcl-zero_shot"  # ~ is the user's home
    assert json.loads((elsewhere / "manifest.json").read_text())["status"] == "complete"
    assert len(json.loads((elsewhere / "metrics" / "metrics.json").read_text())["accuracy_matrix"]["rows"]) == 2
    out = _ok(sh(ABILITY, checkout, "'data.tasks=[OCR]' data.limit=20 train.max_steps=2 eval.max_new_tokens=4"))
    assert "ACL stream · replay" in out
    run = checkout / "artifacts" / "runs" / re.search(r"· run (\S+)", out).group(1)
    assert (run / "tasks" / "0_OCR" / "expert" / "meta.json").exists()


def test_compare_the_finished_runs(checkout, default_run):
    out = _ok(sh(COMPARE, checkout))
    assert "| method | RS | Med | MFT | MFN | MAA | BWT | FWT | router |" in out and "| mr_lora |" in out
    assert f"{default_run}  (report: {default_run / 'report' / 'report.html'})" in out


def test_make_synthetic_then_evaluate_a_folder_through_the_run(checkout, default_run):
    out = _ok(sh(SYNTHETIC, checkout, "--train 4 --test 3"))
    data = checkout / "data" / "mllmcl-synthetic"
    assert f"wrote {data}" in out and (data / "Domain_data" / "Med" / "test.json").exists()
    out = _ok(sh(EVALUATE.replace("<run_id>", default_run.name), checkout))
    assert "Med: accuracy" in out and "on 3 samples" in out
    scores = list((default_run / "eval" / "evaluate").glob("Med-*/scores.json"))
    assert len(scores) == 1 and json.loads(scores[0].read_text())["n"] == 3


def test_serve_and_the_stock_openai_client(checkout, default_run):
    """`jobs/serve.py --run <relative path>`: the routed ensemble (the run id), a pinned expert and
    a streamed answer through the `openai` package; Ctrl-C stops it."""
    import base64

    from openai import OpenAI

    from mllmcl.config import load_config
    from mllmcl.data.prompts import eval_prompt
    from mllmcl.data.release import load_stream
    from mllmcl.data.source import resolve_root
    from mllmcl.evaluation.predictions import read_predictions

    port = _free_port()
    line = f"{SERVE.replace('<run_id>', default_run.name)} port={port}"
    proc = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=checkout, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            text = proc.stdout.readline()
            if not text and proc.poll() is not None:
                break
            lines.append(text)
            if text.startswith("serving run"):
                break
        assert lines and lines[-1].startswith("serving run"), "".join(lines)[-4000:]
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        ids = [m.id for m in client.models.list()]
        assert ids == [default_run.name, "RS", "Med"]
        stream = load_stream(resolve_root(load_config(None, []).data), "dcl", ["RS", "Med"])
        sample = stream.tasks[1].test[0]
        (final,) = [r for r in read_predictions(str(default_run / "eval" / "stage_1" / "Med.parquet"))
                    if r.question_id == sample.uid]
        url = "data:image/png;base64," + base64.b64encode(Path(sample.image).read_bytes()).decode()
        messages = [{"role": "user", "content": [{"type": "text", "text": eval_prompt(sample)},
                                                 {"type": "image_url", "image_url": {"url": url}}]}]
        routed = client.chat.completions.create(model=ids[0], messages=messages)
        assert routed.model_extra["mllmcl"]["routing"]["mode"] == "router"
        assert (routed.model, routed.choices[0].message.content) == (final.expert.split("_", 1)[1].split("/")[0],
                                                                       final.prediction)  # as the stream answered
        pinned = client.chat.completions.create(model="Med", messages=messages)
        assert pinned.model == "Med" and pinned.model_extra["mllmcl"]["routing"]["mode"] == "pinned"
        pieces = [c.choices[0].delta.content or "" for c in
                  client.chat.completions.create(model=ids[0], messages=messages, stream=True) if c.choices]
        assert "".join(pieces) == routed.choices[0].message.content
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the user's terminal
        try:
            rest = proc.communicate(timeout=90)[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rest = proc.communicate()[0]
    terminal = "".join(lines) + (rest or "")
    assert proc.returncode == 0, terminal[-4000:]
    assert not [w for w in QUIET if w in terminal], terminal[-4000:]


def test_the_planner_commands(checkout):
    """The README's two plans of the paper's MR-LoRA preset (8 and 40 A100s): both schedules'
    wall times, memory per GPU; the 40-GPU concurrent run a fraction of the 8-GPU sequential one."""
    walls = []
    for line in (PLAN_8, PLAN_40):
        out = _ok(sh(line, checkout, timeout=300))
        assert "memory per GPU" in out and "does not fit" not in out.lower()
        walls.append({m[0]: m[1] for m in re.findall(r"^(concurrent|sequential)\s+([\d.]+ (?:h|min|s))", out, re.M)})
    to_s = lambda t: float(t.split()[0]) * {"h": 3600, "min": 60, "s": 1}[t.split()[1]]  # noqa: E731
    assert to_s(walls[1]["concurrent"]) <= 0.35 * to_s(walls[0]["sequential"]), walls


def test_sweep_from_the_readme(checkout, default_assets):
    """Two trials at once, each running the stream with a Ray Train fit inside the trial (the
    trial holds no CPU, so it cannot starve its own workers), results under the relative
    storage root of the sweep file."""
    out = _ok(sh(SWEEP, checkout, "--num-samples 2 'data.tasks=[RS]' data.limit=20 train.max_steps=2 "
                                  "eval.max_new_tokens=4", timeout=900))
    root = checkout / "artifacts" / "sweeps" / "lora_ft_dcl"
    results = json.loads((root / "results.json").read_text())
    assert [t["stop_reason"] for t in results["trials"]] == ["completed"] * 2
    assert results["best"] is not None and (root / "best.yaml").exists()
    assert f"results: {root}/results.json" in out
    for trial in results["trials"]:  # every trial's run under the sweep, Ray Train's checkpoint layout
        run = root / "runs" / trial["trial_id"]
        assert (run / "metrics" / "metrics.json").exists()
        ckpts = run / "tasks" / "0_RS" / "checkpoints_lora"
        assert ckpts.is_dir() and not (ckpts / "latest.json").exists()  # not the local backend's layout


# --------------------------------------------------------------------------- in the background
# The commands of `make demo` and the notebook example run without Ray (scaling.backend=local): the
# session runs them in the background (conftest's IdleQueue), each in a fresh copy of the checkout
# of its own, through this file as a script (`python tests/test_readme.py make-demo`); the tests
# read what it printed.

DEMO_BUDGET = "'data.tasks=[RS,Med]' data.limit=40 train.epochs=1 method.router_epochs=2 eval.max_new_tokens=8"


def _python_example() -> str:
    return re.search(r"### From Python.*?```python\n(.*?)```", README.read_text(), re.S).group(1)


def _in_a_fresh_checkout(what: str) -> dict:
    """Run ``what`` (make-demo, python-example) in a fresh copy of the checkout under the current folder."""
    checkout = copy_checkout(Path.cwd() / "clone" / "mllmcl")
    if what == "make-demo":
        first, second, compare = _demo_lines()
        runs = [sh(first, checkout, DEMO_BUDGET), sh(second, checkout, DEMO_BUDGET), sh(compare, checkout)]
    else:
        out = subprocess.run([sys.executable, "-c", _python_example()], cwd=checkout, env=_env(), capture_output=True,
                             text=True, timeout=600)
        out.line = "python -c <the README's example>"  # type: ignore[attr-defined]
        runs = [out]
    return {"checkout": str(checkout), "runs": [{"line": r.line, "returncode": r.returncode, "stdout": r.stdout,
                                                "stderr": r.stderr} for r in runs]}


def _ran(background: subprocess.CompletedProcess) -> tuple[Path, list[subprocess.CompletedProcess]]:
    """The checkout and each command's run, from what ``_in_a_fresh_checkout`` printed."""
    assert background.returncode == 0, background.stderr[-4000:]
    result = json.loads(background.stdout.strip().splitlines()[-1])
    runs = []
    for r in result["runs"]:
        out = subprocess.CompletedProcess(r["line"], r["returncode"], r["stdout"], r["stderr"])
        out.line = r["line"]  # type: ignore[attr-defined]
        runs.append(out)
    return Path(result["checkout"]), runs


@pytest.mark.background([sys.executable, str(Path(__file__).resolve()), "make-demo"])
def test_make_demo_commands(default_assets, background_result):
    """`make demo`'s lines (the README's), at a smaller budget: the table and where the reports are."""
    checkout, (first, second, compare) = _ran(background_result)
    _ok(first)
    _ok(second)
    out = _ok(compare)
    assert "| mr_lora |" in out and "| lora_ft |" in out
    assert str(checkout / "artifacts" / "runs" / "demo-mr_lora" / "report" / "report.html") in out


# --------------------------------------------------------------------------- a `ray start` cluster

class Head:
    """`ray start --head` as the README writes it, with its own ports and temp folder, in the
    foreground (--block) so that the test stops exactly the cluster it started, by its PID."""

    def __init__(self, command: str, cwd: Path):
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))  # Ray's socket paths must stay under 108 bytes
        self.tmp = tmp
        self.dashboard = _free_port()
        ports = (f"--port {_free_port()} --dashboard-port {self.dashboard} --node-manager-port {_free_port()} "
                 f"--object-manager-port {_free_port()} --ray-client-server-port {_free_port()} "
                 f"--dashboard-agent-listen-port {_free_port()} --dashboard-agent-grpc-port {_free_port()} "
                 f"--runtime-env-agent-port {_free_port()} --metrics-export-port {_free_port()} "
                 f"--min-worker-port 20000 --max-worker-port 20999 --num-cpus 2")
        self.log = open(tmp / "head.log", "w+")
        env = _env()
        env.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)  # a user's head polls at Ray's default (the suite's Ray: conftest)
        # on SIGTERM a head drains for up to 30 s (for Serve replicas behind a load balancer); after a
        # job, the idle workers' leases keep it waiting the whole 30 s. Nothing here serves: no drain
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        self.proc = subprocess.Popen(["bash", "-c", f"{command} {ports} --temp-dir {tmp} --block"], cwd=cwd,
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                with socket.create_connection(("127.0.0.1", self.dashboard), timeout=1):
                    break
            except OSError:
                time.sleep(1)
        else:
            raise AssertionError(f"ray start did not come up:\n{self.output()}")

    def submit(self, command: str, cwd: Path, budget: str = "", **env) -> subprocess.CompletedProcess:
        return sh(command.replace("127.0.0.1:8265", f"127.0.0.1:{self.dashboard}"), cwd, budget, **env)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self) -> None:
        # SIGTERM to `ray start` alone (bash exec'd it), as a user's `kill <pid>` would: it stops its
        # own processes in order; whatever is left of the group afterwards is killed
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


JOB_BUDGET = "'data.tasks=[RS]' data.limit=20 train.max_steps=2 eval.max_new_tokens=4"


def _submitted_run(out: subprocess.CompletedProcess) -> Path:
    """The run a submitted README job wrote where the user said (storage.root=$HOME/mllmcl)."""
    assert out.returncode == 0, f"{out.line}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    run = Path(os.environ["HOME"]) / "mllmcl" / "runs" / "demo"
    assert f"artifacts: {run}" in out.stdout + out.stderr
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"
    return run


def test_ray_job_submit_without_authentication(checkout, default_assets):
    head = Head(HEAD_OPEN, checkout)
    try:
        # the default relative storage root would land in Ray's temporary copy: refused before any work
        refused = head.submit(SUBMIT_OPEN.split(" storage.root=")[0], checkout, JOB_BUDGET)
        text = refused.stdout + refused.stderr
        assert refused.returncode != 0 and "storage.root='artifacts' is a relative path" in text, text[-3000:]
        assert "stage 1/1" not in text
        run = _submitted_run(head.submit(SUBMIT_OPEN, checkout, JOB_BUDGET))
        assert (run / "tasks" / "0_RS" / "expert" / "meta.json").exists()  # trained on this cluster's Ray Train
        shutil.rmtree(run)
    finally:
        head.stop()


def test_ray_job_submit_with_token_authentication(checkout, default_assets):
    token = Path(os.environ["HOME"]) / ".ray" / "auth_token"
    had = token.exists()
    _ok(sh(TOKEN, checkout))
    assert token.exists()
    head = Head(HEAD_TOKEN, checkout)
    try:
        # a client that does not say RAY_AUTH_MODE=token is refused (the README says so)
        plain = head.submit(SUBMIT_OPEN, checkout, JOB_BUDGET)
        assert plain.returncode != 0 and "AuthenticationError" in plain.stdout + plain.stderr
        # the token reaches the job; the stream on this cluster's Ray Train is the test above, so
        # here the smallest budget of all: no training (the run itself is checked the same way)
        run = _submitted_run(head.submit(SUBMIT_TOKEN, checkout, "'data.tasks=[RS]' data.limit=20 "
                                                                 "eval.max_new_tokens=4 method.name=zero_shot"))
        shutil.rmtree(run)
    finally:
        head.stop()
        if not had:
            token.unlink()


@pytest.mark.background([sys.executable, str(Path(__file__).resolve()), "python-example"])
def test_the_python_example_runs_as_written(default_assets, background_result):
    """The README's notebook example (its ```python block under "From Python"), verbatim, in a
    fresh copy of the checkout, from the checkout's folder."""
    code = _python_example()
    assert "mllmcl.run_stream(" in code and "mllmcl.load_run(" in code
    checkout, (out,) = _ran(background_result)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    run = checkout / "artifacts" / "runs" / "notebook"
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"
    assert "after Med" in out.stdout and "| mr_lora |" in out.stdout and "PredictionRow(question_id=" in out.stdout
    noise = [word for word in QUIET if word in out.stdout + out.stderr]
    assert not noise, f"the notebook example shows library noise {noise}"


if __name__ == "__main__":  # the background commands above
    print(json.dumps(_in_a_fresh_checkout(sys.argv[1])))
