"""sefe: SEFE (Chen et al., 2025) — RegLoRA (a regularised new LoRA per task, all merged)
plus answer-style diversification (ASD) of the training data.

**RegLoRA.** Stage k trains a fresh LoRA of rank ``lora.rank`` on task k on top of the
model with every earlier task's LoRA merged (``W <- W + scaling_i B_i A_i`` after task i).
The merge is kept as O-LoRA's module keeps it (:func:`mllmcl.methods.olora.concatenate_lora`):
the stage-k adapter is ONE PEFT adapter, the concatenation of all task LoRAs (ranks
concatenated, so its delta is exactly ``sum_i scaling_i B_i A_i``), servable as any PEFT
adapter. While task k trains, the previous stage's concatenated adapter is loaded frozen
and active beside the new LoRA; a frozen adapter's branch adds ``scaling B A x`` to the
layer's output, the same as adding ``scaling B A`` to ``W``, so training on top of the
frozen earlier LoRAs is the same function (and the same gradients for the new LoRA) as
training on the merged weights. The frozen branch's dropout is switched off for that
reason (a merged weight has no dropout).

**Key elements.** After task k, in every adapted weight matrix, the positions of the top
``method.sefe_top_fraction`` (default 2%) entries of ``|scaling B_k A_k|`` (task k's new
LoRA alone) by magnitude are the task's key elements; the stage keeps their union with the
earlier tasks' positions in its adapter folder, in a file of its own (:data:`POSITIONS_FILE`:
safetensors, per layer the sorted flat ``int64`` indices ``row * in + col``). PEFT reads
only ``adapter_config.json`` and ``adapter_model.safetensors``, so the extra file changes
nothing for the engine or the serving path; its suffix is not ``.safetensors`` so that
:func:`mllmcl.models.adapters.local_adapter`'s weights check still notices a folder that
lost its PEFT weights.

**Penalty.** At stage k > 0 the loss is ``CE + method.sefe_lambda * penalty`` with
``penalty = mean over adapted matrices of mean |(scaling B A)[positions]|`` of the new
LoRA at the stored positions (reference ``lambda = 2.5e3``), through the adapter kind's
``extra_loss``. An entry ``(B A)[i, j] = B[i, :] . A[:, j]`` is computed from the gathered
rows of B and columns of A; where the positions are so many that the gathered factors
would be larger than the product itself, the product is formed once and indexed (the same
values; less memory kept for the backward).

**ASD.** ``method.sefe_asd_fraction`` (default 0.2, the paper's SEFE; 0 gives MCITlib
v3's RegLoRA without ASD) of each task's *training* samples are rewritten into another
answer style, chosen by a seeded rule (run seed and stage): yes/no ("... Is the answer X?"
with X the true answer or a wrong one), multiple choice (the true answer lettered among
2-4 options), short explanation ("X. The answer is X.") and short answer (the option's
text for a multiple-choice question). Test samples are never rewritten. The reference has
an MLLM write the rewrites; on the synthetic twin a rule-based rewrite whose only
vocabulary is the task's own training answers is the honest equivalent (no other task's
data, no look-ahead).

Departures from the reference (METHODS-NEXT.md, "SEFE"):

- wrong answers and options are drawn among the task's answers *of the same kind* as the
  true one (yes/no, option letters, numbers, other text), so a distractor is a plausible
  answer to the question ("Is the answer forest?" is never asked of a yes/no question); a
  kind with two distinct answers gives two options (yes/no), and a style whose kind has
  fewer than two distinct answers is skipped for that sample;
- a sample is rewritten into a style other than its own (a yes/no question is not asked
  again as yes/no; a multiple-choice question is not re-lettered; "short answer" is a
  rewrite only for a multiple-choice question whose options it lists, else it is the
  sample's own style); the explanation always applies, so exactly the fraction is
  rewritten (``meta.json`` counts the rewrites by style);
- the rule-made explanation says only ``The answer is X`` (with the option's text when
  the question lists it): there is no rationale to draw on without an MLLM.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch

from mllmcl.data.prompts import LETTER_INSTRUCTION, LETTERS, MED_INSTRUCTION, YES_NO_INSTRUCTION
from mllmcl.data.types import Sample
from mllmcl.methods import register
from mllmcl.methods.base import Answers, CLMethod, MethodOptions, ServingPlan, Stage, answer_with
from mllmcl.methods.olora import NEW, OLD, save_stacked, stack_on_previous, stacked_request
from mllmcl.training.adapter_kinds import unwrap

POSITIONS_FILE = "sefe_positions.idx"  # safetensors; not *.safetensors: see the module's docstring
POSITIONS_FORMAT = "sefe-positions-1"
_PREFIX = "base_model.model."  # PeftModel's prefix of the wrapped model's module names


# --------------------------------------------------------------------------- key elements and the penalty

def lora_layers(model, adapter: str = NEW) -> dict[str, object]:
    """The PEFT LoRA layers holding ``adapter``, by module name (without PEFT's prefix)."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix(_PREFIX): m for name, m in unwrap(model).named_modules()
            if isinstance(m, LoraLayer) and adapter in m.lora_A}


