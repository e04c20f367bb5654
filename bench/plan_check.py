"""The planner (jobs/plan.py) against this machine.

(1) Peak memory of a LoRA fit on CPU, predicted (``mllmcl.planning.costs.fit_memory``) vs
    measured (peak RSS of a process that builds the model and takes training steps, minus
    the RSS it had before building it), for the tiny LLaVA-shaped model and the 1.19 B one of
    ``bench/gpu_check.py``, with and without activation checkpointing.
(2) Stage times of a tiny MR-LoRA stream on Ray (default schedule), predicted vs measured:
    this machine's fp32 matmul FLOP/s stands in for a GPU's peak; the fixed part of a fit
    (Ray Train start-up, loading, saving: measured) is the planner's --startup-s; the rest
    is the model's FLOPs at --mfu.

    scripts/loopback.sh python bench/plan_check.py            # ~10 min on 2 cores
    scripts/loopback.sh python bench/plan_check.py --skip-1b   # without the 1.19 B model (~3 min)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine_flops(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t0, n = time.perf_counter(), 6
    for _ in range(n):
        a @ b
    return n * 2 * 2048 ** 3 / (time.perf_counter() - t0)


def memory_child(size: str, checkpointing: bool, batch: int, text_len: int) -> None:
    """In a fresh process: build, attach LoRA, two training steps; print the RSS growth."""
    import torch

    sys.path.insert(0, str(HERE))
    from gpu_check import batches, build_model

    from mllmcl.models.lora import LoraSettings, attach_lora
    from mllmcl.training.loop import TrainSettings, make_optimizer

    torch.set_num_threads(2)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model, cfg = build_model(size == "tiny")
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = attach_lora(model, LoraSettings(rank=32, alpha=64, dropout=0.0))
    optimizer, scheduler = make_optimizer(model, TrainSettings(epochs=1, max_steps=2, batch_size=batch), 2)
    model.train()
    data, seq = batches(cfg, batch, text_len, 2, torch.device("cpu"))
    for b in data:
        model(**b).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"config": cfg.to_dict(), "seq": seq, "measured": peak - base}))


def memory_check(size: str, batch: int, text_len: int) -> list[str]:
    from mllmcl.planning.costs import GIB, FitShape, fit_memory
    from mllmcl.planning.shapes import ModelShape

    lines = []
    for ckpt in (False, True):
        out = subprocess.run([sys.executable, __file__, "--child", size, "--batch", str(batch), "--text-len",
                              str(text_len)] + (["--checkpointing"] if ckpt else []), capture_output=True, text=True,
                             timeout=3000)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        shape = ModelShape.from_config(r["config"], size)
        targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        m = fit_memory(shape, FitShape(32, targets, False, batch, r["seq"], 1, "float32", "float32", gpu=False), ckpt)
        predicted = m.total - m.runtime  # the process's own runtime is in the baseline
        lines.append(f"  {size:>5} ({shape.params / 1e9:.2f} B, batch {batch} x {r['seq']} tokens, checkpointing "
                     f"{'on ' if ckpt else 'off'}): predicted {predicted / GIB:6.2f} GiB, measured "
                     f"{r['measured'] / GIB:6.2f} GiB -> measured / predicted {r['measured'] / predicted:.2f}")
    return lines


def stream_check(flops: float, tasks: str) -> list[str]:
    from mllmcl import run_stream
    from mllmcl.config import load_config
    from mllmcl.planning import ClusterSpec, plan_run
    from mllmcl.planning.hardware import Device

    root = tempfile.mkdtemp(prefix="mllmcl-plan-check-")
    overrides = [f"data.tasks=[{tasks}]", "data.limit=60", "train.epochs=2", "method.router_epochs=4",
                 "run.progress=false", f"storage.root={root}"]
    cfg = load_config(None, overrides)
    t0 = time.time()
    res = run_stream(cfg, "plan-check")
    wall = time.time() - t0
    stages = json.loads((Path(res.run_dir) / "manifest.json").read_text())["stages"]
    fits = [t for s in stages for t in s["train"] if "seconds" in t]
    fixed = statistics.median(t["seconds"] - (t.get("loop_seconds") or 0) for t in fits)
    loop = sum(t.get("loop_seconds") or 0 for t in fits)
    lines = [f"  measured: wall {wall:.0f}s; {len(fits)} fits, training steps {loop:.1f}s in all, fixed part "
             f"{fixed:.1f}s a fit (median); evaluation {sum(s['eval_seconds'] for s in stages):.1f}s"]
    cpu = Device("this-cpu", flops / 1e12, 24.0, 10.0)
    for mfu in (0.35, None):
        if mfu is None:  # the MFU these fits reached: the training steps' FLOPs over their measured time
            probe = plan_run(cfg, ClusterSpec(1, 1, cpu, 1.0, 0.0, 1e9, os.cpu_count() or 1))
            mfu = sum(f.seconds for f in probe.fits) / max(loop, 1e-9)
        plan = plan_run(cfg, ClusterSpec(1, 1, cpu, mfu, fixed, 1e9, os.cpu_count() or 1))
        fit_s = sum(f.seconds for f in plan.fits)
        ev = sum(e.seconds for e in plan.evals)
        predicted = plan.schedules["concurrent"].wall_s
        lines.append(f"  predicted at MFU {mfu:.3f}: fits {fit_s:.0f}s (measured {sum(t['seconds'] for t in fits):.0f}s)"
                     f", evaluation {ev:.0f}s, wall {predicted:.0f}s (measured {wall:.0f}s) -> measured / predicted "
                     f"{wall / predicted:.2f}")
        for s, e in zip(stages, plan.evals):
            lines.append(f"    stage {s['k']}: evaluation predicted {e.seconds:.1f}s, measured {s['eval_seconds']:.1f}s")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--text-len", type=int, default=64)
    ap.add_argument("--skip-1b", action="store_true")
    ap.add_argument("--skip-memory", action="store_true", help="only (2)")
    ap.add_argument("--tasks", default="RS,Med,AD")
    args = ap.parse_args()
    if args.child:
        memory_child(args.child, args.checkpointing, args.batch, args.text_len)
        return
    flops = machine_flops(os.cpu_count() or 1)
    print(f"this machine: {flops / 1e9:.0f} GFLOP/s fp32 matmul ({os.cpu_count()} threads)", flush=True)
    if not args.skip_memory:
        print("(1) peak memory of a LoRA fit on CPU (fp32, rank 32 on every language-model linear)", flush=True)
    for size in () if args.skip_memory else ("tiny",) + (() if args.skip_1b else ("1b",)):
        for line in memory_check(size, args.batch if size != "tiny" else 8, args.text_len):
            print(line, flush=True)
    print(f"(2) a tiny MR-LoRA stream on Ray ({args.tasks}), stage times", flush=True)
    for line in stream_check(flops, args.tasks):
        print(line, flush=True)


if __name__ == "__main__":
    main()
