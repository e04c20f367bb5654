"""Typed settings of a served run: HTTP binding, request limits, batching, and each
deployment's replicas, autoscaling and resources. YAML + dotted overrides, like runs::

    python jobs/serve.py --run artifacts/runs/<id> experts.max_replicas=4 experts.num_gpus=1
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from mllmcl.settings import build_dataclass, load_yaml
from mllmcl.paths import TINY_MODEL, absolute


@dataclass(frozen=True)
class DeploymentSettings:
    """One Serve deployment. ``max_replicas > 0`` turns on autoscaling between
    ``min_replicas`` and ``max_replicas``; otherwise ``num_replicas`` replicas run."""

    num_replicas: int = 1
    min_replicas: int = 1
    max_replicas: int = 0
    target_ongoing_requests: float = 16.0
    max_ongoing_requests: int = 128
    # requests waiting at each caller (the HTTP proxy, or the ingress for router and experts) beyond
    # the replicas' max_ongoing_requests; more are answered 503 with Retry-After (-1 = no bound)
    max_queued_requests: int = 256
    num_cpus: float = 0.0  # Serve's default is 1 CPU per replica; a 3-deployment app then needs 3 CPUs
    num_gpus: float = 0.0
    threads: int = 0  # torch threads per replica (0 = torch's default)

    def check(self, where: str) -> list[str]:
        p = []
        if self.num_replicas < 1:
            p.append(f"{where}.num_replicas={self.num_replicas}: must be >= 1")
        if self.max_replicas and not 0 <= self.min_replicas <= self.max_replicas:
            p.append(f"{where}: need 0 <= min_replicas ({self.min_replicas}) <= max_replicas ({self.max_replicas})")
        if self.max_replicas < 0:
            p.append(f"{where}.max_replicas={self.max_replicas}: must be >= 0 (0 = no autoscaling)")
        if self.target_ongoing_requests <= 0 or self.max_ongoing_requests < 1:
            p.append(f"{where}: target_ongoing_requests must be > 0 and max_ongoing_requests >= 1")
        if self.max_queued_requests < 1 and self.max_queued_requests != -1:
            p.append(f"{where}.max_queued_requests={self.max_queued_requests}: must be >= 1 (or -1: no bound)")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.threads < 0:
            p.append(f"{where}: num_cpus, num_gpus and threads must be >= 0")
        return p

    def options(self, name: str, retry_after_s: float = 1.0) -> dict:
        """Keyword arguments of ``Deployment.options``."""
        from ray.serve.config import BackpressureConfig

        opts: dict = {"name": name, "max_ongoing_requests": self.max_ongoing_requests,
                      "max_queued_requests": self.max_queued_requests,
                      "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=retry_after_s),
                      "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}}
        if self.max_replicas:
            opts["autoscaling_config"] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                          "target_ongoing_requests": self.target_ongoing_requests}
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


@dataclass(frozen=True)
class LimitSettings:
    """What a request may carry; anything larger is refused with a 4xx."""

    max_image_bytes: int = 10 * 1024 * 1024  # decoded image file size
    max_image_pixels: int = 4096 * 4096
    max_text_chars: int = 8000
    max_prompt_tokens: int = 0  # 0 = the tokenizer's model_max_length (minus the answer's budget)
    max_tokens: int = 512  # largest ``max_tokens`` a request may ask for

    def check(self) -> list[str]:
        bad = [k for k in ("max_image_bytes", "max_image_pixels", "max_text_chars", "max_tokens")
               if getattr(self, k) < 1]
        out = [f"limits.{k}: must be >= 1" for k in bad]
        if self.max_prompt_tokens < 0:
            out.append("limits.max_prompt_tokens: must be >= 0")
        return out


@dataclass(frozen=True)
class AuthSettings:
    """API keys (:mod:`mllmcl.serving.auth`): a file of keys and/or an environment variable
    holding them; with none the endpoint is open, which is refused on a non-loopback host
    unless ``allow_unauthenticated``."""

    keys_file: str = ""
    keys_env: str = "MLLMCL_API_KEYS"
    allow_unauthenticated: bool = False


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "mllmcl"
    route_prefix: str = "/"
    stage: int = -1  # stage whose experts and router are served; -1 = the run's last complete stage
    model_path: str = ""  # "" = the run's model.path
    dtype: str = ""  # "" = the run's model.dtype
    base_only: bool = False  # serve the base model without adapters (a baseline, and the throughput ceiling)
    max_batch_size: int = 32  # rows in one forward (router and experts)
    batch_wait_timeout_s: float = 0.005  # longer (0.05-0.15) forms bigger batches under heavy load (bench/serve_load.py)
    max_experts_per_replica: int = 8  # LRU of loaded experts per expert-pool replica (Serve multiplexing)
    retry_after_s: float = 1.0  # the Retry-After of a 503 answered when a queue is full
    auth: AuthSettings = field(default_factory=AuthSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    ingress: DeploymentSettings = field(default_factory=DeploymentSettings)
    router: DeploymentSettings = field(default_factory=DeploymentSettings)
    experts: DeploymentSettings = field(default_factory=DeploymentSettings)

    def check(self) -> list[str]:
        p = []
        if not 0 < self.port < 65536:
            p.append(f"port={self.port}: expected 1-65535")
        if not self.route_prefix.startswith("/"):
            p.append(f"route_prefix={self.route_prefix!r}: must start with '/'")
        if self.max_batch_size < 1 or self.max_experts_per_replica < 1:
            p.append("max_batch_size and max_experts_per_replica must be >= 1")
        if self.retry_after_s < 0:
            p.append(f"retry_after_s={self.retry_after_s}: must be >= 0")
        if self.batch_wait_timeout_s < 0:
            p.append(f"batch_wait_timeout_s={self.batch_wait_timeout_s}: must be >= 0")
        if self.dtype not in ("", "float32", "bfloat16", "float16"):
            p.append(f"dtype={self.dtype!r}: expected float32, bfloat16 or float16 (or empty = the run's)")
        p += self.limits.check()
        for name in ("ingress", "router", "experts"):
            p += getattr(self, name).check(name)
        return p


def load_serve_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ServeConfig:
    """Settings from YAML + dotted overrides; a local ``model_path`` is made absolute against the
    working directory (replicas run in folders of their own)."""
    cfg = build_dataclass(ServeConfig, load_yaml(path) if path else {}, overrides)
    if cfg.model_path and cfg.model_path != TINY_MODEL:
        cfg = dataclasses.replace(cfg, model_path=absolute(cfg.model_path))
    if cfg.auth.keys_file:
        cfg = dataclasses.replace(cfg, auth=dataclasses.replace(cfg.auth, keys_file=absolute(cfg.auth.keys_file)))
    return cfg
