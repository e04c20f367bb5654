"""The stream runner: for each task in order, the method's fine-tuning (Ray Train, or this
process with ``scaling.backend=local``), the method's finishing step, then every seen task
evaluated through the one engine (row k of the accuracy matrix), then the manifest.

A run is resumable by its id: complete stages are not redone, an adapter already
written is not retrained, and a half-finished fine-tuning resumes from its last
checkpoint. Each stage also records what would serve it (``serving`` in the manifest), so
the service reads a run without knowing its method.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import yaml

from mllmcl import storage
from mllmcl.config import Config, absolute_paths
from mllmcl.data.checksums import release_changes, release_manifest
from mllmcl.data.source import load_configured_stream
from mllmcl.errors import ConfigError
from mllmcl.evaluation.metrics import AccuracyMatrix, add_stage_record, track_matrices
from mllmcl.evaluation.predictions import score_predictions, write_predictions
from mllmcl.evaluation.scorers import TRACKS
from mllmcl.methods import get_method
from mllmcl.methods.base import NotServable, Stage, max_tokens
from mllmcl.models.adapters import adapter_exists
from mllmcl.models.loading import resolve_checkpoint
from mllmcl.provenance import config_hash, provenance
from mllmcl.runner.cache import CachedPredictor, PredictionCache
from mllmcl.runner.outputs import run_metrics, write_outputs
from mllmcl.runner.executors import InlineExecutor
from mllmcl.runner.resume import check_resume, identity
from mllmcl.runner.schedule import Job, StageWork, build_graph, run_schedule
from mllmcl.storage.layout import RunLayout, relative_adapter
from mllmcl.storage.lease import RunLease
from mllmcl.storage.manifest import Manifest, ServingRecord
from mllmcl.tracking import RunTracker, open_run_tracker
from mllmcl.tracking.tracker import fit_name

log = logging.getLogger(__name__)


@dataclass
class StreamResult:
    run_id: str
    run_dir: str
    matrix: AccuracyMatrix
    metrics: dict
    trained_stages: list[int] = field(default_factory=list)
    seconds: float = 0.0


_REPLICAS: dict[tuple, list] = {}  # this driver's evaluation replicas, by what they hold, for its next runs


def eval_replicas(model_path: str, dtype: str, sc, formats) -> list:
    """``sc.eval_replicas`` evaluation actors holding the base at ``model_path``: an earlier run's
    of this driver on this cluster when they hold the same base, dtype, threads, resources and
    adapter format (reset: no adapter or image of that run stays), else new ones."""
    import ray

    from mllmcl.cluster import forwarded_env
    from mllmcl.runner.evaluator import EvalWorker

    env = forwarded_env()
    key = (ray.get_runtime_context().get_job_id(), model_path, dtype, sc.threads_per_worker, sc.eval_cpus,
           sc.eval_gpus, tuple(getattr(f, "name", str(f)) for f in formats), tuple(sorted(env.items())))
    pool = _REPLICAS.setdefault(key, [])
    try:
        ray.get([w.reset.remote() for w in pool])
    except ray.exceptions.RayActorError:  # one died (killed, its node gone): start afresh
        pool.clear()
    actor = ray.remote(EvalWorker).options(num_cpus=sc.eval_cpus, num_gpus=sc.eval_gpus,
                                           runtime_env={"env_vars": env})
    pool.extend(actor.remote(model_path, dtype, sc.threads_per_worker or 0, formats)
                for _ in range(sc.eval_replicas - len(pool)))
    return pool[:sc.eval_replicas]


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


def serving_record(method, stage: Stage) -> dict:
    """What serves the stage, as the manifest keeps it (``refused``: why it cannot be served)."""
    try:
        return method.serving(stage).to_record(stage.layout.run_dir).to_dict()
    except NotServable as e:
        return ServingRecord(refused=str(e)).to_dict()


def run_stream(cfg: Config, run_id: str, stop_after: int | None = None,
               on_stage: Callable[[int, AccuracyMatrix, dict], None] | None = None) -> StreamResult:
    """Run (or resume) the stream; ``stop_after=k`` returns after stage k completes (tests).

    ``on_stage(k, matrix, info)`` is called after every stage, completed now or earlier
    (a resumed run replays the stages it loads), with the matrix up to row k and the
    method's stage info (router accuracy, ...): a sweep reports from it.

    One driver at a time runs a run id (:class:`~mllmcl.storage.lease.RunLease`): a second
    is refused, naming the first.
    """
    t_start = time.time()
    cfg = absolute_paths(cfg)  # a no-op for configs read by load_config; workers never see a relative path
    prepared = prepare(cfg)  # every problem of the config and data before anything is written
    with RunLease(RunLayout(cfg.storage.root, run_id), ttl_s=cfg.run.lease_seconds):
        return _run_stream(cfg, run_id, stop_after, on_stage, prepared, t_start)


def _run_stream(cfg: Config, run_id: str, stop_after: int | None,
                on_stage: Callable[[int, AccuracyMatrix, dict], None] | None, prepared,
                t_start: float) -> StreamResult:
    if cfg.scaling.backend == "ray":  # the local backend runs where Ray is not installed (bench/gpu_check.sh)
        import ray

    from mllmcl.cluster import forwarded_env, init_ray
    from mllmcl.runner.evaluator import EvalWorker
    from mllmcl.training.trainer import TrainOutcome, run_training

    stream, model_path, method = prepared
    layout = RunLayout(cfg.storage.root, run_id)
    manifest = Manifest.load(layout)
    if manifest is not None:
        check_resume(manifest, cfg, layout)
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
    finished = manifest.status == "complete" and storage.exists(layout.metrics)  # resubmitted: nothing to do
    tracker = RunTracker([])
    if not finished:
        # a tracking backend that cannot start stops the run here, before anything trains
        tracker = open_run_tracker(cfg.tracking, layout.run_dir, run_id, stream.name,
                                   tags={"mllmcl.method": cfg.method.name, "mllmcl.stream": stream.name})
        storage.write_json(release_uri, release)
        storage.write_text(layout.config, yaml.safe_dump({"config": cfg.to_dict(), "provenance": prov},
                                                         sort_keys=False))
        tracker.log_config(cfg.to_dict(), prov)
    if sc.backend == "ray" and not finished:
        init_ray()  # this job's Ray (dashboard on 127.0.0.1, no preemption watcher), before Ray Train starts one
    predictor: CachedPredictor | None = None
    replicas: list = []
    formats = [method.adapter_format] if method.adapter_format is not None else []

    def start_replicas() -> None:
        """Create the evaluation actors (they load the base while the first fits train), or take
        the ones an earlier run of this driver left, reset (a notebook's or a test session's runs)."""
        if sc.backend == "ray" and not replicas:
            replicas.extend(eval_replicas(model_path, cfg.model.dtype, sc, formats))

    def evaluation() -> CachedPredictor:
        """The evaluation replicas, started when the first stage needs them (a finished run needs none)."""
        nonlocal predictor
        if predictor is None:
            if sc.backend == "local":  # in this process: its thread count is left alone
                workers = EvalWorker(model_path, cfg.model.dtype, formats=formats)
            else:
                start_replicas()
                ray.get([w.ready.remote() for w in replicas])
                workers = list(replicas)
            predictor = CachedPredictor(workers, PredictionCache(layout, enabled=cfg.eval.cache_predictions),
                                        cfg.eval.batch_size)
        return predictor

    matrices = track_matrices(stream.task_names, TRACKS)  # one per scoring track, never mixed
    matrix = matrices["native"]  # the tasks' own rules: MLLM-CL's numbers
    add_stage = partial(add_stage_record, matrices)
    oracle_rows: list[dict] = []
    stage_info: list[dict] = []
    trained: list[int] = []
    stages: dict[int, Stage] = {}
    train_logs: dict[int, list[dict]] = {}
    states: dict[int, dict] = {}
    work: list[StageWork] = []
    plan_index: dict[int, int] = {}  # a request's place in its stage's plan: its record's name
    def log_stage(k: int, info: dict) -> None:
        tracker.log_stage(k, {t: v for t, v in zip(stream.task_names, matrix[k]) if v is not None},
                          matrix.metrics_so_far(), info)

    for k, task in enumerate(stream):
        stage = Stage(k, stream, layout, cfg)
        done = manifest.stage(k)
        if done is not None:
            if "serving" not in done:  # a run made before stages recorded it
                done["serving"] = serving_record(method, stage)
                manifest.save(layout)
            add_stage(done)
            oracle_rows.append(done.get("oracle") or {})
            stage_info.append(done.get("info") or {})
            log_stage(k, stage_info[-1])  # a stage done before tracking was on (or before a crash) is logged once
            method.load_state_dict(done.get("method_state") or {})
            if on_stage is not None:
                on_stage(k, matrix, stage_info[-1])
            continue
        stages[k] = stage
        train_logs[k], fits = [], []
        for n, req in enumerate(method.plan(stage)):  # every stage is planned up front: it reads stages <= k
            if adapter_exists(req.output_uri):  # written by an earlier driver: its record, if it kept one
                record = layout.path("fits", f"{k}_{req.kind}_{n}.json")
                kept = storage.read_json(record) if storage.exists(record) else {"kind": req.kind}
                train_logs[k].append({**kept, "reused": True})
                stage.trained[req.output_uri] = train_logs[k][-1]
            else:
                fits.append((n, req))
        states[k] = method.state_dict()  # the method's state once stage k is planned
        work.append(StageWork(k, [req for _, req in fits]))
        plan_index.update({id(req): n for n, req in fits})

    def fit(req) -> TrainOutcome:
        ckpts = layout.path("tasks", f"{req.stage}_{req.task}", f"checkpoints_{req.kind}")
        # a Ray Train run on the cluster; under the concurrent schedule this thread of the driver only
        # waits for it (Ray Train's controller is an actor; its Ctrl-C handler is the main thread's)
        return run_training(req, model_path, ckpts, scaling=sc, dtype=cfg.model.dtype,
                            mixed_precision=cfg.train.mixed_precision,
                            gradient_checkpointing=cfg.train.gradient_checkpointing,
                            history_uri=history_uri(req))

    def history_uri(req) -> str:
        return layout.path("fits", f"{req.stage}_{req.kind}_{plan_index[id(req)]}.steps.json")

    def evaluate(k: int) -> dict:
        stage, task = stages[k], stream.tasks[k]
        predictor = evaluation()
        t_eval, shards = time.time(), len(predictor.shards)
        method.finish(stage, predictor)
        if cfg.eval.forward_transfer and k + 1 < len(stream):
            stage.probe = stream.tasks[k + 1]  # answered, never trained on: forward transfer
        answers = method.answer(stage, predictor)
        scores, tracks, oracle = {}, {t: {} for t in TRACKS if t != "native"}, {}
        for j, seen in enumerate(stage.seen):
            experts = [relative_adapter(a, layout.run_dir) for a in answers.experts[seen.name]]
            ev = score_predictions(seen.spec, seen.test, answers.predictions[seen.name], stage=k, experts=experts)
            write_predictions(ev.rows, layout.predictions(k, seen.name))
            scores[seen.name] = ev.accuracy
            for t, v in ev.tracks().items():
                if t != "native":
                    tracks[t][seen.name] = v
            if answers.oracle is not None:
                oracle[seen.name] = score_predictions(seen.spec, seen.test, answers.oracle[seen.name]).accuracy
        forward, zero_shot = forward_scores(stage, answers, predictor, k == 0)
        predictor.cache.flush()
        t_end = time.time()
        begun = min([t_eval] + [t["started"] for t in train_logs[k] if "started" in t])
        manifest.complete_stage({"k": k, "task": task.name, "scores": scores, "tracks": tracks, "forward": forward,
                                 "zero_shot": zero_shot, "oracle": oracle, "info": answers.info,
                                 "train": train_logs[k], "method_state": states[k],
                                 "serving": serving_record(method, stage), "seconds": round(t_end - begun, 1),
                                 "eval_seconds": round(t_end - t_eval, 1), "eval_started": round(t_eval, 3),
                                 "eval_ended": round(t_end, 3), "eval_shards": predictor.shards[shards:]})
        manifest.save(layout)  # last: the stage is complete once this is written
        log.info("stage %d %s done in %.0fs: %s", k + 1, task.name, t_end - begun,
                 ", ".join(f"{n} {v:.1f}" for n, v in scores.items()))
        return {"scores": scores, "tracks": tracks, "forward": forward, "zero_shot": zero_shot, "oracle": oracle,
                "info": answers.info}

    def forward_scores(stage: Stage, answers, predictor, first: bool) -> tuple[dict, dict]:
        """The probe's scores (every track) and the base model's on the probe (and, at stage 0, on
        task 0), their predictions written to ``eval/forward`` and ``eval/zero_shot``."""
        forward, zero_shot = {}, {}
        probe = stage.probe
        if probe is not None and probe.name in answers.predictions:
            experts = [relative_adapter(a, layout.run_dir) for a in answers.experts[probe.name]]
            ev = score_predictions(probe.spec, probe.test, answers.predictions[probe.name], stage=stage.k,
                                   experts=experts)
            write_predictions(ev.rows, layout.predictions("forward", probe.name))
            forward = {"task": probe.name, **ev.tracks()}
        if cfg.eval.forward_transfer:
            for task in ([stage.task] if first else []) + ([probe] if probe is not None else []):
                preds = predictor.generate(task.test, [None] * len(task.test), max_tokens(stage, task))
                ev = score_predictions(task.spec, task.test, preds, stage=-1, experts=["base"] * len(task.test))
                write_predictions(ev.rows, layout.predictions("zero_shot", task.name))
                zero_shot[task.name] = ev.tracks()
        return forward, zero_shot

    def run_job(job: Job):
        if job.lane == "fit":
            req = job.payload
            log.info("stage %d/%d: %s %s fit (%s)", req.stage + 1, len(stream), req.task, req.kind, cfg.method.name)
            return fit(job.payload)
        return evaluate(job.payload)

    def on_done(job: Job, result) -> bool:
        if job.lane == "fit":
            req = job.payload
            entry = {"kind": req.kind, "steps": result.steps, "loss": result.final_loss,
                     "seconds": round(result.seconds, 1), "samples": len(req.samples),
                     "loop_seconds": None if result.loop_seconds is None else round(result.loop_seconds, 1),
                     "started": round(job.started, 3), "ended": round(job.ended, 3)}
            train_logs[req.stage].append(entry)
            stages[req.stage].trained[req.output_uri] = entry
            # kept beside the run, so a later driver that finds the adapter keeps when it was trained
            storage.write_json(layout.path("fits", f"{req.stage}_{req.kind}_{plan_index[id(req)]}.json"), entry)
            trained.append(req.stage)
            if tracker.enabled and storage.exists(history_uri(req)):
                tracker.log_fit(fit_name(req.stage, req.task, req.kind, plan_index[id(req)]),
                                storage.read_json(history_uri(req)))
            return False
        add_stage(result)
        oracle_rows.append(result["oracle"])
        stage_info.append(result["info"])
        log_stage(job.payload, result["info"])
        if on_stage is not None:
            on_stage(job.payload, matrix, result["info"])
        return stop_after is not None and job.payload >= stop_after

    concurrent = sc.backend == "ray" and cfg.run.schedule == "concurrent"
    jobs = build_graph(work, cfg.run.schedule, exists=adapter_exists)
    if concurrent:
        from mllmcl.runner.executors import ThreadedExecutor, fit_slots, one_at_a_time

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        node_cpus = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
        slots = fit_slots(sc, ray.cluster_resources(), node_cpus)
        exclusive = one_at_a_time(sc, len(nodes))
        log.info("schedule: concurrent (up to %d fits at once, %d evaluation replica(s)%s)", slots, sc.eval_replicas,
                 "; one job at a time: each fit uses every core of this node (scaling.threads_per_worker shares "
                 "them)" if exclusive else "")
        executor = ThreadedExecutor(run_job, {"fit": slots, "eval": 1}, exclusive)
        if any(job.lane == "eval" for job in jobs):
            # they load the base while the first fit starts (also when jobs then run one at a time: a
            # replica that loads at the first evaluation keeps the stream waiting for it, 8 s on 2 cores)
            start_replicas()
    else:
        executor = InlineExecutor(run_job)
    try:
        stopped = run_schedule(jobs, executor, on_done).stopped
    except BaseException:
        tracker.end("failed")  # a driver killed outright leaves its MLflow run RUNNING; a resubmit continues it
        raise
    if stopped:
        tracker.end("stopped")
        return StreamResult(run_id, layout.run_dir, matrix, {}, sorted(set(trained)), time.time() - t_start)

    if finished and predictor is None:  # every stage was done before: its outputs stand as written
        return StreamResult(run_id, layout.run_dir, matrix, storage.read_json(layout.metrics), [],
                            time.time() - t_start)
    metrics = run_metrics(cfg, stream.task_names, matrix, oracle_rows, stage_info,
                          tracks={t: m for t, m in matrices.items() if t != "native"}, generated=predictor.generated if predictor else 0,
                          cache_hits=predictor.cache.hits if predictor else 0)
    write_outputs(layout, cfg, stream.name, run_id, matrix, metrics, prov)
    manifest.status = "complete"
    manifest.save(layout)
    tracker.log_final(metrics, [layout.heatmap, layout.report_html, layout.path("report", "router_confusion.png"),
                                layout.accuracy_matrix, layout.metrics], step=len(stream) - 1)
    tracker.end("complete")
    return StreamResult(run_id, layout.run_dir, matrix, metrics, sorted(set(trained)), time.time() - t_start)
