"""Ability continual-learning stream: OCR -> Math & logic -> Visual perception -> GUI agent.

Laptop (synthetic stream, tiny VLM, ./artifacts under the folder it runs from):
    python jobs/ability_stream.py
Real data and checkpoint:
    python jobs/ability_stream.py data.root=/data/MLLM-CL model.path=/models/llava-1.5-7b-hf

Default method: MR-LoRA; any registered method by name (``--help`` lists them):
    python jobs/ability_stream.py method.name=moelora run.id=acl-moe
On a running Ray cluster (README): ``ray job submit --working-dir . -- python jobs/ability_stream.py
storage.root=$HOME/mllmcl`` (the job runs in Ray's temporary copy of the folder, so a relative
storage root is refused there).
"""

import sys

from mllmcl.cli import run_stream_job

if __name__ == "__main__":
    sys.exit(run_stream_job("ability_stream.py", __doc__, "acl"))
