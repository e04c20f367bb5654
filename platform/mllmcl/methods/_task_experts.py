"""Per-task LoRA experts in every adapted linear layer, mixed at test time by anchors: the
layer, adapter format, adapter kind and stage steps that ``hide`` (:mod:`mllmcl.methods.hide`)
and ``disco`` (:mod:`mllmcl.methods.disco`) share. (The underscore keeps the methods'
registry from importing it as a method.)

**Layer.** Every targeted ``nn.Linear`` ``W`` of the language model (``lora.target_modules``)
is wrapped as MoELoRA's are (:class:`mllmcl.methods.moelora.AdaptedLinear`) and holds, per
adapter, an :class:`ExpertBank`: experts ``(A_i, B_i)`` of rank ``r`` each, one per task learned so far (``A_i``: ``r x in``, ``B_i``: ``out x r``; ``s`` = ``lora.alpha /
lora.rank``, the stream's LoRA scaling). A bank is in one of three roles::

    train    y = W x + s * B_t A_t x                       (the newest expert only)
    fused    y = W x + s * (sum_i B_i)(sum_i A_i) x        (W += (ΣB)(ΣA): cross terms kept)
    mixture  y = W x + s * sum_i w_i B_i A_i x             (w: per row, from the anchors)

**Training** task ``t`` (:class:`TaskExpertsKind`): the earlier experts are loaded from the
previous stage's folder, frozen, and left out of the forward (role ``train``); expert ``t``
is new (``A`` as PEFT's LoRA A, ``B = 0``: the start is the base) and the only trainable
parameter. The stage folder holds experts ``0..t`` (``task_experts_config.json``,
``task_experts.safetensors``), so each stage folder is self-contained.

**Anchors** (:func:`store_anchors`, the method's ``finish``): after task ``t`` is trained, the
frozen base model's features of ``anchor_samples`` of its train questions, from
``predictor.features`` (:meth:`mllmcl.engine.Engine.batch_features`): ``image`` = the
projected image features mean-pooled, ``text`` = the final hidden state mean-pooled over the
question read with its image. A task's anchor is the normalised mean. Stored in the run
(``tasks/<t>_<task>/<method>_anchors.json``, like the prototype routers' prototypes) and,
for tasks ``0..t``, in the stage's adapter folder (``task_experts_anchors.json``, then
``meta.json`` rewritten last), so the adapter is self-contained for serving.

**Test time** (:class:`TaskExpertsFormat`): the format's ``rows`` computes each question's
features from the prompt batch with the adapters off (the same computation as the anchors'),
the per-row weights ``w = softmax(mean_kinds cos(feature, anchor_i) / temperature)`` (hide:
kinds image and text, ``(cos_img + cos_text) / 2``; disco: text only), and sets them on the
mixture banks for that ``generate`` call (its decoding steps keep the batch's rows).
Departure from both references: they read the instruction with a frozen CLIP text encoder;
with no text tower beside the base, the text feature here is the base model's own final
hidden state over the question *read with its image* (the one text feature the decoding
path computes from its prompt batch exactly as the anchors were computed), so the image
also shapes it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import weakref
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mllmcl.data.prompts import eval_prompt
from mllmcl.methods.base import Answers, Stage, answer_with, request
from mllmcl.methods.moelora import AdaptedLinear
from mllmcl.models.lora import LANGUAGE_MODEL_LINEARS

CONFIG_FILE = "task_experts_config.json"
WEIGHTS_FILE = "task_experts.safetensors"
ANCHORS_FILE = "task_experts_anchors.json"
MIXINGS = ("hide", "disco")
ANCHOR_KINDS = {"hide": ("image", "text"), "disco": ("text",)}  # what each mixing compares, in order
FEATURE = {"image": "image", "text": "hidden"}  # anchor kind -> Engine.batch_features key
ROLES = ("train", "fused", "mixture")


@dataclass(frozen=True)
class TaskExpertSettings:
    mixing: str = "hide"  # hide (fused lower layers, mixture at the last) | disco (mixture everywhere)
    expert_rank: int = 4
    scaling: float = 2.0  # lora.alpha / lora.rank
    dropout: float = 0.0
    temperature: float = 0.1
    target_modules: tuple[str, ...] = LANGUAGE_MODEL_LINEARS

    def __post_init__(self):
        if self.mixing not in MIXINGS:
            raise ValueError(f"task experts mixing {self.mixing!r}: expected one of {MIXINGS}")
        if self.expert_rank < 1 or not self.temperature > 0:
            raise ValueError(f"task experts need rank >= 1 and temperature > 0, got {self.expert_rank}, "
                             f"{self.temperature}")

    def to_dict(self) -> dict:
        return {**asdict(self), "target_modules": list(self.target_modules)}

    @classmethod
    def from_dict(cls, d: dict) -> "TaskExpertSettings":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["target_modules"] = tuple(d.get("target_modules", LANGUAGE_MODEL_LINEARS))
        return cls(**d)


# --------------------------------------------------------------------------- the layer

class ExpertBank(nn.Module):
    """One adapter's per-task experts for one linear layer, and its role (module docstring)."""

    def __init__(self, in_features: int, out_features: int, s: TaskExpertSettings, role: str, dtype=None,
                 device=None):
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"expert bank role {role!r}: expected one of {ROLES}")
        self.settings, self.role = s, role
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.device = dtype, device  # of the base layer's weight: where new experts go
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        self.dropout = nn.Dropout(s.dropout) if s.dropout > 0 else nn.Identity()
        self.weights: torch.Tensor | None = None  # (rows, experts), set for one generate (role mixture)
        self._frozen: tuple[torch.Tensor, ...] | None = None  # stacked and summed experts, once frozen

    @property
    def experts(self) -> int:
        return len(self.A)

    def add_expert(self, trainable: bool) -> None:
        r, dtype, device = self.settings.expert_rank, self.dtype, self.device
        a = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device), requires_grad=trainable)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as PEFT's LoRA A; B = 0 so the start is the base
        self.A.append(a)
        self.B.append(nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device),
                                   requires_grad=trainable))
        self._frozen = None

    def freeze(self) -> None:
        """No expert trains any more: keep the stacked and summed experts (inference)."""
        for p in self.parameters():
            p.requires_grad_(False)
        self._frozen = self._tensors()

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        a, b = list(self.A), list(self.B)
        return torch.cat(a, 0), torch.cat(b, 1), torch.stack(a).sum(0), torch.stack(b).sum(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.settings.scaling
        lin = nn.functional.linear
        if self.role == "train":  # the newest expert alone: earlier experts are not in the training forward
            return lin(lin(self.dropout(x), self.A[-1]), self.B[-1]) * s
        a, b, a_sum, b_sum = self._frozen if self._frozen is not None else self._tensors()
        if self.role == "fused":
            return lin(lin(x, a_sum), b_sum) * s
        w = self.weights
        if w is None:
            raise RuntimeError("a task-experts mixture layer ran without mixing weights (the format's rows() "
                               "sets them for each generate)")
        if w.shape != (x.shape[0], self.experts):
            raise RuntimeError(f"mixing weights of shape {tuple(w.shape)} for {x.shape[0]} rows and "
                               f"{self.experts} experts")
        h = lin(x, a).unflatten(-1, (self.experts, self.settings.expert_rank))  # (rows, ..., experts, r)
        w = w.to(h.dtype).view(w.shape[0], *([1] * (h.dim() - 3)), self.experts, 1)
        return lin((h * w).flatten(-2), b) * s


class TaskExpertLinear(AdaptedLinear):
    """A frozen linear layer plus named expert banks (``banks``, one per loaded adapter), at most one active."""

    slot, label = "banks", "task-experts"


def expert_layers(model: nn.Module) -> dict[str, TaskExpertLinear]:
    return TaskExpertLinear.layers(model)


def _layer_index(path: str) -> int | None:
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", path)
    return None if m is None else int(m.group(1))


def roles(paths: list[str], s: TaskExpertSettings, training: bool) -> dict[str, str]:
    """Each adapted layer's role: ``train`` while training; at test time hide fuses every layer but
    the last decoder layer's and mixes there, disco mixes everywhere."""
    if training:
        return {p: "train" for p in paths}
    if s.mixing == "disco":
        return {p: "mixture" for p in paths}
    index = {p: _layer_index(p) for p in paths}
    if None in index.values():
        raise ValueError(f"hide: cannot tell the decoder layer of {[p for p, i in index.items() if i is None][:2]}")
    last = max(index.values())
    return {p: "mixture" if i == last else "fused" for p, i in index.items()}


def add_banks(model: nn.Module, s: TaskExpertSettings, name: str = "default", training: bool = False) -> dict:
    """Wrap the targeted linear layers (once), give each an empty bank ``name`` (active); the base
    model's own parameters are frozen. Returns ``path -> bank``."""
    targets = TaskExpertLinear.targets(model, s.target_modules)
    if not targets:
        raise ValueError(f"task experts: no linear layer matches {s.target_modules} in the language model")
    role = roles(targets, s, training)
    banks = {}
    for path, layer in TaskExpertLinear.wrap(model, targets, name).items():
        w = layer.base_layer.weight
        layer.banks[name] = ExpertBank(layer.base_layer.in_features, layer.base_layer.out_features, s, role[path],
                                       w.dtype, w.device)
        banks[path] = layer.banks[name]
    set_active(model, name)
    return banks


def set_active(model: nn.Module, name: str | None) -> None:
    TaskExpertLinear.set_active(model, name)


def set_weights(model: nn.Module, name: str, weights: torch.Tensor | None) -> None:
    """Per-row mixing weights (rows, experts) for adapter ``name``'s mixture banks (None: clear)."""
    for layer in expert_layers(model).values():
        layer.banks[name].weights = weights


def delete_adapter(model: nn.Module, name: str) -> None:
    TaskExpertLinear.delete(model, name)


def experts_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """``<layer path>.A.<i>`` / ``.B.<i>`` -> tensor, every expert of adapter ``name``."""
    out = {}
    for path, layer in expert_layers(model).items():
        bank = layer.banks[name]
        for i in range(bank.experts):
            out[f"{path}.A.{i}"] = bank.A[i].detach().cpu().contiguous()
            out[f"{path}.B.{i}"] = bank.B[i].detach().cpu().contiguous()
    return out


def save_experts(model: nn.Module, folder: str, s: TaskExpertSettings, tasks: list[str],
                 name: str = "default") -> None:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file(experts_state_dict(model, name), os.path.join(folder, WEIGHTS_FILE))
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump({"type": "task_experts", **s.to_dict(), "experts": len(tasks), "tasks": list(tasks)}, f, indent=2)


def read_config(folder: str) -> tuple[TaskExpertSettings, list[str]]:
    with open(os.path.join(folder, CONFIG_FILE)) as f:
        d = json.load(f)
    return TaskExpertSettings.from_dict(d), list(d["tasks"])


def load_experts(banks: dict[str, ExpertBank], folder: str, count: int) -> None:
    """Fill the (empty) banks with the folder's first ``count`` experts, frozen."""
    from safetensors.torch import load_file

    weights = load_file(os.path.join(folder, WEIGHTS_FILE))
    expected = set()
    for path, bank in banks.items():
        for i in range(count):
            keys = (f"{path}.A.{i}", f"{path}.B.{i}")
            missing = [k for k in keys if k not in weights]
            if missing:
                raise ValueError(f"{folder}: task-experts weights lack {missing[0]} (saved for another model?)")
            expected.update(keys)
            bank.add_expert(False)
            with torch.no_grad():
                bank.A[i].copy_(weights[keys[0]])
                bank.B[i].copy_(weights[keys[1]])
    extra = set(weights) - expected
    if extra:
        raise ValueError(f"{folder}: task-experts weights this model has no place for, e.g. {sorted(extra)[0]}")


# --------------------------------------------------------------------------- mixing weights

def mixing_weights(mixing: str, temperature: float, features: dict[str, torch.Tensor],
                   anchors: dict[str, torch.Tensor]) -> torch.Tensor:
    """(rows, tasks): softmax over tasks of the mean, over the mixing's anchor kinds, of
    cos(row's feature, task's anchor), divided by ``temperature``. ``features``: the
    :meth:`~mllmcl.engine.Engine.batch_features` keys (``image``, ``hidden``); ``anchors``:
    kind -> (tasks, dim)."""
    sims = []
    for kind in ANCHOR_KINDS[mixing]:
        f = nn.functional.normalize(features[FEATURE[kind]].float(), dim=-1)
        a = nn.functional.normalize(anchors[kind].float().to(f.device), dim=-1)
        sims.append(f @ a.T)
    return (torch.stack(sims).mean(0) / temperature).softmax(dim=-1)


def read_anchors(folder: str) -> dict[str, torch.Tensor]:
    path = os.path.join(folder, ANCHORS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder}: no {ANCHORS_FILE} (the stage's anchors are written by the method's "
                                f"finish step after training; that step has not run for this adapter)")
    with open(path) as f:
        d = json.load(f)
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in d.items() if k in ("image", "text")}


