"""phi_dpo: φ-DPO (CVPR 2026) — one LoRA trained task after task by focal-weighted preference
optimisation against the previous task's model.

Stage k continues stage k-1's PEFT LoRA (as ``lora_ft``; stage 0 starts from a fresh LoRA,
B = 0, i.e. the base model) and is served as that one adapter. The reference policy is the
task k-1 model, frozen: preference optimisation against it is the anti-forgetting mechanism.
Right after the adapter is built, before any step, the policy *is* that model; so the adapter
kind's ``prepare`` (run on every rank before the first step) computes, in eval mode, without
gradients and in batches, the reference log-probability of every training pair's chosen and
rejected answer, keyed by sample uid, and keeps them for the fit; no second model is held in
memory. A resumed fit runs ``prepare`` again *before* its checkpoint is loaded, so its
reference is again the previous task's model (the same numbers as the first attempt).

Pairs: the chosen answer is the training sample's target; the rejected answer is a wrong
answer from the task's own training answers: one of the task's distinct targets (after
SQuAD normalisation, :func:`mllmcl.evaluation.scorers.normalize_answer`) that matches none of
the sample's acceptable answers, drawn uniformly with a generator seeded by (run seed, stage,
sample uid), so the pairs are deterministic and independent of sample order, of the next task
and of the number of workers. A sample for which no such answer exists (a task with fewer than
two distinct answers) is trained with the SFT term alone, at full weight.

Objective (:class:`FocalDPO`, the fit's ``objective``): a micro-batch stacks the chosen rows
and the rejected rows of its samples in one forward (DDP sees one forward per backward); a
sequence's log-probability is the sum of its answer tokens' log-softmax (the answer and the
end-of-sequence token, as the labels of :meth:`Collator.train_batch`). Per pair::

    h = beta * [(lp_w - ref_w) - (lp_l - ref_l)],   p = sigmoid(h)
    loss = -(1 - p)^gamma * log p  +  sft_weight * CE(chosen)

with ``log p = logsigmoid(h)`` and ``(1 - p)^gamma = exp(gamma * logsigmoid(-h))`` for
stability (gamma = 0 is plain DPO), CE the chosen answer's mean token negative
log-likelihood; the loss is a mean over the micro-batch's samples, and ``weight`` is their
number (the pairs, plus any SFT-only samples), so every pair weighs the same across
micro-batches and ranks. Options: ``method.dpo_beta`` (0.1) and ``method.dpo_gamma`` (2.0),
the paper's best; ``method.dpo_sft_weight`` (1.0).

Where this departs from the reference (only the abstract and summaries could be read):
- rejected answers: the authors built their own pairs for MLLM-CL (how is unknown); here a
  wrong answer from the task's own answer vocabulary (METHODS-NEXT.md: a fair stand-in on the
  synthetic twin). It may be of another question type than the question (a land-cover word
  for a yes/no question): an easy negative.
- the SFT term is unconfirmed in the paper; it is an option, on by default (weight 1.0): the
  reference at stage 0 is the base model, which cannot answer the tasks at all, and pure DPO
  only moves the chosen answer's likelihood *relative* to one sampled wrong answer (at h = 0,
  with beta 0.1 and gamma 2, its gradient in lp_w is 0.03, CE's is 1 / answer tokens); on the
  tiny base pure DPO barely learned the tasks (synthetic ACL, 100 samples, 2 epochs: MFT 4.75
  against 18.0 with the SFT term); ``method.dpo_sft_weight=0`` gives the pure preference objective.
- the SFT term is a per-sample mean over the answer's tokens (each pair weighs the same in
  both terms), not lora_ft's mean over all answer tokens of the batch.
- ``lora.train_projector`` works as for lora_ft: the projector's trained copy is part of the
  adapter, so it is part of the policy and of the reference alike.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mllmcl.data.types import Sample
from mllmcl.evaluation.scorers import normalize_answer
from mllmcl.methods import register
from mllmcl.methods.base import MethodOptions, Stage, request
from mllmcl.methods.lora_ft import LoraFT
from mllmcl.models.batching import IGNORE_INDEX
from mllmcl.training.adapter_kinds import LoraKind

KEY = "phi_dpo"  # the batch entry with the pairs' reference log-probs (popped before the forward)


# --------------------------------------------------------------------------- pairs

def _uid_seed(uid: str) -> int:
    return int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "little")


def rejected_answers(samples: Sequence[Sample], seed: int, stage: int) -> dict[str, str | None]:
    """uid -> a wrong answer from ``samples``' own targets (None where none exists).

    The candidates are the distinct normalised targets that match none of the sample's
    acceptable answers, each written as its smallest surface form; one is drawn uniformly by
    a generator seeded with (seed, stage, uid)."""
    forms: dict[str, str] = {}
    for s in samples:
        key = normalize_answer(s.target)
        forms[key] = min(forms.get(key, s.target), s.target)
    keys = sorted(forms)
    out: dict[str, str | None] = {}
    for s in samples:
        own = {normalize_answer(a) for a in s.answers}
        candidates = [k for k in keys if k not in own]
        if not candidates:
            out[s.uid] = None
            continue
        rng = np.random.default_rng([seed, stage, _uid_seed(s.uid)])
        out[s.uid] = forms[candidates[int(rng.integers(len(candidates)))]]
    return out


# --------------------------------------------------------------------------- the maths

def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of the answer tokens' log-softmax (labels != IGNORE_INDEX, the label at t
    predicted by the logits at t-1), and the number of those tokens. Only the answer positions
    are normalised (a few tokens of a long multimodal sequence); float32."""
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    picked = shift_logits[mask].float()  # (answer tokens, vocab)
    token_lp = picked.log_softmax(-1).gather(-1, shift_labels[mask].unsqueeze(-1)).squeeze(-1)
    full = torch.zeros(mask.shape, dtype=token_lp.dtype, device=token_lp.device)
    full[mask] = token_lp  # no atomic adds: the same sums on every run
    return full.sum(-1), mask.sum(-1)


