"""A run planned before it is spent: the method's own plans and answers on a stand-in of the
data (its sample counts), every fit's and every stage evaluation's modelled duration, and the
stream's own scheduler run on a clock under both schedules.

- **Fits**: ``method.plan(stage)`` for every stage gives the requests a run would make (the
  same samples, epochs, batch sizes, LoRA ranks); :func:`~mllmcl.planning.costs.fit_seconds`
  times each on the fit's workers.
- **Evaluations**: ``method.finish`` and ``method.answer`` run against a counting backend that
  keeps the run's prediction cache and answers nothing but routes: a router is assumed to
  name the right expert (a stated assumption: routing errors add cache misses, at most one
  more answer per question). Each stage's generations are timed by
  :func:`~mllmcl.planning.costs.generation_seconds` and shared by the evaluation replicas.
- **Schedules**: :func:`mllmcl.runner.schedule.run_schedule` with an executor whose clock
  jumps to the next modelled end; the fit slots are :func:`mllmcl.runner.executors.fit_slots`
  on the cluster's GPUs, as the runner computes them on a live cluster.
"""

from __future__ import annotations

import heapq
import re
import tempfile
from dataclasses import dataclass, field, replace

from mllmcl.data.prompts import LETTERS
from mllmcl.data.streams import get_stream_spec
from mllmcl.data.types import Sample, Stream, Task
from mllmcl.planning.costs import BYTES, FitShape, Memory, fit_memory, fit_seconds, generation_seconds
from mllmcl.planning.shapes import model_shape
from mllmcl.runner.executors import fit_slots, one_at_a_time
from mllmcl.runner.schedule import SCHEDULES, Finished, StageWork, build_graph, run_schedule

# Counts of the real release when its folder is not on the planning machine: train / test samples
# per task. Assumed (the release's own counts could not be read where this was written); the
# planner counts the release itself when data.root holds it, and --train-samples/--test-samples
# override both.
ASSUMED_COUNTS = {"dcl": (10_000, 2_000), "acl": (10_000, 1_000)}
TEXT_TOKENS = 64  # question + instruction tokens of a prompt, besides the image's (assumed)
ANSWER_TOKENS = 16  # training answer tokens (assumed)


@dataclass
class FitPlan:
    stage: int
    task: str
    kind: str
    samples: int
    epochs: float
    workers: int
    gpus: float
    seconds: float
    memory: Memory
    memory_checkpointed: Memory


@dataclass
class EvalPlan:
    stage: int
    generations: int
    routed: int
    seconds: float


@dataclass
class ScheduleTimes:
    wall_s: float
    gpu_hours_held: float  # the cluster's GPUs for the whole wall time
    gpu_hours_busy: float  # GPUs actually running fits and evaluations
    max_fits_at_once: int


@dataclass
class Plan:
    method: str
    stream: str
    model: str
    params: int
    cluster: object
    counts: str  # where the sample counts came from
    seq_len: int
    fits: list[FitPlan]
    evals: list[EvalPlan]
    schedules: dict[str, ScheduleTimes] = field(default_factory=dict)
    eval_memory: float = 0.0

    def problems(self, checkpointing: bool) -> list[str]:
        """Fits (and the evaluation replica) that do not fit the device's memory, with the numbers."""
        cap = self.cluster.device.memory_gib * 1024 ** 3
        out = []
        seen = set()
        for f in self.fits:
            mem = f.memory_checkpointed if checkpointing else f.memory
            if mem.total > cap and f.kind not in seen:  # one line a kind of fit: they share their shape
                seen.add(f.kind)
                g = mem.gib()
                out.append(f"stage {f.stage} {f.task} {f.kind} fit: {g['total']:.1f} GiB per GPU > "
                           f"{self.cluster.device.memory_gib:.0f} GiB ({self.cluster.device.name}): weights "
                           f"{g['weights']:.1f}, LoRA + optimizer {g['trainable']:.1f}, activations "
                           f"{g['activations']:.1f}, logits {g['logits']:.1f}, runtime {g['runtime']:.1f}")
        if self.eval_memory > cap:
            out.append(f"evaluation replica: {self.eval_memory / 1024 ** 3:.1f} GiB > "
                       f"{self.cluster.device.memory_gib:.0f} GiB")
        return out


