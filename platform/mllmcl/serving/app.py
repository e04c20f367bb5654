"""The Ray Serve application of a run: an OpenAI-style ingress, the run's router, and an
expert pool that loads experts on demand (Serve multiplexing, LRU per replica) and answers
a batch of requests for different experts in one forward pass.

    ingress (FastAPI) --text, image--> router --letter--> ingress --expert--> expert pool

Start it with ``jobs/serve.py --run <uri>``, or from a Serve config file / RayService with
``import_path: mllmcl.serving.app:app_builder`` (``cluster/serve.yaml``).
"""

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from mllmcl.serving.auth import bind_problems, key_allowed, load_key_digests
from mllmcl.serving.config import ServeConfig, load_serve_config
from mllmcl.serving.protocol import (RequestError, completion_chunks, completion_response, max_body_bytes,
                                     parse_chat_request)
from mllmcl.serving.run import ServedRun, load_served_run
from mllmcl.storage.layout import relative_adapter

log = logging.getLogger("mllmcl.serving")

api = FastAPI(title="mllmcl", description="the router + expert ensemble of a continual-learning run")


class _RouterDeployment:
    """The base model with the run's router (its record: the MLLM router's LoRA, or text
    prototypes); names the expert for a batch of requests."""

    def __init__(self, run: ServedRun, cfg: ServeConfig):
        from mllmcl.engine import Engine
        from mllmcl.routing import load_router

        self.run = run
        self.engine = Engine(run.model_path, run.dtype, cfg.router.threads)
        self.router = load_router(run.router, run.run_uri)
        self.router.prepare(self.engine)
        self._route_batch.set_max_batch_size(cfg.max_batch_size)
        self._route_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _route_batch(self, items: list[tuple[str, bytes]]) -> list[dict]:
        from mllmcl.data.release import decode_image

        # the forward runs on the replica's loop (see the expert pool: batches grow while it runs)
        images = [decode_image(b) for _, b in items]
        return [r.to_dict() for r in self.router.route(self.engine, [q for q, _ in items], images)]

    async def route(self, question: str, image: bytes) -> dict:
        return await self._route_batch((question, image))


class _LoadedExpert:
    """What the multiplexed loader returns. Serve calls ``__del__`` when it evicts the expert
    (LRU); the adapter is then deleted by the pool between batches, never under a forward."""

    def __init__(self, pool, name: str, adapter: str | None):
        self.pool, self.name, self.adapter = pool, name, adapter
        self._retired = False

    def __del__(self):
        if not self._retired and self.adapter is not None:
            self._retired = True
            self.pool._retired.append(self.adapter)


@contextlib.contextmanager
def _batch_across_experts():
    """Clear the request's multiplexed model id while it joins a batch.

    The id has done its job (Serve routed the request to a replica that holds the expert);
    ``@serve.batch`` would otherwise split every batch by model id and run the parts
    concurrently, one forward per expert, which is what the pool's mixed batches avoid.
    """
    from ray.serve import context

    current = context._get_serve_request_context()
    token = context._serve_request_context.set(dataclasses.replace(current, multiplexed_model_id=""))
    try:
        yield
    finally:
        context._serve_request_context.reset(token)


