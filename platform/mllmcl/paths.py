"""Local paths as the platform sees them: made absolute once, at the boundary, and the
cache of built artifacts (tiny base, synthetic streams) outside git.

Ray runs every worker, actor, Serve replica and Tune trial in a working directory of its
own (Ray Train: ``<ray temp>/session_*/artifacts/<run>``; ``ray job submit
--working-dir``: a temporary copy of the uploaded folder). A relative path that reaches
one of them names a different place, so every path a user gives is made absolute
against the caller's working directory when the config or the job's arguments are read.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


SYNTHETIC_DATA = "synthetic"  # data.root: the offline twin of the streams, built into the cache
TINY_MODEL = "tiny"  # model.path: the tiny VLM preset, built into the cache


def is_uri(value: str) -> bool:
    """``s3://...`` and other schemes except ``file://`` (which is a local path)."""
    return "://" in str(value) and not str(value).startswith("file://")


def _local(value: str) -> str | None:
    """The local path ``value`` names (``file://`` dropped, ``~`` expanded); None for a URI or ""."""
    value = str(value)
    if not value or is_uri(value):
        return None
    return os.path.expanduser(value[len("file://"):] if value.startswith("file://") else value)


def absolute(value: str, cwd: str | os.PathLike | None = None) -> str:
    """A local path (plain, ``~/...`` or ``file://...``) made absolute against ``cwd``
    (default: this process's working directory), normalised; URIs are returned as they are.
    ``file://`` is dropped: storage reads plain absolute paths."""
    path = _local(value)
    if path is None:
        return str(value)
    return os.path.normpath(os.path.join(os.fspath(cwd) if cwd is not None else os.getcwd(), path))


def is_relative(value: str) -> bool:
    """A local path that :func:`absolute` would anchor to the working directory."""
    path = _local(value)
    return path is not None and not os.path.isabs(path)


def ray_job_copy(cwd: str | os.PathLike | None = None) -> str | None:
    """The folder of Ray's temporary copy of a job's working directory when ``cwd`` is inside
    one (``ray job submit --working-dir``: ``<ray temp>/session_*/runtime_resources/
    working_dir_files/_ray_pkg_*``, deleted with the session), else None."""
    parts = Path(os.fspath(cwd) if cwd is not None else os.getcwd()).resolve().parts
    for i, part in enumerate(parts):
        if part == "working_dir_files" and i and parts[i - 1] == "runtime_resources":
            end = i + 2 if i + 1 < len(parts) and parts[i + 1].startswith("_ray_pkg_") else i + 1
            return str(Path(*parts[:end]))
        if part.startswith("_ray_pkg_"):
            return str(Path(*parts[: i + 1]))
    return None


def output_location_problems(locations: dict[str, str], cwd: str | os.PathLike | None = None) -> list[str]:
    """Refusals for relative output locations of a job that runs in Ray's temporary copy of
    its working directory: what it wrote there would vanish with the Ray session.
    ``locations``: what the user calls it (``storage.root``, ``--out``) -> the value given."""
    copy = ray_job_copy(cwd)
    if copy is None:
        return []
    return [f"{what}={value!r} is a relative path, and this job runs in Ray's temporary copy of its working "
            f"directory ({copy}), which Ray deletes with the session: the results would be lost. Pass an "
            f"absolute path on a disk the cluster keeps ({what}=/data/mllmcl) or an s3:// prefix "
            f"({what}=s3://bucket/mllmcl)" for what, value in locations.items() if is_relative(value)]


def output_location(value: str, what: str, cwd: str | os.PathLike | None = None) -> str:
    """Where a job writes (``what`` names the setting, e.g. ``--out``): absolute, and refused with a
    :class:`~mllmcl.errors.ConfigError` where a relative path would be lost (see above)."""
    from mllmcl.errors import ConfigError

    problems = output_location_problems({what: value}, cwd)
    if problems:
        raise ConfigError(problems)
    return absolute(value, cwd)


def cache_dir() -> Path:
    """``$MLLMCL_CACHE`` or ``$XDG_CACHE_HOME/mllmcl`` (``~/.cache/mllmcl``), absolute; created on
    first use."""
    root = os.environ.get("MLLMCL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mllmcl"
    )
    path = Path(absolute(root))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def file_lock(path: str | os.PathLike):
    """An exclusive lock on ``path`` (created with its folder), held for the ``with`` block: one
    process at a time builds a cached artifact; the others wait, then find it built."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
