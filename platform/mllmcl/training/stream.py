"""The stream runner: for each task in order, the method's fine-tuning on Ray Train,
then every seen task evaluated (row k of the accuracy matrix), then the manifest.

A run is resumable by its id: complete stages are not redone, an adapter already
written is not retrained, and a half-finished fine-tuning resumes from its last Ray
Train checkpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import yaml

from mllmcl import storage
from mllmcl.config import Config, absolute_paths
from mllmcl.data.checksums import release_changes, release_manifest
from mllmcl.data.source import load_configured_stream
from mllmcl.data.types import Sample
from mllmcl.errors import ConfigError
from mllmcl.evaluation.generate import score_predictions
from mllmcl.evaluation.metrics import AccuracyMatrix
from mllmcl.evaluation.plots import heatmap_png
from mllmcl.evaluation.predictions import write_predictions
from mllmcl.evaluation.report import render_report
from mllmcl.methods import get_method
from mllmcl.methods.base import Stage
from mllmcl.models.adapters import adapter_exists
from mllmcl.models.loading import resolve_checkpoint
from mllmcl.paths import SYNTHETIC_DATA, TINY_MODEL, absolute
from mllmcl.provenance import config_hash, provenance
from mllmcl.storage.layout import RunLayout, relative_adapter
from mllmcl.storage.manifest import Manifest
from mllmcl.training.request import sample_to_dict

log = logging.getLogger(__name__)

# settings that may change when a run is resumed (they do not change its results)
RESUMABLE_CHANGES = ("run.progress", "scaling.", "eval.batch_size", "storage.root", "data.checksum_images")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def identity(cfg: Config) -> dict:
    """The part of the config that defines what the run computes."""
    return {k: v for k, v in _flatten(cfg.to_dict()).items() if not k.startswith(RESUMABLE_CHANGES)}


class PredictionCache:
    """(adapter, sample, max_new_tokens) -> prediction, kept in the run's storage.

    Adapters never change once written, so an expert's answer to a test sample is
    computed once per run and reused at every later stage.
    """

    def __init__(self, layout: RunLayout, enabled: bool = True):
        self.layout = layout
        self.enabled = enabled
        self.data: dict[str, dict[tuple[str, int], str]] = {}
        self.dirty: set[str] = set()
        self.hits = 0
        self.misses = 0

    def _key(self, adapter: str | None) -> str:
        if adapter is None:
            return "base"
        rel = adapter[len(self.layout.run_dir):].strip("/") if adapter.startswith(self.layout.run_dir) else adapter
        return rel.replace("/", "__").replace(":", "_")

    def _uri(self, key: str) -> str:
        return self.layout.path("eval", "cache", f"{key}.parquet")

    def _table(self, key: str) -> dict:
        if key not in self.data:
            self.data[key] = {}
            if self.enabled and storage.exists(self._uri(key)):
                from mllmcl.data.parquet import read_table

                for r in read_table(self._uri(key)).to_pylist():
                    self.data[key][(r["uid"], r["max_new_tokens"])] = r["prediction"]
        return self.data[key]

    def get(self, adapter: str | None, uid: str, max_new: int) -> str | None:
        if not self.enabled:
            return None
        return self._table(self._key(adapter)).get((uid, max_new))

    def put(self, adapter: str | None, uid: str, max_new: int, prediction: str) -> None:
        if self.enabled:
            key = self._key(adapter)
            self._table(key)[(uid, max_new)] = prediction
            self.dirty.add(key)

    def flush(self) -> None:
        import pyarrow as pa

        from mllmcl.data.parquet import write_table

        for key in sorted(self.dirty):
            rows = self.data[key]
            write_table(pa.table({"uid": [u for u, _ in rows], "max_new_tokens": [m for _, m in rows],
                                  "prediction": list(rows.values())}), self._uri(key))
        self.dirty.clear()


@dataclass
class CachedPredictor:
    """The methods' view of the model worker: generation with per-row adapters, cached."""

    worker: object  # ModelWorker: a Ray actor handle, or the object itself (scaling.backend=local)
    cache: PredictionCache
    batch_size: int
    generated: int = 0
    seconds: float = 0.0

    def _call(self, name: str, *args):
        fn = getattr(self.worker, name)
        if hasattr(fn, "remote"):
            import ray

            return ray.get(fn.remote(*args))
        return fn(*args)

    def generate(self, samples: Sequence[Sample], adapters: Sequence[str | None], max_new_tokens: int,
                 questions: Sequence[str] | None = None) -> list[str]:
        out: list[str | None] = [None] * len(samples)
        todo = []
        for i, (s, a) in enumerate(zip(samples, adapters)):
            hit = self.cache.get(a, s.uid, max_new_tokens) if questions is None else None
            if hit is not None:
                out[i] = hit
                self.cache.hits += 1
            else:
                todo.append(i)
        if todo:
            t0 = time.time()
            res = self._call("generate", [sample_to_dict(samples[i]) for i in todo], [adapters[i] for i in todo],
                             max_new_tokens, self.batch_size,
                             [questions[i] for i in todo] if questions is not None else None)
            self.seconds += time.time() - t0
            self.generated += len(todo)
            for i, p in zip(todo, res):
                out[i] = p
                if questions is None:
                    self.cache.put(adapters[i], samples[i].uid, max_new_tokens, p)
                    self.cache.misses += 1
        return out  # type: ignore[return-value]


    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return self._call("embed", list(texts), self.batch_size)


