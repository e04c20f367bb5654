"""Adapter formats the engine can hold: how a format is recognised in an adapter folder,
loaded under a name, made active (or the base model), and dropped.

PEFT is built in. A method whose adapters are not PEFT adapters brings its own format in
its module (``mllmcl.methods.moelora``), and whoever builds the engine for that method's
run passes it in (``Engine(..., formats=[...])``): the engine never imports methods.
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
