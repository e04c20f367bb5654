"""Fine-tuning one adapter: the per-worker loop (:mod:`mllmcl.training.loop`), its workers under
Ray Train or in this process (:mod:`mllmcl.training.worker`, :mod:`mllmcl.training.trainer`),
the adapter kinds it builds (:mod:`mllmcl.training.adapter_kinds`) and DeepSpeed ZeRO
(:mod:`mllmcl.training.deepspeed`).

``fit`` and ``TrainSettings`` load the loop (torch, PEFT, transformers) on first use: a process
that only reads a config (``mllmcl.config`` reads :mod:`mllmcl.training.request`) or refuses bad
input never imports them."""

__all__ = ["TrainSettings", "fit"]


def __getattr__(name: str):
    if name in __all__:
        from mllmcl.training import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'mllmcl.training' has no attribute {name!r}")
