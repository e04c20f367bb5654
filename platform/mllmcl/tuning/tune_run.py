"""A Ray Tune sweep over a whole CL stream.

Each trial is a function that runs the stream through the same stream runner as
``jobs/domain_stream.py`` (Ray Train inside the trial) under its own run id, and reports
after **every task** with the task index as the time attribute (``task``), so ASHA can
stop poor configurations after early tasks. Trials hold no CPU themselves (their Ray
Train workers and evaluation actor ask for their own), which keeps two concurrent trials
from deadlocking on a 2-core machine. A trial reports a tiny Tune checkpoint (the last
task reported) with every result; an interrupted sweep is restored with
``Tuner.restore``: finished trials are kept, and an unfinished trial's stream resumes
from its last completed task (its run in storage), reporting only the tasks Tune has
not seen.

Everything goes under ``<storage>/sweeps/<name>/``: ``tune/`` (Tune's experiment state),
``runs/<trial_id>/`` (each trial's stream run, the usual layout), and the results:
``results.json`` / ``results.csv`` (one row per trial: config, every metric, stop
reason), ``table.md`` (the completed trials' runs as jobs/compare.py tabulates them: a
``data.order`` grid gives mean ± std over the orders), ``best.yaml`` (a ready-to-run preset),
``objective_by_task.png`` and, for a multi-objective search, the Pareto set in ``results.json``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

from mllmcl import storage
from mllmcl.tuning.spec import SweepSpec

log = logging.getLogger(__name__)
TIME_ATTR = "task"


# --------------------------------------------------------------------------- the trial

def stage_metrics(spec: SweepSpec, k: int, matrix, info: dict) -> dict:
    """What a trial reports after task k (1-based ``task``): the stream's metrics so far + objective."""
    m = {key: float(v) for key, v in matrix.metrics_so_far().items()}
    if info.get("router_accuracy") is not None:
        m["router_accuracy"] = float(info["router_accuracy"])
    m[TIME_ATTR] = k + 1
    m["objective"] = spec.objective.value(m)
    return m


def stream_trial(config: dict, spec_data: dict, env: dict | None = None, parent_run_id: str = "") -> None:
    """Tune trial: run the stream with this trial's config, report after every task.

    ``env``: the driver's forwarded environment (cache location, S3 endpoint and
    credentials), which a trial started on an existing cluster does not inherit.
    ``parent_run_id``: the sweep's MLflow run; the trial's run is nested under it, created by
    Ray Tune's ``setup_mlflow`` (which logs the sampled values as the run's parameters), and
    the stream's tracker logs the rest into it.
    """
    from ray import tune

    from mllmcl.runner.stream import run_stream

    os.environ.update(env or {})
    spec = spec_from_dict(spec_data)
    trial_id = tune.get_context().get_trial_id()
    extra = [f"storage.root={spec.sweep_root()}", f"run.id={trial_id}", "run.progress=false"]
    if parent_run_id:
        extra += [f"tracking.parent_run_id={parent_run_id}", f"tracking.run_name={trial_id}"]
        if not storage.exists(storage.join(spec.sweep_root(), "runs", trial_id, "tracking.json")):
            from ray.air.integrations.mlflow import setup_mlflow

            from mllmcl.tracking.tracker import experiment_name

            base = spec.base_config()
            mlflow = setup_mlflow(config, tracking_uri=base.tracking.mlflow_uri, run_name=trial_id,
                                  experiment_name=experiment_name(base.tracking, base.data.stream),
                                  create_experiment_if_not_exists=True,
                                  tags={"mlflow.parentRunId": parent_run_id, "mllmcl.trial_id": trial_id})
            extra.append(f"tracking.run_id={mlflow.active_run().info.run_id}")
    cfg = spec.config_for(config, extra)
    reported = 0
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            reported = json.loads(open(os.path.join(d, "progress.json")).read())["task"]

    def report(k: int, matrix, info: dict) -> None:
        metrics = stage_metrics(spec, k, matrix, info)
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "progress.json"), "w") as f:
                json.dump({"task": k + 1}, f)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    last: dict = {}

    def on_stage(k: int, matrix, info: dict) -> None:
        if k + 1 <= reported:  # Tune has this task's result already (restored trial)
            return
        if k + 1 == len(matrix.tasks):  # reported after the run has written its final artifacts: the
            last.update(k=k, matrix=matrix, info=info)  # scheduler may end the trial at its last report
            return
        report(k, matrix, info)

    run_stream(cfg, trial_id, on_stage=on_stage)
    if last:
        report(last["k"], last["matrix"], last["info"])


def spec_to_dict(spec: SweepSpec) -> dict:
    return asdict(spec)


