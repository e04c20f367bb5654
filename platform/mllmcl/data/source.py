"""Resolve ``data.root`` (a folder, an s3:// prefix, or ``synthetic``) and load the stream."""

from __future__ import annotations

from mllmcl.data.release import load_stream
from mllmcl.data.synthetic.writer import SyntheticSpec, default_synthetic_root, ensure_synthetic
from mllmcl.data.types import Stream
from mllmcl.paths import SYNTHETIC_DATA

SYNTHETIC = SYNTHETIC_DATA


def synthetic_spec(data_cfg) -> SyntheticSpec:
    return SyntheticSpec(n_train=data_cfg.synthetic_train, n_test=data_cfg.synthetic_test,
                         image_size=data_cfg.synthetic_image_size, seed=data_cfg.synthetic_seed)


def resolve_root(data_cfg, progress: bool = True) -> str:
    if data_cfg.root == SYNTHETIC:
        spec = synthetic_spec(data_cfg)
        return str(ensure_synthetic(default_synthetic_root(spec), spec, progress=progress))
    return data_cfg.root


def load_configured_stream(data_cfg, progress: bool = True) -> Stream:
    root = resolve_root(data_cfg, progress=progress)
    return load_stream(root, data_cfg.stream, tasks=data_cfg.task_names(),
                       verify_images=data_cfg.verify_images, limit=data_cfg.limit or None)
