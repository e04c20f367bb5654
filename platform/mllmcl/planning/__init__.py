"""What a run will cost before anything is spent: memory per GPU of each fit, whether it fits,
and the run's wall time and GPU-hours under both schedules (:func:`plan_run`).

The times come from the stream's own scheduler (:mod:`mllmcl.runner.schedule`) run on a
clock that advances by modelled durations: each fit's and each stage evaluation's FLOPs from
the model's shape and the data's sample and token counts, at a stated MFU
(:mod:`mllmcl.planning.costs`). ``jobs/plan.py`` prints it.
"""

from mllmcl.planning.hardware import GPUS, ClusterSpec
from mllmcl.planning.shapes import ModelShape, model_shape
from mllmcl.planning.simulate import Plan, plan_run

__all__ = ["GPUS", "ClusterSpec", "ModelShape", "Plan", "model_shape", "plan_run"]
