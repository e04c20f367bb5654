"""GPU check: a 2-task MR-LoRA stream (the synthetic DCL twin's RS -> Med) run by the platform's
own runner (:func:`mllmcl.runner.stream.run_stream`, ``scaling.backend=local``: no Ray) on a
1.19 B-parameter LLaVA-shaped model in bf16, once without and once with activation
checkpointing, each in its own storage root. Per run it prints training samples/s and MFU,
peak GPU memory beside the planner's estimate, evaluation generated tokens/s and the
accuracy matrix.

    bash bench/gpu_check.sh                         # one GPU, < 8 minutes
    bash bench/gpu_check.sh --out gpu_check.json    # and every number as JSON
    bash bench/gpu_check.sh --tiny                  # the same code path on CPU, tiny model (< 1 min)

The stream (``BUDGET`` below; options override it): 512 train / 100 test samples per task, one
expert epoch at batch 16, the reference MR-LoRA's LoRA (rank 32, alpha 64, the projector trained)
and router (rank 32, 20 samples per seen task, 30 epochs), answers of at most 64 tokens, a few
hundred test questions and about 800 generations per run. Before the runs, one untimed warm-up
step and generation take the one-time costs (CUDA and cuBLAS start-up, lazy imports) out of the
first run's numbers.

The base: a TinyLlama-shaped language model (22 layers, hidden 2048, 32 heads, 4 KV heads,
MLP 5632, vocabulary 32000) under a ViT-B/16 CLIP tower at 224 px (196 image tokens), random
weights (no download), saved as a Hugging Face folder with the tiny base's tokenizer and
LLaVA-1.5 processor recipe (:mod:`mllmcl.models.tiny`; the processor at 224 px / 16 px
patches) and loaded by the platform like any checkpoint. The tokenizer has fewer entries than
the embedding's 32000 rows (ids beyond it decode to nothing): the parameter count and the
logits' cost are the real model's. Random weights answer nothing right: the accuracy matrix
shows the evaluation ran, not what the method learns. ``--tiny``: the same recipe at the tiny
base's shapes, float32 on CPU (CUDA hidden), a smaller budget.

What is measured, and how:

- **training samples/s**: from the run's manifest, every fit (experts and the router) as the
  runner recorded it: samples x epochs / ``loop_seconds`` (the training steps alone: loading
  the base and saving the adapter are outside; the check sets ``scaling.checkpoint_every``
  past the last step so no intermediate checkpoint is written inside the loop; the manifest
  rounds it to 0.1 s, so the unrounded value the runner got is used where it was measured).
- **MFU**: 4 x parameters of the base x tokens/s against the GPU's dense bf16 peak
  (``mllmcl.planning.hardware.GPUS``). A frozen base with LoRA runs the forward pass and the
  input gradients (2 + 2 FLOPs per parameter per token); LoRA's own FLOPs are negligible and
  the recomputation under activation checkpointing is not counted (model FLOPs, not hardware
  FLOPs). Tokens are the language model's real (unpadded) tokens, image tokens included,
  counted as the loop builds its batches. n/a on CPU.
- **peak GPU memory**: ``torch.cuda.max_memory_allocated`` over the whole run (the peak is
  reset between runs) and over each fit on its own (above what was allocated when the fit
  began: the evaluation engine, which stays loaded from stage 0 on). Beside it, the planner's
  estimate (:func:`mllmcl.planning.plan_run`, as ``jobs/plan.py`` prints it) for the same
  config (model, LoRA, batch, checkpointing) and the measured sequence (the experts' mean
  padded batch width): weights + LoRA/optimizer state + activations + logits, and a fixed
  runtime share (CUDA context, allocator) that the allocator does not see.
  n/a on CPU (the planner's estimate is still printed).
- **evaluation generated tokens/s**: the engine's own count of new tokens
  (``Completion.completion_tokens``) over the time spent in ``Engine.generate`` (prefill and
  decode; every test answer, the router's letters, forward-transfer and zero-shot answers).
  Beside it, the answers per second of the stages' evaluation (``metrics.eval_generated`` over
  the manifest's ``eval_seconds``, which include scoring and writing predictions).
- **accuracy matrix**: the run's ``metrics/metrics.json``. Both runs use the same seed:
  checkpointing recomputes the same forward pass, so adapters, fit losses, predictions and
  matrices should match (the check reports whether they do; on CPU they are byte-identical).

The counts of tokens and memory come from thin wrappers around the platform's own functions
(``run_local_training``, the loop's ``CrossEntropy.batch``, ``Engine.generate``), installed
only in this process: they call the originals unchanged. Exits 1 if a run fails or leaves no
accuracy matrix.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))  # run from a checkout without installing (gpu_check.sh sets it too)

RECIPE_VERSION = 1  # bump when build_base changes what it writes
GIB = 1024 ** 3


@dataclass(frozen=True)
class BaseShape:
    """A LLaVA-architecture base: Llama language model + CLIP vision tower + 2-layer projector."""

    name: str
    text_hidden: int
    text_intermediate: int
    text_layers: int
    heads: int
    kv_heads: int
    vocab: int
    context: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int

    def fingerprint(self, dtype: str) -> str:
        payload = json.dumps({**dataclasses.asdict(self), "dtype": dtype, "version": RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


# TinyLlama-1.1B's language model + ViT-B/16 at 224 px: 1.19 B parameters
LLAVA_1B = BaseShape("llava-1.19b", 2048, 5632, 22, 32, 4, 32000, 2048, 768, 3072, 12, 12, 224, 16)
# the tiny base's shapes (mllmcl.models.tiny.TinyVLMSpec), random weights
TINY = BaseShape("llava-tiny", 128, 256, 2, 4, 4, 1024, 512, 64, 128, 2, 4, 32, 8)

# The stream's budget: train/test samples per task, epochs, batch sizes, LoRA and router settings,
# evaluation. GPU: the MR-LoRA reference's LoRA (rank 32, alpha 64, the projector trained) and router
# (rank 32, 20 samples per task, 30 epochs), fewer samples and one epoch, answers cut at 64 tokens (random
# weights seldom stop early: every answer runs to the limit, the DCL tasks' own is 128); --tiny: enough
# for every code path, in well under a minute on 2 cores.
BUDGET = {
    False: {"train": 512, "test": 100, "epochs": 1.0, "batch": 16, "rank": 32, "router_samples": 20,
            "router_epochs": 30.0, "router_rank": 32, "eval_batch": 64, "max_new_tokens": 64, "lr": 2e-4},
    True: {"train": 16, "test": 8, "epochs": 1.0, "batch": 8, "rank": 8, "router_samples": 4,
           "router_epochs": 2.0, "router_rank": 8, "eval_batch": 16, "max_new_tokens": 8, "lr": 2e-3},
}


# --------------------------------------------------------------------------- the base

def build_base(shape: BaseShape, dtype: str, device: str) -> Path:
    """The base's Hugging Face folder under the cache (``$MLLMCL_CACHE/models``), built once:
    the tiny base's tokenizer and processor recipe, a LLaVA config of ``shape``, random weights
    (seed 0) initialised on ``device`` and saved at ``dtype``."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from mllmcl.models.chat import IMAGE_TOKEN
    from mllmcl.models.tiny import TinyVLMSpec, make_processor, train_tokenizer
    from mllmcl.paths import cache_dir

    dest = cache_dir() / "models" / f"gpu-check-{shape.name}-{shape.fingerprint(dtype)}"
    if (dest / "meta.json").exists():
        return dest
    t0 = time.time()
    spec = TinyVLMSpec(image_size=shape.image_size, patch_size=shape.patch_size)
    tokenizer = train_tokenizer(spec)  # the tiny base's tokenizer (its vocab_size and corpus)
    processor = make_processor(tokenizer, spec)
    patches = (shape.image_size // shape.patch_size) ** 2
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=shape.image_size, patch_size=shape.patch_size,
                                       hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
                                       num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                                       projection_dim=shape.vision_hidden),
        text_config=LlamaConfig(vocab_size=max(shape.vocab, len(tokenizer)), hidden_size=shape.text_hidden,
                                intermediate_size=shape.text_intermediate, num_hidden_layers=shape.text_layers,
                                num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                                max_position_embeddings=shape.context, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=patches,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,  # LLaVA-1.5's: the tower's penultimate layer
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg)
    model = model.to(getattr(torch, dtype))
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    params = sum(p.numel() for p in model.parameters())
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    meta = {"preset": f"gpu-check-{shape.name}", "shape": dataclasses.asdict(shape), "dtype": dtype,
            "version": RECIPE_VERSION, "parameters": params, "weights": "random (seed 0)",
            "build_seconds": round(time.time() - t0, 1), "torch": torch.__version__}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    del model
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


