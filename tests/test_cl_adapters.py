"""O-LoRA's loss terms and adapter concatenation, and the MoELoRA layer, on toy models
whose values can be computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn


class Toy(nn.Module):
    """Named like a VLM's language model so that the LoRA target regex applies."""

    def __init__(self, d: int = 3, out: int = 4):
        super().__init__()
        self.language_model = nn.Module()
        self.language_model.q_proj = nn.Linear(d, out, bias=False)

    def forward(self, x):
        return self.language_model.q_proj(x)


def _two_adapters(rank=2, alpha=4):
    from peft import get_peft_model

    from mllmcl.models.lora import LoraSettings, peft_config

    torch.manual_seed(0)
    settings = LoraSettings(rank=rank, alpha=alpha, dropout=0.0, target_modules=("q_proj",))
    model = get_peft_model(Toy(), peft_config(settings), adapter_name="old")
    model.add_adapter("new", peft_config(settings))
    model.base_model.set_adapter(["old", "new"])
    layer = model.base_model.model.language_model.q_proj
    return model, layer


def test_olora_orthogonality_term_matches_hand_computation():
    from mllmcl.methods.olora import l2_loss, orthogonality_loss

    model, layer = _two_adapters()
    with torch.no_grad():
        layer.lora_A["old"].weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        layer.lora_A["new"].weight.copy_(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]]))
        layer.lora_B["new"].weight.copy_(torch.full((4, 2), 0.5))
    # A_old A_new^T = [[1, 0], [1, 0]] -> squared Frobenius norm 2
    assert float(orthogonality_loss(model).detach()) == pytest.approx(2.0)
    # ||A_new||_2 = sqrt(1+1+4) = sqrt(6); ||B_new||_2 = sqrt(8 * 0.25) = sqrt(2)
    assert float(l2_loss(model).detach()) == pytest.approx(math.sqrt(6) + math.sqrt(2))
    with torch.no_grad():  # orthogonal rows: no penalty
        layer.lora_A["new"].weight.copy_(torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 3.0]]))
    assert float(orthogonality_loss(model).detach()) == 0.0


def test_olora_orthogonality_gradient_reaches_only_the_new_adapter():
    from mllmcl.methods.olora import orthogonality_loss

    model, layer = _two_adapters()
    for name, p in model.named_parameters():
        p.requires_grad_(".new." in name)
    orthogonality_loss(model).backward()
    assert layer.lora_A["new"].weight.grad is not None and layer.lora_A["new"].weight.grad.abs().sum() > 0
    assert layer.lora_A["old"].weight.grad is None


