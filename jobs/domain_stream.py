"""Domain continual-learning stream: RS -> Med -> AD -> Sci -> Fin.

Laptop (synthetic stream, tiny VLM, ./artifacts under the folder it runs from):
    python jobs/domain_stream.py
    python jobs/domain_stream.py run.id=demo storage.root=/tmp/mllmcl
Real data and checkpoint:
    python jobs/domain_stream.py data.root=/data/MLLM-CL model.path=/models/llava-1.5-7b-hf
    python jobs/domain_stream.py data.root=s3://bucket/MLLM-CL storage.root=s3://bucket/mllmcl

Default method: MR-LoRA; any registered method by name (``--help`` lists them):
    python jobs/domain_stream.py method.name=olora run.id=dcl-olora
On a running Ray cluster (README): ``ray job submit --working-dir . -- python jobs/domain_stream.py
storage.root=$HOME/mllmcl`` (the job runs in Ray's temporary copy of the folder, so a relative
storage root is refused there).
"""

import sys

from mllmcl.cli import run_stream_job

if __name__ == "__main__":
    sys.exit(run_stream_job("domain_stream.py", __doc__, "dcl"))
