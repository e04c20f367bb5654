"""Load a backbone (model + processor + chat format) from the tiny preset, a local
folder or an ``s3://`` prefix. Hub ids are never fetched (``HF_HUB_OFFLINE=1``)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mllmcl import storage
from mllmcl.errors import ModelLoadError
from mllmcl.models.batching import DEFAULT_MAX_LENGTH, Collator
from mllmcl.models.families import Family, family_for
from mllmcl.paths import TINY_MODEL, cache_dir

log = logging.getLogger(__name__)

TINY = TINY_MODEL


@dataclass
class Backbone:
    model: torch.nn.Module
    processor: object
    family: Family
    source: str
    local_path: str
    meta: dict = field(default_factory=dict)
    context: int = 0  # the language model's context (max_position_embeddings); 0 = unknown

    @property
    def collator(self) -> Collator:
        if not hasattr(self, "_collator"):
            self._collator = Collator(self.processor, self.family, max_length=self.context or DEFAULT_MAX_LENGTH)
        return self._collator


def context_length(config) -> int:
    """The language model's context in tokens (0 if the config does not say)."""
    text = getattr(config, "text_config", None) or config
    return int(getattr(text, "max_position_embeddings", 0) or 0)


def _stage_remote(uri: str) -> Path:
    """Download an ``s3://`` checkpoint once per node into the cache."""
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    dest = cache_dir() / "checkpoints" / key
    if (dest / ".complete").exists():
        return dest
    if not storage.exists(storage.join(uri, "config.json")):
        raise ModelLoadError(f"{uri}: no config.json under this prefix (expected a Hugging Face model folder)")
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    storage.download_dir(uri, str(tmp))
    (tmp / ".complete").write_text(uri + "\n")
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def resolve_checkpoint(source: str) -> Path:
    if source == TINY:
        from mllmcl.models.tiny import build_tiny_base

        return build_tiny_base()
    if source.startswith("s3://"):
        return _stage_remote(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model.path={source!r}: no such folder. Checkpoints load from a local folder or an s3:// prefix; "
            "hub ids are not downloaded (HF_HUB_OFFLINE=1)")
    if not (path / "config.json").exists():
        raise ModelLoadError(f"model.path={source!r}: no config.json in this folder (expected a Hugging Face model folder)")
    return path


@dataclass
class ImageTextProcessor:
    """A checkpoint's tokenizer and image processor, when its full processor cannot be built
    here (all the platform uses of a processor), and the processor's own count of tokens per
    image tile where the family has one (InternVL's ``image_seq_length``)."""

    tokenizer: object
    image_processor: object
    image_seq_length: int | None = None


def _image_seq_length(path: Path) -> int | None:
    """InternVL's tokens per tile as its processor reads them: processor_config.json, else the
    model's config.json (both written by transformers' conversion)."""
    for name in ("processor_config.json", "config.json"):
        f = path / name
        if f.exists():
            value = json.loads(f.read_text()).get("image_seq_length")
            if value:
                return int(value)
    return None


def load_processor(path: Path | str, family: Family):
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    if family.video_processor and not is_torchvision_available():
        return ImageTextProcessor(AutoTokenizer.from_pretrained(path, local_files_only=True),
                                  AutoImageProcessor.from_pretrained(path, local_files_only=True),
                                  _image_seq_length(Path(path)))
    return AutoProcessor.from_pretrained(path, local_files_only=True)


def load_backbone(source: str = TINY, dtype: str | torch.dtype | None = None) -> Backbone:
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = resolve_checkpoint(source)
    try:  # from config.json itself: a remote-code checkpoint is refused before transformers asks to run its code
        family = family_for(json.loads((path / "config.json").read_text()).get("model_type", ""))
    except KeyError as e:
        raise ModelLoadError(f"model.path={source!r}: {e.args[0]}") from None
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
    processor = load_processor(path, family)
    model.eval()
    meta = {}
    if (path / "meta.json").exists():
        meta = json.loads((path / "meta.json").read_text())
    return Backbone(model=model, processor=processor, family=family, source=source, local_path=str(path), meta=meta,
                    context=context_length(config))