@pytest.mark.parametrize("alphas", [(4, 4), (4, 8)])
def test_olora_concatenated_adapter_equals_the_sum(tmp_path, alphas):
    """The saved adapter (ranks concatenated) computes what old + new active together compute."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import save_file

    from mllmcl.methods.olora import concatenate_lora

    torch.manual_seed(1)
    base = Toy()
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=alphas[0], target_modules=["q_proj"]),
                           adapter_name="old")
    model.add_adapter("new", LoraConfig(r=2, lora_alpha=alphas[1], target_modules=["q_proj"]))
    layer = model.base_model.model.language_model.q_proj
    with torch.no_grad():
        for name in ("old", "new"):
            layer.lora_B[name].weight.normal_()
    model.base_model.set_adapter(["old", "new"])
    x = torch.randn(5, 3)
    expected = model(x)
    config, weights = concatenate_lora(model)
    assert config.r == 4
    config.save_pretrained(tmp_path)
    save_file(weights, str(tmp_path / "adapter_model.safetensors"))
    fresh = Toy()
    fresh.load_state_dict({k.replace("base_layer.", ""): v for k, v in base.state_dict().items()
                           if "lora_" not in k})
    merged = PeftModel.from_pretrained(fresh, str(tmp_path))
    torch.testing.assert_close(merged(x), expected)


# --------------------------------------------------------------------------- MoELoRA

def _moe(gate="softmax", top_k=2, experts=2, rank=2):
    from mllmcl.methods.moelora import MoELoraSettings, add_moelora

    torch.manual_seed(0)
    s = MoELoraSettings(experts=experts, expert_rank=rank, alpha=float(experts * rank), gate=gate, top_k=top_k,
                        target_modules=("q_proj",))
    model = add_moelora(Toy(d=8, out=8), s)
    return model, model.language_model.q_proj, s


def test_moelora_starts_as_the_base_and_trains_only_the_adapter():
    model, layer, _ = _moe()
    x = torch.randn(4, 8)
    torch.testing.assert_close(model(x), layer.base_layer(x))  # B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"language_model.q_proj.moe.default.lora_A", "language_model.q_proj.moe.default.lora_B",
                         "language_model.q_proj.moe.default.gate"}


def test_moelora_topk_gate_keeps_k_experts_per_token():
    _, layer, _ = _moe(gate="topk", top_k=1, experts=4)
    g = layer.moe["default"].gate_weights(torch.randn(16, 8))
    assert torch.all((g > 0).sum(-1) == 1) and torch.allclose(g.sum(-1), torch.ones(16))
    _, layer, _ = _moe(gate="softmax", experts=4)
    assert torch.all(layer.moe["default"].gate_weights(torch.randn(16, 8)) > 0)


def test_moelora_gate_learns_to_route_different_inputs_to_different_experts():
    """Two input clusters need opposite maps; after training, the gate sends them to
    different experts (the gate is learned, not fixed)."""
    model, layer, _ = _moe(gate="softmax", experts=2, rank=4)
    g = torch.Generator().manual_seed(0)
    center = torch.zeros(8)
    center[0] = 3.0
    xa = center + 0.3 * torch.randn(64, 8, generator=g)
    xb = -center + 0.3 * torch.randn(64, 8, generator=g)
    target_a, target_b = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    x = torch.cat([xa, xb])
    y = torch.cat([xa @ target_a.T, xb @ target_b.T]) + layer.base_layer(x).detach()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    for _ in range(400):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    gate = layer.moe["default"].gate_weights
    with torch.no_grad():
        ea, eb = gate(xa).argmax(-1), gate(xb).argmax(-1)
    assert ea.float().mean() in (0.0, 1.0) and eb.float().mean() in (0.0, 1.0)  # each cluster: one expert
    assert int(ea[0]) != int(eb[0])


def test_moelora_save_load_roundtrip_and_switching(tmp_path):
    from mllmcl.methods.moelora import delete_adapter, load_moelora, save_moelora, set_active

    model, layer, s = _moe(gate="topk", top_k=1, experts=2)
    with torch.no_grad():
        layer.moe["default"].lora_B.normal_()
    x = torch.randn(3, 8)
    expected = model(x)
    save_moelora(model, str(tmp_path), s)
    other = Toy(d=8, out=8)
    other.load_state_dict({"language_model.q_proj.weight": layer.base_layer.weight.detach()})
    load_moelora(other, str(tmp_path), name="x")
    torch.testing.assert_close(other(x), expected)
    set_active(other, None)
    torch.testing.assert_close(other(x), layer.base_layer(x))
    delete_adapter(other, "x")
    with pytest.raises(KeyError):
        set_active(other, "x")


def test_moelora_settings_are_validated():
    from mllmcl.methods.moelora import MoELoraSettings

    with pytest.raises(ValueError, match="top_k"):
        MoELoraSettings(experts=2, gate="topk", top_k=3)
    with pytest.raises(ValueError, match="gate"):
        MoELoraSettings(gate="hash")


def test_experts_train_their_own_projector(tmp_path, stream_overrides, small_tiny_path, synthetic_small):
    """lora.train_projector=true: each expert stores a trained copy of the vision projector in its
    adapter (PEFT modules_to_save), the base projector is untouched, and the experts' copies differ;
    the run's evaluation (and serving) load it with the adapter."""
    import torch
    from peft.utils import load_peft_weights

    from mllmcl.config import load_config
    from mllmcl.errors import ConfigError
    from mllmcl.models import load_backbone
    from mllmcl import run_stream

    cfg = load_config(None, [*stream_overrides, "scaling.backend=local", "method.name=mr_lora", "train.lr=0.01",
                             "train.max_steps=10", "lora.train_projector=true", "data.tasks=[RS,Med]",
                             f"storage.root={tmp_path}"])
    res = run_stream(cfg, "projector")
    base = {k: v for k, v in load_backbone(str(small_tiny_path)).model.state_dict().items() if "multi_modal_projector" in k}
    copies = []
    for k, task in enumerate(["RS", "Med"]):
        w = load_peft_weights(str(tmp_path / "runs" / "projector" / "tasks" / f"{k}_{task}" / "expert"))
        proj = {n: t for n, t in w.items() if "multi_modal_projector" in n}
        assert proj, f"{task}: no projector weights in the adapter"
        copies.append(proj)
        assert any(not torch.equal(t, base[next(b for b in base if b.endswith(n.split("multi_modal_projector.")[-1]
                                                                       .replace("modules_to_save.", "")))])
                   for n, t in proj.items()), "the projector copy did not train"
    assert any(not torch.equal(copies[0][n], copies[1][n]) for n in copies[0])
    router = load_peft_weights(str(tmp_path / "runs" / "projector" / "tasks" / "1_Med" / "router"))
    assert not any("multi_modal_projector" in n for n in router)  # the router keeps the base projector
    assert len(res.matrix.rows) == 2
    # serving's one-forward mixed batch gives each row its own expert's projector too
    from _reference import assert_mixed_batch_matches_reference

    from mllmcl.data.prompts import eval_prompt
    from mllmcl.data.release import load_image, load_stream
    from mllmcl.serving.ensemble import Ensemble
    from mllmcl.serving.run import load_served_run

    served = load_served_run(res.run_dir)
    engine = Ensemble(served).engine
    rows = [(s, t.name) for t in load_stream(str(synthetic_small), "dcl", ["RS", "Med"]) for s in t.test[:3]]
    texts, images = [eval_prompt(s) for s, _ in rows], [load_image(s.image) for s, _ in rows]
    assert_mixed_batch_matches_reference(engine, served.model_path, served.experts, texts, images, 4)
    with pytest.raises(ConfigError, match="train_projector"):
        load_config(None, ["lora.train_projector=true", "method.name=olora"])
