"""``oracle``: every question to its own task's expert — the upper bound a router can reach
with these experts (the stream's evaluation knows each question's task; a request to a
service does not, so a served oracle run answers only requests that name their expert)."""

from __future__ import annotations

from dataclasses import dataclass

from mllmcl.routing.base import Route, Router, RouterStage, register_router


@dataclass(frozen=True)
class OracleSettings:
    pass


@register_router("oracle")
class OracleRouter(Router):
    needs_truth = True

    @classmethod
    def fit(cls, stage: RouterStage, settings: OracleSettings, backend=None) -> dict:
        return {"kind": cls.kind, "experts": [t.name for t in stage.seen]}

    def select(self, backend, questions: list[str], images: list, rng=None, truth=None) -> list[Route]:
        return [Route(min(int(t), len(self.experts) - 1), "", False) for t in truth]

    def flops_per_question(self, shape: dict) -> float:
        return 0.0