def stand_in_stream(cfg, train: int | None = None, test: int | None = None) -> tuple[Stream, str]:
    """The configured stream with the release's sample counts: read from ``data.root`` when the
    release is there (and no count is given), else the given or assumed counts, samples that only
    carry their task (images and questions name it, so a backend can route them)."""
    from mllmcl.data.source import load_configured_stream

    if train is None and test is None:
        try:
            real = load_configured_stream(replace(cfg.data, verify_images="none"), progress=False)
            counts = [(len(t.train), len(t.test)) for t in real]
            return _stand_in(cfg, real.name, [t.name for t in real], counts), f"the release at {real.root}"
        except Exception:  # noqa: BLE001  (not on this machine: the counts below)
            pass
    spec = get_stream_spec(cfg.data.stream)
    names = cfg.data.task_names()
    a_train, a_test = ASSUMED_COUNTS.get(spec.name, (10_000, 1_000))
    if cfg.data.limit:
        a_train, a_test = min(a_train, cfg.data.limit), min(a_test, cfg.data.limit)
    counts = [(train or a_train, test or a_test)] * len(names)
    source = "given" if (train or test) else "assumed (ASSUMED_COUNTS in mllmcl/planning/simulate.py)"
    return _stand_in(cfg, spec.name, names, counts), f"{counts[0][0]} train / {counts[0][1]} test per task, {source}"


def _stand_in(cfg, stream_name: str, names: list[str], counts: list[tuple[int, int]]) -> Stream:
    spec = get_stream_spec(stream_name)
    tasks = []
    for i, (name, (n_train, n_test)) in enumerate(zip(names, counts)):
        def samples(split, n, name=name):
            return [Sample(uid=f"{name}-{split}-{j}", task=name, split=split, image=f"plan://{name}/{j}",
                           image_rel=f"{j}.png", question=f"[{name}] question {j}", answer="a") for j in range(n)]
        tasks.append(Task(spec=spec.task(name), index=i, root="plan://", train=samples("train", n_train),
                          test=samples("test", n_test)))
    return Stream(stream_name, "plan://", tasks)


class CountingBackend:
    """The evaluation replicas as the planner sees them: it keeps the run's prediction cache
    (adapter, question, limit), counts what would be generated, and routes every question to
    its own task's expert (texts and images of the stand-in samples name their task)."""

    def __init__(self, stream: Stream):
        self.names = stream.task_names
        self.cache: set[tuple] = set()
        self.calls: list[tuple[int, int]] = []  # (rows, new tokens) of each generation
        self.embedded = 0

    def _task(self, text: str) -> int:
        m = re.search(r"plan://([^/]+)/|\[([^\]]+)\]", text)
        name = (m.group(1) or m.group(2)) if m else self.names[0]
        return self.names.index(name) if name in self.names else 0

    def generate(self, samples, adapters, max_new_tokens):
        todo = [(a, s.uid, max_new_tokens) for s, a in zip(samples, adapters)
                if (a, s.uid, max_new_tokens) not in self.cache]
        self.cache.update(todo)
        if todo:
            self.calls.append((len(todo), max_new_tokens))
        return [""] * len(samples)

    def complete(self, prompts, images, adapter, max_new_tokens):
        self.calls.append((len(prompts), max_new_tokens))
        return [LETTERS[self._task(str(img))] for img in images]

    def embed(self, texts):
        self.embedded += len(texts)
        out = []
        for t in texts:
            v = [0.0] * len(self.names)
            v[self._task(t)] = 1.0
            out.append(v)
        return out

    def features(self, prompts, images):
        """A base forward per (question, image): counted like an embedding, one-hot by task."""
        vecs = self.embed(prompts)
        return {"image": vecs, "hidden": vecs}