def spec_from_dict(d: dict) -> SweepSpec:
    from mllmcl.tuning.spec import Objective, Param, SchedulerSpec, SearchSpec

    d = dict(d)
    d["overrides"] = tuple(d["overrides"])
    d["space"] = tuple(Param(p["key"], p["kind"], tuple(p["values"])) for p in d["space"])
    d["objective"] = Objective(**d["objective"])
    d["scheduler"] = SchedulerSpec(**d["scheduler"])
    s = dict(d["search"])
    s["metrics"], s["modes"] = tuple(s["metrics"]), tuple(s["modes"])
    d["search"] = SearchSpec(**s)
    return SweepSpec(**d)


# --------------------------------------------------------------------------- the sweep

@dataclass
class SweepResult:
    root: str
    rows: list[dict]
    best: dict | None
    pareto: list[str]
    task_trainings: int
    task_trainings_without_stopping: int


def _tune_storage(root: str):
    """(storage_path, storage_filesystem) for Tune's RunConfig."""
    if storage.is_remote(root):
        fs, path = storage.filesystem_for(root)
        return path, fs
    return os.path.abspath(root), None


def _searcher(spec: SweepSpec):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if spec.search.type == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        if spec.search.multi_objective:
            return OptunaSearch(metric=list(spec.search.metrics), mode=list(spec.search.modes),
                                sampler=optuna.samplers.NSGAIISampler(seed=spec.search.seed))
        return OptunaSearch(metric="objective", mode=spec.objective.mode,
                            sampler=optuna.samplers.TPESampler(seed=spec.search.seed))
    return BasicVariantGenerator(random_state=spec.search.seed, max_concurrent=spec.max_concurrent)


