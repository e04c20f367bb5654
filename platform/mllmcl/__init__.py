"""mllmcl: continual learning of multimodal LLMs on Ray.

The public surface is small; everything else lives in the subpackages:

- :mod:`mllmcl.config`      typed configs, YAML presets, dotted overrides
- :mod:`mllmcl.data`        Sample / Task / Stream, MLLM-CL release reader, synthetic twins
- :mod:`mllmcl.models`      tiny VLM preset, checkpoint loading, LoRA helpers
- :mod:`mllmcl.evaluation`  scorers, accuracy matrix, CL metrics, predictions, plots
- :mod:`mllmcl.storage`     one interface over local folders and ``s3://``
"""

import os as _os

# Nothing is ever fetched from a model hub at run time: a hub id must fail fast.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
