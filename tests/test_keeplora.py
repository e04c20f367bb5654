"""KeepLoRA's maths on values computed by hand (protected basis, projection, A, GPM growth) and
its adapter kind on a toy language model (only B trains, prepare is deterministic, two tasks
end in one PEFT adapter with a grown basis)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F


def _e(i: int, n: int) -> torch.Tensor:
    v = torch.zeros(n)
    v[i] = 1.0
    return v


def _orthonormal(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    return q  # n x k, orthonormal columns


def _span(basis: torch.Tensor) -> torch.Tensor:
    return basis @ basis.T  # the projector onto the columns' span (sign-free)


# ----------------------------------------------------------------------------- the maths

def test_energy_rank_takes_the_fewest_that_reach_the_threshold():
    from mllmcl.methods.keeplora import energy_rank

    sq = torch.tensor([9.0, 4.0, 1.0, 1.0])  # total 15
    assert energy_rank(sq, 0.5) == 1  # 9/15 = 0.6 >= 0.5
    assert energy_rank(sq, 0.8) == 2  # 9/15 < 0.8 <= 13/15
    assert energy_rank(sq, 1.0) == 4
    assert energy_rank(sq, 0.9, captured=14.0, total=15.0) == 0  # already captured
    assert energy_rank(sq[1:], 0.99, captured=9.0, total=15.0) == 3  # 9 + 4 + 1 + 1 = 15


def test_protected_basis_covers_the_energy_with_the_top_input_directions():
    from mllmcl.methods.keeplora import protected_basis

    m = torch.zeros(3, 4)  # singular values 4, 3, 2 on input directions e2, e0, e3 (e1: 0)
    m[0, 2], m[1, 0], m[2, 3] = 4.0, 3.0, 2.0
    w = _orthonormal(3, 3, seed=1) @ m  # a rotation of the outputs keeps the right singular vectors
    # squared: 16, 9, 4 of 29; 0.6 * 29 = 17.4 needs 16 + 9
    basis = protected_basis(w, 0.6)
    assert basis.shape == (4, 2)
    torch.testing.assert_close(_span(basis), torch.diag(torch.tensor([1.0, 0.0, 1.0, 0.0])), atol=1e-5, rtol=0)
    torch.testing.assert_close(basis.T @ basis, torch.eye(2), atol=1e-5, rtol=0)
    top = protected_basis(w, 0.5)  # 16/29 = 0.55 >= 0.5: the top direction alone
    torch.testing.assert_close(top.abs().squeeze(1), _e(2, 4), atol=1e-5, rtol=0)
    assert protected_basis(w, 1.0).shape == (4, 3)  # never the zero direction e1
    assert float(_span(protected_basis(w, 1.0))[1, 1]) == pytest.approx(0.0, abs=1e-5)


def test_projection_removes_the_protected_component():
    from mllmcl.methods.keeplora import project_out

    u = _orthonormal(6, 2, seed=2)
    g = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    p = project_out(g, u)
    torch.testing.assert_close(p @ u, torch.zeros(5, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(g - p, g @ u @ u.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(project_out(p, u), p, atol=1e-5, rtol=0)  # idempotent
    assert torch.equal(project_out(g, torch.zeros(6, 0)), g)  # an empty basis protects nothing


def test_a_is_the_top_right_singular_vectors_of_the_projected_gradient():
    from mllmcl.methods.keeplora import lora_a

    a = _orthonormal(5, 4, seed=4).T  # four orthonormal output directions (rows)
    # right singular directions e3 (5), e2 (4), e1 (3), e0 (1); e2 is protected
    g = (5 * torch.outer(a[0], _e(3, 4)) + 4 * torch.outer(a[1], _e(2, 4)) + 3 * torch.outer(a[2], _e(1, 4))
         + 1 * torch.outer(a[3], _e(0, 4)))
    protected = _e(2, 4).unsqueeze(1)
    got = lora_a(g, protected, 2)
    assert got.shape == (2, 4)
    torch.testing.assert_close(got.abs(), torch.stack([_e(3, 4), _e(1, 4)]), atol=1e-5, rtol=0)
    torch.testing.assert_close(got @ protected, torch.zeros(2, 1), atol=1e-6, rtol=0)
    unprotected = lora_a(g, torch.zeros(4, 0), 2)  # without the basis, e2 would be taken
    torch.testing.assert_close(unprotected.abs(), torch.stack([_e(3, 4), _e(2, 4)]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="rank"):
        lora_a(g, protected, 5)


def test_a_stays_orthogonal_to_the_basis_when_the_projected_gradient_has_low_rank():
    from mllmcl.methods.keeplora import lora_a

    a = _orthonormal(5, 2, seed=6).T
    g = 5 * torch.outer(a[0], _e(3, 5)) + 4 * torch.outer(a[1], _e(2, 5))  # rank 1 once e2 is protected
    protected = torch.stack([_e(2, 5), _e(0, 5)], dim=1)
    got = lora_a(g, protected, 3)
    assert got.shape == (3, 5)
    torch.testing.assert_close(got[0].abs(), _e(3, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(got @ protected, torch.zeros(3, 2), atol=1e-5, rtol=0)  # the others too
    torch.testing.assert_close(got @ got.T, torch.eye(3), atol=1e-5, rtol=0)
    crowded = lora_a(g, torch.eye(5)[:, :4], 2)  # one free direction left (e4) for a rank of 2
    torch.testing.assert_close(crowded.abs(), torch.stack([_e(4, 5), torch.zeros(5)]), atol=1e-5, rtol=0)


def test_basis_grows_by_gpm_criterion():
    from mllmcl.methods.keeplora import grow_basis

    a = _orthonormal(5, 4, seed=5).T
    u = _e(0, 4).unsqueeze(1)  # e0 protected already
    # energies: e0 100 (captured), e1 9, e2 1, e3 0.01; total 110.01
    g = (10 * torch.outer(a[0], _e(0, 4)) + 3 * torch.outer(a[1], _e(1, 4)) + 1 * torch.outer(a[2], _e(2, 4))
         + 0.1 * torch.outer(a[3], _e(3, 4)))
    grown = grow_basis(u, g, 0.99)  # 0.99 * 110.01 = 108.91: 100 + 9 reaches it
    assert grown.shape == (4, 2)
    assert torch.equal(grown[:, :1], u)  # the old directions stay, first
    torch.testing.assert_close(_span(grown), torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0])), atol=1e-5, rtol=0)
    more = grow_basis(u, g, 0.999)  # 109.90 needs the 1 of e2 as well
    torch.testing.assert_close(_span(more), torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0])), atol=1e-5, rtol=0)
    assert torch.equal(grow_basis(u, g, 0.9), u)  # 100 >= 99.0: nothing to add
    full = torch.eye(4)
    assert torch.equal(grow_basis(full, g, 0.99), full)  # no room left
    rank1 = 10 * torch.outer(a[0], _e(1, 4))  # one direction: 1.0 adds it and no noise direction
    torch.testing.assert_close(_span(grow_basis(u, rank1, 1.0)), torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0])),
                               atol=1e-5, rtol=0)


def test_evenly_spaced_samples():
    from mllmcl.methods.keeplora import evenly_spaced

    assert evenly_spaced(1000, 0.2) == list(range(0, 1000, 5))
    assert evenly_spaced(10, 0.3) == [0, 3, 6]
    assert evenly_spaced(3, 0.01) == [0]
    assert evenly_spaced(4, 1.0) == [0, 1, 2, 3]


def test_options_are_checked():
    from mllmcl.config import load_config
    from mllmcl.errors import ConfigError
    from mllmcl.methods.keeplora import KeepLoRAOptions

    assert KeepLoRAOptions().check() == []
    assert KeepLoRAOptions(keeplora_base_energy=1.0, keeplora_grad_fraction=1.0, keeplora_grow_energy=1.0).check() == []
    bad = KeepLoRAOptions(keeplora_base_energy=0.0, keeplora_grad_fraction=1.5, keeplora_grow_energy=-0.1).check()
    assert [line.split("=")[0] for line in bad] == ["method.keeplora_base_energy", "method.keeplora_grad_fraction",
                                                   "method.keeplora_grow_energy"]
    with pytest.raises(ConfigError, match="train_projector"):
        load_config(None, ["lora.train_projector=true", "method.name=keeplora"])
    with pytest.raises(ConfigError, match="keeplora_grow_energy"):
        load_config(None, ["method.name=keeplora", "method.keeplora_grow_energy=0"])


# ----------------------------------------------------------------------------- the adapter kind

V, D = 6, 8


class ToyLM(nn.Module):
    """A language model small enough to follow: embedding -> q_proj (residual) -> down_proj -> CE,
    named like a VLM's so that the LoRA target regex applies."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.language_model = nn.Module()
        self.language_model.embed = nn.Embedding(V, D)
        self.language_model.q_proj = nn.Linear(D, D, bias=False)
        self.language_model.down_proj = nn.Linear(D, V, bias=False)

    def forward(self, input_ids, labels=None, **_):
        lm = self.language_model
        h = lm.embed(input_ids)
        h = h + torch.tanh(lm.q_proj(h))
        logits = lm.down_proj(h)
        loss = None if labels is None else F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1),
                                                           ignore_index=-100)
        return SimpleNamespace(loss=loss, logits=logits)