@dataclass
class StreamResult:
    run_id: str
    run_dir: str
    matrix: AccuracyMatrix
    metrics: dict
    trained_stages: list[int] = field(default_factory=list)
    seconds: float = 0.0


def prepare(cfg: Config):
    """Validate data, model path, storage and method before Ray starts anything."""
    problems = []
    stream = load_configured_stream(cfg.data, progress=cfg.run.progress)
    model_path = str(resolve_checkpoint(cfg.model.path))  # builds the tiny base once, or checks the path
    method = get_method(cfg.method.name)(cfg, stream)
    if cfg.storage.root.startswith("s3://"):
        bucket = cfg.storage.root[5:].split("/", 1)[0]
        if not storage.exists(f"s3://{bucket}"):
            problems.append(f"storage.root={cfg.storage.root!r}: bucket {bucket!r} not found or not reachable")
    if problems:
        raise ConfigError(problems)
    return stream, model_path, method


def _check_resume(manifest: Manifest, cfg: Config, layout: RunLayout) -> None:
    if manifest.config_hash == config_hash(identity(cfg)):
        return
    old = yaml.safe_load(storage.read_text(layout.config))["config"] if storage.exists(layout.config) else {}
    before, now = _flatten(old), identity(cfg)
    if before:  # a setting added to the platform after the run was made: the run had its default behaviour
        defaults = identity(Config())
        before.update({k: defaults[k] for k in now if k not in before and k in defaults})
        # runs made before paths were resolved at the boundary stored them as given (relative to here)
        for key, keep in (("data.root", SYNTHETIC_DATA), ("model.path", TINY_MODEL)):
            if isinstance(before.get(key), str) and before[key] != keep:
                before[key] = absolute(before[key])
    diff = [f"{k}: run has {before.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(before) | set(now))
            if not k.startswith(RESUMABLE_CHANGES) and before.get(k) != now.get(k)]
    if not diff:
        return
    raise ConfigError([f"run {manifest.run_id!r} exists with a different config; use a new run.id or the same "
                       f"settings"] + diff)


