"""Adapter formats the engine can hold: how a format is recognised in an adapter folder,
loaded under a name, made active (or the base model), and dropped.

PEFT is built in. A method whose adapters are not PEFT adapters brings its own format in
its module (``mllmcl.methods.moelora``), and whoever builds the engine for that method's
run passes it in (``Engine(..., formats=[...])``): the engine never imports methods.

A format may also define ``rows(engine, name, batch)``: a context manager the engine enters
around each ``generate`` of adapter ``name`` with the prompt batch (``input_ids``,
``attention_mask``, ``pixel_values``...), after activating it. It can compute what each row
needs from the batch (e.g. per-question mixing weights from ``engine.batch_features(batch)``,
the base model's features, the same computation as ``engine.features``), set it on its
layers for that call (the decoding steps keep the batch's rows), and clear it on exit
(:mod:`mllmcl.methods._task_experts`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Protocol


class AdapterFormat(Protocol):
    name: str
    mixed_batches: bool  # rows of different adapters can share one generate (PEFT's adapter_names)

    @staticmethod
    def detect(local_dir: str) -> bool: ...

    @staticmethod
    def load(engine, local_dir: str, name: str) -> None: ...

    @staticmethod
    def activate(engine, name: str | None):
        """(model to call, context) running adapter ``name`` (None: the base model)."""

    @staticmethod
    def delete(engine, name: str) -> None: ...


class PeftFormat:
    """A PEFT adapter folder (``adapter_config.json``): one ``PeftModel`` holds every loaded adapter."""

    name = "peft"
    mixed_batches = True

    @staticmethod
    def detect(local_dir: str) -> bool:
        return os.path.exists(os.path.join(local_dir, "adapter_config.json"))

    @staticmethod
    def load(engine, local_dir: str, name: str) -> None:
        from peft import PeftModel

        if engine.peft is None:
            engine.peft = PeftModel.from_pretrained(engine.model, local_dir, adapter_name=name)
        else:
            engine.peft.load_adapter(local_dir, adapter_name=name)
        engine.peft.eval()

    @staticmethod
    def activate(engine, name: str | None):
        if name is None:
            return engine.model, (engine.peft.disable_adapter() if engine.peft is not None
                                  else contextlib.nullcontext())
        engine.peft.set_adapter(name)
        return engine.peft, contextlib.nullcontext()

    @staticmethod
    def delete(engine, name: str) -> None:
        engine.peft.delete_adapter(name)