# --------------------------------------------------------------------------- measuring

class Meter:
    """Counts what the manifest does not hold, from inside this process: each fit's real and
    padded training tokens and its GPU memory, and the engine's generated tokens and time.
    The wrappers call the platform's functions unchanged."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.fits: list[dict] = []
        self.current: dict | None = None
        self.gen = {"calls": 0, "rows": 0, "tokens": 0, "seconds": 0.0}
        self.run_peak = 0

    def _peak(self) -> int:
        import torch

        return torch.cuda.max_memory_allocated() if self.cuda else 0

    def reset(self) -> None:
        import torch

        self.fits, self.current, self.run_peak = [], None, 0
        self.gen = {"calls": 0, "rows": 0, "tokens": 0, "seconds": 0.0}
        if self.cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return max(self.run_peak, self._peak()) / GIB if self.cuda else None

    @contextlib.contextmanager
    def installed(self):
        import torch

        from mllmcl.engine.engine import Engine
        from mllmcl.training import loop, trainer

        meter = self
        run_local, batch, generate = trainer.run_local_training, loop.CrossEntropy.batch, Engine.generate

        def run_local_training(fit, *rest, **kw):
            req = fit.request
            rec = {"stage": req.stage, "task": req.task, "kind": req.kind, "samples": len(req.samples),
                   "epochs": req.train.epochs, "batch_size": req.train.batch_size, "rows": 0, "tokens": 0,
                   "padded_tokens": 0, "batches": 0}
            if meter.cuda:
                gc.collect()
                torch.cuda.empty_cache()
                meter.run_peak = max(meter.run_peak, meter._peak())
                rec["held_gib"] = torch.cuda.memory_allocated() / GIB
                torch.cuda.reset_peak_memory_stats()
            meter.current = rec
            try:
                out = run_local(fit, *rest, **kw)
            finally:
                meter.current = None
                if meter.cuda:
                    rec["peak_gib"] = meter._peak() / GIB
                    rec["fit_peak_gib"] = rec["peak_gib"] - rec["held_gib"]
                    meter.run_peak = max(meter.run_peak, meter._peak())
                meter.fits.append(rec)
            rec["steps"], rec["loop_seconds"] = out.steps, out.loop_seconds
            return out

        def counted_batch(self, *a, **kw):
            b = batch(self, *a, **kw)
            rec = meter.current
            if rec is not None:
                rec["rows"] += int(b["input_ids"].shape[0])
                rec["tokens"] += int(b["attention_mask"].sum())
                rec["padded_tokens"] += int(b["input_ids"].numel())
                rec["batches"] += 1
            return b

        def counted_generate(self, prompts, *args, **kwargs):
            t0 = time.perf_counter()
            out = generate(self, prompts, *args, **kwargs)
            meter.gen["seconds"] += time.perf_counter() - t0
            meter.gen["calls"] += 1
            meter.gen["rows"] += len(out)
            meter.gen["tokens"] += sum(c.completion_tokens for c in out)
            return out

        trainer.run_local_training, loop.CrossEntropy.batch, Engine.generate = \
            run_local_training, counted_batch, counted_generate
        try:
            yield self
        finally:
            trainer.run_local_training, loop.CrossEntropy.batch, Engine.generate = run_local, batch, generate


def warm_up(base: Path, dtype: str, cuda: bool) -> float:
    """One training step and one short generation of the base, outside the timed runs: the first
    run would otherwise pay the one-time costs (CUDA/cuBLAS initialisation, lazy imports, kernel
    selection) inside its training loop and evaluation, and the second run would not."""
    import torch
    from PIL import Image

    from mllmcl.models import load_backbone

    t0 = time.time()
    backbone = load_backbone(str(base), dtype)
    device = torch.device("cuda" if cuda else "cpu")
    model, collate = backbone.model.to(device), backbone.collator
    pixels = collate.images.collate(collate.images.process([Image.new("RGB", (64, 64), (90, 120, 30))] * 2))
    batch = {k: v.to(device) for k, v in collate.train_batch(["What is shown?"] * 2, ["a field"] * 2,
                                                            pixels).items()}
    model.train()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        model(**batch).loss.float().backward()
    model.eval()
    prompt = {k: v.to(device) for k, v in collate.prompt_batch(["What is shown?"] * 2, pixels).items()}
    with torch.no_grad():
        model.generate(**prompt, max_new_tokens=2, do_sample=False)
    del model, backbone, batch, prompt
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return time.time() - t0


# --------------------------------------------------------------------------- the device

def planner_gpu(name: str, memory_gib: float, table: dict):
    """The planner's entry for a device named ``name`` ("NVIDIA H200", "NVIDIA A100-SXM4-80GB"): its
    family in the name, the closest memory size among the family's entries; None if unknown."""
    squashed = name.replace(" ", "").replace("-", "").upper()
    known = [d for key, d in table.items() if key.split("-")[0].upper() in squashed]
    return min(known, key=lambda d: abs(d.memory_gib - memory_gib)) if known else None


