"""What a run records about itself: package version, git SHA, libraries, hardware."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import mllmcl

LIBRARIES = ("torch", "transformers", "peft", "ray", "pyarrow", "tokenizers", "numpy")


def git_sha() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        sha = out.stdout.strip()
        if out.returncode == 0 and sha:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def hardware() -> dict:
    info = {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count(),
            "python": sys.version.split()[0]}
    try:
        import torch

        info["cuda_devices"] = torch.cuda.device_count()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - best effort
        pass
    return info


def config_hash(cfg_dict: dict) -> str:
    return hashlib.sha256(json.dumps(cfg_dict, sort_keys=True).encode()).hexdigest()[:12]


def provenance(cfg_dict: dict, **extra) -> dict:
    return {
        "mllmcl_version": mllmcl.__version__,
        "git_sha": git_sha(),
        "config_hash": config_hash(cfg_dict),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "libraries": library_versions(),
        "hardware": hardware(),
        **extra,
    }
