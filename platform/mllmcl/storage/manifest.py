"""The run manifest: status of every stage, written last and atomically.

Its presence with ``status: complete`` means the run is complete; a stage listed as
complete is never redone when the run is resumed by its id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from mllmcl import storage
from mllmcl.storage.layout import RunLayout


@dataclass(frozen=True)
class ServingRecord:
    """What serves a complete stage, as its manifest entry keeps it (``serving``): the experts by
    name (adapter folders relative to the run's folder, None = the base model) in the router's
    expert order, the router's record (None: one expert, nothing to route), or why the stage
    cannot be served. The stream runner writes it; the service reads it."""

    experts: dict[str, str | None] = field(default_factory=dict)
    router: dict | None = None
    refused: str | None = None

    def to_dict(self) -> dict:
        if self.refused is not None:
            return {"refused": self.refused}
        return {"experts": dict(self.experts), "router": self.router}

    @classmethod
    def from_dict(cls, d: dict) -> "ServingRecord":
        if "refused" in d:
            return cls(refused=str(d["refused"]))
        return cls(experts=dict(d["experts"]), router=d.get("router"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Manifest:
    run_id: str
    method: str
    stream: str
    tasks: list[str]
    config_hash: str
    status: str = "running"
    stages: list[dict[str, Any]] = field(default_factory=list)
    created: str = field(default_factory=_now)
    updated: str = field(default_factory=_now)

    def stage(self, k: int) -> dict | None:
        for s in self.stages:
            if s["k"] == k and s.get("status") == "complete":
                return s
        return None

    def complete_stage(self, record: dict) -> None:
        self.stages = [s for s in self.stages if s["k"] != record["k"]] + [{**record, "status": "complete"}]
        self.stages.sort(key=lambda s: s["k"])

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "method": self.method, "stream": self.stream, "tasks": self.tasks,
                "config_hash": self.config_hash, "status": self.status, "stages": self.stages,
                "created": self.created, "updated": self.updated}

    def save(self, layout: RunLayout) -> None:
        self.updated = _now()
        storage.write_json(layout.manifest, self.to_dict())

    @classmethod
    def load(cls, layout: RunLayout) -> "Manifest | None":
        if not storage.exists(layout.manifest):
            return None
        d = storage.read_json(layout.manifest)
        return cls(**{k: d[k] for k in ("run_id", "method", "stream", "tasks", "config_hash", "status", "stages",
                                        "created", "updated")})
