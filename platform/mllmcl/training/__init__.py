"""Fine-tuning one adapter: the per-worker loop (:mod:`mllmcl.training.loop`), its workers under
Ray Train or in this process (:mod:`mllmcl.training.worker`, :mod:`mllmcl.training.trainer`),
the adapter kinds it builds (:mod:`mllmcl.training.adapter_kinds`) and DeepSpeed ZeRO
(:mod:`mllmcl.training.deepspeed`)."""

from mllmcl.training.loop import TrainSettings, fit

__all__ = ["TrainSettings", "fit"]
