"""φ-DPO's own maths on values computed by hand: the focal DPO loss, sequence log-probs, the
rejected answers, the reference at the start of a fit (h = 0), and that its gradient ranks the
chosen answer above the rejected one."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mllmcl.data.types import Sample
from mllmcl.evaluation.scorers import normalize_answer
from mllmcl.methods.phi_dpo import KEY, FocalDPO, PhiDPOOptions, focal_dpo_loss, rejected_answers, sequence_logprobs
from mllmcl.models.batching import IGNORE_INDEX


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_focal_dpo_loss_by_hand():
    lp_w, ref_w, lp_l, ref_l = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -2.0]), \
        torch.tensor([-4.0, -1.0]), torch.tensor([-2.0, -3.0])
    # h = 0.1 * [(-1 + 3) - (-4 + 2)] = 0.4 ; h = 0.1 * [(0) - (-1 + 3)] = -0.2
    hs = [0.4, -0.2]
    for gamma in (0.0, 1.0, 2.0):
        got = focal_dpo_loss(lp_w, lp_l, ref_w, ref_l, beta=0.1, gamma=gamma)
        want = [-(1 - _sigmoid(h)) ** gamma * math.log(_sigmoid(h)) for h in hs]
        torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=1e-7)
    plain = focal_dpo_loss(lp_w, lp_l, ref_w, ref_l, beta=0.1, gamma=0.0)  # gamma 0: -logsigmoid(h)
    torch.testing.assert_close(plain, -torch.nn.functional.logsigmoid(torch.tensor(hs)))
    # far from the reference: finite, ~ -h when h << 0 (focal weight -> 1), ~ 0 when h >> 0
    far = focal_dpo_loss(torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([5000.0, -5000.0]),
                         torch.tensor([0.0, 0.0]), beta=0.1, gamma=2.0)
    assert torch.isfinite(far).all()
    assert far[0].item() == pytest.approx(500.0) and far[1].item() == pytest.approx(0.0, abs=1e-30)


def test_sequence_logprobs_by_hand():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [0.5, 0.5, 3.0], [9.0, 9.0, 9.0]],
                           [[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.0, 4.0, 0.0]]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 0, 2],  # logits at t-1 predict label t
                           [IGNORE_INDEX, 1, IGNORE_INDEX, IGNORE_INDEX]])

    def log_softmax(row, i):
        return row[i] - math.log(sum(math.exp(v) for v in row))

    row0 = log_softmax([1.0, 0.0, 0.0], 0) + log_softmax([0.5, 0.5, 3.0], 2)
    row1 = log_softmax([2.0, 0.0, 0.0], 1)
    lp, ntok = sequence_logprobs(logits, labels)
    torch.testing.assert_close(lp, torch.tensor([row0, row1]))
    assert ntok.tolist() == [2, 1]


def _sample(uid: str, answer, task: str = "T") -> Sample:
    return Sample(uid, task, "train", f"/img/{uid}.png", f"{uid}.png", f"question {uid}?", answer)


def test_rejected_answers_are_wrong_answers_of_the_task_and_seeded():
    answers = ["Yes", "yes.", "no", "No", "forest", "The urban", ("farmland", "Forest"), "urban"] * 3
    samples = [_sample(f"s{i}", a) for i, a in enumerate(answers)]
    targets = {s.target for s in samples}
    rej = rejected_answers(samples, seed=0, stage=2)
    assert set(rej) == {s.uid for s in samples}
    for s in samples:
        r = rej[s.uid]
        assert r in targets  # one of the task's own training answers
        assert normalize_answer(r) not in {normalize_answer(a) for a in s.answers}  # never the chosen (nor accepted)
    assert rejected_answers(samples, seed=0, stage=2) == rej  # deterministic
    shuffled = samples[:]
    random.Random(1).shuffle(shuffled)
    assert rejected_answers(shuffled, seed=0, stage=2) == rej  # by uid, not by position
    assert rejected_answers(samples, seed=1, stage=2) != rej and rejected_answers(samples, seed=0, stage=3) != rej
    # a normalised answer has one surface form: "yes." and "Yes" are the same candidate
    assert {normalize_answer(r) for r in rej.values()} <= {"yes", "no", "forest", "urban", "farmland"}
    assert len({r for r in rej.values() if normalize_answer(r) == "yes"}) == 1
    # fewer than two distinct answers: no pair (the sample trains on the SFT term alone)
    assert set(rejected_answers([_sample("a", "Yes"), _sample("b", "yes")], 0, 0).values()) == {None}


class ToyLM(nn.Module):
    """A bigram language model: logits at t depend on the token at t (takes only what a model takes)."""

    def __init__(self, vocab: int = 6):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, 8)
        self.out = nn.Linear(8, vocab)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.out(torch.tanh(self.emb(input_ids))))


def _toy_batch(ref_w=None, ref_l=None) -> dict:
    # one pair: prompt [1, 2], chosen answer [3, 5], rejected answer [4, 5]; rows chosen first
    ids = torch.tensor([[1, 2, 3, 5], [1, 2, 4, 5]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 5], [IGNORE_INDEX, IGNORE_INDEX, 4, 5]])
    info = {"n": 1, "paired": torch.tensor([0])}
    if ref_w is not None:
        info |= {"ref_w": torch.tensor([ref_w]), "ref_l": torch.tensor([ref_l])}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, KEY: info}


def _lp(model, batch) -> tuple[float, float]:
    with torch.no_grad():
        lp, _ = sequence_logprobs(model(batch["input_ids"], batch["attention_mask"]).logits, batch["labels"])
    return float(lp[0]), float(lp[1])


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_at_the_start_h_is_zero_and_the_loss_is_log2_times_half_to_gamma(gamma):
    model = ToyLM()
    ref_w, ref_l = _lp(model, _toy_batch())
    obj = FocalDPO({"x": "y"}, beta=0.1, gamma=gamma, sft_weight=0.0)
    batch = _toy_batch(ref_w, ref_l)
    assert obj.weight(batch) == 1
    loss = obj.loss(model, batch)  # the toy's forward takes neither labels nor the reference entry
    assert loss.item() == pytest.approx(0.5 ** gamma * math.log(2), rel=1e-6)
    assert KEY in batch and "labels" in batch  # the batch itself is left as it was


def test_the_gradient_ranks_the_chosen_above_the_rejected():
    model = ToyLM()
    ref_w, ref_l = _lp(model, _toy_batch())
    obj = FocalDPO({"x": "y"}, beta=0.1, gamma=2.0, sft_weight=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(20):
        opt.zero_grad()
        obj.loss(model, _toy_batch(ref_w, ref_l)).backward()
        opt.step()
    lp_w, lp_l = _lp(model, _toy_batch())
    assert (lp_w - ref_w) - (lp_l - ref_l) > 1.0  # h > 0.1: the chosen gained on the rejected
    assert lp_w - lp_l > ref_w - ref_l


def test_sft_only_samples_and_the_sft_term():
    """A sample without a rejected answer trains on CE alone; sft_weight adds CE to a pair's loss."""
    lp = torch.tensor([-2.0, -3.0, -5.0])  # rows: chosen a, chosen b, rejected of a
    ntok = torch.tensor([2, 3, 1])
    info = {"n": 2, "paired": torch.tensor([0]), "ref_w": torch.tensor([-2.0]), "ref_l": torch.tensor([-5.0])}
    got = FocalDPO({}, beta=0.1, gamma=2.0, sft_weight=0.5).terms(lp, ntok, info)
    torch.testing.assert_close(got, torch.tensor([0.25 * math.log(2) + 0.5 * 1.0, 1.0]))


