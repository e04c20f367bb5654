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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders or s3:// prefixes (<storage.root>/runs/<run_id>)")
    ap.add_argument("--labels", default=None, help="comma-separated row labels (default: method names)")
    ap.add_argument("--out", default=None, help="also write the table to this file or URI")
    args = ap.parse_args(argv)
    try:
        metrics = [load_run_metrics(r) for r in args.runs]
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    labels = args.labels.split(",") if args.labels else None
    table = markdown_table(metrics, labels)
    print(table)
    if args.out:
        storage.write_text(args.out, table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
