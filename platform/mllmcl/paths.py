"""Where built artifacts are cached outside git (tiny base, synthetic streams)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$MLLMCL_CACHE`` or ``~/.cache/mllmcl``; created on first use."""
    root = os.environ.get("MLLMCL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mllmcl"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