def focal_dpo_loss(lp_w: torch.Tensor, lp_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
                   beta: float, gamma: float) -> torch.Tensor:
    """Per pair: -(1 - p)^gamma * log p with p = sigmoid(beta * [(lp_w - ref_w) - (lp_l - ref_l)])."""
    h = beta * ((lp_w - ref_w) - (lp_l - ref_l))
    log_p = F.logsigmoid(h)
    return -torch.exp(gamma * F.logsigmoid(-h)) * log_p if gamma else -log_p


# --------------------------------------------------------------------------- the objective

def _forward_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k != KEY}
    labels = inputs.pop("labels")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    return sequence_logprobs(model(**inputs).logits, labels.to(device))


class FocalDPO:
    """φ-DPO's objective (``batch`` / ``weight`` / ``loss``, as :class:`mllmcl.training.loop.CrossEntropy`).

    ``rejected``: uid -> rejected answer (None: the sample trains on SFT alone); ``references``:
    uid -> (ref_w, ref_l), filled by the kind's ``prepare`` (ref_l None for an SFT-only sample)."""

    def __init__(self, rejected: dict[str, str | None], beta: float = 0.1, gamma: float = 2.0,
                 sft_weight: float = 1.0):
        self.rejected, self.beta, self.gamma, self.sft_weight = rejected, beta, gamma, sft_weight
        self.references: dict[str, tuple[float, float | None]] = {}

    def rows(self, collator, samples: Sequence[Sample], pixels) -> dict:
        """The chosen rows of ``samples``, then the rejected rows of the paired ones, as one batch;
        ``batch[KEY]["paired"]``: which samples have a rejected row (in order)."""
        paired = [i for i, s in enumerate(samples) if self.rejected[s.uid] is not None]
        rows = [*((s, s.target) for s in samples), *((samples[i], self.rejected[samples[i].uid]) for i in paired)]
        batch = collator.train_batch([s.question for s, _ in rows], [a for _, a in rows],
                                     pixels.get([s.image for s, _ in rows]))
        return {**batch, KEY: {"n": len(samples), "paired": torch.tensor(paired, dtype=torch.long)}}

    def batch(self, collator, samples: Sequence[Sample], pixels) -> dict:
        missing = [s.uid for s in samples if s.uid not in self.references]
        if missing:
            raise RuntimeError(f"phi_dpo: no reference log-probs for samples {missing[:3]} (the kind's prepare "
                               f"computes them before training)")
        out = self.rows(collator, samples, pixels)
        paired = out[KEY]["paired"].tolist()
        out[KEY]["ref_w"] = torch.tensor([self.references[samples[i].uid][0] for i in paired], dtype=torch.float32)
        out[KEY]["ref_l"] = torch.tensor([self.references[samples[i].uid][1] for i in paired], dtype=torch.float32)
        return out

    def weight(self, batch: dict) -> int:
        return batch[KEY]["n"]

    def terms(self, lp: torch.Tensor, ntok: torch.Tensor, info: dict) -> torch.Tensor:
        """Per sample: focal DPO + sft_weight * CE for a pair, CE alone for an SFT-only sample."""
        n, paired = info["n"], info["paired"].to(lp.device)
        lp_w, lp_l = lp[:n], lp[n:]
        ce = -lp_w / ntok[:n].clamp(min=1)
        per_sample = ce.clone()  # SFT-only samples: CE at full weight
        if len(paired):
            dpo = focal_dpo_loss(lp_w[paired], lp_l, info["ref_w"].to(lp.device), info["ref_l"].to(lp.device),
                                 self.beta, self.gamma)
            per_sample[paired] = dpo + self.sft_weight * ce[paired]
        return per_sample

    def loss(self, model, batch: dict) -> torch.Tensor:
        info = batch[KEY]  # never reaches the model
        lp, ntok = _forward_logprobs(model, batch)
        return self.terms(lp, ntok, info).mean()


