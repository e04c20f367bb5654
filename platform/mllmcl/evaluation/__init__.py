"""Scoring and the numbers of a run: scorers, per-sample predictions, the accuracy matrix and
CL metrics, plots, reports, comparison tables. Nothing here runs a model (that is
:mod:`mllmcl.engine`)."""

from mllmcl.evaluation.metrics import AccuracyMatrix, bwt, forgetting, maa, mfn, mft, summary
from mllmcl.evaluation.predictions import TaskEval, score_predictions
from mllmcl.evaluation.scorers import SCORERS, score

__all__ = ["SCORERS", "AccuracyMatrix", "TaskEval", "bwt", "forgetting", "maa", "mfn", "mft", "score",
           "score_predictions", "summary"]