def _factors(layer, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B: out x r, A: r x in, scaling) of ``adapter`` in a LoRA layer of an ``nn.Linear``."""
    return layer.lora_B[adapter].weight, layer.lora_A[adapter].weight, float(layer.scaling[adapter])


def delta_weight(layer, adapter: str = NEW) -> torch.Tensor:
    """``scaling * B A`` (out x in, float32) of ``adapter`` in one LoRA layer."""
    b, a, s = _factors(layer, adapter)
    return s * (b.float() @ a.float())


def top_positions(delta: torch.Tensor, fraction: float) -> torch.Tensor:
    """Sorted flat indices of the ``round(fraction * numel)`` (at least one) entries of ``delta``
    largest in magnitude; ties go to the lower index (a stable sort: the same on every device)."""
    flat = delta.detach().abs().flatten()
    k = min(flat.numel(), max(1, int(math.floor(fraction * flat.numel() + 0.5))))
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    return torch.sort(order).values.to(torch.int64).cpu()


def key_positions(model, fraction: float, adapter: str = NEW) -> dict[str, torch.Tensor]:
    """Per LoRA layer of ``adapter``: the positions of its top ``fraction`` entries of ``|scaling B A|``."""
    with torch.no_grad():
        return {name: top_positions(delta_weight(m, adapter), fraction) for name, m in lora_layers(model, adapter).items()}


def union_positions(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per layer, the sorted union of two tasks' positions (the same layers on both sides)."""
    if set(old) != set(new):
        raise ValueError(f"SEFE: the stored key elements cover other layers than the new LoRA (only stored: "
                         f"{sorted(set(old) - set(new))[:3]}, only new: {sorted(set(new) - set(old))[:3]}); "
                         f"lora.target_modules must stay the same over the stream")
    return {name: torch.unique(torch.cat([old[name].cpu(), new[name].cpu()])) for name in sorted(new)}


def values_at(layer, positions: torch.Tensor, adapter: str = NEW) -> torch.Tensor:
    """``(scaling * B A)`` at the flat ``positions`` of one layer, differentiable in B and A.

    ``(B A)[i, j] = B[i, :] . A[:, j]``: the gathered rows of B and columns of A (P x r each,
    kept for the backward), unless that is more than the product itself (out x in)."""
    b, a, s = _factors(layer, adapter)
    b, a = b.float(), a.float()
    n_out, n_in = b.shape[0], a.shape[1]
    idx = positions.to(b.device)
    if 2 * idx.numel() * b.shape[1] <= n_out * n_in:
        rows, cols = idx // n_in, idx % n_in
        return s * (b.index_select(0, rows) * a.index_select(1, cols).T).sum(dim=1)
    return s * (b @ a).flatten().index_select(0, idx)


