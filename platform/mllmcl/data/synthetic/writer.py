"""Write the synthetic streams in the MLLM-CL release layout, deterministically."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mllmcl.data.prompts import with_instruction
from mllmcl.data.streams import STREAMS, StreamSpec
from mllmcl.data.synthetic.tasks import GENERATORS
from mllmcl.errors import ConfigError
from mllmcl.paths import cache_dir, file_lock

log = logging.getLogger(__name__)

GENERATOR_VERSION = 4  # bump when the drawings or questions change
MARKER = "synthetic.json"


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes and seed of a synthetic release. Same spec -> byte-identical files."""

    n_train: int = 1000
    n_test: int = 200
    image_size: int = 64
    seed: int = 0
    streams: tuple[str, ...] = ("dcl", "acl")

    def __post_init__(self):
        problems = []
        if self.n_train < 1:
            problems.append(f"n_train={self.n_train}: must be >= 1")
        if self.n_test < 1:
            problems.append(f"n_test={self.n_test}: must be >= 1")
        if not 24 <= self.image_size <= 1024:
            problems.append(f"image_size={self.image_size}: must be in [24, 1024]")
        for s in self.streams:
            if s not in STREAMS:
                problems.append(f"streams: unknown stream {s!r}, expected names from {sorted(STREAMS)}")
        if problems:
            raise ConfigError(problems)

    def fingerprint(self) -> str:
        payload = json.dumps({**asdict(self), "version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _task_seed(spec: SyntheticSpec, stream: StreamSpec, task: str, split: str) -> list[int]:
    return [spec.seed, list(STREAMS).index(stream.name), stream.task_names.index(task), 0 if split == "train" else 1]


def _write_split(spec: SyntheticSpec, stream: StreamSpec, task: str, split: str, folder: Path) -> int:
    gen = GENERATORS[task]
    rng = np.random.default_rng(_task_seed(spec, stream, task, split))
    n = spec.n_train if split == "train" else spec.n_test
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        item = gen(rng, spec.image_size)
        prefix = f"{item.prefix}_" if item.prefix else ""
        rel = f"images/{prefix}{task}_{split}_{i:05d}.png"
        (folder / rel).write_bytes(_png_bytes(item.image))
        answer = item.answer
        uid = f"{task}_{split}_{i:05d}"
        if split == "train":
            target = answer[0] if isinstance(answer, list) else answer
            records.append({
                "id": uid,
                "image": rel,
                "conversations": [
                    {"from": "human", "value": "<image>\n" + with_instruction(task, item.question, target)},
                    {"from": "gpt", "value": target},
                ],
            })
        else:
            records.append({"question_id": uid, "image": rel, "text": item.question, "answer": answer,
                            **item.meta, "question_type_synthetic": item.qtype})
    (folder / f"{split}.json").write_text(json.dumps(records, indent=1) + "\n")
    return n


def write_synthetic(out: str | os.PathLike, spec: SyntheticSpec = SyntheticSpec(), progress: bool = True) -> Path:
    """Write ``out/Domain_data/...`` and ``out/Ability_data/...`` and a marker file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(STREAMS[s], t) for s in spec.streams for t in STREAMS[s].task_names]
    for stream, task in tqdm(jobs, desc="synthetic tasks", disable=not progress):
        train_dir = out / stream.train_dir(task)
        test_dir = out / stream.test_dir(task)
        for d in {train_dir, test_dir}:
            if d.exists():
                shutil.rmtree(d)
        _write_split(spec, stream, task, "train", train_dir)
        _write_split(spec, stream, task, "test", test_dir)
    (out / MARKER).write_text(json.dumps({**asdict(spec), "version": GENERATOR_VERSION,
                                          "fingerprint": spec.fingerprint()}, indent=2) + "\n")
    log.info("wrote synthetic streams %s to %s", list(spec.streams), out)
    return out


def _is_written(out: Path, spec: SyntheticSpec) -> bool:
    try:
        return json.loads((out / MARKER).read_text()).get("fingerprint") == spec.fingerprint()
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def ensure_synthetic(out: str | os.PathLike, spec: SyntheticSpec = SyntheticSpec(), progress: bool = True) -> Path:
    """Reuse ``out`` when its marker matches ``spec``; otherwise (re)write it. Safe to call from
    several processes at once (two jobs starting on one node): one writes, the others wait for it."""
    out = Path(out)
    if _is_written(out, spec):
        return out
    with file_lock(out.parent / f".{out.name}.lock"):
        if _is_written(out, spec):
            return out
        return write_synthetic(out, spec, progress=progress)


def default_synthetic_root(spec: SyntheticSpec = SyntheticSpec()) -> Path:
    return cache_dir() / "synthetic" / spec.fingerprint()
