"""Local paths as the platform sees them: made absolute once, at the boundary, and the
cache of built artifacts (tiny base, synthetic streams) outside git.

Ray runs every worker, actor, Serve replica and Tune trial in a working directory of its
own (Ray Train: ``<ray temp>/session_*/artifacts/<run>``; ``ray job submit
--working-dir``: a temporary copy of the uploaded folder). A relative path that reaches
one of them names a different place, so every path a user gives is made absolute
against the caller's working directory when the config or the job's arguments are read.
"""

from __future__ import annotations

import os
from pathlib import Path


def is_uri(value: str) -> bool:
    """``s3://...`` and other schemes except ``file://`` (which is a local path)."""
    return "://" in str(value) and not str(value).startswith("file://")


def absolute(value: str, cwd: str | os.PathLike | None = None) -> str:
    """A local path (plain, ``~/...`` or ``file://...``) made absolute against ``cwd``
    (default: this process's working directory), normalised; URIs are returned as they are.
    ``file://`` is dropped: storage reads plain absolute paths."""
    value = str(value)
    if not value or is_uri(value):
        return value
    if value.startswith("file://"):
        value = value[len("file://"):]
    path = os.path.expanduser(value)
    if not os.path.isabs(path):
        path = os.path.join(os.fspath(cwd) if cwd is not None else os.getcwd(), path)
    return os.path.normpath(path)


def is_relative(value: str) -> bool:
    """A local path that :func:`absolute` would anchor to the working directory."""
    value = str(value)
    if not value or is_uri(value):
        return False
    if value.startswith("file://"):
        value = value[len("file://"):]
    return not os.path.isabs(os.path.expanduser(value))


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


def cache_dir() -> Path:
    """``$MLLMCL_CACHE`` or ``$XDG_CACHE_HOME/mllmcl`` (``~/.cache/mllmcl``), absolute; created on
    first use."""
    root = os.environ.get("MLLMCL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mllmcl"
    )
    path = Path(absolute(root))
    path.mkdir(parents=True, exist_ok=True)
    return path
