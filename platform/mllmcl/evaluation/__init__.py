"""Scorers, generation, accuracy matrix, CL metrics, predictions and plots."""

from mllmcl.evaluation.generate import TaskEval, evaluate_task, generate, pixel_cache_for, score_predictions
from mllmcl.evaluation.metrics import AccuracyMatrix, bwt, forgetting, maa, mfn, mft, summary
from mllmcl.evaluation.scorers import SCORERS, score

__all__ = [
    "SCORERS", "AccuracyMatrix", "TaskEval", "bwt", "evaluate_task", "forgetting", "generate", "maa", "mfn",
    "mft", "pixel_cache_for", "score", "score_predictions", "summary",
]
