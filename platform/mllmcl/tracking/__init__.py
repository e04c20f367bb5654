"""Experiment tracking: a run's numbers, as it makes them, in the tools researchers watch runs
in — MLflow (a tracking server, a sqlite file or a folder), TensorBoard event files, and
Weights & Biases (offline by default) — through those libraries' own clients.

What a stream run logs (:class:`RunTracker`, driven by the stream runner):

- parameters: the resolved config (dotted keys) and its provenance (seed, workers, library
  versions, data release digest, ...);
- per fit: the training loss, learning rate and samples/s of every step, under
  ``fit/<stage>_<task>_<kind>/...`` with the fit's own step, and the stream's ``train/loss`` with
  a step counted across all fits (one curve per run to compare with another run's);
- per stage k: accuracy on every seen task (``acc/<task>``, step k) and the stage's metrics so far;
- at the end: MFT, MFN, MAA, BWT, FWT, router accuracy; the heat-map, the report and the
  accuracy matrix as artifacts.

A run that resumes keeps logging into the same MLflow run (``tracking.json`` in the run folder
keeps its id and what was logged already), so nothing is logged twice.
"""

from mllmcl.tracking.tracker import RunTracker, open_run_tracker

__all__ = ["RunTracker", "open_run_tracker"]