class ModelledExecutor:
    """Jobs take their modelled seconds; a clock jumps from one end to the next. Room as the
    runner's :class:`~mllmcl.runner.executors.ThreadedExecutor` gives it (slots per lane, or
    one job at a time)."""

    def __init__(self, seconds: dict[str, float], slots: dict[str, int], exclusive: bool = False):
        self.seconds, self.slots, self.exclusive = seconds, slots, exclusive
        self.now, self.heap = 0.0, []

    def can_start(self, job, running):
        if self.exclusive and any(running.values()):
            return False
        return running.get(job.lane, 0) < self.slots.get(job.lane, 1)

    def start(self, job):
        heapq.heappush(self.heap, (self.now + self.seconds[job.id], job.id))

    def wait(self):
        self.now, job_id = heapq.heappop(self.heap)
        return Finished(job_id, None)

    def clock(self):
        return self.now


def plan_run(cfg, cluster, *, model_config: str | None = None, train_samples: int | None = None,
             test_samples: int | None = None, text_tokens: int = TEXT_TOKENS) -> Plan:
    from mllmcl.methods import get_method
    from mllmcl.methods.base import Stage
    from mllmcl.storage.layout import RunLayout

    shape = model_shape(cfg.model.path, model_config)
    stream, counts = stand_in_stream(cfg, train_samples, test_samples)
    sc, tr = cfg.scaling, cfg.train
    method = get_method(cfg.method.name)(cfg, stream)
    seq_len = shape.image_tokens + text_tokens + ANSWER_TOKENS
    weight_bytes = shape.params * BYTES.get(cfg.model.dtype, 4)
    compute = "bfloat16" if tr.mixed_precision in ("auto", "bf16") and sc.use_gpu else \
        ("float16" if tr.mixed_precision == "fp16" else cfg.model.dtype)
    workers = sc.num_workers
    fit_gpus = workers * ((sc.gpus_per_worker or 1.0) if sc.use_gpu else 0.0)
    zero = sc.zero_stage if sc.strategy == "deepspeed" else 0

    fits, seconds, work, evals = [], {}, [], []
    backend = CountingBackend(stream)
    with tempfile.TemporaryDirectory(prefix="mllmcl-plan-") as tmp:
        layout = RunLayout(tmp, "plan")
        for k in range(len(stream)):
            stage = Stage(k, stream, layout, cfg)
            reqs = method.plan(stage)
            for n, req in enumerate(reqs):
                micro = max(1, req.train.batch_size // max(1, workers * req.train.grad_accum))
                shape_of = FitShape(req.lora.rank, tuple(req.lora.target_modules), req.lora.train_projector, micro,
                                    seq_len, workers, cfg.model.dtype, compute, zero, sc.use_gpu)
                epochs = req.train.num_steps(len(req.samples)) * req.train.batch_size / max(1, len(req.samples))
                secs = fit_seconds(shape, len(req.samples), epochs, seq_len, workers, cluster,
                                   tr.gradient_checkpointing, weight_bytes)
                seconds[f"fit:{k}:{req.kind}:{n}"] = secs
                fits.append(FitPlan(k, req.task, req.kind, len(req.samples), round(epochs, 2), workers, fit_gpus,
                                    secs, fit_memory(shape, shape_of, False), fit_memory(shape, shape_of, True)))
            work.append(StageWork(k, reqs))
            calls, embedded = len(backend.calls), backend.embedded
            method.finish(stage, backend)
            method.answer(stage, backend)
            rows = backend.calls[calls:]
            prompt = shape.image_tokens + text_tokens
            secs = sum(generation_seconds(shape, r, prompt, t, cfg.eval.batch_size, cluster, weight_bytes)
                       for r, t in rows)
            secs += generation_seconds(shape, backend.embedded - embedded, text_tokens, 0, cfg.eval.batch_size,
                                       cluster, weight_bytes)
            secs = secs / sc.eval_replicas + (cluster.startup_s + weight_bytes / (cluster.storage_gbs * 1e9)
                                               if k == 0 else 0.0)
            seconds[f"eval:{k}"] = secs
            evals.append(EvalPlan(k, sum(r for r, _ in rows), sum(r for r, t in rows if t <= 4), secs))
    resources = cluster.resources()
    eval_gpus = (sc.eval_gpus or 1.0) * sc.eval_replicas if sc.use_gpu else 0.0
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * (shape.image_tokens + text_tokens + 64) * \
        cfg.eval.batch_size * BYTES.get(cfg.model.dtype, 4)
    plan = Plan(cfg.method.name, stream.name, shape.name, shape.params, cluster, counts, seq_len, fits, evals,
                eval_memory=weight_bytes + kv + (1.5 * 1024 ** 3 if sc.use_gpu else 0.4 * 1024 ** 3))
    for schedule in SCHEDULES:
        jobs = build_graph(work, schedule)
        concurrent = schedule == "concurrent"
        slots = {"fit": fit_slots(sc, resources, cluster.cpus_per_node or None) if concurrent else 1, "eval": 1}
        alone = concurrent and one_at_a_time(sc, cluster.nodes) and bool(cluster.cpus_per_node)
        ran = run_schedule(jobs, ModelledExecutor(seconds, slots, alone)).jobs
        wall = max((j.ended for j in ran), default=0.0)
        busy = sum(seconds[j.id] * (fit_gpus if j.lane == "fit" else eval_gpus) for j in ran) / 3600
        edges = sorted({t for j in ran if j.lane == "fit" for t in (j.started, j.ended)})
        at_once = max((sum(j.started <= t < j.ended for j in ran if j.lane == "fit") for t in edges), default=0)
        plan.schedules[schedule] = ScheduleTimes(wall, wall * cluster.gpus / 3600, busy, at_once)
    return plan


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 else \
        f"{seconds:.1f} s"


def describe(plan: Plan) -> str:
    """The plan as ``jobs/plan.py`` prints it."""
    c = plan.cluster
    size = f"{plan.params / 1e9:.2f} B" if plan.params >= 1e8 else f"{plan.params / 1e6:.1f} M"
    lines = [f"{plan.method} on {plan.stream.upper()} with {plan.model} ({size} parameters), "
             f"{c.nodes} x {c.gpus_per_node} {c.device.name} ({c.device.memory_gib:.0f} GiB, "
             f"{c.device.tflops:.0f} TFLOP/s at MFU {c.mfu:.2f})",
             f"samples: {plan.counts}; sequence {plan.seq_len} tokens", "",
             "memory per GPU of each kind of fit (GiB): total without / with activation checkpointing"]
    kinds = {}
    for f in plan.fits:
        kinds.setdefault(f.kind, f)
    for kind, f in kinds.items():
        a, b = f.memory.gib(), f.memory_checkpointed.gib()
        fits = lambda g: "fits" if g["total"] <= c.device.memory_gib else "DOES NOT FIT"  # noqa: E731
        lines.append(f"  {kind:<7} {a['total']:6.1f} ({fits(a)}) / {b['total']:6.1f} ({fits(b)})   weights "
                     f"{a['weights']:.1f}, LoRA + optimizer {a['trainable']:.2f}, activations {a['activations']:.1f}"
                     f" / {b['activations']:.1f}, logits {a['logits']:.1f}, runtime {a['runtime']:.1f}")
    lines.append(f"  evaluation replica {plan.eval_memory / 1024 ** 3:.1f}")
    lines += ["", "fits (modelled):"]
    for f in plan.fits:
        lines.append(f"  stage {f.stage} {f.task:<4} {f.kind:<7} {f.samples:>7} samples x {f.epochs:g} epochs on "
                     f"{f.workers} workers: {hours(f.seconds)}")
    lines.append("evaluations (modelled, prediction cache on; routers assumed right):")
    for e in plan.evals:
        lines.append(f"  stage {e.stage}: {e.generations} generations ({e.routed} routing), {hours(e.seconds)}")
    lines += ["", f"{'schedule':<11} {'wall time':>10} {'GPU-hours held':>15} {'GPU-hours busy':>15} "
                  f"{'fits at once':>13}"]
    for name, s in plan.schedules.items():
        lines.append(f"{name:<11} {hours(s.wall_s):>10} {s.gpu_hours_held:>15.1f} {s.gpu_hours_busy:>15.1f} "
                     f"{s.max_fits_at_once:>13}")
    return "\n".join(lines)
