"""Executors of the stream's schedule (:mod:`mllmcl.runner.schedule`) for a real run.

- :class:`InlineExecutor`: each job runs to its end in this process when it starts, one at a
  time (``run.schedule=sequential``, and the local backend).
- :class:`ThreadedExecutor`: each job runs in a thread of this process, up to a number per
  lane; a fit's thread only waits for its Ray Train run on the cluster, an evaluation's
  thread drives the evaluation replicas. What the cluster cannot place is not started.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

from mllmcl.runner.schedule import Finished, Job


class InlineExecutor:
    def __init__(self, run: Callable[[Job], Any]):
        self.run = run
        self.done: list[Finished] = []

    def can_start(self, job: Job, running: dict[str, int]) -> bool:
        return not running

    def start(self, job: Job) -> None:
        try:
            self.done.append(Finished(job.id, self.run(job)))
        except Exception as e:  # noqa: BLE001  (the scheduler raises it once the running jobs end)
            self.done.append(Finished(job.id, error=e))

    def wait(self) -> Finished:
        return self.done.pop(0)

    def clock(self) -> float:
        return time.time()


class ThreadedExecutor:
    """``exclusive``: one job at a time, in the schedule's order (a node whose every core a fit
    uses: an evaluation beside it would only slow both down)."""

    def __init__(self, run: Callable[[Job], Any], slots: dict[str, int], exclusive: bool = False):
        self.run = run
        self.slots = slots  # lane -> jobs at once
        self.exclusive = exclusive
        self.events: queue.Queue[Finished] = queue.Queue()

    def can_start(self, job: Job, running: dict[str, int]) -> bool:
        if self.exclusive and any(running.values()):
            return False
        return running.get(job.lane, 0) < self.slots.get(job.lane, 1)

    def start(self, job: Job) -> None:
        def work():
            try:
                self.events.put(Finished(job.id, self.run(job)))
            except BaseException as e:  # noqa: BLE001  (handed to the scheduler in the driver's thread)
                self.events.put(Finished(job.id, error=e))

        threading.Thread(target=work, name=job.id, daemon=True).start()

    def wait(self) -> Finished:
        while True:  # short waits: Ctrl-C reaches the driver's thread at once
            try:
                return self.events.get(timeout=0.5)
            except queue.Empty:
                continue

    def clock(self) -> float:
        return time.time()


def fit_slots(scaling, ray_resources: dict[str, float], node_cpus: float | None = None) -> int:
    """How many fits the cluster can place at once (each ``num_workers`` × the worker's resources,
    beside the evaluation replicas), capped by ``scaling.max_concurrent_fits``; at least one.

    A CPU fit counts the cores its workers use, not only those it requests: with
    ``threads_per_worker=0`` a node's workers share all of its cores (``node_cpus``), so such a
    fit takes a whole node, and two of them on one node would only slow each other down."""
    sc = scaling
    limits = [sc.max_concurrent_fits] if sc.max_concurrent_fits else []
    cpus = sc.num_workers * max(sc.cpus_per_worker, sc.threads_per_worker)
    if not sc.use_gpu and not sc.threads_per_worker and node_cpus:
        cpus = max(cpus, node_cpus)
    if cpus:
        limits.append(int((ray_resources.get("CPU", 0) - sc.eval_cpus * sc.eval_replicas) // cpus))
    if sc.use_gpu:
        gpus = sc.num_workers * (sc.gpus_per_worker or 1.0)
        limits.append(int((ray_resources.get("GPU", 0) - sc.eval_gpus * sc.eval_replicas) // gpus))
    return max(1, min(limits)) if limits else 1_000  # nothing requested: nothing limits them


def one_at_a_time(scaling, nodes: int) -> bool:
    """A single CPU node whose fits use every core (``threads_per_worker=0``): nothing can run
    beside a fit without slowing it (measured on 2 cores: 1.19x the sequential wall time), so
    the concurrent schedule runs one job at a time there, in its order."""
    return not scaling.use_gpu and not scaling.threads_per_worker and nodes == 1
