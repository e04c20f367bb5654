"""What a run will cost before anything is spent: memory per GPU of each fit (with and without
activation checkpointing), whether it fits, and the wall time and GPU-hours of the run under
the sequential and the concurrent schedule, on the cluster you describe.

    python jobs/plan.py --config jobs/configs/dcl/mr_lora_llava15_7b.yaml --gpu A100-40GB --nodes 1
    python jobs/plan.py --config jobs/configs/dcl/mr_lora_llava15_7b.yaml --gpu A100-40GB --nodes 5
    python jobs/plan.py --config jobs/configs/dcl/lora_ft_llava15_7b.yaml --gpu H100-80GB --nodes 2 \\
        train.gradient_checkpointing=true scaling.eval_replicas=4
    python jobs/plan.py --tflops 150 --memory-gib 48 --nodes 2 --gpus-per-node 4 ...   # another GPU

The times come from the stream's own scheduler on modelled durations (FLOPs of each fit and
evaluation from the model's config and the data's sample and token counts, at --mfu); see
``mllmcl.planning``. Exits 2, with the numbers, when a fit does not fit the GPUs given.
"""

import argparse
import sys

from mllmcl.cli import setup_logging
from mllmcl.errors import MllmclError
from mllmcl.paths import absolute


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="plan.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="the run's preset (YAML), as for domain_stream.py")
    ap.add_argument("--gpu", default=None, help="A100-40GB, A100-80GB, H100-80GB, H200, L40S, A10G")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of another GPU")
    ap.add_argument("--memory-gib", type=float, default=None, help="its memory")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="its memory bandwidth (GB/s)")
    ap.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilisation of training and prefill")
    ap.add_argument("--startup-s", type=float, default=60.0, help="start-up of each fit besides reading the base")
    ap.add_argument("--model-config", default=None, help="a config.json for a checkpoint that is not on this machine")
    ap.add_argument("--train-samples", type=int, default=None, help="train samples per task (default: the release's)")
    ap.add_argument("--test-samples", type=int, default=None, help="test samples per task")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the preset")
    args = ap.parse_intermixed_args(argv)
    setup_logging()
    try:
        from mllmcl.config import load_config
        from mllmcl.planning import ClusterSpec, plan_run
        from mllmcl.planning.simulate import describe

        cfg = load_config(absolute(args.config) if args.config else None, args.overrides)
        cluster = ClusterSpec.parse(args.nodes, args.gpus_per_node, args.gpu, args.tflops, args.memory_gib,
                                    args.bandwidth_gbs, args.mfu, args.startup_s)
        plan = plan_run(cfg, cluster, model_config=args.model_config, train_samples=args.train_samples,
                        test_samples=args.test_samples)
    except MllmclError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(plan))
    problems = plan.problems(cfg.train.gradient_checkpointing)
    if problems:
        hint = "" if cfg.train.gradient_checkpointing or plan.problems(True) else \
            " (train.gradient_checkpointing=true fits)"
        print(f"\nerror: the run does not fit the GPUs given{hint}:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
