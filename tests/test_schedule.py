"""The stream's schedule as a graph (no Ray; timed by the planner's executor): what each job waits for, in what order the two
schedules start jobs, that stages complete in order, look-ahead refused, failures and stops."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mllmcl.errors import MllmclError
from mllmcl.planning.simulate import ModelledExecutor
from mllmcl.runner.executors import InlineExecutor, ThreadedExecutor, fit_slots
from mllmcl.runner.schedule import StageWork, build_graph, run_schedule
from mllmcl.settings import ScalingConfig


@dataclass
class Req:
    stage: int
    kind: str
    output_uri: str
    reads: tuple = ()


def mr_lora(n: int) -> list[StageWork]:  # expert k from the base; router k (k >= 1) from data only
    return [StageWork(k, [Req(k, "expert", f"e{k}")] + ([Req(k, "router", f"r{k}")] if k else [])) for k in range(n)]


def lora_ft(n: int) -> list[StageWork]:  # each stage continues from the one before
    return [StageWork(k, [Req(k, "lora", f"a{k}", (f"a{k - 1}",) if k else ())]) for k in range(n)]


def Clock(slots, durations, base=None):
    """The planner's executor (jobs take their modelled seconds): here ``durations[lane]`` each."""
    class Timed(base or ModelledExecutor):
        def start(self, job):
            self.seconds.setdefault(job.id, durations[job.lane])
            super().start(job)

    return Timed({}, slots)


def test_needs_follow_what_each_fit_reads_and_stages_complete_in_order():
    jobs = {j.id: j for j in build_graph(lora_ft(3))}
    assert jobs["fit:1:lora:0"].needs == ("fit:0:lora:0",)
    assert jobs["eval:1"].needs == ("fit:1:lora:0", "eval:0")
    independent = {j.id: j for j in build_graph(mr_lora(3))}
    assert independent["fit:2:expert:0"].needs == () and independent["fit:2:router:1"].needs == ()
    assert independent["eval:2"].needs == ("fit:2:expert:0", "fit:2:router:1", "eval:1")


def test_sequential_runs_one_job_at_a_time_in_stream_order():
    jobs = build_graph(mr_lora(3), "sequential")
    res = run_schedule(jobs, Clock({"fit": 8, "eval": 8}, {"fit": 10.0, "eval": 1.0}))
    order = sorted(res.jobs, key=lambda j: j.started)
    assert [j.id for j in order] == ["fit:0:expert:0", "eval:0", "fit:1:expert:0", "fit:1:router:1", "eval:1",
                                     "fit:2:expert:0", "fit:2:router:1", "eval:2"]
    assert all(a.ended <= b.started for a, b in zip(order, order[1:]))


def test_concurrent_runs_independent_fits_at_once_and_evaluates_beside_later_fits():
    seq = run_schedule(build_graph(mr_lora(3), "sequential"), Clock({"fit": 8, "eval": 1}, {"fit": 10.0, "eval": 1.0}))
    con = run_schedule(build_graph(mr_lora(3)), Clock({"fit": 8, "eval": 1}, {"fit": 10.0, "eval": 1.0}))
    end = lambda r: max(j.ended for j in r.jobs)  # noqa: E731
    assert end(seq) == 5 * 10 + 3 * 1 and end(con) == 10 + 3 * 1  # every fit at once, then three evaluations
    evals = sorted((j for j in con.jobs if j.lane == "eval"), key=lambda j: j.started)
    assert [j.stage for j in evals] == [0, 1, 2] and all(a.ended <= b.started for a, b in zip(evals, evals[1:]))
    chained = run_schedule(build_graph(lora_ft(3)), Clock({"fit": 8, "eval": 1}, {"fit": 10.0, "eval": 4.0}))
    jobs = {j.id: j for j in chained.jobs}
    assert jobs["eval:0"].started < jobs["fit:1:lora:0"].ended  # stage 0 is evaluated while stage 1 trains
    assert jobs["fit:1:lora:0"].started >= jobs["fit:0:lora:0"].ended  # but stage 1 waits for its initial adapter
    limited = run_schedule(build_graph(mr_lora(3)), Clock({"fit": 2, "eval": 1}, {"fit": 10.0, "eval": 1.0}))
    assert max(sum(j.started <= t < j.ended for j in limited.jobs if j.lane == "fit") for t in range(40)) == 2


