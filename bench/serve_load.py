"""Load test of the served router + expert ensemble (loopback HTTP, fixed request count).

Configurations, each deployed on its own and measured with the same requests (test
questions and images of every task of the run, spread over the experts):

  mixed     max_batch_size=B, each request pins an expert (``model``): batches mix experts,
            one forward per batch
  routed    as mixed, but the MR-LoRA router chooses (one more deployment hop and a
            router forward per batch)
  one       max_batch_size=1: one request per forward (one request at a time)
  base      the base model alone, no adapters, batched (the ceiling); each request asks for
            as many tokens as its expert answered with in ``mixed``, so both decode alike

    scripts/loopback.sh python bench/serve_load.py --run artifacts/runs/<mr_lora run>
    scripts/loopback.sh python bench/serve_load.py --run <uri> --clients 32 --requests 512
    scripts/loopback.sh python bench/serve_load.py --compute      # a 12 M-parameter backbone, see below
    scripts/loopback.sh python bench/serve_load.py --compute --width 1024 --steps 20 --ignore-eos --threads 2

On 2 CPU cores the default tiny base (0.6 M parameters) answers a request in ~12 ms, less
than Serve's own cost per request (HTTP proxy + two replica hops, ~12 ms measured with an
echo app), so every configuration is bound by the framework, not by the model. ``--compute``
makes the model dominate, as a real MLLM does: it builds a wider VLM-shaped base (text
hidden 512, 4 layers; a short pretraining) and a short MR-LoRA run on it (5 experts of
120 steps + router; they learn the answer format, so answers end like the tiny run's),
cached under $MLLMCL_CACHE/bench/; requests allow up to 16 new tokens. ``--width 1024``
makes the language model 40 M parameters (``--steps`` per expert: 20 is enough when
``--ignore-eos`` fixes every answer at ``--max-tokens``: a generation-bound workload, where
the answers' content does not matter). The README has the measured numbers and why the
workloads differ.

Prints throughput (requests/s), p50/p99 latency and failures per configuration, and the
ratios mixed/one and mixed/base (targets: >= 3x and >= 0.7x).
"""

import argparse
import asyncio
import json
import socket
import statistics
import time

from mllmcl import storage
from mllmcl.data.prompts import eval_prompt
from mllmcl.data.source import load_configured_stream
from mllmcl.serving import load_serve_config, load_served_run
from mllmcl.serving.protocol import chat_request
from mllmcl.serving.run import load_run_config, split_run_uri


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def drive(url: str, bodies: list[dict], clients: int, warmup: int) -> dict:
    import aiohttp

    latencies: list[float] = []
    failures: list[str] = []
    replies: list[dict | None] = [None] * len(bodies)
    queue: asyncio.Queue = asyncio.Queue()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        async def one(body):
            async with session.post(f"{url}/v1/chat/completions", json=body) as r:
                return r.status, await r.json()

        await asyncio.gather(*[one(b) for b in bodies[:warmup]])  # loads experts, fills caches
        for i in range(len(bodies)):
            queue.put_nowait(i)

        async def client():
            while not queue.empty():
                i = queue.get_nowait()
                t0 = time.perf_counter()
                try:
                    status, out = await one(bodies[i])
                except Exception as e:  # counted, never hidden
                    failures.append(f"{type(e).__name__}: {e}")
                    continue
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    failures.append(f"{status}: {out}")
                else:
                    replies[i] = out

        t0 = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(clients)])
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"requests": len(bodies), "seconds": wall, "throughput": len(bodies) / wall,
            "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "failures": len(failures), "failure_examples": failures[:3], "replies": replies}


def deploy(run_uri: str, port: int, name: str, overrides: list[str]) -> str:
    """One application per configuration, under its own route prefix (Serve has one HTTP port)."""
    from mllmcl.serving.app import start

    cfg = load_serve_config(None, [f"port={port}", f"app_name={name}", f"route_prefix=/{name}", *overrides])
    start(run_uri, cfg)
    return f"http://127.0.0.1:{port}/{name}"


