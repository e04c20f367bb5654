"""Adapter folders in storage: publish (with meta.json, written last) and fetch, local or s3://.

A standard PEFT folder (``adapter_config.json`` + safetensors), or a method's own format
(MoELoRA: ``moelora_config.json`` + safetensors, see :mod:`mllmcl.methods.moelora`). Every
adapter folder carries ``meta.json`` (what trained it); it is written last, so a folder
with ``meta.json`` is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from mllmcl import storage

META = "meta.json"
PEFT_CONFIG = "adapter_config.json"


def publish_adapter(src: str | Path, uri: str, meta: dict) -> None:
    """Write the adapter files in local folder ``src`` plus ``meta`` to ``uri``; ``meta.json`` last."""
    src = Path(src)
    (src / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    if storage.is_remote(uri):
        storage.delete(storage.join(uri, META))  # an overwritten folder is incomplete until meta.json is back
        with tempfile.TemporaryDirectory(prefix="adapter-") as files:
            for f in src.iterdir():
                if f.name != META:
                    shutil.copy2(f, Path(files) / f.name)
            storage.upload_dir(files, uri)
        storage.write_bytes(storage.join(uri, META), (src / META).read_bytes())
        return
    dst = Path(uri)
    staging = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(src, staging)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(staging, dst)


def save_adapter(model, uri: str, meta: dict, adapter_name: str = "default") -> None:
    """Save one PEFT adapter as a standard PEFT folder (adapter_config.json + safetensors) + meta.json."""
    with tempfile.TemporaryDirectory(prefix="adapter-") as tmp:
        model.save_pretrained(tmp, selected_adapters=[adapter_name], safe_serialization=True)
        src = Path(tmp) / adapter_name if adapter_name != "default" else Path(tmp)
        publish_adapter(src, uri, meta)


def adapter_exists(uri: str) -> bool:
    """A complete adapter folder (of either format) is at ``uri``."""
    return storage.exists(storage.join(uri, META))


@contextlib.contextmanager
def local_adapter(uri: str) -> Iterator[str]:
    """A local folder holding the adapter at ``uri`` for the ``with`` block; a remote adapter
    is downloaded to a temporary folder that is removed afterwards (the weights are in
    memory once loaded)."""
    if not adapter_exists(uri):
        raise FileNotFoundError(f"{uri}: no complete adapter folder ({META} missing)")
    if not storage.is_remote(uri):
        _check_weights(uri, str(uri))
        yield str(uri)
        return
    with tempfile.TemporaryDirectory(prefix="adapter-") as tmp:
        storage.download_dir(uri, tmp)
        _check_weights(uri, tmp)
        yield tmp


def _check_weights(uri: str, local: str) -> None:
    """A folder with meta.json but no weights lost files after it was written (a partial copy or
    sync of a run folder): say so, rather than let PEFT take the path for a model hub id."""
    if not any(f.suffix in (".safetensors", ".bin") for f in Path(local).iterdir()):
        raise FileNotFoundError(f"{uri}: the adapter folder has {META} but no weights (*.safetensors): "
                                f"its files were lost after it was written; restore them, or rerun the stage "
                                f"that wrote it in a new run")


def read_meta(uri: str) -> dict:
    return storage.read_json(storage.join(uri, META))
