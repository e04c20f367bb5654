"""Batch evaluation of a test split through a run's router + experts, at scale with Ray Data
(or in this process with ``backend=local``): the same routing and mixed-expert batches as
the service, written as per-sample predictions and scores like the stream runner's.

    python jobs/evaluate.py --run artifacts/runs/<id> --data /data/MLLM-CL/Domain_data/Med
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass

from mllmcl import storage
from mllmcl.data.release import load_image, load_test_folder
from mllmcl.data.streams import STREAMS, get_stream_spec
from mllmcl.data.types import TaskSpec
from mllmcl.errors import DataError
from mllmcl.paths import absolute
from mllmcl.serving.run import ServedRun, load_served_run
from mllmcl.storage.layout import relative_adapter

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    task: str
    accuracy: float
    n: int
    stage: int
    router_accuracy: float | None
    router_fallbacks: int
    experts_used: dict[str, int]
    out_dir: str
    data: str
    backend: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def task_spec_for(folder: str, run: ServedRun, task: str | None = None) -> TaskSpec:
    """The task a folder holds: ``--task``, else the folder's name (``OCR_test`` -> ``OCR``)."""
    name = task or str(folder).rstrip("/").rsplit("/", 1)[-1].removesuffix("_test")
    streams = [get_stream_spec(run.stream)] + [s for s in STREAMS.values() if s.name != run.stream]
    for stream in streams:
        if name in stream.task_names:
            return stream.task(name)
    known = [t for s in streams for t in s.task_names]
    raise DataError(f"{folder}: cannot tell which task this is ({name!r} is not one of {known}); pass --task NAME")


class EnsemblePredictor:
    """Ray Data callable class: one router + experts model per actor."""

    def __init__(self, run: ServedRun, threads: int = 0, max_new_tokens: int | None = None):
        from mllmcl.serving.ensemble import Ensemble

        self.ensemble = Ensemble(run, threads)
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict) -> dict:
        images = [load_image(u) for u in batch["image"]]
        res = self.ensemble.answer(list(batch["question"]), images, self.max_new_tokens, tasks=list(batch["task"]))
        return {"uid": list(batch["uid"]), **{k: [r[k] for r in res] for k in res[0]}}


def _predict(run: ServedRun, rows: list[dict], max_new: int, *, backend: str, batch_size: int, concurrency: int,
             num_cpus: float, num_gpus: float, threads: int) -> list[dict]:
    if backend == "local":
        pred = EnsemblePredictor(run, threads, max_new)
        out = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            res = pred({k: [r[k] for r in chunk] for k in chunk[0]})
            out += [dict(zip(res, vals)) for vals in zip(*res.values())]
        return out
    import ray

    from mllmcl.cluster import init_ray

    init_ray()
    if not threads:
        cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        threads = max(1, cpus // max(1, concurrency))
    ds = ray.data.from_items(rows).map_batches(
        EnsemblePredictor, fn_constructor_kwargs={"run": run, "threads": threads, "max_new_tokens": max_new},
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=num_cpus,
        num_gpus=num_gpus, batch_format="default")
    return ds.take_all()


def evaluate_run(run_uri: str, data: str, *, task: str | None = None, out: str | None = None, stage: int = -1,
                 backend: str = "ray", batch_size: int = 32, concurrency: int = 1, num_cpus: float = 1.0,
                 num_gpus: float = 0.0, threads: int = 0, limit: int = 0, verify_images: str = "exists",
                 model_path: str = "", dtype: str = "") -> EvalResult:
    from mllmcl.data.prompts import eval_prompt
    from mllmcl.evaluation.predictions import score_predictions, write_predictions

    if backend not in ("ray", "local"):
        raise ValueError(f"backend={backend!r}: expected ray or local")
    t0 = time.time()
    data, out = absolute(data), absolute(out) if out else None  # Ray Data actors run in folders of their own
    run = load_served_run(run_uri, stage, model_path=model_path, dtype=dtype)
    if not storage.exists(storage.join(data, "test.json")):
        raise DataError(f"{data}: no test.json (expected a task folder of the MLLM-CL release)")
    spec = task_spec_for(data, run, task)
    samples = load_test_folder(data, spec.name, verify_images=verify_images, limit=limit or None)
    max_new = run.eval_max_new_tokens or spec.max_new_tokens
    rows = [{"uid": s.uid, "question": eval_prompt(s), "image": s.image, "task": spec.name} for s in samples]
    log.info("evaluating %d samples of %s through run %s stage %d (%s)", len(rows), spec.name, run.run_id, run.stage,
             backend)
    res = {r["uid"]: r for r in _predict(run, rows, max_new, backend=backend, batch_size=batch_size,
                                          concurrency=concurrency, num_cpus=num_cpus, num_gpus=num_gpus,
                                          threads=threads)}
    experts = [res[s.uid]["expert"] for s in samples]
    adapters = [relative_adapter(run.experts[e], run.run_uri) for e in experts]
    ev = score_predictions(spec, samples, [res[s.uid]["prediction"] for s in samples], stage=run.stage,
                           experts=adapters)
    if out is None:
        digest = hashlib.sha256(str(data).rstrip("/").encode()).hexdigest()[:8]
        out = storage.join(run.run_uri, "eval", "evaluate", f"{spec.name}-{digest}")
    write_predictions(ev.rows, storage.join(out, f"{spec.name}.parquet"))
    used: dict[str, int] = {}
    for e in experts:
        used[e] = used.get(e, 0) + 1
    routed_right = None
    if run.routed and spec.name in run.experts:
        routed_right = 100.0 * used.get(spec.name, 0) / max(1, len(experts))
    result = EvalResult(task=spec.name, accuracy=ev.accuracy, n=len(samples), stage=run.stage,
                        router_accuracy=routed_right,
                        router_fallbacks=sum(bool(res[s.uid]["router_fallback"]) for s in samples),
                        experts_used=used, out_dir=out, data=str(data), backend=backend,
                        seconds=round(time.time() - t0, 1))
    storage.write_json(storage.join(out, "scores.json"), {**result.to_dict(), "run_id": run.run_id,
                                                          "method": run.method})
    return result

