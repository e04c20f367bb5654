"""The per-task experts that hide and disco share (mllmcl.methods._task_experts), on values
computed by hand: hide's fused lower layers, the anchor mixtures of hide (T 0.1) and disco
(T 0.05), only the newest expert training, a stage folder's round trip, and the engine's
batch features (the decoding path's) equal to its features (the anchors')."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mllmcl.methods import _task_experts as te
from mllmcl.methods._task_experts import (TaskExpertSettings, TaskExpertsFormat, TaskExpertsKind, add_banks,
                                          mixing_weights, set_weights)

X = torch.tensor([[1.0, 2.0, 3.0]])
A = [torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])]  # rank 1, in 3
B = [torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [1.0]])]  # out 2


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(3, 2)
        nn.init.zeros_(self.q_proj.weight)
        nn.init.zeros_(self.q_proj.bias)


class Toy(nn.Module):
    """Two decoder layers of one adapted linear each, named as a language model's."""

    def __init__(self):
        super().__init__()
        self.language_model = nn.Module()
        self.language_model.layers = nn.ModuleList([Block(), Block()])

    def q(self, i: int) -> nn.Module:
        return self.language_model.layers[i].q_proj


def settings(mixing="hide", temperature=0.1) -> TaskExpertSettings:
    return TaskExpertSettings(mixing=mixing, expert_rank=1, scaling=1.0, temperature=temperature,
                              target_modules=("q_proj",))


def hand_made(mixing="hide", temperature=0.1) -> tuple[Toy, dict]:
    """The toy with two frozen experts (A, B above) in every layer, at test time."""
    model = Toy()
    banks = add_banks(model, settings(mixing, temperature))
    for bank in banks.values():
        for a, b in zip(A, B):
            bank.add_expert(False)
            with torch.no_grad():
                bank.A[-1].copy_(a)
                bank.B[-1].copy_(b)
        bank.freeze()
    return model, banks


def test_hide_fuses_the_lower_layers_as_sum_b_times_sum_a():
    model, banks = hand_made()
    assert banks["language_model.layers.0.q_proj"].role == "fused"
    assert banks["language_model.layers.1.q_proj"].role == "mixture"  # the last decoder layer
    y = model.q(0)(X)
    # (ΣB)(ΣA)x: ΣA x = 1 + 2 = 3, ΣB = (1, 1)
    assert torch.equal(y, torch.tensor([[3.0, 3.0]]))
    # not Σ B_i A_i x = (1, 0)·1 + (0, 1)·2: the cross terms B_0 A_1, B_1 A_0 are part of the fusion
    assert not torch.allclose(y, torch.tensor([[1.0, 2.0]]))


def _hide_expected() -> list[float]:
    # image anchors (1, 0), (0, 1); text anchors (1, 0), (1, 1); the question: image (1, 1), text (1, 0)
    s0 = (1 / math.sqrt(2) + 1.0) / 2
    s1 = (1 / math.sqrt(2) + 1 / math.sqrt(2)) / 2
    e0, e1 = math.exp(s0 / 0.1), math.exp(s1 / 0.1)
    return [e0 / (e0 + e1), e1 / (e0 + e1)]


def test_hide_mixes_the_last_layer_by_the_anchors_at_temperature_0_1():
    anchors = {"image": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "text": torch.tensor([[1.0, 0.0], [1.0, 1.0]])}
    feats = {"image": torch.tensor([[1.0, 1.0]]), "hidden": torch.tensor([[1.0, 0.0]])}
    w = mixing_weights("hide", 0.1, feats, anchors)
    expected = _hide_expected()  # 0.812 / 0.188
    assert torch.allclose(w, torch.tensor([expected]), atol=1e-6)
    model, _ = hand_made()
    set_weights(model, "default", w)
    # Σ w_i B_i A_i x = w_0 (1, 0)·1 + w_1 (0, 1)·2
    assert torch.allclose(model.q(1)(X), torch.tensor([[expected[0], 2 * expected[1]]]), atol=1e-6)
    set_weights(model, "default", None)
    with pytest.raises(RuntimeError, match="without mixing weights"):
        model.q(1)(X)


