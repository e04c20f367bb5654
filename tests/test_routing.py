"""The router interface on inputs whose answer is known: registry, records, the fallback rule,
the MLLM router's parsing and the text-prototype router's selection, with a stand-in backend
(no model)."""

import json

import numpy as np
import pytest

from mllmcl.data.prompts import LETTERS, parse_letter, router_prompt
from mllmcl.data.streams import get_stream_spec
from mllmcl.routing import Route, fallback_index, load_router, registered_routers


class Backend:
    """Answers ``complete`` from a script and ``embed`` from fixed vectors; records the calls."""

    def __init__(self, answers=(), vectors=None):
        self.answers, self.vectors, self.calls = list(answers), vectors or {}, []

    def complete(self, prompts, images, adapter, max_new_tokens):
        self.calls.append(("complete", list(prompts), adapter, max_new_tokens))
        return self.answers[:len(prompts)]

    def embed(self, texts):
        self.calls.append(("embed", list(texts)))
        return [self.vectors[t] for t in texts]


def test_registry_and_unknown_kind():
    assert {"mllm", "text_prototype"} <= set(registered_routers())
    with pytest.raises(KeyError, match="unknown router 'ridge'"):
        load_router({"kind": "ridge", "experts": ["RS"]}, "/tmp/run")


def test_fallback_rule():
    assert fallback_index("first", 4, 0, "q") == 0 and fallback_index("last", 4, 0, "q") == 3
    # random without a draw: the question's text decides, the same every time, spread over experts
    picks = [fallback_index("random", 3, 0, f"question {i}") for i in range(60)]
    assert picks == [fallback_index("random", 3, 0, f"question {i}") for i in range(60)] and set(picks) == {0, 1, 2}
    assert fallback_index("random", 3, 1, "question 0") != fallback_index("random", 3, 0, "question 0") or \
        fallback_index("random", 3, 1, "question 1") != fallback_index("random", 3, 0, "question 1")
    # random with the stream's seeded draw: the rng's sequence
    rng, ref = np.random.default_rng([0, 31337, 2, 1]), np.random.default_rng([0, 31337, 2, 1])
    assert [fallback_index("random", 3, 0, "q", rng) for _ in range(5)] == [int(ref.integers(3)) for _ in range(5)]


def test_mllm_router_parses_letters_and_falls_back():
    spec = get_stream_spec("dcl")
    record = {"kind": "mllm", "stream": "dcl", "experts": ["RS", "Med", "AD"], "adapter": "tasks/2_AD/router",
              "fallback": "last", "seed": 0, "max_new_tokens": 4}
    router = load_router(record, "/runs/r")
    backend = Backend(["B", "(C)", "Z", " A.", ""])
    routes = router.route(backend, ["q1", "q2", "q3", "q4", "q5"], ["i"] * 5)
    assert routes == [Route(1, "B", False), Route(2, "(C)", False), Route(2, "Z", True), Route(0, " A.", False),
                      Route(2, "", True)]
    kind, prompts, adapter, budget = backend.calls[0]
    assert adapter == "/runs/r/tasks/2_AD/router" and budget == 4
    assert prompts[0] == router_prompt([spec.task(n) for n in ("RS", "Med", "AD")], "q1")
    assert router.prompts(["q"]) == [router_prompt([spec.task(n) for n in ("RS", "Med", "AD")], "q")]
    assert router.questions == 5 and router.seconds_per_question() is not None
    assert parse_letter("D", 3) is None and LETTERS[parse_letter("C: AD", 3)] == "C"


def test_one_expert_needs_no_model():
    router = load_router({"kind": "mllm", "stream": "dcl", "experts": ["RS"], "adapter": None}, "/runs/r")
    backend = Backend()
    assert router.route(backend, ["a", "b"], [None, None]) == [Route(0, "", False)] * 2 and not backend.calls


def test_text_prototype_router_picks_the_nearest_prototype(tmp_path):
    protos = {"RS": [1.0, 0.0, 0.0], "Med": [0.0, 1.0, 0.0], "AD": [0.0, 0.0, 1.0]}
    rel = []
    for k, (name, vec) in enumerate(protos.items()):
        d = tmp_path / "tasks" / f"{k}_{name}"
        d.mkdir(parents=True)
        (d / "prototype.json").write_text(json.dumps({"task": name, "embedding": vec}))
        rel.append(f"tasks/{k}_{name}/prototype.json")
    router = load_router({"kind": "text_prototype", "experts": list(protos), "prototypes": rel}, str(tmp_path))
    vectors = {"water?": [0.9, 0.1, 0.0], "cells?": [0.2, 0.7, 0.1], "cars?": [0.1, 0.3, 0.6]}
    routes = router.route(Backend(vectors=vectors), list(vectors), [None] * 3)
    assert [r.index for r in routes] == [0, 1, 2] and not any(r.fallback for r in routes)