def sefe_penalty(model, positions: dict[str, torch.Tensor], adapter: str = NEW) -> torch.Tensor:
    """Mean over the adapted matrices of the mean ``|scaling B A|`` of ``adapter`` at ``positions``."""
    layers = lora_layers(model, adapter)
    terms = [values_at(layers[name], idx, adapter).abs().mean() for name, idx in sorted(positions.items())
             if idx.numel()]
    return torch.stack(terms).mean() if terms else torch.zeros(())


def save_positions(positions: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], folder: str,
                   info: dict | None = None) -> None:
    from safetensors.torch import save_file

    # one metadata entry: safetensors writes a header's metadata in no fixed order (byte-identical files)
    meta = {"format": POSITIONS_FORMAT, "shapes": {n: list(shapes[n]) for n in sorted(positions)}, **(info or {})}
    save_file({n: positions[n].to(torch.int64).contiguous() for n in sorted(positions)},
              os.path.join(folder, POSITIONS_FILE), metadata={"sefe": json.dumps(meta, sort_keys=True)})


def load_positions(folder: str) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """(positions, shapes) stored in an adapter folder by :func:`save_positions`."""
    from safetensors import safe_open

    path = os.path.join(folder, POSITIONS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder}: no {POSITIONS_FILE} (the key elements of the earlier tasks); "
                                f"SEFE continues only from an adapter that SEFE wrote")
    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("sefe", "{}"))
        if meta.get("format") != POSITIONS_FORMAT:
            raise ValueError(f"{path}: format {meta.get('format')!r}, expected {POSITIONS_FORMAT!r}")
        positions = {k: f.get_tensor(k) for k in f.keys()}
    return positions, {n: tuple(s) for n, s in meta["shapes"].items()}


def layer_shapes(model, adapter: str = NEW) -> dict[str, tuple[int, int]]:
    return {n: (_factors(m, adapter)[0].shape[0], _factors(m, adapter)[1].shape[1])
            for n, m in lora_layers(model, adapter).items()}


# --------------------------------------------------------------------------- the adapter kind

class SEFEKind:
    """``adapter_args``: ``lambda``, ``top_fraction``, ``previous`` (URI of the earlier tasks' adapter or None)."""

    def __init__(self, request):
        self.request = request
        args = request.adapter_args
        self.lam = float(args.get("lambda", 2.5e3))
        self.top_fraction = float(args.get("top_fraction", 0.02))
        self.previous = args.get("previous")
        self.positions: dict[str, torch.Tensor] = {}  # the earlier tasks' key elements (empty at stage 0)
        self.shapes: dict[str, tuple[int, int]] = {}  # their layers' (out, in), stored with them
        self._on_device: dict[str, torch.Tensor] = {}

    def build(self, backbone_model):
        def read_positions(folder):
            self.positions, self.shapes = load_positions(folder)

        model = stack_on_previous(backbone_model, self.request.lora, self.previous, read_positions)
        if not self.previous:
            return model
        for layer in lora_layers(model, OLD).values():  # the merged earlier LoRAs: no dropout on them
            layer.lora_dropout[OLD] = torch.nn.Identity()
        if layer_shapes(model) != self.shapes or set(self.positions) != set(self.shapes):
            raise ValueError(f"{self.previous}: the stored key elements do not match the new LoRA's layers "
                             f"(lora.target_modules must stay the same over the stream)")
        return model

    def extra_loss(self, model) -> torch.Tensor | None:
        if not self.positions or not self.lam:
            return None
        if not self._on_device:
            devices = {n: m.lora_B[NEW].weight.device for n, m in lora_layers(model).items()}
            self._on_device = {n: idx.to(devices[n]) for n, idx in self.positions.items()}
        return self.lam * sefe_penalty(model, self._on_device)

    def save(self, model, uri: str, meta: dict) -> None:
        core = unwrap(model)
        fresh = key_positions(core, self.top_fraction)
        positions = union_positions(self.positions, fresh) if self.positions else fresh
        meta = {**meta, "sefe_lambda": self.lam, "sefe_top_fraction": self.top_fraction,
                "sefe_key_elements": sum(int(p.numel()) for p in positions.values())}
        save_stacked(core, uri, meta, extra=lambda folder: save_positions(
            positions, layer_shapes(core), folder, {"top_fraction": self.top_fraction}))


