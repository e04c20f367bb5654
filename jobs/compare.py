"""Render finished runs side by side as a paper-style table (Markdown).

Laptop:   python jobs/compare.py artifacts/runs/dcl-mr_lora-* artifacts/runs/dcl-lora_ft-*
Cluster:  python jobs/compare.py s3://bucket/mllmcl/runs/<id1> s3://bucket/mllmcl/runs/<id2> --out table.md
Orders:   python jobs/compare.py artifacts/runs/dcl-*-order-* --html artifacts/compare

Columns: final accuracy per task (the "Last" row), MFT, MFN, MAA, BWT, FWT, and router
accuracy for routed methods. Runs that differ only in their task order (data.order) are one
row: mean ± std over the orders. --track exact|f1 scores the same predictions by exact match
or token F1 instead of each task's own rule; --html DIR also writes a comparison report
(the table, mean accuracy over stages per method, every run's matrix); --routers prints the
router table of routed runs (routing accuracy, MFN, fit seconds, cost per question).
"""

import argparse
import sys

from mllmcl import ConfigError, compare_runs, storage
from mllmcl.paths import absolute


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders or s3:// prefixes (<storage.root>/runs/<run_id>)")
    ap.add_argument("--labels", default=None, help="comma-separated row labels (default: method names)")
    ap.add_argument("--track", default="native", choices=("native", "exact", "f1"),
                    help="scoring track (default: native, each task's own rule)")
    ap.add_argument("--out", default=None, help="also write the table to this file or URI")
    ap.add_argument("--routers", action="store_true",
                    help="the router table instead: routing accuracy, MFN, fit seconds and cost per question")
    ap.add_argument("--html", default=None, metavar="DIR",
                    help="also write a comparison report (comparison.html, comparison.png) to this folder or URI")
    args = ap.parse_args(argv)
    runs = [absolute(r) for r in args.runs]
    try:
        if args.routers:
            from mllmcl.evaluation.compare import router_table

            table = router_table(runs)
        else:
            table = compare_runs(runs, args.labels.split(",") if args.labels else None, track=args.track)
        report = None
        if args.html:
            from mllmcl.evaluation.compare import comparison_html

            report = comparison_html(runs, track=args.track)
    except ConfigError as e:
        print("error: " + "\n       ".join(e.problems), file=sys.stderr)
        return 2
    print(table)
    print()
    for run in runs:
        print(f"{run}  (report: {storage.join(run, 'report', 'report.html')})")
    if args.out:
        storage.write_text(absolute(args.out), table + "\n")
    if report is not None:
        folder = absolute(args.html)
        storage.write_text(storage.join(folder, "comparison.html"), report[0])
        storage.write_bytes(storage.join(folder, "comparison.png"), report[1])
        print(f"comparison report: {storage.join(folder, 'comparison.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
