"""Benchmark the stream runner.

(a) Orchestration overhead: wall time of ``lora_ft`` through the stream runner (Ray
    Train per task, evaluation actor, storage, manifest) against the same training
    steps and evaluations in a plain in-process loop, under the default (concurrent)
    schedule and ``run.schedule=sequential``; where the rest goes (each fit's Ray Train
    start-up and teardown beside its training steps, evaluation).
    Also the same stream runner with ``scaling.backend=local`` (no Ray), which splits
    the overhead into Ray's share and the runner's own (storage, manifest, checkpoints).
    And MR-LoRA (independent experts and routers) under both schedules.
(b) MR-LoRA evaluation with the expert-prediction cache against re-evaluating every
    expert at every stage (same trained adapters, cache off).

    scripts/loopback.sh python bench/stream_overhead.py                 # DCL RS,Med,AD; ~10 min
    scripts/loopback.sh python bench/stream_overhead.py --tasks RS,Med,AD,Sci,Fin --epochs 8

Prints both ratios; numbers go in the issue note.
"""

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

from mllmcl.config import load_config
from mllmcl.data.source import load_configured_stream
from mllmcl.data.release import load_image
from mllmcl.engine import Engine, evaluate_task
from mllmcl.models.batching import PixelCache
from mllmcl.models import attach_lora, load_backbone
from mllmcl.training import fit
from mllmcl import run_stream


def plain_loop(cfg) -> float:
    """lora_ft's work without Ray: same steps, same evaluations, one process."""
    t0 = time.time()
    stream = load_configured_stream(cfg.data, progress=False)
    bb = load_backbone(cfg.model.path)
    pixels = PixelCache(bb.collator.images, load_image)
    model = attach_lora(copy.deepcopy(bb.model), cfg.lora.settings())
    for k, task in enumerate(stream):
        fit(model, bb.collator, pixels, task.train, cfg.train.settings(cfg.run.seed + k))
        for seen in stream.tasks[: k + 1]:
            evaluate_task(Engine.from_model(model, bb.collator, pixels), seen.spec, seen.test, batch_size=cfg.eval.batch_size,
                          max_new_tokens=cfg.eval.max_new_tokens or None)
    return time.time() - t0


def eval_seconds(run_dir: str) -> float:
    manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
    return sum(s["eval_seconds"] for s in manifest["stages"])


def where_it_goes(run_dir: str) -> str:
    """Each fit's wall time against its training steps; evaluation time; how much overlapped."""
    stages = json.loads((Path(run_dir) / "manifest.json").read_text())["stages"]
    fits = [t for s in stages for t in s["train"] if "seconds" in t]
    fit_s = sum(t["seconds"] for t in fits)
    loop_s = sum(t.get("loop_seconds") or 0 for t in fits)
    ev = sum(s["eval_seconds"] for s in stages)
    return (f"{len(fits)} fits {fit_s:.0f}s of which training steps {loop_s:.0f}s (start-up, loading, saving "
            f"{fit_s - loop_s:.0f}s, {(fit_s - loop_s) / max(1, len(fits)):.1f}s a fit); evaluation {ev:.0f}s")


def timed(cfg, run_id):
    t0 = time.time()
    res = run_stream(cfg, run_id)
    return res, time.time() - t0


def report_a(args, stream_s, seq_s, local_s, plain_s, concurrent, sequential, local, mr_con, mr_con_s, mr_seq,
             mr_seq_s):
    print(f"\n(a) lora_ft: stream runner {stream_s:.0f}s (default schedule: concurrent) vs plain in-process loop "
          f"{plain_s:.0f}s -> orchestration overhead ratio {stream_s / plain_s:.2f}x ({args.tasks}, "
          f"{args.epochs} epochs)")
    print(f"    run.schedule=sequential {seq_s:.0f}s -> {seq_s / plain_s:.2f}x; concurrent / sequential "
          f"{stream_s / seq_s:.2f}x; same matrix: {concurrent.matrix.rows == sequential.matrix.rows}")
    print(f"    concurrent: {where_it_goes(concurrent.run_dir)}")
    print(f"    sequential: {where_it_goes(sequential.run_dir)}")
    print(f"    same runner without Ray (scaling.backend=local) {local_s:.0f}s -> {local_s / plain_s:.2f}x the plain "
          f"loop; Ray's share {stream_s - local_s:.0f}s; same matrix as on Ray: "
          f"{local.matrix.rows == concurrent.matrix.rows}")
    print(f"    mr_lora: concurrent {mr_con_s:.0f}s vs sequential {mr_seq_s:.0f}s -> {mr_con_s / mr_seq_s:.2f}x; same "
          f"matrix: {mr_con.matrix.rows == mr_seq.matrix.rows}")
    print(f"    mr_lora concurrent: {where_it_goes(mr_con.run_dir)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stream", default="dcl")
    ap.add_argument("--tasks", default="RS,Med,AD")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--root", default=None, help="storage root (default: a temp folder)")
    ap.add_argument("--skip-cache", action="store_true", help="only (a): no cache on/off comparison")
    args = ap.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="mllmcl-bench-")
    common = [f"data.stream={args.stream}", f"data.tasks=[{args.tasks}]", f"train.epochs={args.epochs}",
              "run.progress=false", f"storage.root={root}"]

    # (a) orchestration overhead
    cfg = load_config(None, [*common, "method.name=lora_ft"])
    load_configured_stream(cfg.data, progress=False)  # build data + base outside every timing
    load_backbone(cfg.model.path)
    concurrent, stream_s = timed(cfg, "bench-lora-ft")
    sequential, seq_s = timed(load_config(None, [*common, "method.name=lora_ft", "run.schedule=sequential"]),
                              "bench-lora-ft-seq")
    local, local_s = timed(load_config(None, [*common, "method.name=lora_ft", "scaling.backend=local"]), "bench-local")
    plain_s = plain_loop(cfg)
    mr_con, mr_con_s = timed(load_config(None, [*common, "method.name=mr_lora"]), "bench-mr-con")
    mr_seq, mr_seq_s = timed(load_config(None, [*common, "method.name=mr_lora", "run.schedule=sequential"]),
                             "bench-mr-seq")

    report_a(args, stream_s, seq_s, local_s, plain_s, concurrent, sequential, local, mr_con, mr_con_s, mr_seq,
             mr_seq_s)
    if args.skip_cache:
        return
    # (b) MR-LoRA evaluation: cache on, then the same adapters re-evaluated with the cache off
    on = run_stream(load_config(None, [*common, "method.name=mr_lora"]), "bench-mr-cache")
    off_dir = Path(root) / "runs" / "bench-mr-nocache"
    shutil.copytree(Path(on.run_dir) / "tasks", off_dir / "tasks",
                    ignore=shutil.ignore_patterns("checkpoints_*"))  # same experts and routers: no retraining
    off = run_stream(load_config(None, [*common, "method.name=mr_lora", "eval.cache_predictions=false"]),
                     "bench-mr-nocache")
    assert off.trained_stages == [], "the cache-off run must reuse the adapters"
    e_on, e_off = eval_seconds(on.run_dir), eval_seconds(off.run_dir)
    same = on.matrix.rows == off.matrix.rows

    print(f"(b) MR-LoRA evaluation: cache {e_on:.0f}s ({on.metrics['eval_generated']} generations) vs no cache "
          f"{e_off:.0f}s ({off.metrics['eval_generated']} generations) -> {e_off / e_on:.2f}x faster with the "
          f"cache; same accuracy matrix: {same}")


if __name__ == "__main__":
    main()