# --------------------------------------------------------------------------- answer-style diversification

YES_NO, CHOICE, EXPLANATION, SHORT = "yes_no", "choice", "explanation", "short"
STYLES = (YES_NO, CHOICE, EXPLANATION, SHORT)
EXPLANATION_INSTRUCTION = "Answer the question, then explain the answer in one short sentence."
OPTION_TEXT_INSTRUCTION = "Answer with the text of the correct option directly."
_INSTRUCTIONS = (MED_INSTRUCTION, YES_NO_INSTRUCTION, LETTER_INSTRUCTION)
_LETTER = re.compile(r"\(?([A-Z])\)?")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_OPTION_LINE = re.compile(r"\s*\(?([A-Z])[.)]\s+(\S.*?)\s*")


def answer_kind(answer: str) -> str:
    """yes_no | letter | number | text: the kind of answer a distractor must share."""
    a = answer.strip()
    if a.lower() in ("yes", "no"):
        return "yes_no"
    if _LETTER.fullmatch(a):
        return "letter"
    return "number" if _NUMBER.fullmatch(a) else "text"


def answer_vocabulary(samples: Sequence[Sample]) -> dict[str, tuple[str, ...]]:
    """The distinct training answers of ``samples`` (one task's), sorted, by kind."""
    vocab: dict[str, set[str]] = {}
    for s in samples:
        vocab.setdefault(answer_kind(s.target), set()).add(s.target)
    return {k: tuple(sorted(v)) for k, v in sorted(vocab.items())}


def own_style(answer: str) -> str:
    kind = answer_kind(answer)
    return YES_NO if kind == "yes_no" else CHOICE if kind == "letter" else SHORT


def listed_options(question: str) -> dict[str, str]:
    """The options a multiple-choice question lists (``A. text`` or ``(A) text`` lines), by letter."""
    return {m.group(1): m.group(2) for m in map(_OPTION_LINE.fullmatch, question.splitlines()) if m}


def base_question(question: str) -> str:
    """The question without the answer-format instruction it ends with (if any)."""
    q = question.rstrip()
    for inst in _INSTRUCTIONS:
        if q.endswith(inst):
            return q[: -len(inst)].rstrip()
    return q


def _option_text(sample: Sample) -> str | None:
    m = _LETTER.fullmatch(sample.target.strip())
    return listed_options(sample.question).get(m.group(1)) if m else None


def styles_for(sample: Sample, vocab: dict[str, tuple[str, ...]]) -> list[str]:
    """The styles ``sample`` can be rewritten into (in :data:`STYLES` order): not its own, and
    only those that make sense with its task's vocabulary."""
    kind, own = answer_kind(sample.target), own_style(sample.target)
    peers = len(vocab.get(kind, ()))
    out = []
    if own != YES_NO and peers >= 2:
        out.append(YES_NO)
    if own != CHOICE and peers >= 2:
        out.append(CHOICE)
    out.append(EXPLANATION)
    if own == CHOICE and _option_text(sample) is not None:
        out.append(SHORT)
    return out


