"""Argument parsing shared by the thin entrypoints in ``jobs/``."""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time

from mllmcl.config import Config, absolute_paths, load_config
from mllmcl.errors import MllmclError, StorageError
from mllmcl.paths import absolute, output_location


def setup_logging(fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    """The job's terminal: the platform's progress (``mllmcl`` at INFO) and everyone's warnings
    and errors; other libraries' INFO lines (matplotlib's font cache, ...) stay out."""
    logging.basicConfig(level=logging.WARNING, format=fmt)
    logging.getLogger("mllmcl").setLevel(logging.INFO)


def stream_parser(prog: str, doc: str, stream: str) -> argparse.ArgumentParser:
    from mllmcl.config import known_methods

    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=f"registered methods: {', '.join(sorted(known_methods()))}")
    ap.add_argument("--config", default=None, help="YAML preset (default: built-in defaults, stream=%s)" % stream)
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="dotted overrides, e.g. method.name=zero_shot storage.root=/data/x run.id=demo")
    return ap


def resolve(args, stream: str) -> Config:
    """The job's config with every local path absolute against the caller's working directory
    (before anything reaches Ray); a relative storage root is refused where it would be lost
    (inside Ray's temporary copy of a submitted job's working directory)."""
    overrides = list(args.overrides)
    if not any(o.startswith("data.stream=") for o in overrides) and args.config is None:
        overrides.insert(0, f"data.stream={stream}")
    cfg = load_config(absolute(args.config) if args.config else None, overrides, resolve=False)
    output_location(cfg.storage.root, "storage.root")
    return absolute_paths(cfg)


def new_run_id(cfg: Config) -> str:
    if cfg.run.id:
        return cfg.run.id
    digest = hashlib.sha256(cfg.to_yaml().encode()).hexdigest()[:6]
    return f"{cfg.data.stream}-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}-{digest}"


def print_summary(result) -> None:
    m = result.metrics
    print(f"\n{m['stream'].upper()} stream · {m['method']} · run {result.run_id}\n")
    print(result.matrix.format_table())
    line = "  ".join(f"{k} {m[k]:.2f}" for k in ("MFT", "MFN", "MAA", "BWT"))
    print(f"\n{line}")
    if m.get("router_accuracy") is not None:
        print(f"router accuracy {m['router_accuracy']:.1f}%  oracle routing {m['oracle_final']:.2f}  "
              f"fallbacks {m['router_fallbacks_per_stage']}")
    print(f"artifacts: {result.run_dir}  ({result.seconds:.0f}s)")


def run_stream_job(prog: str, doc: str, stream: str, argv=None) -> int:
    setup_logging()
    args = stream_parser(prog, doc, stream).parse_intermixed_args(argv)
    run_id = None
    try:
        cfg = resolve(args, stream)
        run_id = new_run_id(cfg)
        from mllmcl import run_stream

        result = run_stream(cfg, run_id)
    except MllmclError as e:
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, StorageError) and run_id:
            print(f"The stages recorded before it are kept: once the storage answers, run the same command with "
                  f"run.id={run_id} to resume the run.", file=sys.stderr)
        return 2
    print_summary(result)
    return 0
