"""A served run's router and experts in one engine: the batch-evaluation worker (one model in
memory; the Serve application splits the same work into a router and an expert pool)."""

from __future__ import annotations

from typing import Sequence

from mllmcl.engine import Engine
from mllmcl.routing import Route, load_router


class Ensemble:
    def __init__(self, run, threads: int = 0):
        self.run = run
        self.names = list(run.experts)
        self.engine = Engine(run.model_path, run.dtype, threads)
        for name, uri in run.experts.items():
            if uri is not None:
                self.engine.load(uri, name=name)
        self.router = load_router(run.router, run.run_uri) if run.router is not None else None
        if self.router is not None:
            self.router.prepare(self.engine)

    def answer(self, questions: Sequence[str], images: Sequence, max_new_tokens: int | None = None,
               tasks: Sequence[str] | None = None) -> list[dict]:
        """Route and answer; each answer's budget is its expert's unless ``max_new_tokens`` is given.
        ``tasks``: each question's task where the caller knows it (batch evaluation of a task's
        folder); only the oracle router reads it, and it needs it."""
        if self.router is not None:
            truth = None
            if tasks is not None and self.router.needs_truth:
                unknown = sorted({t for t in tasks if t not in self.names})
                if unknown:
                    raise ValueError(f"the oracle router routes a task to its own expert; {unknown} has none "
                                     f"(experts: {self.names})")
                truth = [self.names.index(t) for t in tasks]
            routes = self.router.route(self.engine, questions, images, truth=truth)
        else:
            routes = [Route(0, "", False)] * len(questions)
        experts = [self.names[r.index] for r in routes]
        adapters = [name if self.run.experts[name] is not None else None for name in experts]
        budgets = [max_new_tokens or self.run.max_new_tokens[e] for e in experts]
        comps = self.engine.generate(questions, images, adapters, budgets)
        return [{"prediction": c.text, "expert": e, "router_answer": r.answer, "router_fallback": r.fallback}
                for c, e, r in zip(comps, experts, routes)]
