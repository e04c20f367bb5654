"""The stream runner: a CL method over a whole stream, stage after stage, resumable by run id
(:func:`run_stream`), with its prediction cache, evaluation worker, resume checks and the
run's outputs (accuracy matrix, metrics, report)."""

from mllmcl.runner.stream import StreamResult, prepare, run_stream

__all__ = ["StreamResult", "prepare", "run_stream"]
