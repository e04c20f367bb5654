"""Measure the synthetic streams against the tiny base: zero-shot accuracy, each task's
own LoRA expert, and task k after one LoRA is trained on task k then task k+1.

Laptop:   python jobs/calibrate_synthetic.py                 # both streams, ~10 min on 2 cores
          python jobs/calibrate_synthetic.py --stream dcl train.epochs=4
Cluster:  ray job submit --working-dir . -- python jobs/calibrate_synthetic.py model.path=s3://...

Prints a Markdown table (the README's calibration table) and writes it with a JSON
copy to --out.
"""

import argparse
import dataclasses
import json
from pathlib import Path

from mllmcl.cli import setup_logging
from mllmcl.config import load_config
from mllmcl.data.source import load_configured_stream
from mllmcl.calibration import calibrate, format_markdown
from mllmcl.models import load_backbone


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML preset (default: built-in defaults)")
    ap.add_argument("--stream", default="dcl,acl", help="comma-separated streams")
    ap.add_argument("--out", default="artifacts/calibration", help="folder for calibration.md/.json")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3")
    args = ap.parse_args(argv)
    setup_logging("%(message)s")
    rows = []
    for stream_name in [s.strip() for s in args.stream.split(",") if s.strip()]:
        cfg = load_config(args.config, [*args.overrides, f"data.stream={stream_name}"])
        stream = load_configured_stream(cfg.data)
        backbone = load_backbone(cfg.model.path, cfg.model.dtype)
        rows += calibrate(backbone, stream, cfg.train.settings(cfg.run.seed), cfg.lora.settings(),
                          eval_batch=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens or 16,
                          progress=cfg.run.progress)
    table = format_markdown(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.md").write_text(table + "\n")
    (out / "calibration.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
