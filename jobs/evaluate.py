"""Evaluate a test split through a finished run's router + experts (Ray Data, at scale).

    python jobs/evaluate.py --run artifacts/runs/<id> --data /data/MLLM-CL/Domain_data/Med
    python jobs/evaluate.py --run s3://bucket/mllmcl/runs/<id> --data s3://bucket/MLLM-CL/Ability_data/OCR_test \\
        --concurrency 4 --num-gpus 1
    python jobs/evaluate.py --run <uri> --data /data/new_charts --task Fin    # a folder not named after its task

``--data`` is one task folder of the MLLM-CL release layout (test.json + images), local or
s3://. Writes per-sample predictions (<task>.parquet) and scores.json to --out (default
<run>/eval/evaluate/<task>-<hash of --data>/), and prints the accuracy and routing.
"""

import argparse
import json
import sys

from mllmcl.cli import setup_logging
from mllmcl.errors import MllmclError
from mllmcl.paths import output_location


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="<storage root>/runs/<run id> (folder or s3://)")
    ap.add_argument("--data", required=True, help="a task folder with test.json and its images (folder or s3://)")
    ap.add_argument("--task", default=None, help="the task's name when the folder is not named after it")
    ap.add_argument("--out", default=None, help="where predictions and scores go (default: inside the run)")
    ap.add_argument("--stage", type=int, default=-1, help="stage whose router and experts answer (default: last)")
    ap.add_argument("--backend", choices=("ray", "local"), default="ray", help="Ray Data actors, or this process")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=1, help="Ray Data actors, each with a model")
    ap.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per actor")
    ap.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor")
    ap.add_argument("--limit", type=int, default=0, help="first N samples only (0 = all)")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        from mllmcl import evaluate_run

        out = output_location(args.out, "--out") if args.out else None  # refused where it would be lost
        r = evaluate_run(args.run, args.data, task=args.task, out=out, stage=args.stage,
                         backend=args.backend, batch_size=args.batch_size, concurrency=args.concurrency,
                         num_cpus=args.num_cpus, num_gpus=args.num_gpus, limit=args.limit)
    except (MllmclError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    line = f"{r.task}: accuracy {r.accuracy:.2f} on {r.n} samples (stage {r.stage})"
    if r.router_accuracy is not None:
        line += f"; routed to its own expert {r.router_accuracy:.1f}%, fallbacks {r.router_fallbacks}"
    print(line)
    print(f"experts used: {json.dumps(r.experts_used)}")
    print(f"predictions and scores: {r.out_dir}  ({r.seconds:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
