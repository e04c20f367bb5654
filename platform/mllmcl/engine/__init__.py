"""The one inference engine: a base model loaded once, adapters attached and cached, greedy
decoding of mixed-adapter batches with per-row limits, and text embeddings for routers.
The stream's evaluation worker, batch evaluation, the serving pool and the routers all run it.
"""

from mllmcl.engine.engine import BASE_ROW, Completion, Engine, evaluate_task
from mllmcl.engine.formats import AdapterFormat, PeftFormat

__all__ = ["BASE_ROW", "AdapterFormat", "Completion", "Engine", "PeftFormat", "evaluate_task"]
