"""Several runs side by side, as in the paper's tables (per-task final accuracy, MFT, MFN, MAA,
BWT, FWT, router accuracy), on any scoring track.

Runs that differ only in their task order (``data.order``; also in run id, storage and the
settings that never change results) are one experiment: its row is the mean ± sample standard
deviation over its runs, task by task by name (the accuracy matrix is keyed by task name).
"""

from __future__ import annotations

import html
import json
import statistics
from dataclasses import dataclass
from typing import Sequence

import yaml

from mllmcl import storage
from mllmcl.errors import ConfigError
from mllmcl.paths import absolute
from mllmcl.settings import RESUMABLE_CHANGES, flatten

METRICS = ("MFT", "MFN", "MAA", "BWT", "FWT")
TRACKS = ("native", "exact", "f1")
NOT_THE_EXPERIMENT = (*RESUMABLE_CHANGES, "run.id", "data.order")  # what may differ inside one group


def load_run_metrics(run_dir: str) -> dict:
    path = storage.join(run_dir, "metrics", "metrics.json")
    if not storage.exists(path):
        raise FileNotFoundError(f"{run_dir}: no metrics/metrics.json (is the run complete?)")
    return storage.read_json(path)


def _config(run_dir: str) -> dict:
    uri = storage.join(run_dir, "config.yaml")
    return (yaml.safe_load(storage.read_text(uri)) or {}).get("config", {}) if storage.exists(uri) else {}


def experiment_key(config: dict) -> str:
    """What a run computes, but for its task order: runs with the same key form one group."""
    return json.dumps({k: v for k, v in flatten(config).items() if not k.startswith(NOT_THE_EXPERIMENT)},
                      sort_keys=True, default=str)


@dataclass
class RunResult:
    run_dir: str
    metrics: dict  # the track's: MFT ... FWT, final, accuracy_matrix
    method: str
    order: object
    key: str


def _on_track(m: dict, track: str, run_dir: str) -> dict:
    if track == "native":
        return m
    tracks = m.get("tracks") or {}
    if track not in tracks:
        raise ConfigError([f"{run_dir}: no {track!r} track in its metrics (scored before the tracks existed)"])
    t = tracks[track]
    rows = t["accuracy_matrix"]["rows"]
    return {**t, "final": dict(zip(t["accuracy_matrix"]["tasks"], rows[-1])), "tasks": m["tasks"],
            "router_accuracy": m.get("router_accuracy")}


def load_results(runs: Sequence[str], track: str = "native") -> list[RunResult]:
    """Every run's metrics on ``track``; every missing or unfinished run reported at once."""
    if track not in TRACKS:
        raise ConfigError([f"--track {track!r}: expected one of {', '.join(TRACKS)}"])
    out, problems = [], []
    for run in runs:
        run_dir = absolute(str(run))
        try:
            m = load_run_metrics(run_dir)
            cfg = _config(run_dir)
            out.append(RunResult(run_dir, _on_track(m, track, run_dir), m["method"], m.get("order", "paper"),
                                 experiment_key(cfg) if cfg else run_dir))
        except (FileNotFoundError, ConfigError) as e:
            problems += e.problems if isinstance(e, ConfigError) else [str(e)]
    if problems:
        raise ConfigError(problems)
    return out