def test_look_ahead_and_missing_reads_are_refused_with_every_problem_named():
    work = [StageWork(0, [Req(0, "lora", "a0", ("a1",))]), StageWork(1, [Req(1, "lora", "a1", ("gone",))])]
    with pytest.raises(MllmclError) as e:
        build_graph(work)
    assert "reads a1, written at the later stage 1" in str(e.value) and "reads gone, which nothing writes" in str(e.value)
    ok = build_graph([StageWork(1, [Req(1, "lora", "a1", ("a0",))])], exists=lambda uri: uri == "a0")
    assert ok[0].needs == ()  # written by an earlier run of the same id: nothing to wait for
    with pytest.raises(MllmclError, match="run.schedule='parallel'"):
        build_graph(work, "parallel")


def test_a_failed_job_stops_new_starts_and_raises_after_the_running_ones():
    ran = []

    def run(job):
        ran.append(job.id)
        if job.id == "fit:1:lora:0":
            raise RuntimeError("fit failed")
        return job.id

    with pytest.raises(RuntimeError, match="fit failed"):
        run_schedule(build_graph(lora_ft(3)), InlineExecutor(run))
    assert ran == ["fit:0:lora:0", "eval:0", "fit:1:lora:0"]  # nothing after the failure


def test_on_done_stops_the_driver_after_a_stage():
    jobs = build_graph(mr_lora(3))
    seconds = {j.id: 10.0 if j.stage == 0 else 100.0 for j in jobs if j.lane == "fit"}
    seconds.update({j.id: 1.0 for j in jobs if j.lane == "eval"})
    done = []
    res = run_schedule(jobs, ModelledExecutor(seconds, {"fit": 2, "eval": 1}),
                       on_done=lambda job, _: done.append(job.id) or job.id == "eval:0")
    assert res.stopped and "eval:1" not in res.results
    # the two fits running when stage 0 completed ended (and were recorded); nothing else started
    assert done == ["fit:0:expert:0", "eval:0", "fit:1:expert:0", "fit:1:router:1"]
    assert {j.id for j in jobs if j.started is None} == {"fit:2:expert:0", "fit:2:router:1", "eval:1", "eval:2"}


def test_an_exclusive_executor_runs_one_job_at_a_time_in_schedule_order():
    import time

    spans = {}

    def run(job):
        t0 = time.perf_counter()
        time.sleep(0.05)
        spans[job.id] = (t0, time.perf_counter())

    res = run_schedule(build_graph(mr_lora(2)), ThreadedExecutor(run, {"fit": 4, "eval": 1}, exclusive=True))
    order = sorted(spans, key=lambda j: spans[j][0])
    assert order == ["fit:0:expert:0", "eval:0", "fit:1:expert:0", "fit:1:router:1", "eval:1"] and not res.stopped
    assert all(spans[a][1] <= spans[b][0] for a, b in zip(order, order[1:]))
    free = run_schedule(build_graph(mr_lora(2)), ThreadedExecutor(run, {"fit": 4, "eval": 1}))
    assert len(free.results) == 5 and spans["fit:1:expert:0"][0] < spans["fit:0:expert:0"][1]  # at once when free


def test_fit_slots_follow_the_cluster_and_the_cap():
    assert fit_slots(ScalingConfig(num_workers=2, cpus_per_worker=1), {"CPU": 8}) == 4
    assert fit_slots(ScalingConfig(num_workers=2, cpus_per_worker=1, max_concurrent_fits=3), {"CPU": 8}) == 3
    gpus = ScalingConfig(num_workers=8, use_gpu=True, cpus_per_worker=4, eval_gpus=1, eval_replicas=2)
    assert fit_slots(gpus, {"CPU": 400, "GPU": 40}) == 4  # (40 - 2 evaluation GPUs) // 8
    assert fit_slots(ScalingConfig(num_workers=4), {"CPU": 2}) == 1  # never none: Ray queues it
    # a CPU fit whose workers share a node's cores (threads_per_worker=0) takes the whole node
    assert fit_slots(ScalingConfig(), {"CPU": 2}, node_cpus=2) == 1
    assert fit_slots(ScalingConfig(), {"CPU": 16}, node_cpus=8) == 2
    assert fit_slots(ScalingConfig(threads_per_worker=1), {"CPU": 2}, node_cpus=2) == 2
