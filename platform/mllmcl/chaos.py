"""Fault injection for the chaos tests: ``MLLMCL_CHAOS_KILL=<point>@<n>`` makes this process
SIGKILL itself the n-th time it passes ``<point>`` (no ``finally``, no flush: what a node
failure or an OOM kill does). Points: ``step:<task>:<kind>`` (after a training step of that fit and its
checkpoint, in the process that trains: the driver with ``scaling.backend=local``), ``eval`` (after an
evaluation batch), ``write:<file name>`` (half-way through writing that file, e.g.
``write:manifest.json``). Unset: every call is one dictionary lookup."""

from __future__ import annotations

import os
import signal

ENV = "MLLMCL_CHAOS_KILL"
_hits: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    where, _, n = spec.rpartition("@")
    if where != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
