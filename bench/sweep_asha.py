"""What ASHA saves in a sweep over the stream, and whether it picks the same best config.

Runs one sweep file twice with the same sampled configurations (same search seed):
with ASHA (trials report after every task; poor ones stop early) and with FIFO (every
trial runs every task). Prints the task-trainings each needed, wall times, and the best
configuration of each.

    scripts/loopback.sh python bench/sweep_asha.py sweeps/lora_ft_dcl.yaml
    scripts/loopback.sh python bench/sweep_asha.py sweeps/mr_lora_dcl.yaml --num-samples 8 data.tasks=[RS,Med,AD]
"""

import argparse
import tempfile
import time

from mllmcl.tuning import load_spec
from mllmcl.tuning.report import format_table
from mllmcl.tuning.tune_run import run_sweep


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ap.add_argument("--num-samples", type=int, default=None)
    ap.add_argument("--max-concurrent", type=int, default=None)
    ap.add_argument("--storage", default=None, help="default: a temp folder")
    args = ap.parse_intermixed_args()
    storage = args.storage or tempfile.mkdtemp(prefix="mllmcl-asha-")
    out = {}
    for sched in ("asha", "fifo"):
        spec = load_spec(args.sweep, args.overrides, num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                         storage=storage, name=f"bench-{sched}",
                         scheduler={"type": sched, "grace_period": 1, "reduction_factor": 2})
        t0 = time.time()
        res = run_sweep(spec, resume=False)
        out[sched] = (res, time.time() - t0, spec)
        print(f"\n[{sched}]\n{format_table(res.rows, spec)}")
    (a, ta, spec), (f, tf, _) = out["asha"], out["fifo"]
    same_configs = sorted(map(str, (r["config"] for r in a.rows))) == sorted(map(str, (r["config"] for r in f.rows)))
    best_a, best_f = (a.best or {}).get("config"), (f.best or {}).get("config")
    print(f"\nsweep {spec.name}: {len(a.rows)} trials x {a.task_trainings_without_stopping // max(1, len(a.rows))} "
          f"tasks, objective {spec.objective.label} ({spec.objective.mode}); same sampled configs: {same_configs}")
    print(f"task-trainings: ASHA {a.task_trainings} vs every trial to the end {f.task_trainings} -> "
          f"{f.task_trainings - a.task_trainings} saved ({1 - a.task_trainings / f.task_trainings:.0%})")
    print(f"wall time: ASHA {ta:.0f}s vs FIFO {tf:.0f}s ({ta / tf:.2f}x)")
    print(f"best config: ASHA {best_a} ({(a.best or {}).get('objective')}) vs FIFO {best_f} "
          f"({(f.best or {}).get('objective')}) -> same: {best_a == best_f}")


if __name__ == "__main__":
    main()
