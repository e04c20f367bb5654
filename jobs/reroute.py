"""Route a finished MR-LoRA run's experts with other routers (the router zoo, one command).

    python jobs/reroute.py artifacts/runs/<mr_lora run> --routers text_prototype,mm_prototype,ridge,oracle
    python jobs/compare.py --routers artifacts/runs/<mr_lora run>*          # the router table

Each router gets a sibling run <run id>-<router> beside the run, started from the run's
experts and prediction cache: only the router is fitted, only new answers are generated.
Routers: mllm, text_prototype, mm_prototype, ridge, oracle. Trailing key=value overrides
apply to every sibling (e.g. scaling.backend=local, method.router_ridge_lambda=0.1).
"""

import argparse
import sys

from mllmcl import ConfigError
from mllmcl.routing import registered_routers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a finished mr_lora run (folder or s3:// prefix)")
    ap.add_argument("--routers", default=",".join(r for r in registered_routers() if r != "mllm"),
                    help="comma-separated routers (default: every router but the run's own mllm)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides for every sibling run")
    args = ap.parse_args(argv)
    routers = [r.strip() for r in args.routers.split(",") if r.strip()]
    unknown = [r for r in routers if r not in registered_routers()]
    if unknown:
        print(f"error: unknown router(s) {unknown}: expected {', '.join(registered_routers())}", file=sys.stderr)
        return 2
    from mllmcl.runner.reroute import reroute

    try:
        for router in routers:
            res = reroute(args.run, router, args.overrides)
            m = res.metrics
            print(f"{router}: routing {m.get('router_accuracy', 0):.1f}%  MFN {m['MFN']:.2f}  FWT "
                  f"{'–' if m.get('FWT') is None else format(m['FWT'], '.2f')}  artifacts: {res.run_dir}")
    except ConfigError as e:
        print("error: " + "\n       ".join(e.problems), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