class DigitCollator:
    """Questions and answers are digit strings, one token per digit; the question is masked."""

    def train_batch(self, questions, answers, pixels):
        rows = [[int(c) for c in q + a] for q, a in zip(questions, answers)]
        labels = [[-100] * len(q) + [int(c) for c in a] for q, a in zip(questions, answers)]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        lab = torch.tensor([lb + [-100] * (width - len(lb)) for lb in labels])
        return {"input_ids": ids, "labels": lab}


class NoPixels:
    def get(self, uris):
        return None


def _samples(task: int, n: int = 10):
    g = torch.Generator().manual_seed(100 + task)
    out = []
    for _ in range(n):
        q = "".join(str(int(d)) for d in torch.randint(0, V, (3,), generator=g))
        out.append(SimpleNamespace(question=q, target=str((int(q[0]) + task) % V), image=None))
    return out


def _data(task: int):
    from mllmcl.training.worker import FitData

    return FitData(DigitCollator(), NoPixels(), _samples(task), torch.device("cpu"), None, 0, 1)


def _kind(previous=None, rank=2, fraction=0.5):
    from mllmcl.methods.keeplora import KeepLoraKind
    from mllmcl.settings import LoraSettings

    lora = LoraSettings(rank=rank, alpha=2 * rank, dropout=0.0, target_modules=("q_proj", "down_proj"))
    request = SimpleNamespace(lora=lora, task="T", adapter_args={
        "base_energy": 0.6, "grad_fraction": fraction, "grow_energy": 0.99, "previous": previous})
    return KeepLoraKind(request)


