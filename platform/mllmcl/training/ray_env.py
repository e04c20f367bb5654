"""Starting or joining Ray from a job."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


FORWARDED = ("MLLMCL_CACHE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
             "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def forwarded_env() -> dict[str, str]:
    """Environment the driver passes to its Ray workers and actors (cache location, S3 access)."""
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update({k: os.environ[k] for k in FORWARDED if os.environ.get(k)})
    return env


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
        ray.init(address="local", num_cpus=num_cpus, runtime_env=runtime_env, include_dashboard=False,
                 log_to_driver=True)
        log.info("started a local Ray (%s CPUs)", num_cpus or os.cpu_count())