# --------------------------------------------------------------------------- the adapter kind

class PhiDPOKind(LoraKind):
    """lora_ft's PEFT LoRA trained with :class:`FocalDPO`. ``adapter_args``: ``beta``, ``gamma``,
    ``sft_weight``, ``seed`` (the run's seed; the pairs' draw also reads the request's stage)."""

    def __init__(self, request):
        super().__init__(request)
        args = request.adapter_args
        uids = [s.uid for s in request.samples]
        if len(set(uids)) != len(uids):
            raise ValueError(f"phi_dpo: training samples of {request.task} repeat uids (pairs and references "
                             f"are keyed by uid)")
        self.objective = FocalDPO(rejected_answers(request.samples, int(args.get("seed", 0)), request.stage),
                                  beta=float(args.get("beta", 0.1)), gamma=float(args.get("gamma", 2.0)),
                                  sft_weight=float(args.get("sft_weight", 1.0)))

    def prepare(self, model, data) -> None:
        """The reference: the untrained policy (= the previous task's model) on every pair, in
        eval mode, without gradients, in micro-batches of the fit's size; every rank computes all
        of it in the same order (the same numbers on every rank)."""
        train = self.request.train
        chunk = max(1, train.batch_size // max(1, data.world * train.grad_accum))
        was_training = model.training
        model.eval()
        refs: dict[str, tuple[float, float | None]] = {}
        try:
            with torch.no_grad():
                for i in range(0, len(data.samples), chunk):
                    part = data.samples[i:i + chunk]
                    b = self.objective.rows(data.collator, part, data.pixels)
                    with data.autocast() if data.autocast else contextlib.nullcontext():
                        lp, _ = _forward_logprobs(model, b)
                    lp = lp.float().cpu()
                    n, paired = len(part), b[KEY]["paired"].tolist()
                    losing = dict(zip(paired, lp[n:].tolist()))
                    for j, s in enumerate(part):
                        refs[s.uid] = (float(lp[j]), losing.get(j))
        finally:
            model.train(was_training)
        self.objective.references = refs

    def save(self, model, uri: str, meta: dict) -> None:
        o = self.objective
        pairs = sum(r is not None for r in o.rejected.values())
        super().save(model, uri, {**meta, "dpo_beta": o.beta, "dpo_gamma": o.gamma, "dpo_sft_weight": o.sft_weight,
                                  "dpo_pairs": pairs, "dpo_sft_only": len(o.rejected) - pairs})


# --------------------------------------------------------------------------- the method

@dataclass(frozen=True)
class PhiDPOOptions(MethodOptions):
    dpo_beta: float = 0.1  # scale of the policy/reference log-ratio margin
    dpo_gamma: float = 2.0  # focal exponent: (1 - p)^gamma down-weights pairs already ranked right (0: plain DPO)
    dpo_sft_weight: float = 1.0  # weight of the chosen answers' cross-entropy (0: preference loss alone)

    def check(self) -> list[str]:
        p = []
        if not self.dpo_beta > 0:
            p.append(f"method.dpo_beta={self.dpo_beta}: must be > 0")
        if not self.dpo_gamma >= 0:
            p.append(f"method.dpo_gamma={self.dpo_gamma}: must be >= 0 (0 is plain DPO)")
        if not self.dpo_sft_weight >= 0:
            p.append(f"method.dpo_sft_weight={self.dpo_sft_weight}: must be >= 0 (0: no SFT term)")
        return p


@register("phi_dpo")
class PhiDPO(LoraFT):
    Options = PhiDPOOptions

    def plan(self, stage: Stage):
        m = self.options
        init = stage.expert_uri(stage.k - 1) if stage.k > 0 else None
        return [request(stage, "lora", self.training_samples(stage), stage.expert_uri(), init_adapter=init,
                        adapter_kind=PhiDPOKind,
                        adapter_args={"beta": m.dpo_beta, "gamma": m.dpo_gamma, "sft_weight": m.dpo_sft_weight,
                                      "seed": self.cfg.run.seed})]
