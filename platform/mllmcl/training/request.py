"""What one fine-tuning needs, typed: the adapter to fit (:class:`TrainRequest`, planned by a
CL method) and everything the workers of that fit need (:class:`FitConfig`, Ray Train's
``train_loop_config``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mllmcl.data.types import Sample
from mllmcl.settings import LoraSettings, TrainSettings


@dataclass
class TrainRequest:
    """Fine-tune one adapter: on ``samples``, from ``init_adapter`` (or fresh), into ``output_uri``.

    ``adapter_kind`` builds, regularises and saves the adapter (None: a PEFT LoRA,
    :class:`mllmcl.training.adapter_kinds.LoraKind`); a method with its own kind defines the
    class in its module and names it here, with its options in ``adapter_args``. The class
    travels to the workers by reference (its module is imported there).
    """

    stage: int
    task: str
    kind: str  # expert | lora | router: what the adapter is for
    samples: list[Sample]
    output_uri: str
    lora: LoraSettings
    train: TrainSettings
    init_adapter: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    adapter_kind: type | None = None
    adapter_args: dict[str, Any] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()  # adapters the fit reads besides init_adapter (e.g. one it regularises against)

    @property
    def reads(self) -> tuple[str, ...]:
        """Every adapter the fit reads: it may start once they are written."""
        return tuple(dict.fromkeys([*([self.init_adapter] if self.init_adapter else []), *self.depends_on]))


@dataclass(frozen=True)
class FitConfig:
    """The typed loop config of one fit: what every worker of it reads."""

    request: TrainRequest
    model_path: str
    dtype: str = "float32"
    threads: int = 0  # torch threads; 0 = the node's cores / the fit's workers on the node
    mixed_precision: str = "auto"  # auto (bf16 on GPU) | bf16 | fp16 | no
    gradient_checkpointing: bool = False  # recompute each layer's activations in the backward pass
    checkpoint_every: int = 0  # steps; 0 = once per epoch, at most AUTO_CHECKPOINTS per fit
    strategy: str = "ddp"  # ddp | deepspeed
    zero_stage: int = 2
    offload: str = "none"
    inject_failure: dict | None = None  # tests only: {"step", "rank", "marker", "raise"}
    history_uri: str = ""  # where rank 0 writes the fit's per-step loss / lr / samples/s (JSON); "" = nowhere