def _new_weights(model):
    from mllmcl.methods.keeplora import target_layers

    return {n: (m.lora_A["new"].weight.detach().clone(), m.lora_B["new"].weight.detach().clone())
            for n, m in target_layers(model).items()}


def test_mean_gradients_average_the_per_sample_gradients_of_the_base_weights():
    from mllmcl.methods.keeplora import mean_gradients, target_layers

    kind = _kind()
    model = kind.build(ToyLM())
    data = _data(0)
    layers = target_layers(model)
    grads = mean_gradients(model, layers, data, [0, 3, 6])
    plain = ToyLM()  # the same weights, no adapter (B = 0: the same function)
    w = [plain.language_model.q_proj.weight, plain.language_model.down_proj.weight]
    expected = [torch.zeros_like(t) for t in w]
    for i in (0, 3, 6):
        batch = DigitCollator().train_batch([data.samples[i].question], [data.samples[i].target], None)
        for e, gi in zip(expected, torch.autograd.grad(plain(**batch).loss, w)):
            e += gi / 3
    names = sorted(layers)  # ...down_proj, ...q_proj
    torch.testing.assert_close(grads[names[1]], expected[0])
    torch.testing.assert_close(grads[names[0]], expected[1])
    # nothing changed on the model: flags, gradients, mode
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if ".lora_B.new." in n}
    assert all(p.grad is None for p in model.parameters())


