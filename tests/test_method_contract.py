"""The contract every registered CL method keeps, checked on a two-task tiny stream.

Runs use ``scaling.backend=local``: the same stream runner, method code, per-worker
training loop and evaluation worker as on Ray, in this process (the Ray path of every
adapter kind is covered in test_stream.py). For each method:

- it trains and evaluates both stages; every recorded training loss is finite;
- determinism and no look-ahead: stage 0 of the stream RS→Med and of the stream RS→AD,
  same seed, produce byte-identical stage-0 artifacts (adapters, router, prototypes) and
  identical predictions — a method that used the later task at stage 0 would differ (a
  deliberately leaky method shows that the check catches it);
- state saves and restores: the run is stopped after stage 0 and resumed; then a fresh
  method object and a fresh evaluation worker, restored from the manifest and the
  stored artifacts alone (prediction cache off), answer stage 1 exactly as the run did;
- serving: the stage's serving record is in the manifest; a servable routed stage routes
  every test question, through the batch-evaluation engine of ``mllmcl.serving`` (which
  never sees the method), to the expert the stream runner chose.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from mllmcl import run_stream
from mllmcl.config import load_config
from mllmcl.methods import get_method, registered_methods
from mllmcl.routing import registered_routers
from mllmcl.methods.lora_ft import LoraFT

LOCAL = ["scaling.backend=local", "train.lr=0.01", "train.max_steps=30", "method.router_epochs=10"]


def _cfg(root, overrides, method, tasks, *extra):
    return load_config(None, [*overrides, *LOCAL, f"storage.root={root}", f"method.name={method}",
                              f"data.tasks=[{','.join(tasks)}]", *extra])


def _stage_files(run_dir: Path, k: int, task: str) -> dict[str, bytes]:
    folder = run_dir / "tasks" / f"{k}_{task}"
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "checkpoints" not in str(p.relative_to(folder))}


def _predictions(run_dir: Path, k: int, task: str) -> list[tuple[str, str, str]]:
    from mllmcl.evaluation.predictions import read_predictions

    return [(r.question_id, r.prediction, r.expert) for r in
            read_predictions(str(run_dir / "eval" / f"stage_{k}" / f"{task}.parquet"))]


def _stage0_fingerprint(run_dir: Path) -> tuple:
    return _stage_files(run_dir, 0, "RS"), _predictions(run_dir, 0, "RS")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("contract")


# every method, and MR-LoRA's experts with every other router (method.router)
CASES = [*registered_methods(), *(f"mr_lora+{r}" for r in registered_routers() if r != "mllm")]


@pytest.mark.parametrize("case", CASES)
def test_method_contract(case, root, stream_overrides):
    from mllmcl.data.source import load_configured_stream
    from mllmcl.methods.base import Stage
    from mllmcl.runner.cache import CachedPredictor, PredictionCache
    from mllmcl.runner.evaluator import EvalWorker
    from mllmcl.storage.layout import RunLayout

    method, _, router = case.partition("+")
    extra = [f"method.router={router}"] if router else []
    cfg = _cfg(root, stream_overrides, method, ["RS", "Med"], *extra)
    name = case.replace("+", "-")
    first = run_stream(cfg, f"{name}-a", stop_after=0)  # the driver stops after stage 0 ...
    assert first.trained_stages in ([0], [])
    res = run_stream(cfg, f"{name}-a")  # ... and the same run id resumes at stage 1
    assert 0 not in res.trained_stages
    run = Path(res.run_dir)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    losses = [t["loss"] for s in manifest["stages"] for t in s["train"] if "loss" in t]
    if method != "zero_shot":
        assert losses, "a trainable method recorded no training"
    assert all(math.isfinite(v) for v in losses), losses

    if method == "olora":  # the stage-1 adapter holds both tasks' LoRAs (ranks concatenated)
        r = [json.loads((run / "tasks" / d / "expert" / "adapter_config.json").read_text())["r"]
             for d in ("0_RS", "1_Med")]
        assert r[1] == 2 * r[0]

    # determinism + no look-ahead: stage 0 does not depend on which task comes next
    other = run_stream(_cfg(root, stream_overrides, method, ["RS", "AD"], *extra), f"{name}-b", stop_after=0)
    assert _stage0_fingerprint(Path(other.run_dir)) == _stage0_fingerprint(run)

    # state and artifacts restore: a fresh method + evaluation worker answers stage 1 as the run did
    stream = load_configured_stream(cfg.data, progress=False)
    fresh = get_method(method)(cfg, stream)
    fresh.load_state_dict(manifest["stages"][1]["method_state"] or {})
    layout = RunLayout(cfg.storage.root, f"{name}-a")
    formats = [fresh.adapter_format] if fresh.adapter_format else []
    predictor = CachedPredictor(EvalWorker(cfg.model.path, cfg.model.dtype, formats=formats),
                                PredictionCache(layout, enabled=False), cfg.eval.batch_size)
    answers = fresh.answer(Stage(1, stream, layout, cfg), predictor)
    assert predictor.generated > 0 and predictor.cache.hits == 0
    for task in ("RS", "Med"):
        stored = [p for _, p, _ in _predictions(run, 1, task)]
        assert answers.predictions[task] == stored, f"{method}: {task} answers differ after reloading"

    # serving: what the manifest records serves the stage; a routed stage routes as the stream did
    from mllmcl.data.prompts import eval_prompt
    from mllmcl.serving import load_served_run
    from mllmcl.serving.ensemble import Ensemble

    record = manifest["stages"][1]["serving"]
    if "refused" in record:  # the service refuses the run, and says the method's reason
        from mllmcl.errors import ConfigError

        assert record["refused"].strip(), f"{method}: refused without a reason"
        with pytest.raises(ConfigError) as refusal:
            load_served_run(str(run))
        assert record["refused"] in str(refusal.value) and method in str(refusal.value)
        return
    served = load_served_run(str(run))
    assert served.stage == 1 and served.routed == get_method(method).routed
    if served.routed:
        ensemble = Ensemble(served)
        for task in ("RS", "Med"):
            samples = {s.uid: s for s in stream.tasks[("RS", "Med").index(task)].test}
            rows = _predictions(run, 1, task)
            routes = ensemble.router.route(ensemble.engine, [eval_prompt(samples[q]) for q, _, _ in rows],
                                           [samples[q].image for q, _, _ in rows],
                                           truth=[("RS", "Med").index(task)] * len(rows))  # read by the oracle only
            # where the router's answer names no expert, the stream's seeded draw and the service's
            # question hash may pick differently (by design): compare the questions it names
            kept = [(r, e) for r, (_, _, e) in zip(routes, rows) if not r.fallback]
            assert len(kept) >= len(rows) // 2, f"{method}: the router named no expert for most of {task}"
            chosen = [f"tasks/{r.index}_{served.specs[r.index].name}/expert" for r, _ in kept]
            assert chosen == [e for _, e in kept], f"{method}: the service routes {task} otherwise"


class LeakyLoraFT(LoraFT):
    """lora_ft that (wrongly) also trains on the next task's data at stage 0."""

    name = "leaky"

    def training_samples(self, stage):
        samples = list(stage.task.train)
        if stage.k + 1 < len(stage.stream.tasks):
            samples += list(stage.stream.tasks[stage.k + 1].train)
        return samples