def make_compute_run(width: int = 512, steps: int = 120) -> str:
    """A 5-expert MR-LoRA run on a VLM-shaped base with a ``width``-wide, 4-layer language
    model (512: 12 M parameters; 1024: 40 M), ``steps`` per expert (built once, cached)."""
    from mllmcl.config import load_config
    from mllmcl.models.tiny import TinyVLMSpec, build_tiny_base
    from mllmcl.paths import cache_dir
    from mllmcl import run_stream

    base = build_tiny_base(TinyVLMSpec(text_hidden=width, text_layers=4, heads=width // 64, vision_hidden=128,
                                       pretrain_steps=20, pretrain_pool=256), progress=False)
    root = cache_dir() / "bench" / "serve-compute"
    cfg = load_config(None, [f"model.path={base}", "data.stream=dcl", "data.limit=100", f"train.max_steps={steps}",
                             "train.batch_size=16", "method.name=mr_lora", "method.router_epochs=5",
                             "eval.max_new_tokens=16", "scaling.backend=local", "run.progress=false",
                             f"storage.root={root}"])
    run_id = "mr_lora-12m-v2" if (width, steps) == (512, 120) else f"mr_lora-w{width}-s{steps}"
    return run_stream(cfg, run_id).run_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="an MR-LoRA run (<root>/runs/<id>)")
    ap.add_argument("--compute", action="store_true", help="benchmark a 12 M-parameter base instead (see above)")
    ap.add_argument("--width", type=int, default=512, help="--compute: the language model's width (1024: 40 M)")
    ap.add_argument("--steps", type=int, default=120, help="--compute: training steps per expert")
    ap.add_argument("--max-tokens", type=int, default=0, help="new tokens per request (0 = the expert's budget; "
                                                               "16 with --compute)")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="every answer runs to --max-tokens (vLLM's ignore_eos): a generation-bound workload")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32, help="max_batch_size of the batched configurations")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per model replica")
    ap.add_argument("--wait", type=float, default=0.15, help="batch_wait_timeout_s of the batched configurations")
    ap.add_argument("--configs", default="mixed,routed,one,base")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    import ray
    from ray import serve

    if args.compute:
        args.run = args.run or make_compute_run(args.width, args.steps)
        args.max_tokens = args.max_tokens or 16
    if not args.run:
        raise SystemExit("--run <uri> or --compute")
    run = load_served_run(args.run)
    cfg = load_run_config(split_run_uri(args.run))
    stream = load_configured_stream(cfg.data, progress=False)
    samples = [s for t in stream for s in t.test if t.name in run.experts]
    samples = [samples[(i * 7919) % len(samples)] for i in range(args.requests)]  # a fixed spread over tasks
    images = {s.image: storage.read_bytes(s.image) for s in samples}
    names = list(run.experts)
    if args.ignore_eos and not args.max_tokens:
        raise SystemExit("--ignore-eos needs --max-tokens (or --compute)")
    extra = {"max_tokens": args.max_tokens} if args.max_tokens else {}
    if args.ignore_eos:
        extra["ignore_eos"] = True
    pinned = [chat_request(eval_prompt(s), images[s.image], model=s.task if s.task in names else names[0], **extra)
              for s in samples]
    routed = [chat_request(eval_prompt(s), images[s.image], **extra) for s in samples]

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    common = [f"router.threads={args.threads}", f"experts.threads={args.threads}", f"batch_wait_timeout_s={args.wait}",
              f"max_experts_per_replica={max(8, len(names))}"]
    plans = {"mixed": (pinned, [f"max_batch_size={args.batch}"]),
             "routed": (routed, [f"max_batch_size={args.batch}"]),
             "one": (pinned, ["max_batch_size=1"]),
             "base": (None, [f"max_batch_size={args.batch}", "base_only=true"])}
    results: dict[str, dict] = {}
    warmup = min(64, args.requests)
    port = free_port()
    try:
        for name in args.configs.split(","):
            bodies, overrides = plans[name]
            if name == "base":  # same prompts; as many new tokens as the experts produced
                if "mixed" not in results:
                    raise SystemExit("the base configuration needs mixed's answer lengths: list mixed first")
                lengths = [max(1, r["usage"]["completion_tokens"]) if r else 1 for r in results["mixed"]["replies"]]
                bodies = [{**chat_request(eval_prompt(s), images[s.image]), "max_tokens": n,
                           "ignore_eos": args.ignore_eos}
                          for s, n in zip(samples, lengths)]
            url = deploy(args.run, port, name, [*common, *overrides])
            print(f"{name}: deployed, {args.requests} requests from {args.clients} clients", flush=True)
            results[name] = asyncio.run(drive(url, bodies, args.clients, warmup))
            results[name]["pool"] = serve.get_deployment_handle("experts", name).stats.remote().result()
            serve.delete(name)
            r = results[name]
            print(f"  {r['throughput']:.1f} req/s  p50 {r['p50_ms']:.0f} ms  p99 {r['p99_ms']:.0f} ms  "
                  f"failures {r['failures']} {r['failure_examples']}  pool {r['pool']}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\nrun {run.run_id} ({len(names)} experts), {args.requests} requests, {args.clients} clients, "
          f"{'exactly ' + str(args.max_tokens) + ' new tokens each, ' if args.ignore_eos else ''}"
          f"max_batch_size {args.batch}, {args.threads} torch thread(s) per replica")
    print("| configuration | req/s | p50 ms | p99 ms | failed |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['throughput']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['failures']} |")
    ratios = {}
    if "mixed" in results and "one" in results:
        ratios["mixed/one"] = results["mixed"]["throughput"] / results["one"]["throughput"]
    if "mixed" in results and "base" in results:
        ratios["mixed/base"] = results["mixed"]["throughput"] / results["base"]["throughput"]
    if "routed" in results and "base" in results:
        ratios["routed/base"] = results["routed"]["throughput"] / results["base"]["throughput"]
    if "routed" in results and "one" in results:
        ratios["routed/one"] = results["routed"]["throughput"] / results["one"]["throughput"]
    print("  ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"results": {k: {kk: vv for kk, vv in v.items() if kk != "replies"} for k, v in results.items()},
                       "ratios": ratios, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
