"""The engine: one base model, its adapters, greedy decoding and embeddings.

- **Adapters** load from a local folder or ``s3://`` under a name the caller pins
  (``load(uri, name=...)``: the serving pool's experts) or under a name of the engine's,
  keyed by the adapter's URI and the digest of its ``meta.json`` and evicted least recently
  used beyond ``max_adapters`` (``load(uri)``: the stream's evaluation worker, which meets
  every adapter of a run). One engine holds one adapter format (PEFT, or a method's own).
- **Decoding** is greedy. Row i uses adapter ``adapters[i]`` (None = the base model), stops
  at ``max_new_tokens[i]`` and does not end before ``min_new_tokens[i]``. With
  ``mixed=True`` rows of different adapters share one ``generate`` (PEFT's per-row
  ``adapter_names``) where the family allows it (:meth:`Engine.one_forward`); with
  ``mixed=False`` rows are grouped by adapter. ``batch_size`` splits either into batches.
- **Embeddings**: the base language model's last hidden state, mean-pooled over a text's
  tokens and L2-normalised (a router's features). **Features** of an image + question pair
  from one forward of the base model (no adapter): the projected image features (the
  language model's inputs at the image's positions, mean-pooled) and the final layer's
  hidden states mean-pooled over the whole sequence (routers' features).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from mllmcl.engine.formats import PeftFormat

log = logging.getLogger(__name__)

BASE_ROW = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop (end of sequence) | length (hit the row's max_new_tokens)

    def to_dict(self) -> dict:
        return asdict(self)


class Engine:
    def __init__(self, model_path: str | None = None, dtype: str = "float32", threads: int = 0, *,
                 formats: Sequence = (), max_adapters: int = 16, backbone=None):
        from mllmcl.data.release import load_image
        from mllmcl.models import load_backbone
        from mllmcl.models.batching import PixelCache

        if threads:
            torch.set_num_threads(threads)
        if backbone is None:  # the engine's own copy of the base, on the accelerator when there is one
            self.backbone = load_backbone(model_path, dtype)
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self.model = self.backbone.model.to(self.device)
        else:  # a model the caller keeps using (and training): answered where it is
            self.backbone = backbone
            self.model = backbone.model
            self.device = next(self.model.parameters()).device
        self.model.eval()
        self.collator = self.backbone.collator
        self.tok = self.collator.tok
        self.pixel_cache = PixelCache(self.collator.images, load_image)
        self.formats = (PeftFormat, *formats)
        self.format = None  # the format of the loaded adapters, fixed by the first one
        self.peft = None  # PeftFormat's PeftModel, once a PEFT adapter is loaded
        self.adapters: dict[str, str] = {}  # loaded adapter name -> URI
        self.max_adapters = max_adapters
        self._cached: OrderedDict[str, str] = OrderedDict()  # engine-named adapters: key -> name, LRU order
        self._counter = 0

    @classmethod
    def from_model(cls, model, collator, pixel_cache=None) -> "Engine":
        """An engine over a model already in memory (the base, or a model trained in this process,
        answered as it is, on its own device: no adapters are loaded into it). ``pixel_cache``
        shares preprocessed images with the caller's training loop."""
        engine = cls(backbone=SimpleNamespace(model=model, collator=collator))
        if pixel_cache is not None:
            engine.pixel_cache = pixel_cache
        return engine

    def ready(self) -> bool:
        return True

    # ------------------------------------------------------------------ adapters

    def load(self, uri: str, name: str | None = None) -> str:
        """Load the adapter folder at ``uri`` (once) and return its name in this engine."""
        from mllmcl import storage
        from mllmcl.models.adapters import META, local_adapter

        if name is not None and name in self.adapters:
            return name
        key = None
        if name is None:
            pinned = next((n for n, u in self.adapters.items() if u == uri and n not in self._cached.values()), None)
            if pinned is not None:  # loaded under the caller's name (a replica's router)
                return pinned
            meta = storage.join(uri, META)  # digest and time: an adapter written anew at the same place is new
            key = f"{uri}#{hashlib.sha256(storage.read_bytes(meta)).hexdigest()[:12]}#{storage.modified(meta)}"
            if key in self._cached:
                self._cached.move_to_end(key)
                return self._cached[key]
            name = f"a{self._counter}"
            self._counter += 1
        with local_adapter(uri) as local:
            fmt = next((f for f in self.formats if f.detect(local)), None)
            if fmt is None:
                raise ValueError(f"{uri}: not an adapter this engine can load (formats: "
                                 f"{', '.join(f.name for f in self.formats)})")
            if self.format not in (None, fmt):
                raise ValueError(f"{uri}: a {fmt.name} adapter, but this engine holds {self.format.name} adapters "
                                 f"(one engine holds one adapter format)")
            self.format = fmt
            fmt.load(self, local, name)
        self.adapters[name] = uri
        if key is not None:
            self._cached[key] = name
            while len(self._cached) > self.max_adapters:
                self.unload(self._cached.popitem(last=False)[1])
        return name

    def unload(self, name: str) -> None:
        if name in self.adapters:
            self.format.delete(self, name)
            del self.adapters[name]

    # ------------------------------------------------------------------ decoding

    def pixels(self, images: Sequence):
        """Preprocessed images: URIs through the engine's cache, decoded images as they are."""
        if all(isinstance(i, str) for i in images):
            return self.pixel_cache.get(list(images))
        return self.collator.images.pixels(images)

    def _activate(self, adapters: Sequence[str | None]):
        """(model, context, extra generate kwargs) running the rows' adapters."""
        names = set(adapters)
        if len(names) == 1:
            name = next(iter(names))
            if self.format is None:
                return self.model, _null(), {}
            model, ctx = self.format.activate(self, name)
            return model, ctx, {}
        return self.peft, _null(), {"adapter_names": [a or BASE_ROW for a in adapters]}

    def one_forward(self, adapters: Sequence[str | None]) -> bool:
        """Whether rows of these adapters share one ``generate``. PEFT routes a mixed batch by
        row; a family whose projector sees all images' patches as one sequence (Qwen2-VL's
        merger) cannot route per image, so once any loaded adapter has its own projector copy
        (``lora.train_projector``: PEFT then wraps the merger for every adapter) a mixed
        batch runs one ``generate`` per adapter. A format without mixed batches never shares."""
        if len(set(adapters)) <= 1:
            return True
        if self.format is not None and not self.format.mixed_batches:
            return False
        if self.collator.images.image_rows:
            return True
        return not any(self.peft.peft_config[a].modules_to_save for a in self.adapters)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], images: Sequence, adapters: Sequence[str | None],
                 max_new_tokens: int | Sequence[int], min_new_tokens: Sequence[int] | None = None, *,
                 batch_size: int | None = None, mixed: bool = True) -> list[Completion]:
        """Greedy answers, one per prompt, in the prompts' order (see the module's docstring)."""
        n = len(prompts)
        if not n:
            return []
        limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
        unknown = {a for a in adapters if a is not None and a not in self.adapters}
        if unknown:
            raise KeyError(f"adapters not loaded: {sorted(unknown)}")
        if mixed and self.one_forward(adapters):
            groups = [list(range(n))]
        else:
            by: dict[str | None, list[int]] = {}
            for i, a in enumerate(adapters):
                by.setdefault(a, []).append(i)
            groups = list(by.values())
        step = batch_size or n
        out: list[Completion | None] = [None] * n
        for idx in groups:
            for start in range(0, len(idx), step):
                rows = idx[start:start + step]
                pick = lambda xs: None if xs is None else [xs[i] for i in rows]  # noqa: E731
                for i, c in zip(rows, self._decode(pick(prompts), pick(images), pick(adapters), pick(limits),
                                                   pick(min_new_tokens))):
                    out[i] = c
        return out  # type: ignore[return-value]

    def _decode(self, prompts, images, adapters, limits, minimum) -> list[Completion]:
        batch = self.collator.prompt_batch(list(prompts), self.pixels(images))
        batch = {k: v.to(self.device) for k, v in batch.items()}
        width = batch["input_ids"].shape[1]
        prompt_lens = batch["attention_mask"].sum(1).tolist()
        model, ctx, extra = self._activate(adapters)
        eos = self.tok.eos_token_id
        if minimum is not None and any(minimum):
            extra["logits_processor"] = LogitsProcessorList([_RowMinNewTokens(width, list(minimum), eos)])
        rows = getattr(self.format, "rows", None)  # a format that sets per-row state from the prompt batch
        name = adapters[0] if len(set(adapters)) == 1 else None
        with ctx, (rows(self, name, batch) if rows is not None and name is not None else _null()):
            gen = model.generate(**batch, max_new_tokens=max(limits), do_sample=False, num_beams=1,
                                 pad_token_id=self.tok.pad_token_id, eos_token_id=eos, **extra)
        out = []
        for i, limit in enumerate(limits):
            new = gen[i, width:width + limit].tolist()
            stop = new.index(eos) if eos in new else None
            tokens = new if stop is None else new[:stop]
            out.append(Completion(self.tok.decode(tokens, skip_special_tokens=True).strip(), int(prompt_lens[i]),
                                  len(tokens), "stop" if stop is not None else "length"))
        return out

    def complete(self, prompts: Sequence[str], images: Sequence, adapter: str | None, max_new_tokens: int,
                 batch_size: int | None = None) -> list[str]:
        """Answers of one adapter (URI, loaded once; None = the base model): a router's backend."""
        name = None if adapter is None else self.load(adapter)
        return [c.text for c in self.generate(prompts, images, [name] * len(prompts), max_new_tokens,
                                              batch_size=batch_size)]

    def answer(self, samples: Sequence, max_new_tokens: int, batch_size: int = 64) -> list[str]:
        """The model's answers to test samples (their question as shown at test time, their image)."""
        from mllmcl.data.prompts import eval_prompt

        return self.complete([eval_prompt(s) for s in samples], [s.image for s in samples], None, max_new_tokens,
                             batch_size)

    # ------------------------------------------------------------------ embeddings

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 64) -> list[list[float]]:
        """Text embeddings from the base model: the language model's last hidden state, mean-pooled
        over the text's tokens (no image, no adapter), L2-normalised."""
        lm = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        if lm is None:
            raise ValueError("this backbone exposes no language model (get_decoder) to embed text with")
        _, ctx, _ = self._activate([None])
        out: list[list[float]] = []
        with ctx:
            for start in range(0, len(texts), batch_size):
                enc = self.tok(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                               truncation=True, max_length=self.collator.max_length)
                enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                hidden = lm(**enc).last_hidden_state.float()
                mask = enc["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                out.extend(torch.nn.functional.normalize(pooled, dim=-1).cpu().tolist())
        return out


    def shape(self, prompts: Sequence[str], images: Sequence) -> dict:
        """What a router's compute is counted from: the base model's parameters (all, and its
        language model's), hidden size, and the mean tokens of ``prompts`` read with their images
        (``prompt_tokens``) and alone (``text_tokens``)."""
        lm = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model
        batch = self.collator.prompt_batch(list(prompts), self.pixels(list(images)))
        text = self.tok(list(prompts), padding=True, truncation=True, max_length=self.collator.max_length)
        n = max(1, len(prompts))
        hidden = getattr(getattr(self.model.config, "text_config", self.model.config), "hidden_size", None)
        return {"params": sum(p.numel() for p in self.model.parameters()),
                "lm_params": sum(p.numel() for p in lm.parameters()), "hidden": hidden,
                "prompt_tokens": float(batch["attention_mask"].sum()) / n,
                "text_tokens": float(sum(sum(m) for m in text["attention_mask"])) / n}

    @torch.no_grad()
    def features(self, prompts: Sequence[str], images: Sequence, batch_size: int = 32) -> dict[str, list[list[float]]]:
        """Per (question, image), from one forward of the base model (no adapter), batch by batch
        (:meth:`batch_features`): ``image`` and ``hidden``, lists of floats."""
        out: dict[str, list[list[float]]] = {"image": [], "hidden": []}
        for start in range(0, len(prompts), batch_size):
            batch = self.collator.prompt_batch(list(prompts[start:start + batch_size]),
                                               self.pixels(list(images[start:start + batch_size])))
            feats = self.batch_features({k: v.to(self.device) for k, v in batch.items()})
            for key in out:
                out[key].extend(feats[key].cpu().tolist())
        return out

    @torch.no_grad()
    def batch_features(self, batch: dict) -> dict[str, torch.Tensor]:
        """The features of one prompt batch (``collator.prompt_batch``, on the engine's device), from
        one forward of the base model (no adapter), float32, one row per prompt: ``image``, the mean
        of the language model's input embeddings at the image's token positions (what the projector
        made of the image); ``hidden``, the final layer's hidden states mean-pooled over the sequence
        (the question read with its image). Neither is normalised. :meth:`features` and an adapter
        format's ``rows`` (per-row state at decoding) both compute them here."""
        image_token = getattr(self.model.config, "image_token_id", None)
        if image_token is None:
            image_token = getattr(self.model.config, "image_token_index", None)
        _, ctx, _ = self._activate([None])
        with ctx:
            res = self.model(**batch, output_hidden_states=True, return_dict=True)
        first, last = res.hidden_states[0].float(), res.hidden_states[-1].float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        hidden = (last * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        at_image = (batch["input_ids"] == image_token).unsqueeze(-1).float() if image_token is not None \
            else torch.zeros_like(mask)
        if float(at_image.sum()) == 0:  # the family puts image features elsewhere: the sequence's mean
            at_image = mask
        return {"image": (first * at_image).sum(1) / at_image.sum(1).clamp(min=1.0), "hidden": hidden}


def _null():
    import contextlib

    return contextlib.nullcontext()


class _RowMinNewTokens(LogitsProcessor):
    """Per-row ``min_new_tokens`` (``generate``'s own is one number for the whole batch):
    the end-of-sequence token is barred from row i until it has ``minimum[i]`` new tokens."""

    def __init__(self, width: int, minimum: list[int], eos: int):
        self.width, self.minimum, self.eos = width, torch.tensor(minimum), eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        short = (self.minimum > input_ids.shape[1] - self.width).to(scores.device)
        scores[:, self.eos] = scores[:, self.eos].masked_fill(short, float("-inf"))
        return scores


def evaluate_task(engine: Engine, spec, samples: Sequence, *, batch_size: int = 64, max_new_tokens: int | None = None,
                  stage: int = -1):
    """A task's test samples answered by the engine's model and scored (a ``TaskEval``)."""
    from mllmcl.evaluation.predictions import score_predictions

    preds = engine.answer(samples, max_new_tokens or spec.max_new_tokens, batch_size)
    return score_predictions(spec, samples, preds, stage=stage)
