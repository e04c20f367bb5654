"""API keys of the served endpoint: where they come from, how a request's key is checked, and
when a service may start without any.

Keys come from a file (``auth.keys_file``: one key per line, ``#`` comments) and/or an
environment variable (``auth.keys_env``, default ``MLLMCL_API_KEYS``: keys separated by commas
or whitespace). Only their SHA-256 digests leave the process that read them: the ingress
replicas get digests, so a key is never part of a deployment's arguments, Serve's config, or a
log line. A request's ``Authorization: Bearer <key>`` is hashed and compared with every digest
with :func:`hmac.compare_digest` (no early exit: the time taken does not depend on which
digest, or how much of one, matched).

A service bound to a host other than loopback without keys is refused unless
``auth.allow_unauthenticated=true`` says that is wanted.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from pathlib import Path

from mllmcl.errors import ConfigError

DEFAULT_KEYS_ENV = "MLLMCL_API_KEYS"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _split(text: str) -> list[str]:
    keys = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        keys += [k for k in line.replace(",", " ").split() if k]
    return keys


def load_key_digests(keys_file: str = "", keys_env: str = DEFAULT_KEYS_ENV) -> tuple[str, ...]:
    """The digests of every configured key (empty: the service runs without keys). A key file
    that is named but missing or empty is an error (a typo must not turn authentication off)."""
    problems, keys = [], []
    if keys_file:
        path = Path(keys_file).expanduser()
        if not path.is_file():
            problems.append(f"auth.keys_file={keys_file!r}: no such file")
        else:
            found = _split(path.read_text())
            if not found:
                problems.append(f"auth.keys_file={keys_file!r}: holds no key (one key per line)")
            keys += found
    if keys_env and os.environ.get(keys_env, "").strip():
        keys += _split(os.environ[keys_env])
    short = sum(len(k) < 16 for k in keys)
    if short:
        problems.append(f"{short} API key(s) shorter than 16 characters (e.g. `python -c 'import secrets; "
                        f"print(secrets.token_urlsafe(32))'`)")
    if problems:
        raise ConfigError(problems)
    return tuple(sorted({digest(k) for k in keys}))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: not known to be loopback
        return False


def bind_problems(host: str, digests: tuple[str, ...], allow_unauthenticated: bool) -> list[str]:
    if digests or allow_unauthenticated or is_loopback(host):
        return []
    return [f"host={host!r} is reachable from other machines and no API key is configured: set "
            f"auth.keys_file=<file> or the {DEFAULT_KEYS_ENV} environment variable (auth.keys_env names "
            f"another), or auth.allow_unauthenticated=true if an open endpoint is wanted"]


def bearer_key(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def key_allowed(header: str | None, digests: tuple[str, ...]) -> bool:
    """Whether an ``Authorization`` header carries one of the keys (every digest is compared)."""
    key = bearer_key(header)
    presented = digest(key if key is not None else "")
    ok = False
    for d in digests:
        ok |= hmac.compare_digest(presented, d)
    return ok and key is not None
