"""Training: the per-worker fine-tuning loop (Ray Train wraps it in the stream runner)."""

from mllmcl.training.loop import TrainSettings, fit

__all__ = ["TrainSettings", "fit"]
