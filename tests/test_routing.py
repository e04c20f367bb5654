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
    with pytest.raises(KeyError, match="unknown router 'lasso'"):
        load_router({"kind": "lasso", "experts": ["RS"]}, "/tmp/run")


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


class FeatureBackend(Backend):
    """``features`` and ``embed`` from fixed vectors per question."""

    def __init__(self, image, hidden, text):
        super().__init__(vectors=text)
        self.image, self.hidden = image, hidden

    def features(self, prompts, images):
        self.calls.append(("features", list(prompts)))
        return {"image": [self.image[p] for p in prompts], "hidden": [self.hidden[p] for p in prompts]}


def test_ridge_statistics_grow_analytically_and_equal_the_batch_solution():
    from mllmcl.routing.ridge import accumulate, solve

    rng = np.random.default_rng(0)
    X = [rng.normal(size=(6, 4)) + 3 * np.eye(4)[k] for k in range(3)]  # three tasks' features
    G = C = None
    for k, x in enumerate(X):
        G, C = accumulate(G, C, x, k)
    Xall = np.concatenate(X)
    Y = np.zeros((18, 3))
    for k in range(3):
        Y[6 * k:6 * k + 6, k] = 1.0
    lam = 0.5
    W_batch = np.linalg.inv(Xall.T @ Xall + lam * np.eye(4)) @ Xall.T @ Y  # closed form, all at once
    assert np.allclose(solve(G, C, lam), W_batch)
    assert (np.argmax(Xall @ W_batch, axis=1) == np.repeat([0, 1, 2], 6)).mean() > 0.9
    with pytest.raises(ValueError, match="tasks arrive in order"):
        accumulate(G, C, X[0], 5)


def test_ridge_and_mm_prototype_routers_route_by_their_features(tmp_path):
    import io

    from mllmcl.routing.mm_prototype import mm_features

    qs = ["water?", "cells?"]
    image = {"water?": [1.0, 0.0], "cells?": [0.0, 1.0]}
    hidden = {"water?": [2.0, 0.1], "cells?": [0.1, 2.0]}
    text = {"water?": [1.0, 0.0], "cells?": [0.0, 1.0]}
    backend = FeatureBackend(image, hidden, text)
    feats = mm_features(backend, qs, [None, None])
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0) and feats.shape == (2, 4)
    d = tmp_path / "tasks" / "1_Med"
    d.mkdir(parents=True)
    W = np.array([[1.0, -1.0], [-1.0, 1.0], [0.0, 0.0]])  # hidden (2) + bias -> 2 experts
    buf = io.BytesIO()
    np.savez(buf, W=W)
    (d / "ridge.npz").write_bytes(buf.getvalue())
    ridge = load_router({"kind": "ridge", "experts": ["RS", "Med"], "stats": "tasks/1_Med/ridge.npz", "lambda": 1.0},
                        str(tmp_path))
    assert [r.index for r in ridge.route(backend, qs, [None, None])] == [0, 1]
    for k, q in enumerate(qs):
        p = tmp_path / "tasks" / f"{k}_{['RS', 'Med'][k]}"
        p.mkdir(parents=True, exist_ok=True)
        (p / "mm_prototype.json").write_text(json.dumps({"embedding": feats[k].tolist()}))
    mm = load_router({"kind": "mm_prototype", "experts": ["RS", "Med"],
                      "prototypes": ["tasks/0_RS/mm_prototype.json", "tasks/1_Med/mm_prototype.json"]}, str(tmp_path))
    assert [r.index for r in mm.route(backend, qs[::-1], [None, None])] == [1, 0]
    shape = {"params": 1000, "lm_params": 800, "hidden": 2, "prompt_tokens": 10.0, "text_tokens": 4.0}
    assert ridge.flops_per_question(shape) == 2.0 * (1000 * 10 + 3 * 2)
    assert mm.flops_per_question(shape) == 2.0 * (1000 * 10 + 800 * 4 + 2 * 2 * 2)


def test_the_oracle_routes_by_the_task_and_refuses_without_it():
    oracle = load_router({"kind": "oracle", "experts": ["RS", "Med", "AD"]}, "/runs/r")
    assert [r.index for r in oracle.route(Backend(), ["a", "b"], [None, None], truth=[2, 0])] == [2, 0]
    with pytest.raises(ValueError, match="routes by each question's task"):
        oracle.route(Backend(), ["a"], [None])
    assert sorted(registered_routers()) == ["mllm", "mm_prototype", "oracle", "ridge", "text_prototype"]
