"""Ray Tune sweep of CL hyperparameters over a whole task stream.

    python jobs/sweep.py sweeps/mr_lora_dcl.yaml
    python jobs/sweep.py sweeps/lora_ft_dcl.yaml --num-samples 8 --max-concurrent 2 --storage s3://bucket/mllmcl
    python jobs/sweep.py sweeps/replay_dcl.yaml data.tasks=[RS,Med,AD]     # dotted overrides for every trial

Each trial runs the stream (Ray Train inside the trial) and reports after every task, so
ASHA stops poor configurations early. Rerunning the same sweep (same name and storage)
resumes it: finished trials are kept. Results: <storage>/sweeps/<name>/ (results.json,
results.csv, best.yaml, objective_by_task.png).
"""

import argparse
import sys

from mllmcl.cli import setup_logging
from mllmcl.errors import MllmclError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="sweep.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", help="sweep definition (YAML), e.g. sweeps/mr_lora_dcl.yaml")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides for every trial")
    ap.add_argument("--num-samples", type=int, default=None, help="number of trials (overrides the file)")
    ap.add_argument("--max-concurrent", type=int, default=None, help="trials at once (overrides the file)")
    ap.add_argument("--storage", default=None, help="local folder or s3:// prefix (overrides the file)")
    ap.add_argument("--name", default=None, help="sweep name: results under <storage>/sweeps/<name>/")
    ap.add_argument("--restart", action="store_true", help="do not resume an existing sweep of the same name")
    args = ap.parse_intermixed_args(argv)
    setup_logging()
    try:
        from mllmcl import load_spec, run_sweep
        from mllmcl.tuning.report import format_table

        spec = load_spec(args.sweep, args.overrides, num_samples=args.num_samples,
                         max_concurrent=args.max_concurrent, storage=args.storage, name=args.name)
        result = run_sweep(spec, resume=not args.restart)
    except MllmclError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nsweep {spec.name}: objective {spec.objective.label} ({spec.objective.mode})\n")
    print(format_table(result.rows, spec))
    print(f"\ntask trainings: {result.task_trainings} of {result.task_trainings_without_stopping} "
          f"without early stopping")
    if result.best:
        print(f"best: trial {result.best['trial_id']} objective {result.best['objective']:.4f} -> "
              f"{result.root}/best.yaml")
    if result.pareto:
        print(f"Pareto set ({', '.join(spec.search.metrics)}): {', '.join(result.pareto)}")
    print(f"results: {result.root}/results.json, results.csv, objective_by_task.png")
    if not result.best:
        errors = [r for r in result.rows if r["stop_reason"].startswith("error")]
        why = (f"; trial {errors[0]['trial_id']} failed with {errors[0]['stop_reason'][len('error: '):]}"
               f" ({len(errors)} of {len(result.rows)} trials failed)" if errors else "")
        print(f"error: no trial completed the stream{why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
