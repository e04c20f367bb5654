"""The model side of serving, without Serve: a base model holding named PEFT adapters that
answers a batch whose rows use different adapters in **one** ``generate`` (PEFT's
per-row ``adapter_names``; see ``one_forward`` for the one exception), and MR-LoRA
routing on top of it. The Serve deployments and the Ray Data batch evaluation both run
this code.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

log = logging.getLogger(__name__)


BASE_ROW = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch
ROUTER = "router"


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop (end of sequence) | length (hit the row's max_new_tokens)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Route:
    index: int  # expert index (router letter order)
    answer: str  # the router's raw answer
    fallback: bool  # the answer did not parse; ``index`` comes from the fallback rule

    def to_dict(self) -> dict:
        return asdict(self)


class AdapterEngine:
    def __init__(self, model_path: str, dtype: str = "float32", threads: int = 0):
        from mllmcl.models import load_backbone

        if threads:
            torch.set_num_threads(threads)
        self.backbone = load_backbone(model_path, dtype)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.backbone.model.to(self.device)
        self.collator = self.backbone.collator
        self.tok = self.collator.tok
        self.peft = None
        self.adapters: set[str] = set()

    # ------------------------------------------------------------------ adapters

    def load(self, name: str, uri: str) -> None:
        """Load the PEFT adapter folder at ``uri`` (local or s3://) under ``name``."""
        from peft import PeftModel

        from mllmcl.models.adapters import adapter_format, local_adapter

        if name in self.adapters:
            return
        with local_adapter(uri) as local:
            fmt = adapter_format(local)
            if fmt != "peft":
                raise ValueError(f"{uri}: a {fmt} adapter; serving batches PEFT adapters only")
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.backbone.model, local, adapter_name=name)
            else:
                self.peft.load_adapter(local, adapter_name=name)
        self.peft.eval()
        self.adapters.add(name)

    def unload(self, name: str) -> None:
        if name in self.adapters:
            self.peft.delete_adapter(name)
            self.adapters.discard(name)

    # ------------------------------------------------------------------ inputs

    def pixels(self, images: Sequence):
        return self.collator.images.pixels(images)

    # ------------------------------------------------------------------ generation

    def _model(self, adapters: Sequence[str | None]):
        """(model, context, extra generate kwargs) for the rows' adapters."""
        names = {a for a in adapters}
        if self.peft is None or names == {None}:
            ctx = self.peft.disable_adapter() if self.peft is not None else contextlib.nullcontext()
            return self.backbone.model, ctx, {}
        if len(names) == 1:  # one adapter: the plain PEFT path (as the stream runner's evaluation actor)
            self.peft.set_adapter(next(iter(names)))
            return self.peft, contextlib.nullcontext(), {}
        return self.peft, contextlib.nullcontext(), {"adapter_names": [a or BASE_ROW for a in adapters]}

    def one_forward(self, adapters: Sequence[str | None]) -> bool:
        """Whether rows of these adapters share one ``generate``. PEFT routes a mixed batch by
        row; a family whose projector sees all images' patches as one sequence (Qwen2-VL's
        merger) cannot route per image, so once any loaded adapter has its own projector copy
        (``lora.train_projector``: PEFT then wraps the merger for every adapter) a mixed
        batch runs one ``generate`` per adapter."""
        if len(set(adapters)) <= 1 or self.collator.images.image_rows:
            return True
        return not any(self.peft.peft_config[a].modules_to_save for a in self.adapters)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], images: Sequence, adapters: Sequence[str | None],
                 max_new_tokens: Sequence[int], min_new_tokens: Sequence[int] | None = None) -> list[Completion]:
        """Greedy answers in one forward pass per decoding step; row i uses adapter
        ``adapters[i]`` (None = base model), stops at ``max_new_tokens[i]`` tokens and does
        not end before ``min_new_tokens[i]``."""
        if not prompts:
            return []
        unknown = {a for a in adapters if a is not None and a not in self.adapters}
        if unknown:
            raise KeyError(f"adapters not loaded: {sorted(unknown)}")
        if not self.one_forward(adapters):
            out: list[Completion | None] = [None] * len(prompts)
            for name in dict.fromkeys(adapters):
                idx = [i for i, a in enumerate(adapters) if a == name]
                pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
                for i, c in zip(idx, self.generate(pick(prompts), pick(images), [name] * len(idx),
                                                   pick(max_new_tokens), pick(min_new_tokens))):
                    out[i] = c
            return out  # type: ignore[return-value]
        batch = self.collator.prompt_batch(list(prompts), self.pixels(images))
        batch = {k: v.to(self.device) for k, v in batch.items()}
        width = batch["input_ids"].shape[1]
        prompt_lens = batch["attention_mask"].sum(1).tolist()
        model, ctx, extra = self._model(adapters)
        eos = self.tok.eos_token_id
        if min_new_tokens is not None and any(min_new_tokens):
            extra["logits_processor"] = LogitsProcessorList([_RowMinNewTokens(width, list(min_new_tokens), eos)])
        with ctx:
            gen = model.generate(**batch, max_new_tokens=max(max_new_tokens), do_sample=False, num_beams=1,
                                 pad_token_id=self.tok.pad_token_id, eos_token_id=eos, **extra)
        out = []
        for i, limit in enumerate(max_new_tokens):
            new = gen[i, width:width + limit].tolist()
            stop = new.index(eos) if eos in new else None
            tokens = new if stop is None else new[:stop]
            out.append(Completion(self.tok.decode(tokens, skip_special_tokens=True).strip(), int(prompt_lens[i]),
                                  len(tokens), "stop" if stop is not None else "length"))
        return out