def test_prepare_sets_a_orthogonal_to_the_basis_and_only_b_trains():
    kind = _kind()
    model = kind.build(ToyLM())
    data = _data(0)
    kind.prepare(model, data)
    from mllmcl.methods.keeplora import target_layers

    for name, m in target_layers(model).items():
        a, b = m.lora_A["new"].weight, m.lora_B["new"].weight
        basis = kind.basis[name]
        assert 0 < basis.shape[1] < basis.shape[0]
        torch.testing.assert_close(a @ basis, torch.zeros(a.shape[0], basis.shape[1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-5, rtol=0)
        assert not a.requires_grad and b.requires_grad and float(b.detach().abs().sum()) == 0.0
    batch = DigitCollator().train_batch([s.question for s in data.samples], [s.target for s in data.samples], None)
    base_loss = ToyLM()(**batch).loss
    loss = model(**batch).loss
    torch.testing.assert_close(loss, base_loss)  # B = 0: it starts as the merged model
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in model.named_parameters() if ".lora_B.new." in n}
    assert all(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if n in with_grad)


def test_prepare_is_deterministic_across_calls_and_rebuilds():
    kind = _kind()
    model = kind.build(ToyLM())
    kind.prepare(model, _data(0))
    first = _new_weights(model)
    kind.prepare(model, _data(0))  # a resumed fit calls it again, before its checkpoint is loaded
    again = _new_weights(model)
    other = _kind()
    rebuilt = other.build(ToyLM())
    other.prepare(rebuilt, _data(0))
    rebuilt_weights = _new_weights(rebuilt)
    for name in first:
        assert torch.equal(first[name][0], again[name][0]) and torch.equal(first[name][0], rebuilt_weights[name][0])
        assert torch.equal(kind.basis[name], other.basis[name])


def _train(model, task):
    from mllmcl.settings import TrainSettings
    from mllmcl.training.loop import fit

    fit(model, DigitCollator(), NoPixels(), _samples(task), TrainSettings(epochs=3, batch_size=4, lr=0.05))


def test_two_tasks_end_in_one_peft_adapter_with_a_grown_basis(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from mllmcl.methods.keeplora import BASIS_FILE, target_layers
    from mllmcl.models.adapters import local_adapter

    kind0 = _kind()
    m0 = kind0.build(ToyLM())
    kind0.prepare(m0, _data(0))
    a0 = _new_weights(m0)
    _train(m0, 0)
    after = _new_weights(m0)
    assert all(torch.equal(a0[n][0], after[n][0]) for n in a0)  # A frozen ...
    assert all(not torch.equal(a0[n][1], after[n][1]) for n in a0)  # ... B trained
    s0 = str(tmp_path / "s0")
    kind0.save(m0, s0, {"stage": 0})
    basis0 = load_file(f"{s0}/{BASIS_FILE}")
    assert set(basis0) == set(target_layers(m0))
    assert all(basis0[n].shape[1] >= kind0.basis[n].shape[1] for n in basis0)  # grown (or kept)
    assert all(torch.equal(basis0[n][:, :kind0.basis[n].shape[1]], kind0.basis[n]) for n in basis0)
    meta = json.loads((tmp_path / "s0" / "meta.json").read_text())
    assert meta["keeplora_grad_samples"] == 5 and meta["keeplora_basis_dims"]["max"] <= D
    with local_adapter(s0):  # the basis file does not stand in for the adapter's weights
        pass

    kind1 = _kind(previous=s0)
    m1 = kind1.build(ToyLM())
    kind1.prepare(m1, _data(1))
    for name, m in target_layers(m1).items():
        torch.testing.assert_close(m.lora_A["new"].weight @ basis0[name],
                                   torch.zeros(2, basis0[name].shape[1]), atol=1e-5, rtol=0)
    old = {n: p.detach().clone() for n, p in m1.named_parameters() if ".old." in n}
    _train(m1, 1)
    assert all(torch.equal(p, old[n]) for n, p in m1.named_parameters() if ".old." in n)  # earlier LoRAs frozen
    s1 = str(tmp_path / "s1")
    kind1.save(m1, s1, {"stage": 1})
    assert json.loads((tmp_path / "s1" / "adapter_config.json").read_text())["r"] == 4  # two rank-2 LoRAs
    basis1 = load_file(f"{s1}/{BASIS_FILE}")
    assert all(torch.equal(basis1[n][:, :basis0[n].shape[1]], basis0[n]) for n in basis1)

    batch = DigitCollator().train_batch([s.question for s in _samples(1)], [s.target for s in _samples(1)], None)
    served = PeftModel.from_pretrained(ToyLM(), s1)  # one PEFT adapter: what the engine loads
    with torch.no_grad():
        torch.testing.assert_close(served(**batch).logits, m1(**batch).logits)


def test_a_folder_with_only_the_basis_is_not_taken_for_an_adapter(tmp_path):
    """The basis file must not pass the adapter folder's weight check in place of lost weights."""
    from mllmcl.methods.keeplora import BASIS_FILE
    from mllmcl.models.adapters import local_adapter

    kind = _kind()
    model = kind.build(ToyLM())
    kind.prepare(model, _data(0))
    kind.save(model, str(tmp_path / "s0"), {})
    (tmp_path / "s0" / "adapter_model.safetensors").unlink()
    assert (tmp_path / "s0" / BASIS_FILE).exists()
    with pytest.raises(FileNotFoundError, match="no weights"):
        with local_adapter(str(tmp_path / "s0")):
            pass
