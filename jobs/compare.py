"""Render finished runs side by side as a paper-style table (Markdown).

Laptop:   python jobs/compare.py artifacts/runs/dcl-mr_lora-* artifacts/runs/dcl-lora_ft-*
Cluster:  python jobs/compare.py s3://bucket/mllmcl/runs/<id1> s3://bucket/mllmcl/runs/<id2> --out table.md

Columns: final accuracy per task (the "Last" row), MFT, MFN, MAA, BWT, and router
accuracy for routed methods.
"""

import argparse
import sys

from mllmcl import storage
from mllmcl.evaluation.compare import load_run_metrics, markdown_table
from mllmcl.paths import absolute


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders or s3:// prefixes (<storage.root>/runs/<run_id>)")
    ap.add_argument("--labels", default=None, help="comma-separated row labels (default: method names)")
    ap.add_argument("--out", default=None, help="also write the table to this file or URI")
    args = ap.parse_args(argv)
    runs = [absolute(r) for r in args.runs]
    metrics, problems = [], []
    for run in runs:
        try:
            metrics.append(load_run_metrics(run))
        except FileNotFoundError as e:
            problems.append(str(e))
    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(runs):
        problems.append(f"--labels names {len(labels)} rows for {len(runs)} runs")
    if problems:
        print("error: " + "\n       ".join(problems), file=sys.stderr)
        return 2
    table = markdown_table(metrics, labels)
    print(table)
    print()
    for run in runs:
        print(f"{run}  (report: {storage.join(run, 'report', 'report.html')})")
    if args.out:
        storage.write_text(absolute(args.out), table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