# --------------------------------------------------------------------------- the engine's format

_LOADED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # engine -> adapter name -> (settings, anchors)


class TaskExpertsFormat:
    """A task-experts folder (``task_experts_config.json``): banks live in the model's own layers,
    one adapter active; ``rows`` sets each question's mixing weights for a ``generate``."""

    name = "task_experts"
    mixed_batches = False  # one set of mixing weights per call: rows of different adapters cannot share

    @staticmethod
    def detect(local_dir: str) -> bool:
        return os.path.exists(os.path.join(local_dir, CONFIG_FILE))

    @staticmethod
    def load(engine, local_dir: str, name: str) -> None:
        s, tasks = read_config(local_dir)
        anchors = read_anchors(local_dir)
        for kind in ANCHOR_KINDS[s.mixing]:
            if kind not in anchors or anchors[kind].shape[0] != len(tasks):
                raise ValueError(f"{local_dir}: {ANCHORS_FILE} needs {len(tasks)} {kind} anchors for {s.mixing}")
        banks = add_banks(engine.model, s, name, training=False)
        load_experts(banks, local_dir, len(tasks))
        for bank in banks.values():
            bank.freeze()
        _LOADED.setdefault(engine, {})[name] = (s, {k: v.to(engine.device) for k, v in anchors.items()})
        engine.model.eval()

    @staticmethod
    def activate(engine, name: str | None):
        set_active(engine.model, name)
        return engine.model, contextlib.nullcontext()

    @staticmethod
    def delete(engine, name: str) -> None:
        delete_adapter(engine.model, name)
        _LOADED.get(engine, {}).pop(name, None)

    @staticmethod
    @contextlib.contextmanager
    def rows(engine, name: str, batch: dict):
        s, anchors = _LOADED[engine][name]
        feats = engine.batch_features(batch)  # the base model's (adapters off), as the anchors were computed
        set_active(engine.model, name)
        set_weights(engine.model, name, mixing_weights(s.mixing, s.temperature, feats, anchors))
        try:
            yield
        finally:
            set_weights(engine.model, name, None)