class _RowMinNewTokens(LogitsProcessor):
    """Per-row ``min_new_tokens`` (``generate``'s own is one number for the whole batch):
    the end-of-sequence token is barred from row i until it has ``minimum[i]`` new tokens."""

    def __init__(self, width: int, minimum: list[int], eos: int):
        self.width, self.minimum, self.eos = width, torch.tensor(minimum), eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        short = (self.minimum > input_ids.shape[1] - self.width).to(scores.device)
        scores[:, self.eos] = scores[:, self.eos].masked_fill(short, float("-inf"))
        return scores


def fallback_index(rule: str, n_experts: int, seed: int, question: str) -> int:
    """Expert for a router answer that does not parse. ``random`` is seeded by the request's
    text, so one question always goes to the same expert (the stream runner's seeded draw
    depends on the task, which a service does not know)."""
    if rule == "first":
        return 0
    if rule == "last":
        return n_experts - 1
    digest = hashlib.sha256(f"{seed}|{question}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n_experts


def route(engine: AdapterEngine, specs: Sequence, questions: Sequence[str], images: Sequence, *,
          router: str = ROUTER, fallback: str = "random", seed: int = 0) -> list[Route]:
    """MR-LoRA routing: the router adapter answers the expert's letter for every question."""
    from mllmcl.methods.mr_lora import ROUTER_MAX_NEW_TOKENS
    from mllmcl.routing.router import parse_letter, router_prompt

    prompts = [router_prompt(specs, q) for q in questions]
    answers = engine.generate(prompts, images, [router] * len(prompts), [ROUTER_MAX_NEW_TOKENS] * len(prompts))
    out = []
    for q, a in zip(questions, answers):
        idx = parse_letter(a.text, len(specs))
        out.append(Route(idx, a.text, False) if idx is not None else
                   Route(fallback_index(fallback, len(specs), seed, q), a.text, True))
    return out


class Ensemble:
    """Router + every expert of a served run in one engine: the batch-evaluation worker
    (one model in memory; Serve splits the same work into a router and an expert pool)."""

    def __init__(self, run, threads: int = 0):
        self.run = run
        self.names = list(run.experts)
        self.engine = AdapterEngine(run.model_path, run.dtype, threads)
        for name, uri in run.experts.items():
            if uri is not None:
                self.engine.load(name, uri)
        if run.router is not None:
            self.engine.load(ROUTER, run.router)

    def answer(self, questions: Sequence[str], images: Sequence, max_new_tokens: int | None = None) -> list[dict]:
        """Route and answer; each answer's budget is its expert's unless ``max_new_tokens`` is given."""
        if self.run.router is not None:
            routes = route(self.engine, self.run.specs, questions, images, fallback=self.run.router_fallback,
                           seed=self.run.seed)
        else:
            routes = [Route(0, "", False)] * len(questions)
        experts = [self.names[r.index] for r in routes]
        adapters = [name if self.run.experts[name] is not None else None for name in experts]
        budgets = [max_new_tokens or self.run.max_new_tokens[e] for e in experts]
        comps = self.engine.generate(questions, images, adapters, budgets)
        return [{"prediction": c.text, "expert": e, "router_answer": r.answer, "router_fallback": r.fallback}
                for c, e, r in zip(comps, experts, routes)]
