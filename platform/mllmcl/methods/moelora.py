"""moelora: MoELoRA — a mixture of LoRA experts with a learned per-token gate in every
targeted linear layer of the language model (the MoELoRA baseline of CoIN / MLLM-CL),
fine-tuned task after task (as ``lora_ft``, each stage continues the previous stage's
adapter). This module is the whole method: the layer, its adapter format (how the engine
loads it), its adapter kind (how a training worker builds and saves it), its options and
the method.

``method.moe_experts`` experts of rank ``lora.rank / moe_experts`` each (the same
parameter budget as the LoRA baselines, plus the gates); ``method.moe_gate`` is
``softmax`` (dense mixture) or ``topk`` (softmax over the ``method.moe_top_k`` best
experts per token).

Every targeted ``nn.Linear`` ``W`` becomes::

    y = W x + scaling * sum_e g_e(x) * B_e A_e x,     g(x) = gate(W_g x)

with ``E`` experts of rank ``r`` each and ``gate`` a softmax over the experts, or a
softmax over the ``top_k`` largest logits (the others get weight 0). The experts are
stored stacked (``A``: ``E*r x in``, ``B``: ``out x E*r``), so a forward costs the same
two matmuls as one LoRA of rank ``E*r``; top-k is applied by zeroing gate weights, which
keeps every parameter in the graph (DDP needs no unused-parameter search). ``scaling``
is ``alpha / (E*r)``, the scaling of a plain LoRA with the same total rank.

Several named adapters can live in one model (the evaluation worker keeps a few
loaded); one is active at a time, or none (the base model). An adapter is saved as a
folder with ``moelora_config.json`` and ``moelora.safetensors``.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mllmcl.methods import register
from mllmcl.methods.base import Answers, CLMethod, MethodOptions, NotServable, Stage, answer_with, request
from mllmcl.models.lora import LANGUAGE_MODEL_LINEARS, language_model_target_regex

CONFIG_FILE = "moelora_config.json"
WEIGHTS_FILE = "moelora.safetensors"
GATES = ("softmax", "topk")


@dataclass(frozen=True)
class MoELoraSettings:
    experts: int = 4
    expert_rank: int = 4
    alpha: float = 32.0
    dropout: float = 0.0
    gate: str = "softmax"  # softmax | topk
    top_k: int = 2
    target_modules: tuple[str, ...] = LANGUAGE_MODEL_LINEARS

    def __post_init__(self):
        if self.experts < 1 or self.expert_rank < 1:
            raise ValueError(f"MoELoRA needs >= 1 expert of rank >= 1, got {self.experts} x {self.expert_rank}")
        if self.gate not in GATES:
            raise ValueError(f"MoELoRA gate {self.gate!r}: expected one of {GATES}")
        if self.gate == "topk" and not 1 <= self.top_k <= self.experts:
            raise ValueError(f"MoELoRA top_k={self.top_k}: must be in [1, experts={self.experts}]")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.experts * self.expert_rank)

    @classmethod
    def for_lora(cls, lora, experts: int, gate: str, top_k: int) -> "MoELoraSettings":
        """``experts`` experts sharing the rank of ``lora`` (the run's LoRA settings; its alpha,
        dropout and target modules too)."""
        return cls(experts=experts, expert_rank=max(1, lora.rank // experts), alpha=float(lora.alpha),
                   dropout=lora.dropout, gate=gate, top_k=top_k, target_modules=tuple(lora.target_modules))

    def to_dict(self) -> dict:
        return {**asdict(self), "target_modules": list(self.target_modules)}

    @classmethod
    def from_dict(cls, d: dict) -> "MoELoraSettings":
        d = dict(d)
        d["target_modules"] = tuple(d.get("target_modules", LANGUAGE_MODEL_LINEARS))
        return cls(**d)


class MoEAdapter(nn.Module):
    """One adapter's parameters for one linear layer: stacked experts and the gate."""

    def __init__(self, in_features: int, out_features: int, s: MoELoraSettings, dtype=None, device=None):
        super().__init__()
        total = s.experts * s.expert_rank
        self.settings = s
        self.lora_A = nn.Parameter(torch.empty(total, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, total, dtype=dtype, device=device))
        self.gate = nn.Parameter(torch.empty(s.experts, in_features, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT's LoRA A; B = 0 so the start is the base
        nn.init.normal_(self.gate, std=0.02)
        self.dropout = nn.Dropout(s.dropout) if s.dropout > 0 else nn.Identity()

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token expert weights (..., E), summing to 1."""
        logits = nn.functional.linear(x, self.gate).float()
        s = self.settings
        if s.gate == "topk" and s.top_k < s.experts:
            kth = logits.topk(s.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.settings
        g = self.gate_weights(x).to(x.dtype)
        h = nn.functional.linear(self.dropout(x), self.lora_A)  # (..., E*r)
        h = (h.unflatten(-1, (s.experts, s.expert_rank)) * g.unsqueeze(-1)).flatten(-2)
        return nn.functional.linear(h, self.lora_B) * s.scaling


class AdaptedLinear(nn.Module):
    """A frozen linear layer plus named adapters, at most one active: the wrapper MoELoRA's layer
    shares with the other per-layer adapters (:mod:`mllmcl.methods._task_experts`). A subclass
    sets ``slot``, the attribute holding its adapters (an ``nn.ModuleDict``, so part of the
    parameter names), and ``label``, its name in errors."""

    slot: str
    label: str

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base_layer = base
        setattr(self, self.slot, nn.ModuleDict())
        self.active: str | None = None

    @property
    def adapters(self) -> nn.ModuleDict:
        return getattr(self, self.slot)

    @property
    def weight(self):  # some model code reads the wrapped layer's weight (dtype / device checks)
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.active is None:
            return y
        return y + self.adapters[self.active](x)

    @classmethod
    def layers(cls, model: nn.Module) -> dict:
        """``path -> layer`` of this class in ``model``."""
        return {n: m for n, m in model.named_modules() if isinstance(m, cls)}

    @classmethod
    def targets(cls, model: nn.Module, target_modules) -> list[str]:
        """The paths of the language model's linear layers (wrapped or not) ``target_modules`` names."""
        pattern = re.compile(language_model_target_regex(target_modules))
        return [n for n, m in model.named_modules() if pattern.fullmatch(n) and isinstance(m, (nn.Linear, cls))]

    @classmethod
    def wrap(cls, model: nn.Module, paths: list[str], name: str) -> dict:
        """Wrap the layers at ``paths`` (once each; the first wrap freezes the base model's own
        parameters), none of which may hold adapter ``name`` yet. Returns ``path -> layer``."""
        if not cls.layers(model):
            for p in model.parameters():
                p.requires_grad_(False)
        out = {}
        for path in paths:
            parent_name, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = getattr(parent, child)
            if not isinstance(layer, cls):
                layer = cls(layer)
                setattr(parent, child, layer)
            if name in layer.adapters:
                raise ValueError(f"{cls.label} adapter {name!r} already exists")
            out[path] = layer
        return out

    @classmethod
    def set_active(cls, model: nn.Module, name: str | None) -> None:
        for layer in cls.layers(model).values():
            if name is not None and name not in layer.adapters:
                raise KeyError(f"{cls.label} adapter {name!r} is not loaded")
            layer.active = name

    @classmethod
    def delete(cls, model: nn.Module, name: str) -> None:
        for layer in cls.layers(model).values():
            if layer.active == name:
                layer.active = None
            if name in layer.adapters:
                del layer.adapters[name]


class MoELoraLinear(AdaptedLinear):
    """A frozen linear layer plus named MoELoRA adapters (``moe``), at most one active."""

    slot, label = "moe", "MoELoRA"

    def add(self, name: str, s: MoELoraSettings) -> None:
        w = self.base_layer.weight
        self.moe[name] = MoEAdapter(self.base_layer.in_features, self.base_layer.out_features, s, w.dtype, w.device)


def moe_layers(model: nn.Module) -> dict[str, MoELoraLinear]:
    return MoELoraLinear.layers(model)


def add_moelora(model: nn.Module, s: MoELoraSettings, name: str = "default") -> nn.Module:
    """Wrap the targeted linear layers (once) and add adapter ``name`` to each; make it active.

    The base model's own parameters are frozen; only the new adapter is trainable.
    """
    targets = MoELoraLinear.targets(model, s.target_modules)
    if not targets:
        raise ValueError(f"MoELoRA: no linear layer matches {s.target_modules} in the language model")
    for layer in MoELoraLinear.wrap(model, targets, name).values():
        layer.add(name, s)
    set_active(model, name)
    return model


def set_active(model: nn.Module, name: str | None) -> None:
    MoELoraLinear.set_active(model, name)


def delete_adapter(model: nn.Module, name: str) -> None:
    MoELoraLinear.delete(model, name)


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """``<layer path>.<param>`` -> tensor for adapter ``name`` (no adapter name in the keys)."""
    out = {}
    for path, layer in moe_layers(model).items():
        for pname, p in layer.moe[name].named_parameters():
            out[f"{path}.{pname}"] = p.detach().cpu().contiguous()
    return out


def save_moelora(model: nn.Module, folder: str, s: MoELoraSettings, name: str = "default") -> None:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file(adapter_state_dict(model, name), os.path.join(folder, WEIGHTS_FILE))
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump({"type": "moelora", **s.to_dict()}, f, indent=2)


def read_settings(folder: str) -> MoELoraSettings:
    with open(os.path.join(folder, CONFIG_FILE)) as f:
        d = json.load(f)
    d.pop("type", None)
    return MoELoraSettings.from_dict(d)


def load_moelora(model: nn.Module, folder: str, name: str = "default", trainable: bool = False) -> nn.Module:
    """Add the adapter saved in ``folder`` to ``model`` as ``name`` (active)."""
    from safetensors.torch import load_file

    s = read_settings(folder)
    add_moelora(model, s, name)
    weights = load_file(os.path.join(folder, WEIGHTS_FILE))
    layers = moe_layers(model)
    expected = set()
    for path, layer in layers.items():
        for pname, p in layer.moe[name].named_parameters():
            key = f"{path}.{pname}"
            expected.add(key)
            if key not in weights:
                raise ValueError(f"{folder}: MoELoRA weights lack {key} (saved for another model?)")
            with torch.no_grad():
                p.copy_(weights[key].to(p.dtype))
            p.requires_grad_(trainable)
    extra = set(weights) - expected
    if extra:
        raise ValueError(f"{folder}: MoELoRA weights for layers this model lacks, e.g. {sorted(extra)[0]}")
    return model


# --------------------------------------------------------------------------- the engine's format

class MoELoraFormat:
    """A MoELoRA folder (``moelora_config.json``): adapters live in the model's own layers, one active."""

    name = "moelora"
    mixed_batches = False  # one gate per layer: rows of different adapters cannot share a forward

    @staticmethod
    def detect(local_dir: str) -> bool:
        return os.path.exists(os.path.join(local_dir, CONFIG_FILE))

    @staticmethod
    def load(engine, local_dir: str, name: str) -> None:
        load_moelora(engine.model, local_dir, name)
        engine.model.eval()

    @staticmethod
    def activate(engine, name: str | None):
        import contextlib

        set_active(engine.model, name)
        return engine.model, contextlib.nullcontext()

    @staticmethod
    def delete(engine, name: str) -> None:
        delete_adapter(engine.model, name)


# --------------------------------------------------------------------------- the training worker's kind

class MoELoraKind:
    """``adapter_args``: ``moe`` (the :class:`MoELoraSettings` as a dict)."""

    def __init__(self, request):
        self.request = request
        self.settings = MoELoraSettings.from_dict(request.adapter_args["moe"])

    def build(self, backbone_model):
        from mllmcl.models.adapters import local_adapter

        if self.request.init_adapter:
            with local_adapter(self.request.init_adapter) as local:
                if read_settings(local) != self.settings:
                    raise ValueError(f"{self.request.init_adapter}: MoELoRA settings differ from this run's")
                return load_moelora(backbone_model, local, trainable=True)
        return add_moelora(backbone_model, self.settings)

    def extra_loss(self, model) -> torch.Tensor | None:
        return None

    def save(self, model, uri: str, meta: dict, extra=None) -> None:
        """Publish the adapter at ``uri``; ``extra(folder)``, if given, writes a subclass's own files
        into the folder first."""
        from mllmcl.models.adapters import publish_adapter
        from mllmcl.training.adapter_kinds import unwrap

        with tempfile.TemporaryDirectory(prefix="adapter-") as tmp:
            save_moelora(unwrap(model), tmp, self.settings)
            if extra is not None:
                extra(tmp)
            publish_adapter(tmp, uri, meta)


# --------------------------------------------------------------------------- the method

@dataclass(frozen=True)
class MoELoRAOptions(MethodOptions):
    moe_experts: int = 4  # low-rank experts per layer, rank lora.rank / moe_experts each
    moe_gate: str = "softmax"  # softmax (dense mixture) | topk (softmax over the moe_top_k best)
    moe_top_k: int = 2

    def check(self) -> list[str]:
        p = []
        if self.moe_experts < 1:
            p.append(f"method.moe_experts={self.moe_experts}: must be >= 1")
        if self.moe_gate not in GATES:
            p.append(f"method.moe_gate={self.moe_gate!r}: expected softmax or topk")
        elif self.moe_gate == "topk" and not 1 <= self.moe_top_k <= max(1, self.moe_experts):
            p.append(f"method.moe_top_k={self.moe_top_k}: must be in [1, method.moe_experts={self.moe_experts}]")
        return p

    def check_with(self, cfg) -> list[str]:
        p = []
        if cfg.lora.train_projector:
            p.append("lora.train_projector: not supported by moelora (its adapters are gated per layer); "
                     "use it with mr_lora, lora_ft, replay or joint")
        if self.moe_experts >= 1 and cfg.lora.rank % self.moe_experts:
            p.append(f"lora.rank={cfg.lora.rank} must be a multiple of method.moe_experts={self.moe_experts} "
                     f"(each MoELoRA expert has rank lora.rank / moe_experts)")
        return p


def moe_settings(cfg) -> MoELoraSettings:
    m = cfg.method
    return MoELoraSettings.for_lora(cfg.lora, m.moe_experts, m.moe_gate, m.moe_top_k)


@register("moelora")
class MoELoRA(CLMethod):
    Options = MoELoRAOptions
    adapter_format = MoELoraFormat

    def plan(self, stage: Stage):
        init = stage.expert_uri(stage.k - 1) if stage.k > 0 else None
        return [request(stage, "lora", stage.task.train, stage.expert_uri(), init_adapter=init,
                        adapter_kind=MoELoraKind, adapter_args={"moe": moe_settings(self.cfg).to_dict()})]

    def answer(self, stage: Stage, predictor) -> Answers:
        return answer_with(stage, predictor, stage.expert_uri())

    def serving(self, stage: Stage):
        raise NotServable("moelora adapters are not PEFT adapters, so PEFT cannot batch them across experts; "
                          "evaluate MoELoRA runs with the stream runner")