def _scheduler(spec: SweepSpec, n_tasks: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler.type == "asha":
        return ASHAScheduler(time_attr=TIME_ATTR, max_t=n_tasks, grace_period=spec.scheduler.grace_period,
                             reduction_factor=spec.scheduler.reduction_factor)
    return FIFOScheduler()


def run_sweep(spec: SweepSpec, resume: bool = True) -> SweepResult:
    """Run the sweep (or restore an interrupted one under the same storage and name)."""
    from ray import tune

    from mllmcl.cluster import forwarded_env, init_ray
    from mllmcl.runner.stream import prepare

    base = spec.base_config()
    prepare(base)  # data, model and storage checked (and the tiny base built) before any trial
    root = spec.sweep_root()
    tracker = None
    if base.tracking.mlflow_uri:  # the sweep's parent run (a server that cannot be reached: an error now)
        from mllmcl.tracking.tracker import SweepTracker

        tracker = SweepTracker(base.tracking, root, spec.name, base.data.stream, spec_to_dict(spec))
    init_ray()
    n_tasks = spec.n_tasks()
    storage_path, fs = _tune_storage(root)
    resources = {"CPU": spec.trial_cpus, "memory": int(spec.trial_memory_gb * 2**30)}
    trainable = tune.with_resources(tune.with_parameters(stream_trial, spec_data=spec_to_dict(spec),
                                                         env=forwarded_env(),
                                                         parent_run_id=tracker.run_id if tracker else ""), resources)
    experiment = f"{storage_path}/tune"  # in Tune's terms: a path on storage_filesystem (or local)
    if resume and tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        log.info("restoring sweep %s from %s", spec.name, storage.join(root, "tune"))
        tuner = tune.Tuner.restore(experiment, trainable,
                                   resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    else:
        multi = spec.search.multi_objective
        tuner = tune.Tuner(
            trainable,
            param_space={p.key: p.tune_domain() for p in spec.space},
            tune_config=tune.TuneConfig(
                metric=None if multi else "objective", mode=None if multi else spec.objective.mode,
                search_alg=_searcher(spec), scheduler=_scheduler(spec, n_tasks), num_samples=spec.num_samples,
                # the random searcher limits concurrency itself; Tune applies this to Searchers (optuna) only
                max_concurrent_trials=spec.max_concurrent if spec.search.type == "optuna" else None),
            run_config=tune.RunConfig(name="tune", storage_path=storage_path, storage_filesystem=fs,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=None),  # tiny JSON
                                      failure_config=tune.FailureConfig(max_failures=1), verbose=1),
        )
    grid = tuner.fit()
    result = write_results(spec, grid, n_tasks)
    if tracker is not None:
        best = {"best_objective": result.best["objective"]} if result.best else {}
        tracker.finish({**best, "trials": len(result.rows), "task_trainings": result.task_trainings},
                       [storage.join(root, f) for f in ("results.json", "results.csv", "table.md", "best.yaml",
                                                        "objective_by_task.png")],
                       stopped=tuple(r["trial_id"] for r in result.rows
                                     if r["stop_reason"].startswith("stopped by the scheduler")))
    return result


# --------------------------------------------------------------------------- results

def root_error(exc: BaseException) -> str:
    """``Type: message`` of the error that failed a trial, not of Ray's wrappers around it
    (a ``RayTaskError``'s first line is the task's name and PID)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {(lines[0] if lines else '')[:300]}"


def _stop_reason(result, n_tasks: int) -> str:
    if result.error is not None:
        return f"error: {root_error(result.error)}"
    task = int((result.metrics or {}).get(TIME_ATTR, 0))
    if task >= n_tasks:
        return "completed"
    return f"stopped by the scheduler after task {task}"


def _history(result) -> list[dict]:
    df = result.metrics_dataframe
    if df is None or TIME_ATTR not in df:
        return []
    df = df.drop_duplicates(subset=[TIME_ATTR], keep="last").sort_values(TIME_ATTR)
    return [{TIME_ATTR: int(r[TIME_ATTR]), "objective": float(r["objective"])} for _, r in df.iterrows()]


def pareto_front(rows: list[dict], metrics: tuple[str, ...], modes: tuple[str, ...]) -> list[str]:
    """Trial ids of the completed trials that no other completed trial dominates."""
    pts = [(r["trial_id"], [r[m] if mode == "max" else -r[m] for m, mode in zip(metrics, modes)])
           for r in rows if r["stop_reason"] == "completed" and all(r.get(m) is not None for m in metrics)]
    front = []
    for tid, p in pts:
        dominated = any(all(q_i >= p_i for q_i, p_i in zip(q, p)) and any(q_i > p_i for q_i, p_i in zip(q, p))
                        for _, q in pts)
        if not dominated:
            front.append(tid)
    return front


def trials_table(root: str, completed: list[dict]) -> str | None:
    """The paper-style table of the completed trials' runs (jobs/compare.py's): trials that differ
    only in task order (a ``data.order`` grid) are one row, mean ± std over the orders."""
    from mllmcl.evaluation.compare import compare_runs

    runs = [storage.join(root, "runs", r["trial_id"]) for r in completed]
    runs = [r for r in runs if storage.exists(storage.join(r, "metrics", "metrics.json"))]
    return compare_runs(runs) if runs else None


def write_results(spec: SweepSpec, grid, n_tasks: int) -> SweepResult:
    from mllmcl.tuning.report import objective_plot_png, results_csv
    from mllmcl.tuning.spec import best_preset

    rows = []
    for result in grid:
        metrics = result.metrics or {}
        tid = metrics.get("trial_id") or (os.path.basename(result.path).split("_")[1] if result.path else "?")
        row: dict[str, Any] = {"trial_id": tid, "config": dict(result.config or {}),
                               "tasks_done": int(metrics.get(TIME_ATTR, 0)),
                               "stop_reason": _stop_reason(result, n_tasks), "history": _history(result)}
        for key in ("objective", *spec.reported_metrics):
            row[key] = metrics.get(key)
        rows.append(row)
    rows.sort(key=lambda r: r["trial_id"])
    done = [r for r in rows if r["stop_reason"] == "completed"]
    best = None
    if done:
        pick = max if spec.objective.mode == "max" else min
        best = pick(done, key=lambda r: r["objective"])
    pareto = pareto_front(rows, spec.search.metrics, spec.search.modes) if spec.search.multi_objective else []
    trainings = sum(r["tasks_done"] for r in rows)
    out = {"sweep": spec.name, "objective": {"label": spec.objective.label, **asdict(spec.objective)},
           "tasks": n_tasks, "trials": rows, "best": best, "pareto": pareto, "task_trainings": trainings,
           "task_trainings_without_stopping": n_tasks * len(rows)}
    root = spec.sweep_root()
    storage.write_json(storage.join(root, "results.json"), out)
    storage.write_text(storage.join(root, "results.csv"), results_csv(rows, spec))
    storage.write_bytes(storage.join(root, "objective_by_task.png"),
                        objective_plot_png(rows, f"{spec.name}: {spec.objective.label} by task", n_tasks))
    table = trials_table(root, [r for r in rows if r["stop_reason"] == "completed"])
    if table:
        storage.write_text(storage.join(root, "table.md"), table + "\n")
    if best is not None:
        header = (f"Best of sweep {spec.name!r} ({spec.source or 'sweep file'}): trial {best['trial_id']}, "
                  f"{spec.objective.label} = {best['objective']:.4f} ({spec.objective.mode}).\n"
                  f"Reproduce: python jobs/{'ability' if spec.base_config().data.stream == 'acl' else 'domain'}"
                  f"_stream.py --config best.yaml")
        storage.write_text(storage.join(root, "best.yaml"), best_preset(spec, best["config"], header))
    return SweepResult(root, rows, best, pareto, trainings, n_tasks * len(rows))