def test_disco_mixes_every_layer_by_the_prototypes_at_temperature_0_05():
    prototypes = {"text": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    feats = {"image": torch.tensor([[9.0, -9.0], [0.0, 1.0]]), "hidden": torch.tensor([[2.0, 1.0], [1.0, 3.0]])}
    w = mixing_weights("disco", 0.05, feats, prototypes)  # the image feature plays no part
    rows = []
    for f in ([2.0, 1.0], [1.0, 3.0]):
        c = [v / math.hypot(*f) for v in f]
        e = [math.exp(v / 0.05) for v in c]
        rows.append([v / sum(e) for v in e])
    assert torch.allclose(w, torch.tensor(rows), atol=1e-6)
    model, banks = hand_made("disco", 0.05)
    assert {b.role for b in banks.values()} == {"mixture"}
    set_weights(model, "default", w)
    x = X.repeat(2, 1)
    for i in (0, 1):  # every layer, each row with its own weights
        assert torch.allclose(model.q(i)(x), torch.tensor([[rows[0][0], 2 * rows[0][1]], [rows[1][0], 2 * rows[1][1]]]),
                              atol=1e-5)


def _kind(tasks, init=None, mixing="hide"):
    req = SimpleNamespace(adapter_args={"experts": settings(mixing).to_dict(), "tasks": tasks}, init_adapter=init)
    return TaskExpertsKind(req)


def _stage_folder(tmp_path, mixing="hide") -> tuple[str, str]:
    """Stage 0 and stage 1 folders of the toy, each expert with a nonzero B."""
    torch.manual_seed(0)
    k0 = _kind(["T0"], mixing=mixing)
    m0 = k0.build(Toy())
    for bank in te.expert_layers(m0).values():
        with torch.no_grad():
            bank.banks["default"].B[0].normal_()
    k0.save(m0, str(tmp_path / "s0"), {"stage": 0})
    k1 = _kind(["T0", "T1"], init=str(tmp_path / "s0"), mixing=mixing)
    m1 = k1.build(Toy())
    for bank in te.expert_layers(m1).values():
        with torch.no_grad():
            bank.banks["default"].B[1].normal_()
    k1.save(m1, str(tmp_path / "s1"), {"stage": 1})
    return str(tmp_path / "s0"), str(tmp_path / "s1")


def test_only_the_newest_expert_trains_and_it_alone_is_in_the_training_forward(tmp_path):
    s0, _ = _stage_folder(tmp_path)
    torch.manual_seed(1)
    model = _kind(["T0", "T1"], init=s0).build(Toy())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"language_model.layers.{i}.q_proj.banks.default.{w}.1" for i in (0, 1) for w in "AB"]
    # expert 1 starts at B = 0, so the forward is the base's although expert 0 is nonzero
    x = torch.randn(4, 3)
    assert torch.equal(model.q(0)(x), model.q(0).base_layer(x))
    (model.q(0)(x).sum() + model.q(1)(x).sum()).backward()
    for name, p in model.named_parameters():
        if name.endswith(".B.1"):
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
        elif name.endswith(".A.1"):
            assert p.grad is not None, name  # zero while B = 0, but in the graph
        else:
            assert p.grad is None, name  # the base and expert 0


def test_a_stage_folder_round_trips(tmp_path):
    from safetensors.torch import load_file

    _, s1 = _stage_folder(tmp_path)
    config = json.loads((tmp_path / "s1" / te.CONFIG_FILE).read_text())
    assert config["experts"] == 2 and config["tasks"] == ["T0", "T1"] and config["mixing"] == "hide"
    saved = load_file(str(tmp_path / "s1" / te.WEIGHTS_FILE))
    first = load_file(str(tmp_path / "s0" / te.WEIGHTS_FILE))
    assert all(torch.equal(saved[k], v) for k, v in first.items())  # expert 0 copied from stage 0's folder
    assert set(saved) == {f"language_model.layers.{i}.q_proj.{w}.{e}" for i in (0, 1) for w in "AB" for e in (0, 1)}

    class Engine:  # what the format reads of an engine
        def __init__(self):
            self.model, self.device = Toy(), torch.device("cpu")

    engine = Engine()
    with pytest.raises(FileNotFoundError, match="anchors"):
        TaskExpertsFormat.load(engine, s1, "a")
    (tmp_path / "s1" / te.ANCHORS_FILE).write_text(json.dumps({"tasks": ["T0", "T1"], "image": [[1, 0], [0, 1]],
                                                               "text": [[1, 0], [0, 1]]}))
    TaskExpertsFormat.load(engine, s1, "a")
    assert TaskExpertsFormat.detect(s1)
    assert all(torch.equal(te.experts_state_dict(engine.model, "a")[k], v) for k, v in saved.items())
    assert [b.banks["a"].role for b in te.expert_layers(engine.model).values()] == ["fused", "mixture"]
    assert not any(p.requires_grad for p in engine.model.parameters())
    TaskExpertsFormat.delete(engine, "a")
    assert not any(b.banks for b in te.expert_layers(engine.model).values())


