"""A checksum manifest of the data release a run reads (local folder or ``s3://``).

The public MLLM-CL release changed after publication, so a run records exactly which
files it saw: per task and split, the SHA-256 of the annotation file (``train.json`` /
``test.json``) and a digest of the image files — their names and sizes from one listing
(cheap on S3), or their full contents with ``data.checksum_images=true``. The manifest's
own digest depends on contents only, not on where the release lives, so a local copy and
an S3 copy of the same release agree. It is written to the run as ``data_release.json``
and its digest goes into the run's provenance; a run resumed on changed data is refused.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow.fs as pafs

from mllmcl import storage
from mllmcl.data.streams import get_stream_spec
from mllmcl.data.types import Stream

ANNOTATIONS = {"train": "train.json", "test": "test.json"}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def folder_manifest(folder: str, annotation: str, hash_images: bool = False) -> dict:
    fs, base = storage.filesystem_for(folder)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    prefix = base.rstrip("/") + "/"
    files = {i.path[len(prefix):]: i.size for i in infos if i.type == pafs.FileType.File and i.path.startswith(prefix)}
    images = sorted(f for f in files if not f.endswith(".json"))
    if hash_images:
        lines = [f"{f}\t{files[f]}\t{_sha256(storage.read_bytes(storage.join(folder, f)))}" for f in images]
    else:
        lines = [f"{f}\t{files[f]}" for f in images]
    ann = storage.join(folder, annotation)
    return {"folder": folder,
            "annotation": {"file": annotation, "sha256": _sha256(storage.read_bytes(ann)) if annotation in files
                           else None, "bytes": files.get(annotation)},
            "images": {"count": len(images), "bytes": sum(files[f] for f in images),
                       "digest": _sha256("\n".join(lines).encode()), "mode": "content" if hash_images else "listing"}}


def _content(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "folder"}


def release_manifest(stream: Stream, hash_images: bool = False) -> dict:
    """Checksums of every task folder of ``stream`` (the files as a whole, whatever data.limit)."""
    spec = get_stream_spec(stream.name)
    tasks = {}
    for task in stream:
        test_dir = f"{task.root}_test" if spec.separate_test_folder else task.root
        tasks[task.name] = {"train": folder_manifest(task.root, ANNOTATIONS["train"], hash_images),
                            "test": folder_manifest(test_dir, ANNOTATIONS["test"], hash_images)}
    content = {t: {s: _content(e) for s, e in splits.items()} for t, splits in tasks.items()}
    digest = _sha256(json.dumps(content, sort_keys=True).encode())
    return {"stream": stream.name, "root": stream.root, "digest": digest, "tasks": tasks}


def release_changes(old: dict, new: dict) -> list[str]:
    """What differs between two manifests, file by file (empty when the digests agree)."""
    if old.get("digest") == new.get("digest"):
        return []
    out = []
    for task in sorted(set(old.get("tasks", {})) | set(new.get("tasks", {}))):
        a, b = old.get("tasks", {}).get(task), new.get("tasks", {}).get(task)
        if a is None or b is None:
            out.append(f"{task}: {'added' if a is None else 'removed'}")
            continue
        for split in ("train", "test"):
            ea, eb = _content(a[split]), _content(b[split])
            if ea["annotation"] != eb["annotation"]:
                out.append(f"{task}/{eb['annotation']['file']}: sha256 {ea['annotation']['sha256']} -> "
                           f"{eb['annotation']['sha256']}")
            if ea["images"] != eb["images"]:
                out.append(f"{task} {split} images: {ea['images']['count']} files / {ea['images']['bytes']} bytes -> "
                           f"{eb['images']['count']} / {eb['images']['bytes']} (digest changed)")
    return out or ["the manifests' digests differ"]
