"""Serve a run's router + expert ensemble over HTTP (OpenAI chat-completions format).

    python jobs/serve.py --run artifacts/runs/dcl-mr_lora-demo
    python jobs/serve.py --run s3://bucket/mllmcl/runs/dcl-mr_lora port=8000 experts.max_replicas=4 experts.num_gpus=1
    python jobs/serve.py --run artifacts/runs/<id> --config cluster/serve_settings.yaml stage=2

Then:
    curl -s http://127.0.0.1:8000/v1/models
    curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{"messages":
      [{"role": "user", "content": [{"type": "text", "text": "What is in the image?"},
       {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}]}'
    (add "model": "Med" to pin an expert and skip the router)

Without RAY_ADDRESS a local Ray is started and the service runs until Ctrl-C. With
RAY_ADDRESS (or under ``ray job submit``) the application is deployed on that cluster and
this command returns once it is running; ``serve shutdown`` or ``serve delete`` removes it.
Settings (host, port, batching, replicas, autoscaling, resources, request limits):
``mllmcl.serving.config.ServeConfig``; binds 127.0.0.1 unless ``host=`` says otherwise.

API keys: ``auth.keys_file=<file>`` (one per line) and/or the MLLMCL_API_KEYS environment
variable; clients send ``Authorization: Bearer <key>`` (the openai package's ``api_key``). A
non-loopback ``host=`` without keys is refused unless ``auth.allow_unauthenticated=true``. Each
deployment's queue is bounded (``ingress.max_queued_requests`` ...): a burst beyond it is answered
503 with ``Retry-After`` (``retry_after_s``).
"""

import argparse
import os
import sys
import time

from mllmcl.cli import setup_logging
from mllmcl.errors import MllmclError
from mllmcl.paths import absolute


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="serve.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the run to serve: <storage root>/runs/<run id> (folder or s3://)")
    ap.add_argument("--config", default=None, help="serving settings (YAML); defaults: ServeConfig")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. port=8001 experts.num_gpus=1")
    args = ap.parse_intermixed_args(argv)
    setup_logging()
    try:
        from mllmcl.serving import load_serve_config, load_served_run

        from mllmcl.errors import ConfigError
        from mllmcl.serving.auth import bind_problems, load_key_digests

        cfg = load_serve_config(absolute(args.config) if args.config else None, args.overrides)
        problems = bind_problems(cfg.host, load_key_digests(cfg.auth.keys_file, cfg.auth.keys_env),
                                 cfg.auth.allow_unauthenticated)
        if problems:
            raise ConfigError(problems)
        load_served_run(args.run, cfg.stage, model_path=cfg.model_path, dtype=cfg.dtype,
                        base_only=cfg.base_only)  # every problem is reported before Ray starts
    except MllmclError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from ray import serve

    from mllmcl.serving.app import start
    from mllmcl.cluster import init_ray

    on_cluster = bool(os.environ.get("RAY_ADDRESS"))
    init_ray()
    run = start(args.run, cfg)  # the run's path is made absolute as it is loaded (replicas run elsewhere)
    url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    print(f"serving run {run.run_id} stage {run.stage} ({run.method}; experts {', '.join(run.experts)}"
          f"{'; ' + run.router['kind'] + ' router' if run.routed else ''}) at {url}/v1/chat/completions", flush=True)
    if on_cluster:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return stop(serve)
    return 0


def stop(serve, timeout_s: float = 60.0) -> int:
    """Ctrl-C: remove the application and stop this job's Ray, within ``timeout_s``. A second
    Ctrl-C, or a shutdown that does not finish in time, ends the process at once (the local
    Ray's processes share its fate); what was still running is printed first."""
    import faulthandler
    import threading

    import ray

    print("stopping the service (Ctrl-C again to stop at once)", flush=True)
    done = threading.Event()

    def shutdown():
        try:
            serve.shutdown()
            ray.shutdown()
        finally:
            done.set()

    threading.Thread(target=shutdown, name="serve-shutdown", daemon=True).start()
    try:
        if done.wait(timeout_s):
            return 0
        print(f"warning: the service did not stop within {timeout_s:.0f} s; stopping now. Still running:",
              file=sys.stderr, flush=True)
        faulthandler.dump_traceback(sys.stderr, all_threads=True)
    except KeyboardInterrupt:
        print("stopped at once", file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
