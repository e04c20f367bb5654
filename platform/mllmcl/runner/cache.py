"""The prediction cache of a run, and the methods' cached view of the evaluation worker."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

from mllmcl import chaos, storage
from mllmcl.data.prompts import eval_prompt
from mllmcl.data.types import Sample
from mllmcl.storage.layout import RunLayout


class PredictionCache:
    """(adapter, sample, max_new_tokens) -> prediction, kept in the run's storage.

    Adapters never change once written, so an expert's answer to a test sample is
    computed once per run and reused at every later stage.
    """

    def __init__(self, layout: RunLayout, enabled: bool = True):
        self.layout = layout
        self.enabled = enabled
        self.data: dict[str, dict[tuple[str, int], str]] = {}
        self.dirty: set[str] = set()
        self.hits = 0
        self.misses = 0

    def _key(self, adapter: str | None) -> str:
        if adapter is None:
            return "base"
        rel = adapter[len(self.layout.run_dir):].strip("/") if adapter.startswith(self.layout.run_dir) else adapter
        return rel.replace("/", "__").replace(":", "_")

    def _uri(self, key: str) -> str:
        return self.layout.path("eval", "cache", f"{key}.parquet")

    def _table(self, key: str) -> dict:
        if key not in self.data:
            self.data[key] = {}
            if self.enabled and storage.exists(self._uri(key)):
                from mllmcl.data.parquet import read_table

                for r in read_table(self._uri(key)).to_pylist():
                    self.data[key][(r["uid"], r["max_new_tokens"])] = r["prediction"]
        return self.data[key]

    def get(self, adapter: str | None, uid: str, max_new: int) -> str | None:
        if not self.enabled:
            return None
        return self._table(self._key(adapter)).get((uid, max_new))

    def put(self, adapter: str | None, uid: str, max_new: int, prediction: str) -> None:
        if self.enabled:
            key = self._key(adapter)
            self._table(key)[(uid, max_new)] = prediction
            self.dirty.add(key)

    def flush(self) -> None:
        import pyarrow as pa

        from mllmcl.data.parquet import write_table

        for key in sorted(self.dirty):
            rows = self.data[key]
            write_table(pa.table({"uid": [u for u, _ in rows], "max_new_tokens": [m for _, m in rows],
                                  "prediction": list(rows.values())}), self._uri(key))
        self.dirty.clear()


def batches(adapters: Sequence[str | None], batch_size: int) -> list[list[int]]:
    """The batches one evaluation worker forms from rows with these adapters: rows grouped by
    adapter (in order of first appearance), each group cut into ``batch_size`` rows. Replicas are
    handed whole batches, so every row is decoded in the batch it would be in on one worker."""
    groups: dict[str | None, list[int]] = {}
    for i, a in enumerate(adapters):
        groups.setdefault(a, []).append(i)
    step = max(1, batch_size)
    return [rows[s:s + step] for rows in groups.values() for s in range(0, len(rows), step)]


@dataclass
class CachedPredictor:
    """The methods' view of the evaluation replicas: test answers with per-row adapters (cached),
    and the routers' backend (``complete``, ``embed``: not cached). Each generation is shared
    among the replicas by whole batches (:func:`batches`, round robin); ``shards`` records each
    replica's part of every call (rows, start and end times)."""

    worker: object  # EvalWorker, or a list of them: Ray actor handles, or one object (scaling.backend=local)
    cache: PredictionCache
    batch_size: int
    generated: int = 0
    seconds: float = 0.0
    shards: list[dict] = field(default_factory=list)

    @property
    def workers(self) -> list:
        return list(self.worker) if isinstance(self.worker, (list, tuple)) else [self.worker]

    def _call(self, name: str, *args):
        fn = getattr(self.workers[0], name)
        if hasattr(fn, "remote"):
            import ray

            return ray.get(fn.remote(*args))
        return fn(*args)

    def _generate(self, prompts: list[str], images: list[str], adapters: list[str | None],
                  max_new_tokens: int) -> list[str]:
        t0 = time.time()
        workers = self.workers
        if len(workers) == 1:
            out = self._call("generate", prompts, images, adapters, max_new_tokens, self.batch_size)
            self.shards.append({"replica": 0, "rows": len(prompts), "started": round(t0, 3),
                                "ended": round(time.time(), 3)})
        else:
            import ray

            parts: list[list[int]] = [[] for _ in workers]
            for b, rows in enumerate(batches(adapters, self.batch_size)):
                parts[b % len(workers)].extend(rows)
            pick = lambda xs, rows: [xs[i] for i in rows]  # noqa: E731
            refs = {w.generate.remote(pick(prompts, rows), pick(images, rows), pick(adapters, rows), max_new_tokens,
                                      self.batch_size): (r, rows) for r, (w, rows) in enumerate(zip(workers, parts))
                    if rows}
            out: list[str] = [""] * len(prompts)
            waiting = list(refs)
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1)
                replica, rows = refs[ready[0]]
                for i, text in zip(rows, ray.get(ready[0])):
                    out[i] = text
                self.shards.append({"replica": replica, "rows": len(rows), "started": round(t0, 3),
                                    "ended": round(time.time(), 3)})
        self.seconds += time.time() - t0
        self.generated += len(prompts)
        return out

    def generate(self, samples: Sequence[Sample], adapters: Sequence[str | None], max_new_tokens: int) -> list[str]:
        out: list[str | None] = [None] * len(samples)
        todo = []
        for i, (s, a) in enumerate(zip(samples, adapters)):
            hit = self.cache.get(a, s.uid, max_new_tokens)
            if hit is not None:
                out[i] = hit
                self.cache.hits += 1
            else:
                todo.append(i)
        if todo:
            res = self._generate([eval_prompt(samples[i]) for i in todo], [samples[i].image for i in todo],
                                 [adapters[i] for i in todo], max_new_tokens)
            for i, p in zip(todo, res):
                out[i] = p
                self.cache.put(adapters[i], samples[i].uid, max_new_tokens, p)
                self.cache.misses += 1
            chaos.point("eval")  # tests: a kill in the middle of an evaluation
        return out  # type: ignore[return-value]

    def complete(self, prompts: Sequence[str], images: Sequence[str], adapter: str | None,
                 max_new_tokens: int) -> list[str]:
        return self._generate(list(prompts), list(images), [adapter] * len(prompts), max_new_tokens)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return self._call("embed", list(texts), self.batch_size)

    def features(self, prompts: Sequence[str], images: Sequence[str]) -> dict[str, list[list[float]]]:
        return self._call("features", list(prompts), list(images), self.batch_size)

    def shape(self, prompts: Sequence[str], images: Sequence[str]) -> dict:
        return self._call("shape", list(prompts), list(images))
