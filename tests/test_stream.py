"""The stream runner on Ray Train: every method end to end, artifacts, resume, worker
failure, DDP equivalence, S3 storage, and validation before Ray starts."""

import json
import os
from pathlib import Path

import pytest
import yaml

from mllmcl.config import load_config
from mllmcl.methods import registered_methods
from mllmcl import run_stream

TWO = "data.tasks=[RS,Med]"


def _cfg(root, overrides, *extra):
    return load_config(None, [*overrides, f"storage.root={root}", *extra])


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def reference(ray_session, runs_root, stream_overrides):
    """An uninterrupted lora_ft run: the reference for resume, failure, DDP and S3 runs."""
    return run_stream(_cfg(runs_root, stream_overrides, TWO, "method.name=lora_ft"), "m-lora_ft")


# Methods whose Ray path differs (adapter kind sent to the Ray Train workers, adapter format given
# to the evaluation actor's engine, router training, text embeddings on the actor, no training).
# replay and joint run exactly lora_ft's Ray path (the LoRA kind on other samples); mr_lora's (experts + router on Ray Train) is the
# README tier's default stream (tests/test_readme.py); every method also runs end to end in the
# contract test (tests/test_method_contract.py), on the local backend.
RAY_PATHS = ["lora_ft", "moelora", "disco_select", "zero_shot"]
ON_RAY_IN_THE_README_TIER = {"mr_lora"}


# methods whose own adapter kind trains under Ray Train with DDP and DeepSpeed in test_kinds_on_ray.py
# (that test asserts it covers every method with a kind of its own)
OWN_KINDS_ON_RAY = {"olora", "moelora", "sefe", "keeplora", "clmoe", "phi_dpo", "hide", "disco"}


def test_every_method_is_covered_on_ray_or_shares_a_covered_path():
    shares_lora_ft = {"replay", "joint"}
    assert set(registered_methods()) <= (set(RAY_PATHS) | shares_lora_ft | OWN_KINDS_ON_RAY
                                         | ON_RAY_IN_THE_README_TIER)


@pytest.mark.parametrize("method", RAY_PATHS)
def test_every_method_runs_a_stream(method, ray_session, runs_root, stream_overrides, reference):
    # moelora on one task: its kind on Ray Train workers and its format on the evaluation actor are
    # what differ from lora_ft's path; its second task's fit (reading the first's adapter) on Ray
    # Train is test_kinds_on_ray.py's
    tasks = ["RS"] if method == "moelora" else ["RS", "Med"]
    res = reference if method == "lora_ft" else run_stream(
        _cfg(runs_root, stream_overrides, f"data.tasks=[{','.join(tasks)}]", f"method.name={method}"), f"m-{method}")
    run = Path(res.run_dir)
    m = json.loads((run / "metrics" / "metrics.json").read_text())
    assert m["method"] == method and m["tasks"] == tasks
    for key in ("MFT", "MFN", "MAA", "BWT"):
        assert isinstance(m[key], float)
    rows = m["accuracy_matrix"]["rows"]
    assert len(rows) == len(tasks) and all(v is not None for v in rows[-1])
    if len(tasks) == 2:
        assert rows[0][1] is None
    for k, t in [(k, t) for k in range(len(tasks)) for t in tasks[:k + 1]]:
        assert (run / "eval" / f"stage_{k}" / f"{t}.parquet").exists()
    assert (run / "report" / "report.html").exists() and (run / "report" / "accuracy_matrix.png").exists()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and [s["k"] for s in manifest["stages"]] == list(range(len(tasks)))
    prov = (run / "config.yaml").read_text()
    for key in ("git_sha", "effective_batch", "workers", "seed", "hardware", "libraries"):
        assert key in prov
    if method != "zero_shot":
        last = f"{len(tasks) - 1}_{tasks[-1]}"
        meta = json.loads((run / "tasks" / last / "expert" / "meta.json").read_text())
        fmt = "moelora_config.json" if method == "moelora" else "adapter_config.json"
        assert (run / "tasks" / last / "expert" / fmt).exists()
        assert meta["task"] == tasks[-1] and meta["steps"] == 4
    if method in ("mr_lora", "disco_select"):
        assert 0.0 <= m["router_accuracy"] <= 100.0 and len(m["router_accuracy_per_stage"]) == 2
        assert m["oracle_final"] is not None
        assert m["eval_cache_hits"] > 0  # RS expert's answers from stage 0 reused at stage 1
    if method == "disco_select":
        proto = json.loads((run / "tasks" / "1_Med" / "prototype.json").read_text())
        assert proto["task"] == "Med" and len(proto["embedding"]) > 0



