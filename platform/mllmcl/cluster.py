"""The Ray cluster a job uses: starting or joining Ray, and the environment its workers and actors get."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


FORWARDED = ("MLLMCL_CACHE", "MLLMCL_RAY_TRAIN_LOG_LEVEL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
             "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def forwarded_env() -> dict[str, str]:
    """Environment the driver passes to its Ray workers and actors (cache location, S3 access)."""
    from mllmcl.paths import absolute

    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_DISABLE_PROGRESS_BARS": os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "1")}
    env.update({k: os.environ[k] for k in FORWARDED if os.environ.get(k)})
    if "MLLMCL_CACHE" in env:  # workers run in other folders: a relative cache would be another cache
        env["MLLMCL_CACHE"] = absolute(env["MLLMCL_CACHE"])
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in ``RAY_ADDRESS`` (as under ``ray job submit``), else start a local one.

    ``address="local"`` never attaches to a stray cluster. When joining a cluster whose
    nodes may not have the package installed, it is shipped with the job (py_modules).
    """
    import ray

    if ray.is_initialized():
        return
    import mllmcl

    address = os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": forwarded_env()}
    if address:
        runtime_env["py_modules"] = [os.path.dirname(mllmcl.__file__)]
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        log.info("joined Ray cluster at %s", address)
    else:
        # A local cluster for this job. The dashboard (on 127.0.0.1) serves Ray's State API, which
        # Ray Train's PlacementGroupCleaner polls: without it every fit logs "Failed to query Ray
        # Train Controller actor state" every second. A single local node is never preempted, so
        # Ray Train's preemption watcher (one more actor per fit, which logs an error line at
        # start) is off; a user's own setting wins.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray Train's controller polls its workers every 2 s by default, and several of those waits
        # (group started, loop done, group stopped) sit between every fit's steps and the next fit:
        # measured here, 0.25 s takes ~4 s off each fit (25 s of start-up and tear-down for a 0.3 s
        # loop, on 2 cores). On one node the polls cost nothing; on a cluster Ray's default stays.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
        # The State API client finds "its" cluster by scanning the machine for Ray processes and
        # fails ("Found multiple active Ray instances") where another Ray runs: name the dashboard.
        port = _free_port()
        runtime_env["env_vars"]["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(address="local", num_cpus=num_cpus, runtime_env=runtime_env, include_dashboard=True,
                 dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=True)
        log.info("started a local Ray (%s CPUs)", num_cpus or os.cpu_count())
