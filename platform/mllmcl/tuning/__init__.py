"""Ray Tune sweeps of CL hyperparameters over a whole task stream (see ``jobs/sweep.py``)."""

from mllmcl.tuning.spec import SweepSpec, load_spec, parse_spec

__all__ = ["SweepSpec", "load_spec", "parse_spec"]
