"""Ability continual-learning stream: OCR -> Math & logic -> Visual perception -> GUI agent.

Laptop (synthetic stream, tiny VLM, local folder ./artifacts):
    python jobs/ability_stream.py
Real data and checkpoint:
    python jobs/ability_stream.py data.root=/data/MLLM-CL model.path=/models/llava-1.5-7b-hf

Today this job runs the zero-shot evaluation of the base model on every task; the
continual methods (MR-LoRA and baselines on Ray Train) arrive with the stream runner.
"""

import sys

from mllmcl.cli import run_stream_job

if __name__ == "__main__":
    sys.exit(run_stream_job("ability_stream.py", __doc__, "acl"))