def test_look_ahead_check_catches_a_leaky_method(root, stream_overrides, monkeypatch):
    from mllmcl import methods

    methods.registered_methods()  # the built-in methods first, then the leaky one beside them
    monkeypatch.setitem(methods._METHODS._classes, "leaky", LeakyLoraFT)
    a = run_stream(_cfg(root, stream_overrides, "leaky", ["RS", "Med"]), "leaky-a", stop_after=0)
    b = run_stream(_cfg(root, stream_overrides, "leaky", ["RS", "AD"]), "leaky-b", stop_after=0)
    assert _stage0_fingerprint(Path(a.run_dir)) != _stage0_fingerprint(Path(b.run_dir))


def test_local_backend_resumes_a_half_done_fit(root, stream_overrides, monkeypatch):
    """A failure mid-task under the local backend: the rerun continues from the stored checkpoint
    and ends with the same adapter as an uninterrupted run."""
    from peft.utils import load_peft_weights

    cfg = _cfg(root, stream_overrides, "lora_ft", ["RS"], "scaling.checkpoint_every=1")
    clean = run_stream(cfg, "local-clean")
    monkeypatch.setenv("MLLMCL_INJECT_WORKER_FAILURE", "RS:2:0")
    with pytest.raises(RuntimeError, match="injected failure"):
        run_stream(cfg, "local-failed")
    ckpts = Path(cfg.storage.root) / "runs" / "local-failed" / "tasks" / "0_RS" / "checkpoints_lora"
    assert json.loads((ckpts / "latest.json").read_text())["step"] == 2
    monkeypatch.delenv("MLLMCL_INJECT_WORKER_FAILURE")
    for marker in Path(os.environ.get("TMPDIR", "/tmp")).glob(f"mllmcl-injected-{os.getpid()}-RS-*"):
        marker.unlink()
    resumed = run_stream(cfg, "local-failed")
    assert resumed.matrix.rows == clean.matrix.rows
    expert = Path(resumed.run_dir) / "tasks" / "0_RS" / "expert"
    assert json.loads((expert / "meta.json").read_text())["resumed_from_step"] == 2  # not retrained from step 0
    assert json.loads((Path(clean.run_dir) / "tasks" / "0_RS" / "expert" / "meta.json").read_text())[
        "resumed_from_step"] == 0
    w1 = load_peft_weights(str(Path(clean.run_dir) / "tasks" / "0_RS" / "expert"))
    w2 = load_peft_weights(str(Path(resumed.run_dir) / "tasks" / "0_RS" / "expert"))
    assert all(float((w1[k] - w2[k]).abs().max()) == 0.0 for k in w1)
    kept = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("checkpoint_"))
    assert len(kept) == 2 and json.loads((ckpts / "latest.json").read_text())["previous"] == kept[0]  # the two newest
