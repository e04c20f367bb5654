"""Write the synthetic twins of the MLLM-CL streams in the release layout.

Laptop:   python jobs/make_synthetic.py --out data/mllmcl-synthetic
Cluster:  ray job submit --working-dir . -- python jobs/make_synthetic.py --out /shared/mllmcl-synthetic
          (then copy the folder to s3://bucket/prefix and use data.root=s3://bucket/prefix)

Writes OUT/Domain_data/<RS|Med|AD|Sci|Fin>/{images/,train.json,test.json} and
OUT/Ability_data/<OCR|Math|VP|APP>/{images/,train.json} + <X>_test/{images/,test.json}.
Same arguments -> byte-identical files.
"""

import argparse
import sys

from mllmcl.cli import setup_logging
from mllmcl.data.release import load_stream
from mllmcl.data.synthetic import SyntheticSpec, write_synthetic
from mllmcl.errors import ConfigError
from mllmcl.paths import output_location


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/mllmcl-synthetic", help="output folder (default: %(default)s)")
    ap.add_argument("--train", type=int, default=SyntheticSpec.n_train, help="train samples per task")
    ap.add_argument("--test", type=int, default=SyntheticSpec.n_test, help="test samples per task")
    ap.add_argument("--image-size", type=int, default=SyntheticSpec.image_size, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=SyntheticSpec.seed)
    ap.add_argument("--streams", default="dcl,acl", help="comma-separated: dcl, acl")
    args = ap.parse_args(argv)
    setup_logging("%(message)s")
    try:
        out = output_location(args.out, "--out")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    spec = SyntheticSpec(n_train=args.train, n_test=args.test, image_size=args.image_size, seed=args.seed,
                         streams=tuple(s.strip() for s in args.streams.split(",") if s.strip()))
    out = write_synthetic(out, spec)
    for s in spec.streams:
        stream = load_stream(str(out), s)
        print(f"{s}: " + ", ".join(f"{t.name} {len(t.train)}/{len(t.test)}" for t in stream))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
