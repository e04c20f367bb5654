"""PEFT adapter folders in storage: save (with meta.json) and fetch, local or s3://."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from mllmcl import storage


def save_adapter(model, uri: str, meta: dict, adapter_name: str = "default") -> None:
    """Save one adapter as a standard PEFT folder (adapter_config.json + safetensors) + meta.json."""
    with tempfile.TemporaryDirectory(prefix="adapter-") as tmp:
        model.save_pretrained(tmp, selected_adapters=[adapter_name], safe_serialization=True)
        src = Path(tmp) / adapter_name if adapter_name != "default" else Path(tmp)
        (src / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if storage.is_remote(uri):
            storage.upload_dir(str(src), uri)
        else:
            dst = Path(uri)
            staging = dst.with_name(dst.name + ".tmp")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(src, staging)
            shutil.rmtree(dst, ignore_errors=True)
            os.replace(staging, dst)


def adapter_exists(uri: str) -> bool:
    return storage.exists(storage.join(uri, "adapter_config.json"))


def fetch_adapter(uri: str, into: str | None = None) -> str:
    """A local folder holding the adapter at ``uri`` (downloaded when remote)."""
    if not storage.is_remote(uri):
        if not (Path(uri) / "adapter_config.json").exists():
            raise FileNotFoundError(f"{uri}: no adapter_config.json (not a PEFT adapter folder)")
        return str(uri)
    if not adapter_exists(uri):
        raise FileNotFoundError(f"{uri}: no adapter_config.json (not a PEFT adapter folder)")
    dest = into or tempfile.mkdtemp(prefix="adapter-")
    storage.download_dir(uri, dest)
    return dest


def read_meta(uri: str) -> dict:
    return storage.read_json(storage.join(uri, "meta.json"))
