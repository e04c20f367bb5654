"""A Ray actor that holds the base model once for the whole stream and generates with
any adapter of the run (loaded on demand, LRU), one group of rows per adapter."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import OrderedDict
from typing import Sequence

import torch

log = logging.getLogger(__name__)

BASE = None  # adapter value meaning "the base model, no adapter"


class ModelWorker:
    def __init__(self, model_path: str, dtype: str = "float32", threads: int = 0, max_adapters: int = 16):
        from mllmcl.data.release import load_image
        from mllmcl.models import load_backbone
        from mllmcl.models.batching import PixelCache

        if threads:
            torch.set_num_threads(threads)
        self.backbone = load_backbone(model_path, dtype)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.backbone.model.to(self.device)
        self.pixels = PixelCache(self.backbone.processor, load_image)
        self.peft = None
        self.loaded: OrderedDict[str, str] = OrderedDict()  # cache key -> adapter name
        self.max_adapters = max_adapters
        self._counter = 0

    def ready(self) -> bool:
        return True

    def _adapter_name(self, uri: str) -> str:
        from peft import PeftModel

        from mllmcl import storage
        from mllmcl.models.adapters import fetch_adapter

        meta = storage.read_bytes(storage.join(uri, "meta.json")) if storage.exists(storage.join(uri, "meta.json")) \
            else b""
        key = f"{uri}#{hashlib.sha256(meta).hexdigest()[:12]}"
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        local = fetch_adapter(uri)
        name = f"a{self._counter}"
        self._counter += 1
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.backbone.model, local, adapter_name=name)
        else:
            self.peft.load_adapter(local, adapter_name=name)
        self.peft.eval()
        self.loaded[key] = name
        while len(self.loaded) > self.max_adapters:
            _, old = self.loaded.popitem(last=False)
            self.peft.delete_adapter(old)
        return name

    @torch.no_grad()
    def generate(self, samples: Sequence[dict], adapters: Sequence[str | None], max_new_tokens: int,
                 batch_size: int = 64, questions: Sequence[str] | None = None) -> list[str]:
        """Greedy answers; ``adapters[i]`` is the adapter URI for row i (None = base model)."""
        from mllmcl.data.prompts import eval_prompt
        from mllmcl.training.request import sample_from_dict

        rows = [sample_from_dict(s) for s in samples]
        texts = list(questions) if questions is not None else [eval_prompt(s) for s in rows]
        out: list[str | None] = [None] * len(rows)
        groups: dict[str | None, list[int]] = {}
        for i, a in enumerate(adapters):
            groups.setdefault(a, []).append(i)
        col = self.backbone.collator
        tok = col.tok
        for adapter, idx in groups.items():
            if adapter is BASE:
                model = self.backbone.model
                ctx = self.peft.disable_adapter() if self.peft is not None else contextlib.nullcontext()
            else:
                name = self._adapter_name(adapter)
                self.peft.set_adapter(name)
                model, ctx = self.peft, contextlib.nullcontext()
            with ctx:
                for start in range(0, len(idx), batch_size):
                    chunk = idx[start:start + batch_size]
                    batch = col.prompt_batch([texts[i] for i in chunk], self.pixels.get([rows[i].image for i in chunk]))
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
                    texts_out = tok.batch_decode(gen[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
                    for i, t in zip(chunk, texts_out):
                        out[i] = t.strip()
        return out  # type: ignore[return-value]

