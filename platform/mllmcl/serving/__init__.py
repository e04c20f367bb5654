"""Serving a run: its router + expert ensemble as a Ray Serve endpoint
(:mod:`mllmcl.serving.app`), and batch evaluation of new data through the same router and
experts with Ray Data (:mod:`mllmcl.serving.evaluate`)."""

from mllmcl.serving.config import ServeConfig, load_serve_config
from mllmcl.serving.run import ServedRun, load_served_run

__all__ = ["ServeConfig", "ServedRun", "load_serve_config", "load_served_run"]
