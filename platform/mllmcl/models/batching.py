"""Turn samples into model batches: images through the family's image layout, prompts
in its chat format, answer labels."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

import torch

from mllmcl.models.chat import IMAGE_TOKEN, ChatFormat
from mllmcl.models.families import LLAVA, Family
from mllmcl.models.vision import Pixels

IGNORE_INDEX = -100
DEFAULT_MAX_LENGTH = 2048  # training sequence limit when the model's config gives no context


class PixelCache:
    """LRU cache of preprocessed images (the layout's per-image items) keyed by image URI,
    bounded in bytes: a preprocessed image is ~1.4 MB for LLaVA-1.5 at 336 px and grows with
    resolution for Qwen2-VL (~4.7 MB at 448x448), so a count bound would not bound memory."""

    def __init__(self, images, load: Callable, max_bytes: int = 2 << 30):
        self.images = images  # FixedImages | GridImages (``collator.images``)
        self.load = load
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._data: OrderedDict[str, dict] = OrderedDict()

    def get(self, uris: Sequence[str]) -> Pixels:
        missing = [u for u in dict.fromkeys(uris) if u not in self._data]
        fresh = dict(zip(missing, self.images.process([self.load(u) for u in missing]))) if missing else {}
        out = []
        for u in uris:
            if u in self._data:
                self._data.move_to_end(u)
            out.append(self._data.get(u) or fresh[u])
        for u, item in fresh.items():
            self._data[u] = item
            self.nbytes += _nbytes(item)
        while self.nbytes > self.max_bytes and self._data:
            self.nbytes -= _nbytes(self._data.popitem(last=False)[1])
        return self.images.collate(out)


def _nbytes(item: dict) -> int:
    return sum(t.numel() * t.element_size() for t in item.values())


@dataclass
class Collator:
    """Builds training batches (prompt masked out of the labels) and generation batches."""

    processor: object
    family: Family = LLAVA
    max_length: int = DEFAULT_MAX_LENGTH  # longest training sequence (the backbone passes its context)
    chat: ChatFormat = field(init=False)  # the family's

    def __post_init__(self):
        self.tok = self.processor.tokenizer
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.chat = self.family.chat
        self.images = self.family.images(self.processor)
        self.image_token_id = self.tok.convert_tokens_to_ids(self.chat.image_token)
        # every epoch and every evaluation tokenizes the same prompts again (~0.1 ms each)
        self._token_cache = lru_cache(maxsize=1 << 16)(self._tokenize)

    def _inputs(self, input_ids: torch.Tensor, attn: torch.Tensor, pixels: Pixels) -> dict:
        out = {"input_ids": input_ids, "attention_mask": attn, **pixels.tensors}
        if self.images.token_types:
            out["mm_token_type_ids"] = (input_ids == self.image_token_id).long()
        return out

    def _tokenize(self, text: str, image_tokens: int) -> tuple[int, ...]:
        expanded = text.replace(IMAGE_TOKEN, self.chat.image_block(image_tokens))
        return tuple(self.tok(expanded, add_special_tokens=True)["input_ids"])

    def _ids(self, text: str, image_tokens: int) -> list[int]:
        return list(self._token_cache(text, image_tokens))

    def prompt_tokens(self, question: str, image_tokens: int) -> int:
        """Length of the generation prompt for ``question`` with an image of ``image_tokens``."""
        return len(self._ids(self.chat.prompt(question), image_tokens))

    def _batch(self, rows: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            span = slice(width - len(r), width) if left else slice(0, len(r))
            input_ids[i, span] = torch.tensor(r)
            attn[i, span] = 1
        return input_ids, attn

    def train_batch(self, questions: Sequence[str], answers: Sequence[str], pixels: Pixels) -> dict:
        rows, labels = [], []
        for q, a, n in zip(questions, answers, pixels.tokens):
            prompt_ids = self._ids(self.chat.prompt(q), n)
            full_ids = self._ids(self.chat.full(q, a), n)
            if full_ids[: len(prompt_ids)] != prompt_ids:  # tokenizers that merge across the boundary
                full_ids = prompt_ids + self.tok(self.chat.answer_sep + a, add_special_tokens=False)["input_ids"]
            full_ids = full_ids + [self.tok.eos_token_id]
            if len(full_ids) > self.max_length:
                raise ValueError(f"sequence of {len(full_ids)} tokens exceeds max_length={self.max_length}: {q[:60]!r}")
            rows.append(full_ids)
            labels.append([IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids):])
        input_ids, attn = self._batch(rows, left=False)
        lab = torch.full_like(input_ids, IGNORE_INDEX)
        for i, l in enumerate(labels):
            lab[i, : len(l)] = torch.tensor(l)
        return {**self._inputs(input_ids, attn, pixels), "labels": lab}

    def prompt_batch(self, questions: Sequence[str], pixels: Pixels) -> dict:
        rows = [self._ids(self.chat.prompt(q), n) for q, n in zip(questions, pixels.tokens)]
        input_ids, attn = self._batch(rows, left=True)  # left padding for generation
        return self._inputs(input_ids, attn, pixels)