def run_stream(cfg: Config, run_id: str, stop_after: int | None = None,
               on_stage: Callable[[int, AccuracyMatrix, dict], None] | None = None) -> StreamResult:
    """Run (or resume) the stream; ``stop_after=k`` returns after stage k completes (tests).

    ``on_stage(k, matrix, info)`` is called after every stage, completed now or earlier
    (a resumed run replays the stages it loads), with the matrix up to row k and the
    method's stage info (router accuracy, ...): a sweep reports from it.
    """

    import ray

    from mllmcl.evaluation.worker import ModelWorker
    from mllmcl.training.ray_env import forwarded_env, init_ray
    from mllmcl.training.trainer import run_training

    t_start = time.time()
    cfg = absolute_paths(cfg)  # a no-op for configs read by load_config; workers never see a relative path
    stream, model_path, method = prepare(cfg)
    layout = RunLayout(cfg.storage.root, run_id)
    manifest = Manifest.load(layout)
    if manifest is not None:
        _check_resume(manifest, cfg, layout)
        log.info("resuming run %s: %d of %d stages complete", run_id, len(manifest.stages), len(stream))
    else:
        manifest = Manifest(run_id=run_id, method=cfg.method.name, stream=stream.name, tasks=stream.task_names,
                            config_hash=config_hash(identity(cfg)))
    release = release_manifest(stream, cfg.data.checksum_images)
    release_uri = layout.path("data_release.json")
    if manifest.stages and storage.exists(release_uri):
        changes = release_changes(storage.read_json(release_uri), release)
        if changes:
            raise ConfigError([f"run {run_id!r}: the data release changed since the run started; use a new run.id "
                               f"(or restore the data)"] + changes)
    sc = cfg.scaling
    prov = provenance(cfg.to_dict(), seed=cfg.run.seed, workers=sc.num_workers,
                      effective_batch=cfg.train.batch_size, per_worker_batch=cfg.train.batch_size / sc.num_workers /
                      cfg.train.grad_accum, grad_accum=cfg.train.grad_accum, data_root=stream.root,
                      model_path=model_path)
    prov["data_release"] = {"digest": release["digest"], "manifest": "data_release.json",
                            "images": "content" if cfg.data.checksum_images else "listing"}
    storage.write_json(release_uri, release)
    storage.write_text(layout.config, yaml.safe_dump({"config": cfg.to_dict(), "provenance": prov}, sort_keys=False))

    if sc.backend == "local":
        worker = ModelWorker(model_path, cfg.model.dtype)  # in this process: its thread count is left alone
    else:
        init_ray()
        worker = ray.remote(ModelWorker).options(num_cpus=sc.eval_cpus, num_gpus=sc.eval_gpus,
                                                 runtime_env={"env_vars": forwarded_env()}).remote(
            model_path, cfg.model.dtype, sc.threads_per_worker or 0)
        ray.get(worker.ready.remote())
    cache = PredictionCache(layout, enabled=cfg.eval.cache_predictions)
    predictor = CachedPredictor(worker, cache, cfg.eval.batch_size)

    matrix = AccuracyMatrix(tasks=stream.task_names)
    oracle_rows: list[dict] = []
    stage_info: list[dict] = []
    trained: list[int] = []
    for k, task in enumerate(stream):
        stage = Stage(k, stream, layout, cfg)
        done = manifest.stage(k)
        if done is not None:
            matrix.add_row(done["scores"])
            oracle_rows.append(done.get("oracle") or {})
            stage_info.append(done.get("info") or {})
            method.load_state_dict(done.get("method_state") or {})
            if on_stage is not None:
                on_stage(k, matrix, stage_info[-1])
            continue
        t0 = time.time()
        log.info("stage %d/%d: %s (%s)", k + 1, len(stream), task.name, cfg.method.name)
        train_log = []
        for req in method.plan(stage):
            if adapter_exists(req.output_uri):
                log.info("  %s adapter for %s already in storage; not retrained", req.kind, task.name)
                train_log.append({"kind": req.kind, "reused": True})
                continue
            ckpts = layout.path("tasks", f"{k}_{task.name}", f"checkpoints_{req.kind}")
            out = run_training(req, cfg, model_path, ckpts)
            train_log.append({"kind": req.kind, "steps": out.steps, "loss": out.final_loss,
                              "seconds": round(out.seconds, 1), "samples": len(req.samples)})
            trained.append(k)
        method.finish(stage, predictor)
        t_eval = time.time()
        answers = method.answer(stage, predictor)
        scores, oracle = {}, {}
        for j, seen in enumerate(stage.seen):
            experts = [relative_adapter(a, layout.run_dir) for a in answers.experts[seen.name]]
            ev = score_predictions(seen.spec, seen.test, answers.predictions[seen.name], stage=k, experts=experts)
            write_predictions(ev.rows, layout.predictions(k, seen.name))
            scores[seen.name] = ev.accuracy
            if answers.oracle is not None:
                oracle[seen.name] = score_predictions(seen.spec, seen.test, answers.oracle[seen.name]).accuracy
        cache.flush()
        matrix.add_row(scores)
        oracle_rows.append(oracle)
        stage_info.append(answers.info)
        manifest.complete_stage({"k": k, "task": task.name, "scores": scores, "oracle": oracle, "info": answers.info,
                                 "train": train_log, "method_state": method.state_dict(),
                                 "seconds": round(time.time() - t0, 1), "eval_seconds": round(time.time() - t_eval, 1)})
        manifest.save(layout)  # last: the stage is complete once this is written
        log.info("stage %d %s done in %.0fs: %s", k + 1, task.name, time.time() - t0,
                 ", ".join(f"{n} {v:.1f}" for n, v in scores.items()))
        if on_stage is not None:
            on_stage(k, matrix, answers.info)
        if stop_after is not None and k >= stop_after:
            return StreamResult(run_id, layout.run_dir, matrix, {}, trained, time.time() - t_start)

    metrics = _metrics(cfg, stream.task_names, matrix, oracle_rows, stage_info, predictor)
    storage.write_json(layout.accuracy_matrix, matrix.to_dict())
    storage.write_json(layout.metrics, metrics)
    storage.write_bytes(layout.heatmap, heatmap_png(matrix, title=f"{stream.name.upper()} · {cfg.method.name}"))
    headline = {k: metrics[k] for k in ("MFT", "MFN", "MAA", "BWT", "forgetting")}
    if "router_accuracy" in metrics:
        headline["router accuracy (final stage)"] = metrics["router_accuracy"]
        headline["oracle routing (final stage)"] = metrics["oracle_final"]
    storage.write_text(layout.report_html, render_report(
        f"{stream.name.upper()} · {cfg.method.name} · {run_id}", matrix, headline,
        {k: v for k, v in prov.items() if k != "libraries"}))
    manifest.status = "complete"
    manifest.save(layout)
    return StreamResult(run_id, layout.run_dir, matrix, metrics, trained, time.time() - t_start)


def _metrics(cfg: Config, tasks: list[str], matrix: AccuracyMatrix, oracle_rows: list[dict], info: list[dict],
             predictor: CachedPredictor) -> dict:
    m = {"method": cfg.method.name, "stream": cfg.data.stream, "tasks": tasks, **matrix.metrics(),
         "final": dict(zip(tasks, matrix.rows[-1])), "accuracy_matrix": matrix.to_dict(),
         "eval_generated": predictor.generated, "eval_cache_hits": predictor.cache.hits}
    if any("router_accuracy" in i for i in info):
        m["router_accuracy_per_stage"] = [i.get("router_accuracy") for i in info]
        m["router_accuracy"] = info[-1].get("router_accuracy")
        m["router_fallbacks_per_stage"] = [i.get("router_fallbacks") for i in info]
        m["oracle_per_stage"] = oracle_rows
        last = oracle_rows[-1]
        m["oracle_final"] = sum(last.values()) / len(last) if last else None
    return m