def _questions(n=5):
    from PIL import Image

    prompts = [f"What is shown in picture {i}?" if i % 2 else f"Count the objects {i}" for i in range(n)]
    images = [Image.new("RGB", (32, 32), (40 * i, 255 - 30 * i, 7 * i)) for i in range(n)]
    return prompts, images


def test_batch_features_are_the_features(small_tiny_path):
    from mllmcl.engine import Engine

    engine = Engine(str(small_tiny_path))
    prompts, images = _questions()
    feats = engine.features(prompts, images, batch_size=len(prompts))
    batch = {k: v.to(engine.device) for k, v in engine.collator.prompt_batch(prompts, engine.pixels(images)).items()}
    direct = engine.batch_features(batch)
    for key in ("image", "hidden"):
        assert torch.equal(direct[key].cpu(), torch.tensor(feats[key], dtype=torch.float32)), key
    in_two = engine.features(prompts, images, batch_size=3)  # another batching: the same up to rounding
    assert torch.allclose(torch.tensor(in_two["hidden"]), torch.tensor(feats["hidden"]), atol=1e-5)


@pytest.mark.parametrize("mixing", ["hide", "disco"])
def test_decoding_sets_each_rows_weights_from_its_own_features(small_tiny_path, tmp_path, monkeypatch, mixing):
    """A stage folder of the tiny base answered through the engine: rows() sets the weights the
    anchors give for each question's features (engine.features), and clears them after."""
    from mllmcl.engine import Engine
    from mllmcl.models import load_backbone

    s = TaskExpertSettings(mixing=mixing, expert_rank=2, scaling=2.0, temperature=0.1)
    torch.manual_seed(0)
    kind = TaskExpertsKind(SimpleNamespace(adapter_args={"experts": s.to_dict(), "tasks": ["T0"]}, init_adapter=None))
    model = kind.build(load_backbone(str(small_tiny_path)).model)
    kind.save(model, str(tmp_path / "s0"), {"stage": 0})
    kind = TaskExpertsKind(SimpleNamespace(adapter_args={"experts": s.to_dict(), "tasks": ["T0", "T1"]},
                                           init_adapter=str(tmp_path / "s0")))
    model = kind.build(load_backbone(str(small_tiny_path)).model)
    for layer in te.expert_layers(model).values():
        with torch.no_grad():
            layer.banks["default"].B[1].normal_(std=0.05)
    kind.save(model, str(tmp_path / "s1"), {"stage": 1})

    engine = Engine(str(small_tiny_path), formats=[TaskExpertsFormat])
    prompts, images = _questions(4)
    feats = engine.features(prompts, images, batch_size=4)
    anchors = {"image": [feats["image"][0], feats["image"][1]], "text": [feats["hidden"][0], feats["hidden"][1]]}
    (tmp_path / "s1" / te.ANCHORS_FILE).write_text(json.dumps({"tasks": ["T0", "T1"], **anchors}))
    name = engine.load(str(tmp_path / "s1"))
    seen = []
    real = te.set_weights
    monkeypatch.setattr(te, "set_weights", lambda m, n, w: (seen.append(None if w is None else w.clone()),
                                                            real(m, n, w)))
    out = engine.generate(prompts, images, [name] * 4, 3)
    assert len(out) == 4 and len(seen) == 2 and seen[1] is None  # set for the call, then cleared
    expected = mixing_weights(mixing, 0.1, {k: torch.tensor(v) for k, v in feats.items()},
                              {k: torch.tensor(v) for k, v in anchors.items()})
    assert torch.allclose(seen[0], expected, atol=1e-6)
    assert seen[0][0].argmax() == 0 and seen[0][1].argmax() == 1  # questions 0 and 1 are the anchors
    assert all(layer.banks[name].weights is None for layer in te.expert_layers(engine.model).values())