def device_info(cuda: bool, peak_tflops: float | None) -> dict:
    """The GPU and its entry in the planner's table (peak dense bf16 TFLOP/s, memory)."""
    import torch

    from mllmcl.planning.hardware import GPUS

    if not cuda:
        return {"name": "cpu", "cuda": False, "peak_tflops": None, "planner_gpu": None,
                "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)}
    name = torch.cuda.get_device_name(0)
    memory = torch.cuda.get_device_properties(0).total_memory / GIB
    entry = planner_gpu(name, memory, GPUS)
    return {"name": name, "cuda": True, "memory_gib": round(memory, 1), "planner_gpu": entry.name if entry else None,
            "peak_tflops": peak_tflops or (entry.tflops if entry else None), "torch_cuda": torch.version.cuda}


def cluster_for(dev: dict):
    from mllmcl.planning import ClusterSpec

    if dev["cuda"] and dev["planner_gpu"]:
        return ClusterSpec.parse(1, 1, gpu=dev["planner_gpu"])
    # CPU, or a GPU the planner's table does not know: the memory estimate does not depend on its speed
    return ClusterSpec.parse(1, 1, tflops=dev["peak_tflops"] or 1.0, memory_gib=dev["memory_gib"])


# --------------------------------------------------------------------------- one run

def overrides_for(args, base: Path, root: Path, checkpointing: bool, cuda: bool) -> list[str]:
    b = args.budget
    out = ["data.stream=dcl", "data.root=synthetic", f"data.tasks={','.join(args.tasks)}",
           f"data.synthetic_train={b['train']}", f"data.synthetic_test={b['test']}",
           f"model.path={base}", f"model.dtype={'bfloat16' if cuda else 'float32'}",
           f"lora.rank={b['rank']}", f"lora.alpha={2 * b['rank']}", "lora.dropout=0.05",
           "lora.train_projector=true",  # as the reference MR-LoRA: each adapter trains its own projector copy
           f"train.epochs={b['epochs']}", f"train.batch_size={b['batch']}", f"train.lr={b['lr']}",
           "train.mixed_precision=auto", f"train.gradient_checkpointing={'true' if checkpointing else 'false'}",
           "method.name=mr_lora", f"method.router_samples_per_task={b['router_samples']}",
           f"method.router_epochs={b['router_epochs']}", f"method.router_rank={b['router_rank']}",
           f"method.router_batch_size={b['batch']}", "method.router_fallback=random",
           f"eval.batch_size={b['eval_batch']}", f"eval.max_new_tokens={b['max_new_tokens']}",
           "scaling.backend=local", f"scaling.use_gpu={'true' if cuda else 'false'}",
           f"scaling.threads_per_worker={args.threads}",
           "scaling.checkpoint_every=1000000",  # no checkpoint inside the timed loop (the adapter is saved after it)
           f"storage.root={root}", f"run.id=gpu-check-{'ckpt' if checkpointing else 'nockpt'}", "run.seed=0",
           "run.progress=false"]
    return out


def predictions_digest(run_dir: Path) -> str:
    """A digest of every answer the run wrote (stages, forward transfer, zero-shot)."""
    import pyarrow.parquet as pq

    h = hashlib.sha256()
    for f in sorted((run_dir / "eval").glob("*/*.parquet")):
        if f.parent.name == "cache":
            continue
        t = pq.read_table(f, columns=["question_id", "prediction", "expert"]).to_pylist()
        h.update(f"{f.parent.name}/{f.name}".encode())
        for r in t:
            h.update(json.dumps(r, sort_keys=True).encode())
    return h.hexdigest()[:16]


def adapters_digest(run_dir: Path) -> str:
    """A digest of every finished adapter's weights (experts and routers), by their place in the run."""
    h = hashlib.sha256()
    for f in sorted((run_dir / "tasks").glob("*/*/*.safetensors")):
        if f.parent.name.startswith("checkpoints_"):
            continue
        h.update(str(f.relative_to(run_dir)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def run_one(args, base: Path, root: Path, checkpointing: bool, dev: dict, meter: Meter, params: int) -> dict:
    from mllmcl.config import load_config
    from mllmcl.planning import plan_run
    from mllmcl.planning.shapes import model_shape
    from mllmcl.planning.simulate import ANSWER_TOKENS
    from mllmcl.runner.stream import run_stream

    cuda = dev["cuda"]
    overrides = overrides_for(args, base, root, checkpointing, cuda)
    cfg = load_config(None, overrides)
    run_id = cfg.run.id
    meter.reset()
    t0 = time.time()
    with meter.installed():
        result = run_stream(cfg, run_id)
    wall = time.time() - t0
    run_dir = Path(result.run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    metrics = json.loads((run_dir / "metrics" / "metrics.json").read_text())
    out = {"gradient_checkpointing": checkpointing, "run_dir": str(run_dir), "seconds": round(wall, 1),
           "overrides": overrides, "status": manifest.get("status")}

    # training: the manifest's fits (every fit the runner ran), with the meter's tokens
    fits = []
    by_stage_kind: dict[tuple, list[dict]] = {}
    for r in meter.fits:
        by_stage_kind.setdefault((r["stage"], r["kind"]), []).append(r)
    for stage in manifest["stages"]:
        for entry in stage["train"]:
            if entry.get("reused"):
                continue
            m = (by_stage_kind.get((stage["k"], entry["kind"])) or [{}]).pop(0)
            epochs = m.get("epochs", cfg.method.router_epochs if entry["kind"] == "router" else cfg.train.epochs)
            # the manifest keeps loop_seconds to 0.1 s; the same number unrounded, as the runner got it, if measured
            loop_s = m.get("loop_seconds") or entry["loop_seconds"]
            fits.append({"stage": stage["k"], "task": stage["task"], "kind": entry["kind"], "steps": entry["steps"],
                         "samples": entry["samples"], "epochs": epochs, "loop_seconds": loop_s,
                         "fit_seconds": entry["seconds"], "loss": entry["loss"], "rows": m.get("rows"),
                         "tokens": m.get("tokens"), "padded_tokens": m.get("padded_tokens"),
                         "batch_size": m.get("batch_size"), "fit_peak_gib": m.get("fit_peak_gib"),
                         "held_gib": m.get("held_gib")})
    samples = sum(f["samples"] * f["epochs"] for f in fits)
    loop = sum(f["loop_seconds"] or 0.0 for f in fits)
    tokens = sum(f["tokens"] or 0 for f in fits)
    tokens_per_s = tokens / loop if loop else None
    peak = dev["peak_tflops"]
    train = {"samples": samples, "loop_seconds": round(loop, 2), "samples_per_s": samples / loop if loop else None,
             "tokens": tokens, "tokens_per_s": tokens_per_s,
             "tokens_per_sample": tokens / sum(f["rows"] or 0 for f in fits) if tokens else None,
             "mfu": 4 * params * tokens_per_s / (peak * 1e12) if (cuda and peak and tokens_per_s) else None,
             "by_kind": {}}
    for kind in dict.fromkeys(f["kind"] for f in fits):
        fk = [f for f in fits if f["kind"] == kind]
        s, ls = sum(f["samples"] * f["epochs"] for f in fk), sum(f["loop_seconds"] or 0.0 for f in fk)
        train["by_kind"][kind] = {"fits": len(fk), "samples": s, "loop_seconds": round(ls, 2),
                                  "samples_per_s": s / ls if ls else None}
    out["fits"], out["train"] = fits, train

    # memory: measured, and the planner's for the same model, batch and sequence
    experts = [f for f in fits if f["kind"] == "expert" and f["rows"]]
    padded = sum(f["padded_tokens"] for f in experts) / sum(f["rows"] for f in experts) if experts else None
    shape = model_shape(str(base))
    text_tokens = max(0, round(padded) - shape.image_tokens - ANSWER_TOKENS) if padded else 64
    plan = plan_run(cfg, cluster_for(dev), text_tokens=text_tokens)
    planner = {}
    for f in plan.fits:
        if f.kind in planner:
            continue
        mem = f.memory_checkpointed if checkpointing else f.memory
        planner[f.kind] = {f"{k}_gib": getattr(mem, k) / GIB
                           for k in ("weights", "trainable", "activations", "logits", "runtime", "total")}
    kinds_measured = {}
    for f in fits:
        if f["fit_peak_gib"] is not None:
            k = kinds_measured.setdefault(f["kind"], {"fit_peak_gib": 0.0, "held_gib": 0.0})
            k["fit_peak_gib"] = max(k["fit_peak_gib"], f["fit_peak_gib"])
            k["held_gib"] = max(k["held_gib"], f["held_gib"])
    out["memory"] = {"peak_gib": meter.peak_gib(), "fits": kinds_measured,
                     "planner": {"fits": planner,
                                 "eval_replica_gib": plan.eval_memory / GIB,
                                 "seq_len": plan.seq_len, "gpu": plan.cluster.device.name if cuda else "CPU"}}

    # evaluation
    eval_seconds = sum(s.get("eval_seconds") or 0.0 for s in manifest["stages"])
    g = meter.gen
    out["eval"] = {"answers": metrics.get("eval_generated"), "cache_hits": metrics.get("eval_cache_hits"),
                   "eval_seconds": round(eval_seconds, 2),
                   "answers_per_s": metrics["eval_generated"] / eval_seconds if eval_seconds else None,
                   "generated_tokens": g["tokens"], "generated_rows": g["rows"],
                   "generate_seconds": round(g["seconds"], 2),
                   "tokens_per_s": g["tokens"] / g["seconds"] if g["seconds"] else None}
    out["accuracy_matrix"] = metrics.get("accuracy_matrix")
    out["metrics"] = {k: metrics.get(k) for k in ("MFT", "MFN", "MAA", "BWT", "router_accuracy")}
    out["predictions_digest"] = predictions_digest(run_dir)
    out["adapters_digest"] = adapters_digest(run_dir)
    return out


# --------------------------------------------------------------------------- printing

def fmt(v, spec: str, unit: str = "", none: str = "n/a") -> str:
    return none if v is None else f"{v:{spec}}{unit}"


def size(gib: float | None) -> str:
    if gib is None:
        return "n/a"
    return f"{gib:.2f} GiB" if abs(gib) >= 0.1 else f"{gib * 1024:.1f} MiB"


def print_run(r: dict) -> None:
    from mllmcl.evaluation.metrics import AccuracyMatrix

    t, m, e = r["train"], r["memory"], r["eval"]
    label = "on" if r["gradient_checkpointing"] else "off"
    print(f"\n== activation checkpointing {label}: MR-LoRA {' -> '.join(r['accuracy_matrix']['tasks'])}, "
          f"{r['seconds']:.0f} s  ({r['run_dir']})")
    kinds = ", ".join(f"{k} {fmt(v['samples_per_s'], '.1f')}/s ({v['fits']} fit{'s' if v['fits'] > 1 else ''}, "
                      f"{v['samples']:g} samples)" for k, v in t["by_kind"].items())
    print(f"training    {fmt(t['samples_per_s'], '.2f')} samples/s ({t['samples']:g} samples in "
          f"{t['loop_seconds']:.1f} s of training steps: {kinds})")
    print(f"            {fmt(t['tokens_per_s'], '.0f')} tokens/s ({fmt(t['tokens_per_sample'], '.0f')} per sample), "
          f"MFU {fmt(t['mfu'] and 100 * t['mfu'], '.1f', '%')} (4 x params x tokens/s / peak)")
    p = m["planner"]
    print(f"memory      peak {size(m['peak_gib'])} (max_memory_allocated over the run); the planner's estimate for "
          f"a sequence of {p['seq_len']} tokens on {p['gpu']}:")
    for kind, est in p["fits"].items():
        got = m["fits"].get(kind)
        meas = (f"measured {size(got['fit_peak_gib'])} above the {size(got['held_gib'])} held before it" if got else
                "measured n/a")
        print(f"  {kind:<8}  {meas}; planner {size(est['total_gib'] - est['runtime_gib'])} + "
              f"{size(est['runtime_gib'])} runtime (weights {size(est['weights_gib'])}, LoRA + optimizer "
              f"{size(est['trainable_gib'])}, activations {size(est['activations_gib'])}, "
              f"logits {size(est['logits_gib'])})")
    print(f"  evaluation replica: planner {size(p['eval_replica_gib'])}")
    print(f"evaluation  {fmt(e['tokens_per_s'], '.0f')} generated tokens/s ({e['generated_tokens']} tokens, "
          f"{e['generated_rows']} rows in {e['generate_seconds']:.1f} s of Engine.generate); "
          f"{fmt(e['answers_per_s'], '.1f')} answers/s ({e['answers']} answers, {e['cache_hits']} cached, "
          f"{e['eval_seconds']:.1f} s of stage evaluation)")
    print("accuracy matrix (random weights: the numbers show the evaluation ran, not learning):")
    print("  " + AccuracyMatrix.from_dict(r["accuracy_matrix"]).format_table().replace("\n", "\n  "))


def third_party_modules() -> list[str]:
    names = {n.split(".")[0] for n in list(sys.modules)}
    return sorted(n for n in names if n not in sys.stdlib_module_names and not n.startswith("_") and n != "mllmcl")


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true",
                    help="the tiny base's shapes in float32 on CPU (CUDA hidden) with a small budget: "
                         "the same code path as a smoke test (under a minute on 2 cores)")
    ap.add_argument("--out", default=None, help="write every number of both runs as JSON here")
    ap.add_argument("--root", default=None,
                    help="storage roots of the runs go under this folder (default: a temporary folder, "
                         "deleted at the end unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the runs' artifacts (with the default --root)")
    ap.add_argument("--checkpointing", default="off,on",
                    help="which runs: off, on or off,on (activation checkpointing; default both)")
    ap.add_argument("--tasks", default="RS,Med", help="the DCL tasks of the stream (default: the first two)")
    ap.add_argument("--train", type=int, default=None, help="train samples per task (GPU 512, --tiny 16)")
    ap.add_argument("--test", type=int, default=None, help="test questions per task (GPU 100, --tiny 8)")
    ap.add_argument("--epochs", type=float, default=None, help="epochs of each expert (1)")
    ap.add_argument("--batch", type=int, default=None, help="training batch of experts and router (GPU 16, --tiny 8)")
    ap.add_argument("--router-epochs", type=float, default=None, help="the router's epochs (GPU 30, --tiny 2)")
    ap.add_argument("--eval-batch", type=int, default=None, help="evaluation batch (GPU 64, --tiny 16)")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="cap on generated tokens per answer (GPU 64, --tiny 8; 0 = the task's own, 128)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the fits and the evaluation (--tiny 1: a tiny model's matrices gain "
                         "nothing from more, and threads that wait on busy cores cost much; GPU: 0 = torch's default)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the GPU's dense bf16 peak, when the planner's table does not know it")
    args = ap.parse_args(argv)
    b = dict(BUDGET[args.tiny])
    for key, value in (("train", args.train), ("test", args.test), ("epochs", args.epochs), ("batch", args.batch),
                       ("router_epochs", args.router_epochs), ("eval_batch", args.eval_batch),
                       ("max_new_tokens", args.max_new_tokens)):
        if value is not None:
            b[key] = value
    args.budget = b
    if args.threads is None:
        args.threads = 1 if args.tiny else 0
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.runs = [{"off": False, "on": True}[s.strip()] for s in args.checkpointing.split(",") if s.strip()] \
        if all(s.strip() in ("off", "on") for s in args.checkpointing.split(",")) else None
    if not args.runs:
        ap.error(f"--checkpointing {args.checkpointing!r}: expected off, on or off,on")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch: the tiny check is the CPU path
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # the evaluation engine (in this process); fits set their own
    cuda = torch.cuda.is_available() and not args.tiny
    if not args.tiny and not cuda:
        print("gpu_check: no CUDA device (use --tiny for the CPU smoke test)", file=sys.stderr)
        return 2
    from mllmcl.cli import setup_logging

    setup_logging()
    import peft
    import transformers

    dev = device_info(cuda, args.peak_tflops)
    shape = TINY if args.tiny else LLAVA_1B
    dtype = "bfloat16" if cuda else "float32"
    t0 = time.time()
    print(f"gpu check: {dev['name']} ({dev['memory_gib']} GiB); torch {torch.__version__}, transformers "
          f"{transformers.__version__}, peft {peft.__version__}", flush=True)
    base = build_base(shape, dtype, "cuda" if cuda else "cpu")
    params = json.loads((base / "meta.json").read_text())["parameters"]
    count = f"{params / 1e9:.2f} B" if params >= 1e8 else f"{params / 1e6:.2f} M"
    print(f"base {shape.name}: {count} parameters, {dtype}, random weights, at {base} ({time.time() - t0:.0f} s)",
          flush=True)
    print(f"warm-up (one training step and a short generation, untimed): {warm_up(base, dtype, cuda):.0f} s",
          flush=True)
    b = args.budget
    limit = b["max_new_tokens"] or "the tasks' own"
    print(f"stream: DCL {' -> '.join(args.tasks)} (synthetic twin), {b['train']} train / {b['test']} test per task, "
          f"experts {b['epochs']:g} epoch(s) at batch {b['batch']}, router {b['router_samples']} samples per task x "
          f"{b['router_epochs']:g} epochs, answers of at most {limit} tokens, "
          f"scaling.backend=local", flush=True)

    root_tmp = None
    if args.root:
        root = Path(args.root).resolve()
    else:
        root_tmp = root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    report = {"device": dev, "tiny": args.tiny, "base": {"path": str(base), "shape": dataclasses.asdict(shape),
                                                          "dtype": dtype, "parameters": params},
              "budget": b, "tasks": args.tasks, "runs": [], "errors": [],
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__}}
    meter = Meter(cuda)

    def write() -> None:  # after every run: a run cut short by the time limit leaves the ones before it
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    try:
        for checkpointing in args.runs:
            label = "ckpt" if checkpointing else "nockpt"
            if (root / label).exists() and any((root / label).iterdir()):
                # the runner would resume the run found there and train nothing: nothing to measure
                report["errors"].append(f"{root / label}: not empty (a run of an earlier check?); remove it or "
                                        f"give another --root")
                continue
            try:
                r = run_one(args, base, root / label, checkpointing, dev, meter, params)
            except Exception as e:  # noqa: BLE001  (reported, and the exit status says so)
                traceback.print_exc()
                report["errors"].append(f"activation checkpointing {'on' if checkpointing else 'off'}: "
                                        f"{type(e).__name__}: {e}")
                continue
            report["runs"].append(r)
            if not (r.get("accuracy_matrix") or {}).get("rows"):
                report["errors"].append(f"{r['run_dir']}: no accuracy matrix in metrics/metrics.json")
            print_run(r)
            sys.stdout.flush()
            write()
    finally:
        if root_tmp is not None and not args.keep:
            shutil.rmtree(root_tmp, ignore_errors=True)

    runs = report["runs"]
    if len(runs) == 2:
        a, c = runs
        losses = [(x["loss"], y["loss"]) for x, y in zip(a["fits"], c["fits"])]
        diff = max((abs(x - y) / max(abs(x), 1e-12) for x, y in losses if x is not None and y is not None),
                   default=None)
        same = {"accuracy_matrix": a["accuracy_matrix"] == c["accuracy_matrix"],
                "predictions": a["predictions_digest"] == c["predictions_digest"],
                "adapters": a["adapters_digest"] == c["adapters_digest"],
                "fit_loss_max_rel_diff": diff}
        report["same_results"] = same
        ratio = lambda x, y: (y / x) if x and y else None  # noqa: E731
        report["checkpointing_effect"] = {
            "samples_per_s_ratio": ratio(a["train"]["samples_per_s"], c["train"]["samples_per_s"]),
            "peak_gib_saved": (a["memory"]["peak_gib"] - c["memory"]["peak_gib"])
            if a["memory"]["peak_gib"] is not None else None}
        saved = report["checkpointing_effect"]["peak_gib_saved"]
        memory = "n/a" if saved is None else size(abs(saved)) + (" lower" if saved >= 0 else " higher")
        print(f"\ncheckpointing on vs off: {fmt(report['checkpointing_effect']['samples_per_s_ratio'], '.2f')} x the "
              f"samples/s, peak memory {memory}; the same "
              + ", ".join(f"{k.replace('_', ' ')}: {'yes' if same[k] else 'NO'}"
                          for k in ("accuracy_matrix", "predictions", "adapters"))
              + f"; fit losses within {fmt(diff, '.1e')} (relative)")
    report["third_party_modules"] = third_party_modules()
    report["seconds"] = round(time.time() - t0, 1)
    print(f"\nthird-party packages imported: {', '.join(report['third_party_modules'])}")
    print(f"total {report['seconds']:.0f} s")
    write()
    if report["errors"]:
        print("gpu_check FAILED:\n  " + "\n  ".join(report["errors"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
