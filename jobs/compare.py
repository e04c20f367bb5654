"""Render finished runs side by side as a paper-style table (Markdown).

Laptop:   python jobs/compare.py artifacts/runs/dcl-mr_lora-* artifacts/runs/dcl-lora_ft-*
Cluster:  python jobs/compare.py s3://bucket/mllmcl/runs/<id1> s3://bucket/mllmcl/runs/<id2> --out table.md

Columns: final accuracy per task (the "Last" row), MFT, MFN, MAA, BWT, and router
accuracy for routed methods.
"""

import argparse
import sys

from mllmcl import ConfigError, compare_runs, storage
from mllmcl.paths import absolute


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders or s3:// prefixes (<storage.root>/runs/<run_id>)")
    ap.add_argument("--labels", default=None, help="comma-separated row labels (default: method names)")
    ap.add_argument("--out", default=None, help="also write the table to this file or URI")
    args = ap.parse_args(argv)
    runs = [absolute(r) for r in args.runs]
    try:
        table = compare_runs(runs, args.labels.split(",") if args.labels else None)
    except ConfigError as e:
        print("error: " + "\n       ".join(e.problems), file=sys.stderr)
        return 2
    print(table)
    print()
    for run in runs:
        print(f"{run}  (report: {storage.join(run, 'report', 'report.html')})")
    if args.out:
        storage.write_text(absolute(args.out), table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