def rewrite(sample: Sample, style: str, vocab: dict[str, tuple[str, ...]], rng: random.Random) -> Sample:
    """``sample`` asked and answered in ``style`` (the image, ids and the rest unchanged)."""
    truth, base = sample.target, base_question(sample.question)
    if style == YES_NO:
        wrong = [a for a in vocab[answer_kind(truth)] if a != truth]
        asked = truth if rng.random() < 0.5 else rng.choice(wrong)
        question = f"{base}\nIs the answer {asked}?\n{YES_NO_INSTRUCTION}"
        answer = "yes" if asked == truth else "no"
    elif style == CHOICE:
        wrong = [a for a in vocab[answer_kind(truth)] if a != truth]
        n = min(len(wrong) + 1, rng.choice((3, 4)))
        options = [truth, *rng.sample(wrong, n - 1)]
        rng.shuffle(options)
        lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
        question = f"{base}\n{lines}\n{LETTER_INSTRUCTION}"
        answer = LETTERS[options.index(truth)]
    elif style == EXPLANATION:
        text = _option_text(sample)
        question = f"{base}\n{EXPLANATION_INSTRUCTION}"
        answer = f"{truth}. The answer is {truth}" + (f": {text}." if text else ".")
    elif style == SHORT:
        text = _option_text(sample)
        if text is None:
            raise ValueError(f"{sample.uid}: no option text to answer with (style {SHORT!r})")
        question, answer = f"{base}\n{OPTION_TEXT_INSTRUCTION}", text
    else:
        raise ValueError(f"unknown answer style {style!r}, expected one of {STYLES}")
    return dataclasses.replace(sample, question=question, answer=answer, meta={**sample.meta, "sefe_asd": style})


def diversify(samples: Sequence[Sample], fraction: float, seed: int, stage: int) -> tuple[list[Sample], dict[str, int]]:
    """``round(fraction * len(samples))`` of one task's training samples, drawn by a rule seeded by
    (seed, stage), rewritten into another answer style; the vocabulary is these samples' answers
    alone. Returns the samples (in their order) and how many went to each style."""
    samples = list(samples)
    count = min(len(samples), int(math.floor(fraction * len(samples) + 0.5)))
    if not count:
        return samples, {}
    rng = random.Random(f"sefe-asd/{seed}/{stage}")
    vocab = answer_vocabulary(samples)
    styles: Counter = Counter()
    for i in sorted(rng.sample(range(len(samples)), count)):
        options = styles_for(samples[i], vocab)
        style = rng.choice(options)
        samples[i] = rewrite(samples[i], style, vocab, rng)
        styles[style] += 1
    return samples, dict(sorted(styles.items()))


# --------------------------------------------------------------------------- options and the method

@dataclass(frozen=True)
class SEFEOptions(MethodOptions):
    sefe_lambda: float = 2.5e3  # weight of the key-element penalty (the reference's)
    sefe_top_fraction: float = 0.02  # share of each matrix's entries that are a task's key elements
    sefe_asd_fraction: float = 0.2  # share of each task's training samples rewritten into another style (0: no ASD)

    def check(self) -> list[str]:
        p = []
        if not (math.isfinite(self.sefe_lambda) and self.sefe_lambda >= 0):
            p.append(f"method.sefe_lambda={self.sefe_lambda}: must be a finite number >= 0")
        if not 0 < self.sefe_top_fraction <= 1:
            p.append(f"method.sefe_top_fraction={self.sefe_top_fraction}: must be in (0, 1]")
        if not 0 <= self.sefe_asd_fraction <= 1:
            p.append(f"method.sefe_asd_fraction={self.sefe_asd_fraction}: must be in [0, 1]")
        return p

    def check_with(self, cfg) -> list[str]:
        if cfg.lora.train_projector:
            return ["lora.train_projector: not supported by sefe (its task LoRAs are merged); "
                    "use it with mr_lora, lora_ft, replay or joint"]
        return []


@register("sefe")
class SEFE(CLMethod):
    Options = SEFEOptions

    def plan(self, stage: Stage):
        m = self.options
        samples, styles = diversify(stage.task.train, m.sefe_asd_fraction, stage.cfg.run.seed, stage.k)
        return [stacked_request(stage, samples, SEFEKind, {"lambda": m.sefe_lambda, "top_fraction": m.sefe_top_fraction},
                                sefe_tasks=stage.k + 1, sefe_asd_fraction=m.sefe_asd_fraction,
                                sefe_asd_styles=styles)]

    def answer(self, stage: Stage, predictor) -> Answers:
        return answer_with(stage, predictor, stage.expert_uri())

    def serving(self, stage: Stage) -> ServingPlan:
        return ServingPlan({self.name: stage.expert_uri()})  # the summed task LoRAs, one PEFT adapter