def test_resume_refuses_a_different_config(ray_session, runs_root, stream_overrides):
    from mllmcl.errors import ConfigError

    cfg = _cfg(runs_root, stream_overrides, TWO, "method.name=zero_shot")
    first = run_stream(cfg, "zs-fixed")
    with pytest.raises(ConfigError, match="train.lr"):
        run_stream(_cfg(runs_root, stream_overrides, TWO, "method.name=zero_shot", "train.lr=0.1"), "zs-fixed")
    # a run made before a setting existed resumes under that setting's default, and only under it:
    # its stored config lacks the key and its manifest holds the hash of that older config
    from mllmcl.provenance import config_hash
    from mllmcl.runner.resume import identity

    run = runs_root / "runs" / "zs-fixed"
    doc = yaml.safe_load((run / "config.yaml").read_text())
    del doc["config"]["train"]["epochs_per_task"]
    (run / "config.yaml").write_text(yaml.safe_dump(doc))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config_hash"] = config_hash({k: v for k, v in identity(cfg).items() if k != "train.epochs_per_task"})
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert run_stream(cfg, "zs-fixed").matrix.rows == first.matrix.rows
    with pytest.raises(ConfigError, match=r"train.epochs_per_task: run has \[\], now \[2"):
        run_stream(_cfg(runs_root, stream_overrides, TWO, "method.name=zero_shot", "train.epochs_per_task=[2,2]"),
                   "zs-fixed")


def test_two_workers_match_one_and_a_killed_worker_resumes(ray_session, runs_root, stream_overrides, reference,
                                                           monkeypatch):
    """DDP over two workers with the same effective batch (4: 2 samples each per step) gives one
    worker's result, also when rank 0 is killed mid-fit and the worker group restarts from the
    last Ray Train checkpoint. One task (the reference's stage 0: a stage never depends on the
    tasks after it, test_method_contract.py); a fit that starts from an earlier adapter on two
    workers is the DeepSpeed test's. (Resuming a stopped run is tested on S3 below and, for every
    method, in the contract test.)

    LoRA dropout is off in these runs (stream_overrides): its random masks are drawn per
    rank, so with dropout the two runs see different (equally valid) noise. Stated
    tolerance: adapter weights within 1e-4, identical accuracy.
    """
    from peft.utils import load_peft_weights

    monkeypatch.setenv("MLLMCL_INJECT_WORKER_FAILURE", "RS:2:0")  # kill rank 0 after step 2 of task RS
    two = run_stream(_cfg(runs_root, stream_overrides, "data.tasks=[RS]", "method.name=lora_ft",
                          "scaling.num_workers=2", "scaling.checkpoint_every=1"), "ddp-2")
    markers = list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"mllmcl-injected-{os.getpid()}-RS-*"))
    assert markers, "the failure was not injected"
    for m in markers:
        m.unlink()
    # the restarted worker group continued from a checkpoint (a restart from step 0 would end with
    # the same weights: data order and seeds are deterministic). Ray Train's report is asynchronous:
    # a rank killed right after reporting step 2 may die before the controller registers that
    # checkpoint, and the group then resumes from step 1's (both seen here)
    meta = json.loads((Path(two.run_dir) / "tasks" / "0_RS" / "expert" / "meta.json").read_text())
    assert meta["resumed_from_step"] in (1, 2) and (meta["steps"], meta["workers"]) == (4, 2)
    w1 = load_peft_weights(str(Path(reference.run_dir) / "tasks" / "0_RS" / "expert"))
    w2 = load_peft_weights(str(Path(two.run_dir) / "tasks" / "0_RS" / "expert"))
    assert w1.keys() == w2.keys()
    diff = max(float((w1[n] - w2[n]).abs().max()) for n in w1)
    assert diff < 1e-4, f"RS: adapters differ by {diff}"
    assert abs(two.matrix.rows[0][0] - reference.matrix.rows[0][0]) <= 1e-9


