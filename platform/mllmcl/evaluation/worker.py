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
        self.pixels = PixelCache(self.backbone.collator.images, load_image)
        self.peft = None
        self.loaded: OrderedDict[str, str] = OrderedDict()  # cache key -> adapter name
        self.max_adapters = max_adapters
        self.format: str | None = None  # "peft" or "moelora" once an adapter is loaded
        self._counter = 0

    def ready(self) -> bool:
        return True

    def _adapter_name(self, uri: str) -> str:
        """Load the adapter at ``uri`` (once; LRU) and return its name in this worker."""
        from mllmcl import storage
        from mllmcl.models.adapters import META, adapter_format, local_adapter

        key = f"{uri}#{hashlib.sha256(storage.read_bytes(storage.join(uri, META))).hexdigest()[:12]}"
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        name = f"a{self._counter}"
        self._counter += 1
        with local_adapter(uri) as local:
            self._load(local, name, adapter_format(local), uri)
        self.loaded[key] = name
        while len(self.loaded) > self.max_adapters:
            _, old = self.loaded.popitem(last=False)
            self._delete(old)
        return name

    def _load(self, local: str, name: str, fmt: str, uri: str) -> None:
        from peft import PeftModel

        from mllmcl.models import moelora

        if self.format not in (None, fmt):
            raise ValueError(f"{uri}: a {fmt} adapter, but this worker already serves {self.format} adapters "
                             f"(one worker holds one adapter format)")
        self.format = fmt
        if fmt == "moelora":
            moelora.load_moelora(self.backbone.model, local, name)
            self.backbone.model.eval()
        elif self.peft is None:
            self.peft = PeftModel.from_pretrained(self.backbone.model, local, adapter_name=name)
        else:
            self.peft.load_adapter(local, adapter_name=name)
        if self.peft is not None:
            self.peft.eval()

    def _delete(self, name: str) -> None:
        from mllmcl.models import moelora

        if self.format == "moelora":
            moelora.delete_adapter(self.backbone.model, name)
        else:
            self.peft.delete_adapter(name)

    def _activate(self, adapter: str | None):
        """(model to call, context) that runs the base model or one adapter."""
        from mllmcl.models import moelora

        name = None if adapter is BASE else self._adapter_name(adapter)  # loads it (and fixes the format)
        if self.format == "moelora":
            moelora.set_active(self.backbone.model, name)
            return self.backbone.model, contextlib.nullcontext()
        if name is None:
            return self.backbone.model, (self.peft.disable_adapter() if self.peft is not None
                                         else contextlib.nullcontext())
        self.peft.set_adapter(name)
        return self.peft, contextlib.nullcontext()

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 64) -> list[list[float]]:
        """Text embeddings from the base model: the language model's last hidden state, mean-pooled
        over the text's tokens (no image, no adapter), L2-normalised."""
        tok = self.backbone.collator.tok
        lm = self.backbone.model.get_decoder() if hasattr(self.backbone.model, "get_decoder") else None
        if lm is None:
            raise ValueError("this backbone exposes no language model (get_decoder) to embed text with")
        _, ctx = self._activate(BASE)
        out: list[list[float]] = []
        with ctx:
            for start in range(0, len(texts), batch_size):
                enc = tok(list(texts[start:start + batch_size]), return_tensors="pt", padding=True, truncation=True,
                          max_length=self.backbone.collator.max_length)
                enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                hidden = lm(**enc).last_hidden_state.float()
                mask = enc["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                out.extend(torch.nn.functional.normalize(pooled, dim=-1).cpu().tolist())
        return out

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
            model, ctx = self._activate(adapter)
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