# --------------------------------------------------------------------------- the training worker's kind

class TaskExpertsKind:
    """``adapter_args``: ``experts`` (the :class:`TaskExpertSettings` as a dict) and ``tasks`` (the
    names of tasks 0..t; expert t is trained, 0..t-1 come from ``init_adapter``)."""

    def __init__(self, request):
        self.request = request
        self.settings = TaskExpertSettings.from_dict(request.adapter_args["experts"])
        self.tasks = list(request.adapter_args["tasks"])

    def build(self, backbone_model):
        from mllmcl.models.adapters import local_adapter

        t = len(self.tasks) - 1
        banks = add_banks(backbone_model, self.settings, training=True)
        if t > 0:
            if not self.request.init_adapter:
                raise ValueError(f"task experts: training expert {t} needs the previous stage's folder")
            with local_adapter(self.request.init_adapter) as local:
                s, tasks = read_config(local)
                if s != self.settings or tasks != self.tasks[:t]:
                    raise ValueError(f"{self.request.init_adapter}: its experts ({tasks}, {s}) are not this run's "
                                     f"tasks 0..{t - 1} ({self.tasks[:t]}, {self.settings})")
                load_experts(banks, local, t)
        for bank in banks.values():
            bank.add_expert(True)
        return backbone_model

    def extra_loss(self, model) -> torch.Tensor | None:
        return None

    def save(self, model, uri: str, meta: dict) -> None:
        from mllmcl.models.adapters import publish_adapter
        from mllmcl.training.adapter_kinds import unwrap

        with tempfile.TemporaryDirectory(prefix="adapter-") as tmp:
            save_experts(unwrap(model), tmp, self.settings, self.tasks)
            publish_adapter(tmp, uri, meta)