def expert_pool_class(max_experts: int):
    """The expert-pool deployment class; multiplexing's LRU size is fixed when it is defined."""

    class ExpertPool:
        def __init__(self, run: ServedRun, cfg: ServeConfig):
            from mllmcl.engine import Engine

            self.run = run
            self.capacity = max_experts
            self.engine = Engine(run.model_path, run.dtype, cfg.experts.threads)
            self._retired: list[str] = []
            self._loads = 0
            self._lock = asyncio.Lock()  # one batch at a time on the engine, whatever Serve schedules
            self.counts = {"batches": 0, "forwards": 0, "mixed_forwards": 0, "rows": 0, "model_seconds": 0.0}
            self._generate_batch.set_max_batch_size(cfg.max_batch_size)
            self._generate_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

        @serve.multiplexed(max_num_models_per_replica=max_experts)
        async def get_expert(self, name: str) -> _LoadedExpert:
            if name not in self.run.experts:  # only the run's registered adapters, never a caller's path
                raise KeyError(f"unknown expert {name!r}")
            uri = self.run.experts[name]
            adapter = None
            if uri is not None:
                self._loads += 1
                adapter = f"{name}#{self._loads}"  # a fresh name: an evicted copy may still await deletion
                await asyncio.to_thread(self.engine.load, uri, adapter)
            return _LoadedExpert(self, name, adapter)

        def _delete_retired(self) -> None:
            while self._retired:
                self.engine.unload(self._retired.pop())

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
        async def _generate_batch(self, items: list[tuple[str, str, bytes, int, int]]) -> list[dict]:
            async with self._lock:
                return await self._answer(items)

        async def _answer(self, items: list[tuple[str, str, bytes, int, int]]) -> list[dict]:
            from mllmcl.data.release import decode_image

            out: list[dict | None] = [None] * len(items)
            names = list(dict.fromkeys(it[0] for it in items))
            for start in range(0, len(names), self.capacity):  # never more distinct experts than the LRU holds
                chunk = set(names[start:start + self.capacity])
                loaded = {n: await self.get_expert(n) for n in chunk}
                self._delete_retired()
                rows = [i for i, it in enumerate(items) if it[0] in chunk]
                # The forward runs on the replica's loop, not in a thread: requests that arrive
                # meanwhile wait in Ray and join the next batch together, where a thread would
                # fight the loop for the GIL and let Serve cut many small batches (measured:
                # ~1.4 rows per batch in a thread, ~16 on the loop, 32 clients).
                t0 = time.perf_counter()
                images = [decode_image(items[i][2]) for i in rows]
                adapters = [loaded[items[i][0]].adapter for i in rows]
                answers = self.engine.generate([items[i][1] for i in rows], images, adapters,
                                               [items[i][3] for i in rows], [items[i][4] for i in rows])
                for i, c in zip(rows, answers):
                    out[i] = c.to_dict()
                self.counts["model_seconds"] += time.perf_counter() - t0
                one = self.engine.one_forward(adapters)
                self.counts["forwards"] += 1 if one else len(set(adapters))
                self.counts["mixed_forwards"] += len(chunk) > 1 and one
            self.counts["batches"] += 1
            self.counts["rows"] += len(items)
            return out  # type: ignore[return-value]

        async def generate(self, expert: str, text: str, image: bytes, max_new_tokens: int,
                           min_new_tokens: int = 0) -> dict:
            with _batch_across_experts():
                return await self._generate_batch((expert, text, image, max_new_tokens, min_new_tokens))

        def stats(self) -> dict:
            return {"loaded": sorted(self.engine.adapters), "loads": self._loads, **self.counts}

    return ExpertPool


class _TokenCounter:
    """Prompt length checks with the run's tokenizer (the ingress holds no model weights)."""

    def __init__(self, run: ServedRun, cfg: ServeConfig):
        from transformers import AutoConfig

        from mllmcl.models.batching import DEFAULT_MAX_LENGTH, Collator
        from mllmcl.routing import load_router
        from mllmcl.models.families import family_for
        from mllmcl.models.loading import context_length, load_processor, resolve_checkpoint

        path = resolve_checkpoint(run.model_path)
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        self.context = context_length(config)
        family = family_for(config.model_type)
        self.collator = Collator(load_processor(path, family), family, max_length=self.context or DEFAULT_MAX_LENGTH)
        self.limit = cfg.limits.max_prompt_tokens
        self.router = load_router(run.router, run.run_uri) if run.router is not None else None

    def count(self, text: str, image_size: tuple[int, int]) -> int:
        return self.collator.prompt_tokens(text, self.collator.images.tokens_for_size(*image_size))

    def check(self, text: str, image_size: tuple[int, int], run: ServedRun) -> None:
        n = self.count(text, image_size)
        budget = max(run.max_new_tokens.values())
        limit = self.limit or (self.context - budget if self.context else 0)
        if limit and n > limit:
            raise RequestError(400, f"prompt is {n} tokens (with the image's); the limit is {limit}", "messages",
                               "context_length_exceeded")
        prompts = self.router.prompts([text]) if self.router is not None and self.context else None
        if prompts:
            r = self.count(prompts[0], image_size)
            if r + self.router.max_new_tokens > self.context:
                raise RequestError(400, f"the router's prompt for this text is {r} tokens; the model's context is "
                                        f"{self.context}", "messages", "context_length_exceeded")