@pytest.mark.s3
def test_s3_run_writes_and_resumes_like_local(ray_session, s3_bucket, stream_overrides, reference):
    from mllmcl import storage

    cfg = load_config(None, [*stream_overrides, TWO, "method.name=lora_ft", f"storage.root={s3_bucket}"])
    first = run_stream(cfg, "s3run", stop_after=0)  # stage 1's fit starts beside stage 0's evaluation
    assert first.trained_stages[:1] == [0]
    second = run_stream(cfg, "s3run")
    assert 0 not in second.trained_stages
    assert second.matrix.rows == reference.matrix.rows
    run = f"{s3_bucket}/runs/s3run"
    assert storage.read_json(f"{run}/manifest.json")["status"] == "complete"
    assert storage.exists(f"{run}/tasks/1_Med/expert/adapter_config.json")
    assert storage.exists(f"{run}/tasks/1_Med/checkpoints_lora")
    assert storage.exists(f"{run}/eval/stage_1/Med.parquet")
    assert "MFN" in storage.read_json(f"{run}/metrics/metrics.json")


def test_deepspeed_zero2_runs_a_stream_and_resumes(ray_session, runs_root, stream_overrides, reference, monkeypatch):
    """scaling.strategy=deepspeed, ZeRO-2, 2 CPU workers over gloo: a rank is killed mid-fit, the
    worker group restarts from DeepSpeed's checkpoint (each rank's optimizer shard), and the run
    ends with the same adapters (within 1e-4) and accuracy matrix as the one-worker DDP reference.
    Stage 0 runs in-process (the local backend's adapter is DDP's, byte for byte: test_concurrency)
    and the run resumes under DeepSpeed (scaling is a resumable change), so the DeepSpeed fit is
    the one that continues from an earlier task's adapter."""
    from peft.utils import load_peft_weights

    run_stream(_cfg(runs_root, stream_overrides, TWO, "method.name=lora_ft", "scaling.backend=local"),
               "deepspeed-zero2", stop_after=0)
    monkeypatch.setenv("MLLMCL_INJECT_WORKER_FAILURE", "Med:2:1")  # kill rank 1 after step 2 of task Med
    cfg = _cfg(runs_root, stream_overrides, TWO, "method.name=lora_ft", "scaling.strategy=deepspeed",
               "scaling.num_workers=2", "scaling.checkpoint_every=1")
    res = run_stream(cfg, "deepspeed-zero2")
    assert res.trained_stages == [1]
    markers = list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"mllmcl-injected-{os.getpid()}-Med-*"))
    assert markers, "the failure was not injected"
    for m in markers:
        m.unlink()
    run = Path(res.run_dir)
    meta = json.loads((run / "tasks" / "1_Med" / "expert" / "meta.json").read_text())
    assert (meta["strategy"], meta["workers"]) == ("deepspeed", 2)
    assert meta["resumed_from_step"] in (1, 2)  # from a DeepSpeed checkpoint, not retrained from step 0 (above)
    ckpts = sorted((run / "tasks" / "1_Med" / "checkpoints_lora").rglob("zero_pp_rank_*_optim_states.pt"))
    assert {p.name for p in ckpts} >= {"zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                       "zero_pp_rank_1_mp_rank_00_optim_states.pt"}  # both ranks' shards
    for k, task in enumerate(["RS", "Med"]):
        w_ref = load_peft_weights(str(Path(reference.run_dir) / "tasks" / f"{k}_{task}" / "expert"))
        w_ds = load_peft_weights(str(run / "tasks" / f"{k}_{task}" / "expert"))
        assert w_ref.keys() == w_ds.keys()
        diff = max(float((w_ref[n] - w_ds[n]).abs().max()) for n in w_ref)
        assert diff < 1e-4, f"{task}: DeepSpeed adapter differs from DDP by {diff}"
    assert res.matrix.rows == reference.matrix.rows


def test_a_resumed_run_whose_expert_lost_its_weights_says_so(tmp_path, stream_overrides):
    """A run folder copied or synced in part (meta.json there, the weights not): resuming it
    names the folder and what is missing, instead of failing deep in PEFT."""
    cfg = _cfg(tmp_path, stream_overrides, TWO, "method.name=lora_ft", "scaling.backend=local")
    first = run_stream(cfg, "lost", stop_after=0)
    expert = Path(first.run_dir) / "tasks" / "0_RS" / "expert"
    weights = list(expert.glob("*.safetensors"))
    assert weights and (expert / "meta.json").exists()
    for w in weights:
        w.unlink()
    with pytest.raises(FileNotFoundError, match=r"0_RS/expert: the adapter folder has meta.json but no weights"):
        run_stream(cfg, "lost")