# --------------------------------------------------------------------------- the methods' stage steps

def expert_settings(cfg, n_tasks: int, mixing: str, expert_rank: int, temperature: float) -> TaskExpertSettings:
    """``expert_rank`` 0: ``lora.rank`` split over the stream's tasks (at least 1)."""
    lora = cfg.lora
    return TaskExpertSettings(mixing=mixing, expert_rank=expert_rank or max(1, lora.rank // max(1, n_tasks)),
                              scaling=float(lora.alpha) / lora.rank, dropout=lora.dropout, temperature=temperature,
                              target_modules=tuple(lora.target_modules))


def plan_experts(stage: Stage, s: TaskExpertSettings):
    """Stage k's one fit: expert k, beside experts 0..k-1 of stage k-1's folder."""
    init = stage.expert_uri(stage.k - 1) if stage.k > 0 else None
    return [request(stage, "experts", stage.task.train, stage.expert_uri(), init_adapter=init,
                    adapter_kind=TaskExpertsKind,
                    adapter_args={"experts": s.to_dict(), "tasks": [t.name for t in stage.seen]})]


def anchor_uri(stage: Stage, k: int, method: str) -> str:
    from mllmcl import storage

    return storage.join(stage.layout.task_dir(k, stage.stream.tasks[k].name), f"{method}_anchors.json")


def store_anchors(stage: Stage, predictor, s: TaskExpertSettings, method: str, samples: int, salt: int) -> None:
    """Task k's anchors (once, in the run), then tasks 0..k's into the stage's adapter folder,
    ``meta.json`` rewritten last (the folder is complete again only with its anchors)."""
    import numpy as np

    from mllmcl import storage
    from mllmcl.models.adapters import META, read_meta
    from mllmcl.routing.base import sample_indices
    from mllmcl.routing.prototype import unit

    kinds = ANCHOR_KINDS[s.mixing]
    uri = anchor_uri(stage, stage.k, method)
    if not storage.exists(uri):
        train = stage.task.train
        pick = sample_indices(len(train), samples, stage.cfg.run.seed, salt, stage.k)
        feats = predictor.features([eval_prompt(train[j]) for j in pick], [train[j].image for j in pick])
        record = {"task": stage.task.name, "samples": len(pick), "uids": [train[j].uid for j in pick]}
        for kind in kinds:
            record[kind] = unit(np.asarray(feats[FEATURE[kind]], dtype=np.float64).mean(axis=0)).tolist()
        storage.write_json(uri, record)
    folder = stage.expert_uri()
    if storage.exists(storage.join(folder, ANCHORS_FILE)):
        return
    stored = [storage.read_json(anchor_uri(stage, i, method)) for i in range(stage.k + 1)]
    storage.write_json(storage.join(folder, ANCHORS_FILE),
                       {"tasks": [t.name for t in stage.seen], **{kind: [a[kind] for a in stored] for kind in kinds}})
    meta = read_meta(folder)
    meta["anchors"] = {"file": ANCHORS_FILE, "kinds": list(kinds), "samples": [a["samples"] for a in stored]}
    storage.write_json(storage.join(folder, META), meta)


def mixed_answer(stage: Stage, predictor, s: TaskExpertSettings, method: str) -> Answers:
    """Every seen task (and the probe) answered by the stage's adapter; ``mix_top_accuracy``: how
    often the largest mixing weight falls on the question's own task (per task too), and the mean
    weight there. The weights are recomputed here from ``predictor.features`` with the function
    the layers use (the same features, batched as the decoding batches them)."""
    from mllmcl import storage

    answers = answer_with(stage, predictor, stage.expert_uri())
    anchors = {kind: torch.tensor([storage.read_json(anchor_uri(stage, i, method))[kind] for i in range(stage.k + 1)],
                                  dtype=torch.float32) for kind in ANCHOR_KINDS[s.mixing]}
    per_task, own = {}, {}
    right = total = 0
    for j, task in enumerate(stage.seen):
        feats = predictor.features([eval_prompt(x) for x in task.test], [x.image for x in task.test])
        w = mixing_weights(s.mixing, s.temperature, {k: torch.tensor(v, dtype=torch.float32)
                                                     for k, v in feats.items()}, anchors)
        hits = int((w.argmax(dim=1) == j).sum())
        per_task[task.name] = 100.0 * hits / max(1, len(task.test))
        own[task.name] = float(w[:, j].mean()) if len(task.test) else None
        right, total = right + hits, total + len(task.test)
    answers.info.update({"mixing": s.mixing, "mix_temperature": s.temperature,
                         "mix_top_accuracy": 100.0 * right / max(1, total), "mix_top_accuracy_per_task": per_task,
                         "mix_own_weight_per_task": own})
    return answers


def not_servable(method: str) -> str:
    return (f"{method} mixes every seen task's expert inside each layer by per-question weights from its anchors "
            f"(adapter format task_experts, with a per-batch rows() step); the service builds its engines with "
            f"PEFT adapters only (it reads a run without importing its method) and answers each request with one "
            f"router-chosen expert, so it cannot load or mix these: evaluate {method} runs with the stream runner")