def groups(results: Sequence[RunResult]) -> list[list[RunResult]]:
    """Runs grouped by experiment (everything but the task order), in order of first appearance."""
    by_key: dict[str, list[RunResult]] = {}
    for r in results:
        by_key.setdefault(r.key, []).append(r)
    return list(by_key.values())


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None where a value is missing; std None for one value)."""
    if not values or any(v is None for v in values):
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _tasks(results: Sequence[RunResult]) -> list[str]:
    tasks: list[str] = []
    for r in results:
        for t in r.metrics["tasks"]:
            if t not in tasks:
                tasks.append(t)
    return tasks


def comparison_rows(metrics: Sequence[dict], labels: Sequence[str] | None = None) -> tuple[list[str], list[list]]:
    """One row per run (no grouping): label, final accuracy per task, the metrics, router accuracy."""
    tasks: list[str] = []
    for m in metrics:
        tasks += [t for t in m["tasks"] if t not in tasks]
    header = ["method", *tasks, *METRICS, "router"]
    rows = []
    for i, m in enumerate(metrics):
        final = m.get("final", {})
        rows.append([labels[i] if labels else m["method"], *[final.get(t) for t in tasks],
                     *[m.get(k) for k in METRICS], m.get("router_accuracy")])
    return header, rows


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, tuple):
        mean, std = v
        return "–" if mean is None else (f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}")
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def grouped_rows(results: Sequence[RunResult], labels: Sequence[str] | None = None) -> tuple[list[str], list[list]]:
    """One row per experiment: mean ± std over its runs (orders) of every column."""
    tasks = _tasks(results)
    header = ["method", "orders", *tasks, *METRICS, "router"]
    rows = []
    for i, group in enumerate(groups(results)):
        ms = [r.metrics for r in group]
        label = labels[i] if labels else group[0].method
        cols = [mean_std([m.get("final", {}).get(t) for m in ms]) for t in tasks]
        cols += [mean_std([m.get(k) for m in ms]) for k in METRICS]
        cols.append(mean_std([m.get("router_accuracy") for m in ms]))
        rows.append([label, len(group), *cols])
    return header, rows


def _markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown_table(metrics: Sequence[dict], labels: Sequence[str] | None = None) -> str:
    return _markdown(*comparison_rows(metrics, labels))


def compare_runs(runs: Sequence[str], labels: Sequence[str] | None = None, track: str = "native") -> str:
    """The paper-style Markdown table of finished runs (folders or ``s3://`` prefixes): one row per
    run, or, where runs differ only in task order, one row per experiment with mean ± std over
    its orders. Every run that is missing or unfinished, and a label count that does not match
    the rows, reported at once."""
    results = load_results(runs, track)
    grouped = any(len(g) > 1 for g in groups(results))
    n_rows = len(groups(results)) if grouped else len(results)
    if labels is not None and len(labels) != n_rows:
        raise ConfigError([f"--labels names {len(labels)} rows for {n_rows} {'experiments' if grouped else 'runs'}"])
    if grouped:
        return _markdown(*grouped_rows(results, labels))
    return _markdown(*comparison_rows([r.metrics for r in results], labels))


def stage_means(matrix: dict) -> list[float]:
    """Mean accuracy over the seen tasks after each stage (the curve of the comparison plot)."""
    return [statistics.fmean([v for v in row[: t + 1]]) for t, row in enumerate(matrix["rows"])]


def comparison_html(runs: Sequence[str], track: str = "native") -> tuple[str, bytes]:
    """A comparison report: the table, a plot of mean accuracy over stages per experiment (mean
    over its orders), and every run's accuracy matrix grouped by experiment. (HTML, PNG)"""
    from mllmcl.evaluation.metrics import AccuracyMatrix
    from mllmcl.evaluation.plots import curves_png
    from mllmcl.evaluation.report import matrix_html

    results = load_results(runs, track)
    table = compare_runs(runs, track=track)
    curves = {}
    sections = []
    for group in groups(results):
        name = group[0].method if sum(g[0].method == group[0].method for g in groups(results)) == 1 else \
            f"{group[0].method} ({group[0].run_dir.rsplit('/', 1)[-1]})"
        per_run = [stage_means(r.metrics["accuracy_matrix"]) for r in group]
        curves[name] = [statistics.fmean(c[t] for c in per_run) for t in range(min(len(c) for c in per_run))]
        parts = []
        for r in group:
            m = AccuracyMatrix.from_dict(r.metrics["accuracy_matrix"])
            parts.append(f"<h3>{html.escape(name)} · order {html.escape(str(r.order))}: "
                         f"{html.escape(' → '.join(m.tasks))}</h3><p>{html.escape(r.run_dir)}</p>{matrix_html(m)}")
        sections.append("".join(parts))
    rows = table.splitlines()
    head = [c.strip() for c in rows[0].strip("|").split("|")]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in rows[2:]]
    table_html = ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" +
                  "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body) +
                  "</table>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mllmcl comparison</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}th{{background:#f4f4f4}}</style></head>
<body><h1>Comparison ({html.escape(track)} track)</h1>
<p>Mean ± sample standard deviation over the task orders of each experiment (runs that differ only in
<code>data.order</code>); FWT: the next task before training on it, minus the untrained base model.</p>
{table_html}
<h2>Mean accuracy over the seen tasks, after each stage</h2>
<img src="comparison.png" alt="mean accuracy over stages">
<h2>Accuracy matrices, one per run</h2>
{''.join(sections)}
</body></html>
"""
    return page, curves_png(curves)


ROUTER_HEADER = ["router", "stream", "routing acc. (final)", "MFN", "oracle MFN", "fit s (all stages)",
                 "ms / question", "GFLOPs / question"]


def router_table(runs: Sequence[str]) -> str:
    """Routed runs side by side by their router (the router zoo): final-stage routing accuracy,
    MFN with those experts (and with the oracle's routing), the router's fit seconds over all
    stages, and its inference cost per question at the final stage (measured seconds; FLOPs
    counted from the base model's size and the questions' tokens)."""
    rows, problems = [], []
    for run in runs:
        run_dir = absolute(str(run))
        try:
            m = load_run_metrics(run_dir)
        except FileNotFoundError as e:
            problems.append(str(e))
            continue
        if "router_accuracy" not in m:
            problems.append(f"{run_dir}: method {m['method']!r} has no router")
            continue
        infos = [s.get("info") or {} for s in storage.read_json(storage.join(run_dir, "manifest.json"))["stages"]]
        fits = [i.get("router_fit_seconds") for i in infos if "router_fit_seconds" in i]
        fit = None if any(f is None for f in fits) else sum(fits)
        sec = infos[-1].get("router_seconds_per_question") if infos else None
        flops = m.get("router_flops_per_question")
        rows.append([m.get("router"), m["stream"], m["router_accuracy"], m["MFN"], m.get("oracle_final"), fit,
                     None if sec is None else 1000.0 * sec, None if flops is None else flops / 1e9])
    if problems:
        raise ConfigError(problems)
    return _markdown(ROUTER_HEADER, rows)