def test_options_are_checked():
    assert PhiDPOOptions().check() == []
    bad = PhiDPOOptions(dpo_beta=0.0, dpo_gamma=-1.0, dpo_sft_weight=-0.1).check()
    assert [line.split("=")[0] for line in bad] == ["method.dpo_beta", "method.dpo_gamma", "method.dpo_sft_weight"]


def test_prepare_on_the_tiny_base_gives_h_zero_at_the_start(small_tiny_path, synthetic_small):
    """The kind's prepare on the real tiny backbone: every training pair gets its reference, and the
    untrained policy (a fresh LoRA, B = 0) scores h = 0 on them."""
    from mllmcl.data.release import load_image, load_stream
    from mllmcl.methods.phi_dpo import PhiDPOKind
    from mllmcl.models import load_backbone
    from mllmcl.models.batching import PixelCache
    from mllmcl.settings import LoraSettings, TrainSettings
    from mllmcl.training.request import TrainRequest
    from mllmcl.training.worker import FitData

    samples = list(load_stream(str(synthetic_small), "dcl", ["RS"]).tasks[0].train)[:6]
    req = TrainRequest(stage=0, task="RS", kind="lora", samples=samples, output_uri="unused",
                       lora=LoraSettings(rank=4, alpha=8, dropout=0.0), train=TrainSettings(batch_size=3),
                       adapter_kind=PhiDPOKind, adapter_args={"beta": 0.1, "gamma": 2.0, "sft_weight": 0.0})
    kind = PhiDPOKind(req)
    bb = load_backbone(str(small_tiny_path))
    model = kind.build(bb.model)
    pixels = PixelCache(bb.collator.images, load_image)
    kind.prepare(model, FitData(bb.collator, pixels, samples, torch.device("cpu"), None, 0, 1))
    assert set(kind.objective.references) == {s.uid for s in samples}
    assert all(r[1] is not None for r in kind.objective.references.values())
    model.eval()
    with torch.no_grad():
        for part in (samples[:3], samples[3:]):  # the micro-batches prepare used
            loss = kind.objective.loss(model, kind.objective.batch(bb.collator, part, pixels))
            assert loss.item() == pytest.approx(0.25 * math.log(2), rel=1e-5)
