"""mllmcl: continual learning of multimodal LLMs on Ray.

The public surface is small; everything else lives in the subpackages:

- :mod:`mllmcl.config`      typed configs, YAML presets, dotted overrides
- :mod:`mllmcl.data`        Sample / Task / Stream, MLLM-CL release reader, synthetic twins
- :mod:`mllmcl.models`      tiny VLM preset, checkpoint loading, LoRA helpers
- :mod:`mllmcl.evaluation`  scorers, accuracy matrix, CL metrics, predictions, plots
- :mod:`mllmcl.storage`     one interface over local folders and ``s3://``
"""

import os as _os
import warnings as _warnings

# Nothing is ever fetched from a model hub at run time: a hub id must fail fast.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Terminals show the stream's progress, not a weight-loading bar per process and fit
# (HF_HUB_DISABLE_PROGRESS_BARS=0 brings them back).
_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# PEFT 0.21 reads an attribute that transformers 5.24 deprecated, on every LoRA it wraps:
# one FutureWarning per fit and worker about library internals, nothing a user can act on.
# Only this exact message is silenced.
_warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

__version__ = "0.1.0"
