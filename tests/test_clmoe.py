"""CL-MoE's own maths on toy modules whose values are computed by hand: the top-2 usage
counts, the claimed experts, the momentum merge, the kind's stored statistics (stage 0
without a merge, stage 1 with it) and the options' messages."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

# token -> the feature vector the toy's layers see; with the gate G below, the logits G x are:
#   a = ( 2, 1): ( 2,  1, -2, -1) -> top-2 {0, 1}      b = (-2, 1): (-2,  1,  2, -1) -> {1, 2}
#   c = (.5,-2): (.5, -2, -.5, 2) -> {0, 3}            pad = (-2,-1): (-2, -1, 2, 1) -> {2, 3}
FEATURES = {"<pad>": (-2.0, -1.0), "a": (2.0, 1.0), "b": (-2.0, 1.0), "c": (0.5, -2.0)}
VOCAB = list(FEATURES)
GATE = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])


class ToyLM(nn.Module):
    """Token ids -> fixed features -> two targeted linears (named like a VLM's language model)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding.from_pretrained(torch.tensor([FEATURES[t] for t in VOCAB]))
        self.language_model = nn.Module()
        self.language_model.q_proj = nn.Linear(2, 2, bias=False)
        self.language_model.v_proj = nn.Linear(2, 2, bias=False)

    def forward(self, input_ids, attention_mask=None, **_):
        h = self.table(input_ids)
        return self.language_model.q_proj(h) + self.language_model.v_proj(h)


class ToyCollator:
    """A question is its tokens ("a a b"); the answer adds none; right padding with <pad>."""

    def train_batch(self, questions, answers, pixels):
        rows = [[VOCAB.index(t) for t in q.split()] for q in questions]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


class NoPixels:
    def get(self, uris):
        return None


Q, V = "language_model.q_proj", "language_model.v_proj"


def _settings(experts=4, rank=1):
    from mllmcl.methods.moelora import MoELoraSettings

    return MoELoraSettings(experts=experts, expert_rank=rank, alpha=float(experts * rank), gate="softmax",
                           target_modules=("q_proj", "v_proj"))


def _set_gates(model, q_gate, v_gate):
    from mllmcl.methods.moelora import moe_layers

    layers = moe_layers(model)
    with torch.no_grad():
        layers[Q].moe["default"].gate.copy_(q_gate)
        layers[V].moe["default"].gate.copy_(v_gate)


def _batches(*rows_per_batch):
    return [ToyCollator().train_batch(rows, [""] * len(rows), None) for rows in rows_per_batch]


# --------------------------------------------------------------------------- usage counts and claims

def test_top2_usage_counts_per_layer_exclude_padding():
    from mllmcl.methods.clmoe import usage_counts
    from mllmcl.methods.moelora import add_moelora

    model = add_moelora(ToyLM(), _settings())
    # q_proj: the gate above; v_proj: its rows reversed (expert e of q is expert 3 - e of v)
    _set_gates(model, GATE, GATE.flip(0))
    # batch 1: "a a a b b" and "c" (4 pads); batch 2: "b"
    counts, tokens = usage_counts(model, _batches(["a a a b b", "c"], ["b"]))
    # a x3 -> {0,1}; b x3 -> {1,2}; c x1 -> {0,3}: e0 = 3+1, e1 = 3+3, e2 = 3, e3 = 1 (the pads' {2,3} not counted)
    assert counts[Q] == [4, 6, 3, 1]
    assert counts[V] == [1, 3, 6, 4]
    assert tokens == 7
    assert model.training  # the model is back in the mode it was in


def test_usage_counts_see_the_padding_when_it_is_unmasked():
    """The mask is what keeps the pads out: unmask them and they are counted ({2, 3} each)."""
    from mllmcl.methods.clmoe import usage_counts
    from mllmcl.methods.moelora import add_moelora

    model = add_moelora(ToyLM(), _settings())
    _set_gates(model, GATE, GATE)
    batch = _batches(["a a a b b", "c"])[0]
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    counts, tokens = usage_counts(model, [batch])
    assert counts[Q] == [3 + 1, 3 + 2, 2 + 4, 1 + 4] and tokens == 10


def test_claimed_experts_are_the_most_used_lower_index_first_on_ties():
    from mllmcl.methods.clmoe import claimed_experts

    assert claimed_experts({Q: [4, 6, 3, 1], V: [1, 3, 6, 4]}, 2) == {Q: [0, 1], V: [2, 3]}
    assert claimed_experts({Q: [5, 2, 5, 5]}, 2) == {Q: [0, 2]}
    assert claimed_experts({Q: [0, 0, 0, 9]}, 1) == {Q: [3]}


def test_usage_subset_is_evenly_spaced_and_deterministic():
    from mllmcl.methods.clmoe import usage_subset

    assert usage_subset(list(range(10)), 0) == list(range(10))
    assert usage_subset(list(range(10)), 20) == list(range(10))
    assert usage_subset(list(range(10)), 4) == [0, 2, 5, 7]


# --------------------------------------------------------------------------- the momentum merge

def test_momentum_merge_by_hand_claimed_and_unclaimed_experts():
    """Two experts of rank 2: A is (4 x in), rows 0-1 expert 0 and rows 2-3 expert 1; B is
    (out x 4), the same split over columns. new = 1, old = 3 everywhere: the claimed expert
    becomes 0.7 * 1 + 0.3 * 3 = 1.6, the other 0.3 * 1 + 0.7 * 3 = 2.4; the gate stays new."""
    from mllmcl.methods.clmoe import merge_coefficients, momentum_merge

    s = _settings(experts=2, rank=2)
    new = {f"{Q}.lora_A": torch.ones(4, 3), f"{Q}.lora_B": torch.ones(5, 4), f"{Q}.gate": torch.full((2, 3), 7.0)}
    old = {f"{Q}.lora_A": torch.full((4, 3), 3.0), f"{Q}.lora_B": torch.full((5, 4), 3.0),
           f"{Q}.gate": torch.zeros(2, 3)}
    out = momentum_merge(new, old, {Q: [1]}, s, 0.7)
    a, b = out[f"{Q}.lora_A"], out[f"{Q}.lora_B"]
    torch.testing.assert_close(a[:2], torch.full((2, 3), 2.4))  # expert 0: not claimed
    torch.testing.assert_close(a[2:], torch.full((2, 3), 1.6))  # expert 1: claimed by the new task
    torch.testing.assert_close(b[:, :2], torch.full((5, 2), 2.4))
    torch.testing.assert_close(b[:, 2:], torch.full((5, 2), 1.6))
    torch.testing.assert_close(out[f"{Q}.gate"], new[f"{Q}.gate"])
    assert merge_coefficients(4, [0, 2], 0.7) == pytest.approx([0.7, 0.3, 0.7, 0.3])
    # momentum 1: the claimed experts are the new ones, the others the old ones
    out = momentum_merge(new, old, {Q: [0]}, s, 1.0)
    torch.testing.assert_close(out[f"{Q}.lora_A"][:2], torch.ones(2, 3))
    torch.testing.assert_close(out[f"{Q}.lora_A"][2:], torch.full((2, 3), 3.0))


def test_momentum_merge_refuses_a_previous_stage_of_another_shape():
    from mllmcl.methods.clmoe import momentum_merge

    s = _settings(experts=2, rank=1)
    with pytest.raises(ValueError, match="previous stage"):
        momentum_merge({f"{Q}.lora_A": torch.ones(2, 3)}, {f"{Q}.lora_A": torch.ones(4, 3)}, {Q: [0]}, s, 0.7)


# --------------------------------------------------------------------------- the kind: statistics file, merge

def _request(tmp_path, stage, init=None, usage_samples=0):
    from dataclasses import asdict

    from mllmcl.methods.clmoe import CLMoEKind
    from mllmcl.settings import LoraSettings, TrainSettings
    from mllmcl.training.request import TrainRequest

    moe = asdict(_settings())
    moe["target_modules"] = list(moe["target_modules"])
    samples = [SimpleNamespace(question=q, target="", image=f"img{i}") for i, q in
               enumerate(["a a a b b", "c", "b"])]
    return TrainRequest(stage=stage, task=f"T{stage}", kind="lora", samples=samples,
                        output_uri=str(tmp_path / f"stage{stage}"), lora=LoraSettings(rank=4, alpha=4),
                        train=TrainSettings(batch_size=2), init_adapter=init, adapter_kind=CLMoEKind,
                        adapter_args={"moe": moe, "clmoe": {"momentum": 0.7, "claimed": 2,
                                                            "usage_samples": usage_samples}})


def _fit_data(samples):
    from mllmcl.training.worker import FitData

    return FitData(ToyCollator(), NoPixels(), samples, torch.device("cpu"), None, 0, 1)


def _fill(model, a: float, b: float):
    from mllmcl.methods.moelora import moe_layers

    with torch.no_grad():
        for layer in moe_layers(model).values():
            layer.moe["default"].lora_A.fill_(a)
            layer.moe["default"].lora_B.fill_(b)


def test_stage0_saves_statistics_and_no_merge_then_stage1_merges_with_stage0(tmp_path):
    from safetensors.torch import load_file

    from mllmcl.methods.clmoe import USAGE_FILE, CLMoEKind, read_usage
    from mllmcl.methods.moelora import WEIGHTS_FILE, load_moelora, moe_layers

    # stage 0: "trained" to A = 1, B = 2, the gates above; nothing to merge with
    req0 = _request(tmp_path, 0)
    kind0 = CLMoEKind(req0)
    model0 = kind0.build(ToyLM())
    assert kind0.previous is None
    _fill(model0, 1.0, 2.0)
    _set_gates(model0, GATE, GATE.flip(0))
    kind0.prepare(model0, _fit_data(req0.samples))
    kind0.save(model0, req0.output_uri, {"task": "T0"})
    usage = read_usage(req0.output_uri)
    assert usage["counts"] == {Q: [4, 6, 3, 1], V: [1, 3, 6, 4]} and usage["tokens"] == 7 and usage["samples"] == 3
    assert usage["claimed"] == {Q: [0, 1], V: [2, 3]}
    assert usage["merged"] is False and usage["merge_coefficients"] is None
    assert usage["history"] == [{"stage": 0, "task": "T0", "claimed": {Q: [0, 1], V: [2, 3]}}]
    w0 = load_file(str(tmp_path / "stage0" / WEIGHTS_FILE))
    assert torch.all(w0[f"{Q}.lora_A"] == 1.0) and torch.all(w0[f"{Q}.lora_B"] == 2.0)  # as trained
    assert (tmp_path / "stage0" / USAGE_FILE).exists() and (tmp_path / "stage0" / "meta.json").exists()

    # stage 1: continues from stage 0, "trained" to A = 11, B = 12, with q's gate reversed (claims {2, 3})
    req1 = _request(tmp_path, 1, init=req0.output_uri)
    kind1 = CLMoEKind(req1)
    model1 = kind1.build(ToyLM())
    assert kind1.history == usage["history"]
    _fill(model1, 11.0, 12.0)  # in place: the kind's copy of stage 0 must not follow
    assert torch.all(kind1.previous[f"{Q}.lora_A"] == 1.0)
    _set_gates(model1, GATE.flip(0), GATE.flip(0))
    kind1.prepare(model1, _fit_data(req1.samples))
    kind1.save(model1, req1.output_uri, {"task": "T1"})
    usage1 = read_usage(req1.output_uri)
    assert usage1["claimed"] == {Q: [2, 3], V: [2, 3]} and usage1["merged"] is True
    assert usage1["merge_coefficients"][Q] == pytest.approx([0.3, 0.3, 0.7, 0.7])
    assert [h["task"] for h in usage1["history"]] == ["T0", "T1"]
    w1 = load_file(str(tmp_path / "stage1" / WEIGHTS_FILE))
    # rank 1: row e of A and column e of B are expert e. claimed: 0.7 * new + 0.3 * old; the others 0.3 / 0.7
    a, b = w1[f"{Q}.lora_A"], w1[f"{Q}.lora_B"]
    torch.testing.assert_close(a[:, 0], torch.tensor([0.3 * 11 + 0.7 * 1] * 2 + [0.7 * 11 + 0.3 * 1] * 2))
    torch.testing.assert_close(b[0], torch.tensor([0.3 * 12 + 0.7 * 2] * 2 + [0.7 * 12 + 0.3 * 2] * 2))
    torch.testing.assert_close(w1[f"{Q}.gate"], GATE.flip(0))  # the gate: the new one, not merged
    # the folder loads as a MoELoRA adapter (the engine's format) with the merged weights
    fresh = load_moelora(ToyLM(), req1.output_uri)
    torch.testing.assert_close(moe_layers(fresh)[Q].moe["default"].lora_A.detach(), a)


def test_usage_needs_the_fit_data(tmp_path):
    from mllmcl.methods.clmoe import CLMoEKind

    req = _request(tmp_path, 0)
    kind = CLMoEKind(req)
    model = kind.build(ToyLM())
    with pytest.raises(RuntimeError, match="prepare"):
        kind.save(model, req.output_uri, {})


def test_usage_on_a_subset_counts_only_its_samples(tmp_path):
    from mllmcl.methods.clmoe import CLMoEKind, read_usage

    req = _request(tmp_path, 0, usage_samples=2)  # samples 0 and 1 of 3: "a a a b b", "c"
    kind = CLMoEKind(req)
    model = kind.build(ToyLM())
    _set_gates(model, GATE, GATE)
    kind.prepare(model, _fit_data(req.samples))
    kind.save(model, req.output_uri, {})
    usage = read_usage(req.output_uri)
    assert usage["samples"] == 2 and usage["tokens"] == 6 and usage["counts"][Q] == [4, 5, 2, 1]


# --------------------------------------------------------------------------- options and serving

def test_options_messages():
    from mllmcl.config import load_config
    from mllmcl.errors import ConfigError
    from mllmcl.methods.clmoe import CLMoEOptions

    assert CLMoEOptions().check() == []
    msgs = CLMoEOptions(clmoe_experts=1, clmoe_claimed=3, clmoe_momentum=1.5, clmoe_usage_samples=-1).check()
    for needle in ("method.clmoe_experts=1: must be >= 2", "method.clmoe_claimed=3: must be in [1",
                   "method.clmoe_momentum=1.5: must be in [0, 1]", "method.clmoe_usage_samples=-1: must be >= 0"):
        assert any(needle in m for m in msgs), (needle, msgs)
    assert "method.clmoe_claimed=4" in " ".join(CLMoEOptions(clmoe_claimed=4).check())  # all 4: none left
    with pytest.raises(ConfigError) as e:
        load_config(None, ["method.name=clmoe", "method.clmoe_experts=3", "lora.train_projector=true",
                           "scaling.strategy=deepspeed", "scaling.zero_stage=3"])
    msg = str(e.value)
    for needle in ("lora.rank=16 must be a multiple of method.clmoe_experts=3",
                   "lora.train_projector: not supported by clmoe", "scaling.zero_stage=3: not supported by clmoe"):
        assert needle in msg, needle
    cfg = load_config(None, ["method.name=clmoe", "scaling.strategy=deepspeed", "scaling.zero_stage=2"])
    assert cfg.method.clmoe_momentum == 0.7 and cfg.method.clmoe_claimed == 2


def test_stages_are_not_servable_and_say_why():
    from mllmcl.config import load_config
    from mllmcl.methods import get_method
    from mllmcl.methods.base import NotServable

    method = get_method("clmoe")(load_config(None, ["method.name=clmoe"]), None)
    with pytest.raises(NotServable, match="not PEFT adapters"):
        method.serving(None)
