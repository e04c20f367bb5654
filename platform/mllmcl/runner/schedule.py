"""The stream's schedule: its work as a graph of jobs, and the one scheduler that runs it.

A run is a set of **fit** jobs (one per adapter a method planned) and one **eval** job per
stage (the method's finishing step, every seen task answered and scored, the stage written
to the manifest). A job starts once every job it needs is done:

- a fit needs the fits that write what it reads (its initial adapter, earlier adapters it
  regularises against: :attr:`TrainRequest.reads`), never anything of a later stage;
- a stage's evaluation needs its own fits and the evaluation of the stage before it, so
  stages complete in order, as they would one after the other.

``run.schedule=sequential`` chains every job to the one before it (fits of stage k in the
method's order, then its evaluation, then stage k+1): one thing at a time, today's order.
``concurrent`` (the default) lets an executor run whatever is ready at once, as many as
it has room for. The scheduler itself knows nothing of Ray: the stream runner hands it an
executor that runs jobs on the cluster (or in this process), and the planner one that only
advances a clock by modelled durations (:mod:`mllmcl.planning`), so the plan and the run
follow the same decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from mllmcl.errors import MllmclError

SCHEDULES = ("concurrent", "sequential")


@dataclass
class Job:
    id: str  # fit:<k>:<kind>:<n> | eval:<k>
    lane: str  # fit | eval
    stage: int
    needs: tuple[str, ...] = ()
    payload: Any = None  # a fit's TrainRequest; an evaluation's stage number
    started: float | None = None  # the executor's clock
    ended: float | None = None


@dataclass
class StageWork:
    """What stage k still has to do: the fits to run (already-written adapters left out) and
    whether its evaluation is still to come (False: the stage is complete in the manifest)."""

    k: int
    fits: Sequence[Any] = ()  # TrainRequest: .output_uri, .reads, .kind
    evaluate: bool = True


@dataclass
class Finished:
    job_id: str
    result: Any = None
    error: BaseException | None = None


class Executor(Protocol):
    """Runs jobs for the scheduler. ``can_start`` says whether a job of ``lane`` may start with
    ``running`` jobs per lane in flight; ``start`` begins it (or runs it to the end, in this
    process); ``wait`` returns the next job that ended; ``clock`` is the time it keeps."""

    def can_start(self, job: Job, running: dict[str, int]) -> bool: ...

    def start(self, job: Job) -> None: ...

    def wait(self) -> Finished: ...

    def clock(self) -> float: ...


def build_graph(work: Sequence[StageWork], schedule: str = "concurrent",
                exists: Callable[[str], bool] = lambda uri: False) -> list[Job]:
    """The jobs of ``work`` (stages in order) with what each needs, in priority order. A fit that
    reads what no earlier fit writes and ``exists`` does not find, or what a later stage writes
    (look-ahead), is refused with every such read named."""
    if schedule not in SCHEDULES:
        raise MllmclError(f"run.schedule={schedule!r}: expected concurrent or sequential")
    later = {req.output_uri: w.k for w in work for req in w.fits}
    jobs: list[Job] = []
    writer: dict[str, str] = {}  # output URI -> the fit job writing it (this stage or earlier)
    problems: list[str] = []
    previous_eval: str | None = None
    for w in work:
        fit_ids = []
        for n, req in enumerate(w.fits):
            needs = []
            for uri in getattr(req, "reads", ()):
                if uri in writer:
                    needs.append(writer[uri])
                elif uri in later:
                    problems.append(f"stage {w.k}'s {req.kind} fit reads {uri}, written at the later stage {later[uri]}")
                elif not exists(uri):
                    problems.append(f"stage {w.k}'s {req.kind} fit reads {uri}, which nothing writes")
            job = Job(f"fit:{w.k}:{req.kind}:{n}", "fit", w.k, tuple(needs), req)
            writer[req.output_uri] = job.id
            jobs.append(job)
            fit_ids.append(job.id)
        if w.evaluate:
            needs = fit_ids + ([previous_eval] if previous_eval else [])
            jobs.append(Job(f"eval:{w.k}", "eval", w.k, tuple(needs), w.k))
            previous_eval = jobs[-1].id
    if problems:
        raise MllmclError("the schedule cannot be built:\n  " + "\n  ".join(problems))
    if schedule == "sequential":
        for before, job in zip(jobs, jobs[1:]):
            if before.id not in job.needs:
                job.needs = (*job.needs, before.id)
    return jobs


@dataclass
class ScheduleResult:
    jobs: list[Job]
    results: dict[str, Any] = field(default_factory=dict)
    stopped: bool = False  # ``on_done`` asked to stop (or a job could not start): not every job ran


def run_schedule(jobs: Sequence[Job], executor: Executor,
                 on_done: Callable[[Job, Any], bool] | None = None) -> ScheduleResult:
    """Run ``jobs``: start, in priority order, every job whose needs are done and that the
    executor has room for; when one ends, call ``on_done(job, result)``. True means the driver
    stops there: nothing new starts, the running jobs end (their ``on_done`` is still called, so
    their work is recorded) and the schedule returns. A job that fails stops new starts too; the
    running ones end (their work is kept) and its error is raised."""
    pending = list(jobs)
    running: dict[str, Job] = {}
    out = ScheduleResult(list(jobs))
    failure: BaseException | None = None
    stopping = False
    while pending or running:
        if failure is None and not stopping:
            for job in list(pending):
                lanes = _lanes(running)
                if all(n in out.results for n in job.needs) and executor.can_start(job, lanes):
                    pending.remove(job)
                    running[job.id] = job
                    job.started = executor.clock()
                    executor.start(job)
        if not running:
            if pending and failure is None and not stopping:
                raise MllmclError(f"the schedule cannot go on: {', '.join(j.id for j in pending)} wait for jobs "
                                  f"that never run")
            break
        fin = executor.wait()
        job = running.pop(fin.job_id)
        job.ended = executor.clock()
        if fin.error is not None:
            failure = failure or fin.error
            continue
        out.results[job.id] = fin.result
        if on_done is not None and on_done(job, fin.result):
            stopping = True
    if failure is not None:
        raise failure
    out.stopped = stopping or bool(pending)
    return out


def _lanes(running: dict[str, Job]) -> dict[str, int]:
    lanes: dict[str, int] = {}
    for job in running.values():
        lanes[job.lane] = lanes.get(job.lane, 0) + 1
    return lanes
