"""Turn samples into model batches: images through the processor, prompts, answer labels."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from mllmcl.models.chat import IMAGE_TOKEN, ChatFormat

IGNORE_INDEX = -100


class PixelCache:
    """LRU cache of preprocessed pixel tensors keyed by image URI."""

    def __init__(self, processor, load: Callable, capacity: int = 20000):
        self.processor = processor
        self.load = load
        self.capacity = capacity
        self._data: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, uris: Sequence[str]) -> torch.Tensor:
        missing = [u for u in dict.fromkeys(uris) if u not in self._data]
        if missing:
            images = [self.load(u) for u in missing]
            pix = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
            for u, p in zip(missing, pix):
                self._data[u] = p
                if len(self._data) > self.capacity:
                    self._data.popitem(last=False)
        out = []
        for u in uris:
            self._data.move_to_end(u)
            out.append(self._data[u])
        return torch.stack(out)


@dataclass
class Collator:
    """Builds training batches (prompt masked out of the labels) and generation batches."""

    processor: object
    chat: ChatFormat = field(default_factory=ChatFormat)
    max_length: int = 512

    def __post_init__(self):
        self.tok = self.processor.tokenizer
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.n_image_tokens = self._count_image_tokens()

    def _count_image_tokens(self) -> int:
        from PIL import Image

        crop = getattr(self.processor.image_processor, "crop_size", None) or {}
        size = int(crop.get("height", 32)) if isinstance(crop, dict) else 32
        enc = self.processor(text=[IMAGE_TOKEN], images=[Image.new("RGB", (size, size))], return_tensors="pt")
        image_id = self.tok.convert_tokens_to_ids(IMAGE_TOKEN)
        return int((enc["input_ids"] == image_id).sum())

    def _expand(self, text: str) -> str:
        return text.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.n_image_tokens)

    def _ids(self, text: str) -> list[int]:
        return self.tok(self._expand(text), add_special_tokens=True)["input_ids"]

    def train_batch(self, questions: Sequence[str], answers: Sequence[str], pixel_values: torch.Tensor) -> dict:
        rows, labels = [], []
        for q, a in zip(questions, answers):
            prompt_ids = self._ids(self.chat.prompt(q))
            full_ids = self._ids(self.chat.full(q, a))
            if full_ids[: len(prompt_ids)] != prompt_ids:  # tokenizers that merge across the boundary
                full_ids = prompt_ids + self.tok(" " + a, add_special_tokens=False)["input_ids"]
            full_ids = full_ids + [self.tok.eos_token_id]
            if len(full_ids) > self.max_length:
                raise ValueError(f"sequence of {len(full_ids)} tokens exceeds max_length={self.max_length}: {q[:60]!r}")
            rows.append(full_ids)
            labels.append([IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids):])
        width = max(len(r) for r in rows)
        pad = self.tok.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        lab = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (r, l) in enumerate(zip(rows, labels)):
            input_ids[i, : len(r)] = torch.tensor(r)
            attn[i, : len(r)] = 1
            lab[i, : len(l)] = torch.tensor(l)
        return {"input_ids": input_ids, "attention_mask": attn, "pixel_values": pixel_values, "labels": lab}

    def prompt_batch(self, questions: Sequence[str], pixel_values: torch.Tensor) -> dict:
        rows = [self._ids(self.chat.prompt(q)) for q in questions]
        width = max(len(r) for r in rows)
        pad = self.tok.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding for generation
            input_ids[i, width - len(r):] = torch.tensor(r)
            attn[i, width - len(r):] = 1
        return {"input_ids": input_ids, "attention_mask": attn, "pixel_values": pixel_values}
