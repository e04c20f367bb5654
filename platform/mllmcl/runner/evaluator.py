"""The stream's evaluation worker: a Ray actor (or, with ``scaling.backend=local``, an object in
the driver) holding the one engine for the whole stream. It answers with any adapter of the
run, addressed by URI (loaded on demand, least recently used evicted), in batches grouped by
adapter, and embeds texts for routers."""

from __future__ import annotations

from typing import Sequence

from mllmcl.engine import Engine


class EvalWorker:
    def __init__(self, model_path: str, dtype: str = "float32", threads: int = 0, formats: Sequence = (),
                 max_adapters: int = 16):
        self.engine = Engine(model_path, dtype, threads, formats=formats, max_adapters=max_adapters)

    def ready(self) -> bool:
        return True

    def reset(self) -> bool:
        """Ready for the next run of the same driver (the base stays loaded): images are read
        again; adapters stay cached by URI, ``meta.json``'s digest and its modification time,
        so an adapter written anew (a run deleted and made again) is loaded anew."""
        self.engine.pixel_cache = type(self.engine.pixel_cache)(self.engine.collator.images,
                                                                self.engine.pixel_cache.load)
        return True

    def generate(self, prompts: Sequence[str], images: Sequence[str], adapters: Sequence[str | None],
                 max_new_tokens: int, batch_size: int = 64) -> list[str]:
        """Greedy answers; ``adapters[i]`` is the adapter URI for row i (None = the base model). Rows
        run grouped by adapter, each adapter loaded just before its group (any number of them
        passes through the engine's cache)."""
        out: list[str | None] = [None] * len(prompts)
        for uri in dict.fromkeys(adapters):
            rows = [i for i, a in enumerate(adapters) if a == uri]
            name = None if uri is None else self.engine.load(uri)
            done = self.engine.generate([prompts[i] for i in rows], [images[i] for i in rows], [name] * len(rows),
                                        max_new_tokens, batch_size=batch_size)
            for i, c in zip(rows, done):
                out[i] = c.text
        return out  # type: ignore[return-value]

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> list[list[float]]:
        return self.engine.embed(texts, batch_size)

    def features(self, prompts: Sequence[str], images: Sequence[str], batch_size: int = 32) -> dict:
        return self.engine.features(prompts, images, batch_size)

    def shape(self, prompts: Sequence[str], images: Sequence[str]) -> dict:
        return self.engine.shape(prompts, images)