_UNAUTHORIZED = {"error": {"message": "a valid API key is needed: send it as `Authorization: Bearer <key>`",
                            "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}


@serve.ingress(api)
class _Ingress:
    def __init__(self, run: ServedRun, cfg: ServeConfig, router, pool, key_digests: tuple[str, ...] = ()):
        from mllmcl.routing import get_router

        self.run, self.cfg, self.router, self.pool = run, cfg, router, pool
        self.key_digests = tuple(key_digests)  # SHA-256 of the API keys (none: an open endpoint)
        self.needs_task = run.router is not None and get_router(run.router["kind"]).needs_truth
        self.names = list(run.experts)
        self.limits = cfg.limits
        self._tokens = _TokenCounter(run, cfg)
        self.created = int(time.time())

    def _error(self, e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def _authorized(self, request: Request) -> bool:
        return not self.key_digests or key_allowed(request.headers.get("authorization"), self.key_digests)

    def _unauthorized(self) -> JSONResponse:
        return JSONResponse(_UNAUTHORIZED, status_code=401, headers={"WWW-Authenticate": "Bearer"})

    def _overloaded(self, e: Exception, message: str = "the service is at capacity; retry later",
                    code: str = "overloaded") -> JSONResponse:
        """A full queue behind the ingress (router or experts), or a replica that died under the
        request: 503 with Retry-After, as Serve's proxy answers when the ingress's own queue is full."""
        import math

        wait = getattr(e, "retry_after_s", None)
        wait = self.cfg.retry_after_s if wait is None else wait
        return JSONResponse({"error": {"message": message, "type": "server_error", "param": None, "code": code}},
                            status_code=503,
                            headers={"Retry-After": str(max(0, math.ceil(wait)))})

    @api.get("/healthz")
    async def healthz(self, request: Request) -> dict:
        """Open (load balancers probe it); what is served only with a key when keys are set."""
        return {"status": "ok", **(self.run.to_dict() if self._authorized(request) else {})}

    @api.get("/v1/models")
    async def models(self, request: Request) -> Any:
        """The routed ensemble first (its id is the run id: the router picks the expert), then
        every expert (its task name: pins it and skips the router)."""
        from mllmcl.data.prompts import LETTERS

        if not self._authorized(request):
            return self._unauthorized()

        ensemble = {"id": self.run.run_id, "object": "model", "created": self.created, "owned_by": "mllmcl",
                    "mllmcl": {"kind": "ensemble", "routed": self.run.routed, "stage": self.run.stage,
                               "method": self.run.method, "experts": self.names}}
        experts = [{"id": name, "object": "model", "created": self.created, "owned_by": "mllmcl",
                    "mllmcl": {"kind": "expert", "letter": LETTERS[i], "stage": self.run.stage,
                               "run_id": self.run.run_id,
                               "adapter": None if uri is None else relative_adapter(uri, self.run.run_uri)}}
                   for i, (name, uri) in enumerate(self.run.experts.items())]
        return {"object": "list", "data": [ensemble, *experts]}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Any:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError

        if not self._authorized(request):
            return self._unauthorized()
        try:
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > max_body_bytes(self.limits):
                raise RequestError(413, f"request body is {length} bytes; the limit is {max_body_bytes(self.limits)}",
                                   None, "request_too_large")
            req = parse_chat_request(await request.body(), self.limits, self.run.experts, ensemble=self.run.run_id)
            self._tokens.check(req.text, req.image_size, self.run)
            routing: dict = {"mode": "single", "stage": self.run.stage}
            if req.model is not None:
                expert, routing = req.model, {"mode": "pinned", "stage": self.run.stage}
            elif self.needs_task:
                raise RequestError(400, "this run routes with the oracle (each question to its own task's expert), "
                                        "an evaluation bound that needs the question's task: name the expert as the "
                                        f"model (one of {self.names})", "model")
            elif self.router is None:
                expert = self.names[0]
            else:
                r = await self.router.route.remote(req.text, req.image)
                expert = self.names[r["index"]]
                routing = {"mode": "router", "stage": self.run.stage, "router_answer": r["answer"],
                           "fallback": r["fallback"]}
            budget = self.run.max_new_tokens[expert]
            max_new = min(req.max_tokens, self.limits.max_tokens) if req.max_tokens else budget
            if req.min_tokens > max_new:
                raise RequestError(400, f"min_tokens={req.min_tokens} is above expert {expert!r}'s answer budget "
                                        f"({max_new} tokens); give max_tokens too", "min_tokens")
            out = await self.pool.options(multiplexed_model_id=expert).generate.remote(
                expert, req.text, req.image, max_new, req.min_tokens)
            extra = {"routing": routing, "run_id": self.run.run_id}
            if req.stream:  # the answer is complete here: errors above are still plain JSON with a status
                return StreamingResponse(iter(completion_chunks(expert, out, extra, req.include_usage)),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            return JSONResponse(completion_response(expert, out, extra))
        except RequestError as e:
            return self._error(e)
        except BackPressureError as e:
            return self._overloaded(e)
        except RayActorError as e:  # the replica that had the request died (Serve starts another): retry
            log.warning("request failed: a replica died (%s)", type(e).__name__)
            return self._overloaded(e, "a replica serving this request failed; retry", "replica_failed")
        except Exception as e:  # a failure of one request never takes the service down
            log.exception("request failed")
            return JSONResponse({"error": {"message": f"internal error: {type(e).__name__}: {e}", "type": "server_error",
                                           "param": None, "code": "internal_error"}}, status_code=500)


def build_app(run: ServedRun, cfg: ServeConfig, env: dict[str, str] | None = None,
              key_digests: tuple[str, ...] = ()):
    """The Serve application (ingress + router + expert pool) of a loaded run; ``env`` is set
    in every replica (cache location, S3 access); ``key_digests``: the API keys' digests
    (:func:`mllmcl.serving.auth.load_key_digests`; none = an open endpoint)."""

    def options(settings, name: str) -> dict:
        opts = settings.options(name, cfg.retry_after_s)
        if env:
            opts["ray_actor_options"]["runtime_env"] = {"env_vars": dict(env)}
        return opts

    pool_cls = serve.deployment(expert_pool_class(cfg.max_experts_per_replica))
    pool = pool_cls.options(**options(cfg.experts, "experts")).bind(run, cfg)
    from mllmcl.routing import get_router

    router = None
    if run.router is not None and not get_router(run.router["kind"]).needs_truth:  # the oracle needs no model
        router = serve.deployment(_RouterDeployment).options(**options(cfg.router, "router")).bind(run, cfg)
    ingress = serve.deployment(_Ingress).options(**options(cfg.ingress, "ingress"))
    return ingress.bind(run, cfg, router, pool, tuple(key_digests))


def app_builder(args: dict):
    """Serve config-file entry point: ``args: {run: <uri>, config: <yaml>, overrides: [k=v, ...]}``."""
    if "run" not in args:
        raise ValueError("app_builder needs args.run: the run's URI (<storage root>/runs/<run id>)")
    cfg = load_serve_config(args.get("config"), list(args.get("overrides") or []))
    run = load_served_run(args["run"], cfg.stage, model_path=cfg.model_path, dtype=cfg.dtype, base_only=cfg.base_only)
    # the keys as the builder's node sees them (the Serve config file's env_vars or a mounted file);
    # the proxy's host is the config file's http_options, which a builder does not see
    return build_app(run, cfg, key_digests=load_key_digests(cfg.auth.keys_file, cfg.auth.keys_env))


def start(run_uri: str, cfg: ServeConfig, *, blocking: bool = False):
    """Deploy the run's application on the connected Ray cluster; returns the loaded run."""
    from mllmcl.cluster import forwarded_env

    from mllmcl.errors import ConfigError

    digests = load_key_digests(cfg.auth.keys_file, cfg.auth.keys_env)
    problems = bind_problems(cfg.host, digests, cfg.auth.allow_unauthenticated)
    if problems:
        raise ConfigError(problems)
    run = load_served_run(run_uri, cfg.stage, model_path=cfg.model_path, dtype=cfg.dtype, base_only=cfg.base_only)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(run, cfg, forwarded_env(), digests), name=cfg.app_name, route_prefix=cfg.route_prefix,
              blocking=blocking)
    return run
