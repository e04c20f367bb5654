"""Serving a run: the Ray Serve app over HTTP on loopback gives the stream runner's answers
and expert choices, refuses bad requests with 4xx while it keeps serving, and batch
evaluation through the same router + experts reproduces the stream runner's scores.

One MR-LoRA run (RS -> Med -> AD, local backend) is made per module; the app is deployed
once, with an expert LRU smaller than the number of experts so that multiplexing evicts
and reloads experts during the test.
"""

from __future__ import annotations

import io
import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mllmcl.config import load_config
from mllmcl.errors import ConfigError
from mllmcl.evaluation.predictions import read_predictions
from mllmcl.serving.config import LimitSettings, load_serve_config
from mllmcl.serving.protocol import RequestError, chat_request, parse_chat_request
from mllmcl.serving.run import load_served_run

TASKS = ["RS", "Med", "AD"]
APP = "mllmcl-test"


# --------------------------------------------------------------------------- the run

@pytest.fixture(scope="module")
def run(tmp_path_factory, stream_overrides):
    from mllmcl import run_stream

    root = tmp_path_factory.mktemp("serving")
    cfg = load_config(None, [*stream_overrides, "scaling.backend=local", "train.lr=0.01", "train.max_steps=30",
                             "method.router_epochs=10", "method.router_fallback=last", f"storage.root={root}",
                             "method.name=mr_lora", f"data.tasks=[{','.join(TASKS)}]"])
    res = run_stream(cfg, "served")
    return Path(res.run_dir)


def _final(run: Path) -> dict[str, dict]:
    """question_id -> (prediction, expert task) of the stream runner's last stage."""
    out = {}
    for task in TASKS:
        for r in read_predictions(str(run / "eval" / f"stage_{len(TASKS) - 1}" / f"{task}.parquet")):
            out[r.question_id] = {"prediction": r.prediction, "expert": r.expert.split("/")[1].split("_", 1)[1]}
    return out


def _oracle(run: Path, k: int, task: str) -> dict[str, str]:
    """Expert k's cached answers (the stream runner's evaluation of every expert)."""
    from mllmcl.data.parquet import read_table

    table = read_table(str(run / "eval" / "cache" / f"tasks__{k}_{task}__expert.parquet")).to_pylist()
    return {r["uid"]: r["prediction"] for r in table}


def _samples(synthetic_small):
    from mllmcl.data.release import load_stream

    return load_stream(str(synthetic_small), "dcl", TASKS)


# --------------------------------------------------------------------------- without Ray

def _png(size=(8, 8)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


BAD_REQUESTS = [  # (name, body bytes, status, words in the message)
    ("malformed JSON", b'{"messages": [', 400, "not valid JSON"),
    ("not an object", b"[1, 2]", 400, "JSON object"),
    ("no messages", json.dumps({"messages": []}).encode(), 400, "non-empty list"),
    ("missing image", json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), 400, "no image"),
    ("undecodable image", json.dumps(chat_request("hi", b"certainly not a png")).encode(), 400, "cannot be decoded"),
    ("bad base64", json.dumps({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}
    ).encode(), 400, "not valid base64"),
    ("remote image URL", json.dumps({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}]}]}
    ).encode(), 400, "not fetched"),
    ("image over the byte limit", json.dumps(chat_request("hi", _png() + b"\0" * 25000)).encode(), 413, "limit"),
    ("image over the pixel limit", json.dumps(chat_request("hi", _png((300, 300)))).encode(), 413, "pixels"),
    ("too-long text", json.dumps(chat_request("x" * 2001, _png())).encode(), 413, "characters"),
    ("too many tokens", json.dumps(chat_request("word " * 390, _png())).encode(), 400, "tokens"),
    ("unknown expert", json.dumps(chat_request("hi", _png(), model="Fin")).encode(), 404, "unknown expert"),
    ("model as a path", json.dumps(chat_request("hi", _png(), model="/tmp/evil_adapter")).encode(), 400, "path or URI"),
    ("model as a URI", json.dumps(chat_request("hi", _png(), model="s3://bucket/adapter")).encode(), 400,
     "path or URI"),
    ("two turns", json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": "hi"}]}).encode(), 400, "exactly one message"),
    ("stream not a boolean", json.dumps({**chat_request("hi", _png()), "stream": "yes"}).encode(), 400,
     "stream='yes'"),
    ("stream_options without stream", json.dumps({**chat_request("hi", _png()), "stream_options": {
        "include_usage": True}}).encode(), 400, "only allowed with stream"),
    ("max_tokens out of range", json.dumps({**chat_request("hi", _png()), "max_tokens": 0}).encode(), 400,
     "max_tokens"),
    ("min_tokens over max_tokens", json.dumps({**chat_request("hi", _png()), "max_tokens": 4, "min_tokens": 5}).encode(),
     400, "min_tokens"),
    ("ignore_eos without max_tokens", json.dumps({**chat_request("hi", _png()), "ignore_eos": True}).encode(), 400,
     "ignore_eos needs max_tokens"),
    ("ignore_eos not a boolean", json.dumps({**chat_request("hi", _png()), "max_tokens": 3, "ignore_eos": "yes"}
                                            ).encode(), 400, "expected true or false"),
]
LIMITS = ["limits.max_image_bytes=20000", "limits.max_image_pixels=40000", "limits.max_text_chars=2000"]


@pytest.mark.parametrize("name,body,status,words", [b for b in BAD_REQUESTS if b[0] != "too many tokens"],
                         ids=[b[0] for b in BAD_REQUESTS if b[0] != "too many tokens"])
def test_parse_refuses_bad_requests(name, body, status, words):
    limits = load_serve_config(None, LIMITS).limits
    with pytest.raises(RequestError) as e:
        parse_chat_request(body, limits, {"RS": "x", "Med": "y", "AD": "z"})
    assert e.value.status == status and words in e.value.message, (e.value.status, e.value.message)


def test_parse_accepts_a_good_request():
    image = _png()
    req = parse_chat_request(json.dumps({**chat_request("What is it?", image, model="Med"), "max_tokens": 7}).encode(),
                             LimitSettings(), {"RS": "x", "Med": "y"})
    assert (req.text, req.image, req.model, req.max_tokens, req.min_tokens) == ("What is it?", image, "Med", 7, 0)
    fixed = parse_chat_request(json.dumps({**chat_request("q", image), "max_tokens": 6, "ignore_eos": True}).encode(),
                               LimitSettings(), {"RS": "x"})
    assert (fixed.max_tokens, fixed.min_tokens) == (6, 6)
    auto = parse_chat_request(json.dumps(chat_request("q", image, model="auto")).encode(), LimitSettings(), {"RS": "x"})
    assert auto.model is None
    ensemble = parse_chat_request(json.dumps({**chat_request("q", image, model="run-1"), "stream": True}).encode(),
                                  LimitSettings(), {"RS": "x"}, ensemble="run-1")
    assert (ensemble.model, ensemble.stream) == (None, True)
    with pytest.raises(RequestError, match="'run-1' \\(the routed ensemble\\)"):
        parse_chat_request(json.dumps(chat_request("q", image, model="run-2")).encode(), LimitSettings(), {"RS": "x"},
                           ensemble="run-1")


def test_serve_config_is_validated():
    with pytest.raises(ConfigError) as e:
        load_serve_config(None, ["port=0", "experts.max_replicas=2", "experts.min_replicas=3", "routerr.num_cpus=1",
                                 "limits.max_tokens=0"])
    text = str(e.value)
    for words in ("port=0", "min_replicas (3) <= max_replicas (2)", "routerr: unknown key", "limits.max_tokens"):
        assert words in text
    opts = load_serve_config(None, ["experts.max_replicas=4", "experts.num_gpus=1"]).experts.options("experts")
    assert opts["autoscaling_config"]["max_replicas"] == 4 and opts["ray_actor_options"]["num_gpus"] == 1


KEY = "k-" + "0123456789abcdef" * 2  # a test key (never a real one)


def test_api_keys_come_from_a_file_and_the_environment(tmp_path, monkeypatch):
    from mllmcl.serving.auth import bind_problems, digest, key_allowed, load_key_digests

    keys = tmp_path / "keys"
    keys.write_text(f"# the team's keys\n{KEY}\n  {KEY[::-1]}  # rotated in\n")
    monkeypatch.setenv("MLLMCL_API_KEYS", "env-key-abcdefghijklmnop, env-key-2-abcdefghijklmn")
    digests = load_key_digests(str(keys), "MLLMCL_API_KEYS")
    assert digests == tuple(sorted(digest(k) for k in (KEY, KEY[::-1], "env-key-abcdefghijklmnop",
                                                      "env-key-2-abcdefghijklmn")))
    assert KEY not in repr(digests)  # only digests travel to the replicas
    for header in (f"Bearer {KEY}", f"bearer  {KEY[::-1]} ", "Bearer env-key-2-abcdefghijklmn"):
        assert key_allowed(header, digests), header
    for header in (None, "", "Bearer", f"Basic {KEY}", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", KEY):
        assert not key_allowed(header, digests), header
    assert not key_allowed("Bearer ", (digest(""),))  # an empty key never passes
    monkeypatch.delenv("MLLMCL_API_KEYS")
    assert load_key_digests("", "MLLMCL_API_KEYS") == ()
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    monkeypatch.setenv("OTHER_KEYS", "short")
    with pytest.raises(ConfigError) as e:  # every problem at once, and a named file that is wrong never means "open"
        load_key_digests(str(empty), "OTHER_KEYS")
    assert "holds no key" in str(e.value) and "shorter than 16" in str(e.value)
    with pytest.raises(ConfigError, match="no such file"):
        load_key_digests(str(tmp_path / "missing"), "")
    assert bind_problems("127.0.0.1", (), False) == [] and bind_problems("::1", (), False) == []
    assert bind_problems("0.0.0.0", digests, False) == [] and bind_problems("0.0.0.0", (), True) == []
    assert "no API key" in bind_problems("0.0.0.0", (), False)[0]
    assert bind_problems("head.cluster.internal", (), False)  # a host name is not known to be loopback


def test_serve_job_refuses_an_open_non_loopback_endpoint(tmp_path):
    """``jobs/serve.py host=0.0.0.0`` without keys stops before Ray starts, naming the fix."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MLLMCL_API_KEYS"}
    out = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "jobs" / "serve.py"), "--run",
                          str(tmp_path / "runs" / "any"), "host=0.0.0.0"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "no API key is configured" in out.stderr and "auth.allow_unauthenticated=true" in out.stderr


def test_served_run_plan_and_refusals(run, tmp_path):
    served = load_served_run(str(run))
    assert served.stage == len(TASKS) - 1 and list(served.experts) == TASKS and served.routed
    assert load_served_run(str(run), stage=0).router is None  # one expert, nothing to route
    with pytest.raises(ConfigError, match="not complete"):
        load_served_run(str(run), stage=7)
    with pytest.raises(ConfigError, match="runs/<run id>"):
        load_served_run(str(tmp_path / "somewhere"))
    # a MoELoRA run is refused with the reason, before anything is deployed (each stage records
    # what serves it, as the stream runner writes it; the service never asks the method)
    from mllmcl.config import load_config
    from mllmcl.methods import get_method
    from mllmcl.runner.stream import serving_record

    fake = tmp_path / "runs" / "moe"
    fake.mkdir(parents=True)
    manifest = json.loads((run / "manifest.json").read_text())
    refused = serving_record(get_method("moelora")(load_config(None, ["method.name=moelora"]), None), None)
    stages = [{**st, "serving": refused} for st in manifest["stages"]]
    (fake / "manifest.json").write_text(json.dumps({**manifest, "method": "moelora", "stages": stages}))
    (fake / "config.yaml").write_text((run / "config.yaml").read_text().replace("name: mr_lora", "name: moelora"))
    with pytest.raises(ConfigError, match="PEFT"):
        load_served_run(str(fake))


def test_a_run_made_before_serving_records_serves_after_a_resubmit(run, tmp_path, stream_overrides):
    """A run of the earlier layout (no serving record per stage, no router.json) is refused with the
    command that upgrades it; that command (the same job, same run id) trains nothing, starts no
    model, leaves the run's outputs as they were and records what serves each stage."""
    import shutil

    from mllmcl import run_stream

    old = tmp_path / "runs" / "served"
    shutil.copytree(run, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for st in manifest["stages"]:
        del st["serving"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    for record in old.glob("tasks/*/router.json"):
        record.unlink()
    with pytest.raises(ConfigError, match="with the same run.id"):
        load_served_run(str(old))
    metrics = (old / "metrics" / "metrics.json").read_bytes()
    cfg = load_config(None, [*stream_overrides, "scaling.backend=local", "train.lr=0.01", "train.max_steps=30",
                             "method.router_epochs=10", "method.router_fallback=last", f"storage.root={tmp_path}",
                             "method.name=mr_lora", f"data.tasks=[{','.join(TASKS)}]"])
    res = run_stream(cfg, "served")
    assert res.trained_stages == [] and (old / "metrics" / "metrics.json").read_bytes() == metrics
    upgraded, original = load_served_run(str(old)), load_served_run(str(run))
    assert upgraded.router == original.router and list(upgraded.experts) == list(original.experts)
    for k, t in list(enumerate(TASKS))[1:]:  # the stages that route (stage 0: one expert, no record needed)
        assert json.loads((old / f"tasks/{k}_{t}/router.json").read_text()) == \
            json.loads((run / f"tasks/{k}_{t}/router.json").read_text())


def test_mixed_expert_batch_answers_as_each_expert_alone(run, synthetic_small):
    """One generate over rows that use different experts gives each row its own expert's answer:
    checked against plain PEFT (each expert loaded alone, one question at a time) and against
    the stream runner's cached answers, on inputs where the experts disagree."""
    from _reference import assert_mixed_batch_matches_reference

    from mllmcl.data.prompts import eval_prompt
    from mllmcl.data.release import load_image
    from mllmcl.serving.ensemble import Ensemble

    served = load_served_run(str(run))
    engine = Ensemble(served).engine
    stream = _samples(synthetic_small)
    rows = [(s, task.name) for task in stream for s in task.test[:4]]
    rows = rows[::2] + rows[1::2]  # experts interleaved in the batch
    texts, images = [eval_prompt(s) for s, _ in rows], [load_image(s.image) for s, _ in rows]
    assert_mixed_batch_matches_reference(engine, served.model_path, served.experts, texts, images, 4)
    mixed = engine.generate(texts, images, [t for _, t in rows], [4] * len(rows))
    for task in TASKS:  # the stream runner's evaluation worker answered the same
        idx = [i for i, (_, t) in enumerate(rows) if t == task]
        k = TASKS.index(task)
        assert [mixed[i].text for i in idx] == [_oracle(run, k, task)[rows[i][0].uid] for i in idx]
    # per-row minimum lengths (``min_tokens``): rows with a minimum run on, the others answer as before
    floor = [6 if i % 2 else 0 for i in range(len(rows))]
    longer = engine.generate(texts, images, [t for _, t in rows], [6] * len(rows), floor)
    for i, (a, b) in enumerate(zip(mixed, longer)):
        if floor[i]:
            assert (b.completion_tokens, b.finish_reason) == (6, "length")
        else:
            assert b.text == a.text
    assert any(mixed[i].finish_reason == "stop" for i in range(len(rows)) if floor[i])  # else it changed nothing


@pytest.mark.s3
def test_evaluate_from_s3_matches_local(run, synthetic_small, s3_bucket):
    """The run's artifacts in S3 serve the same answers (batch evaluation, in-process backend)."""
    from mllmcl import storage
    from mllmcl.serving.evaluate import evaluate_run

    storage.upload_dir(str(run), f"{s3_bucket}/runs/served")
    data = str(Path(synthetic_small) / "Domain_data" / "Med")
    local = evaluate_run(str(run), data, backend="local", out=str(run.parent / "eval-local"))
    remote = evaluate_run(f"{s3_bucket}/runs/served", data, backend="local")
    assert remote.accuracy == local.accuracy and remote.experts_used == local.experts_used
    assert remote.out_dir.startswith(s3_bucket) and storage.exists(storage.join(remote.out_dir, "scores.json"))


# --------------------------------------------------------------------------- the service

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(run, ray_session):
    from ray import serve

    from mllmcl.serving.app import start

    port = _free_port()
    cfg = load_serve_config(None, [f"port={port}", f"app_name={APP}", "max_experts_per_replica=2",
                                   "batch_wait_timeout_s=0.05", *LIMITS, "limits.max_prompt_tokens=300"])
    start(str(run), cfg)
    yield f"http://127.0.0.1:{port}"
    serve.delete(APP)
    serve.shutdown()


def _post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def test_service_answers_like_the_stream_runner(run, service, synthetic_small):
    from mllmcl import storage
    from mllmcl.data.prompts import eval_prompt

    final = _final(run)
    samples = [s for task in _samples(synthetic_small) for s in task.test]
    bodies = [chat_request(eval_prompt(s), storage.read_bytes(s.image)) for s in samples]
    with ThreadPoolExecutor(12) as pool:  # concurrent: batches mix experts, and 3 experts share an LRU of 2
        replies = list(pool.map(lambda b: _post(service, b), bodies))
    for s, (status, out) in zip(samples, replies):
        assert status == 200, out
        want = final[s.uid]
        assert (out["model"], out["choices"][0]["message"]["content"]) == (want["expert"], want["prediction"]), s.uid
        assert out["mllmcl"]["routing"]["mode"] == "router"
        assert out["object"] == "chat.completion" and out["usage"]["prompt_tokens"] > 0


def test_pinned_experts_answer_like_each_expert(run, service, synthetic_small):
    from ray import serve

    from mllmcl import storage
    from mllmcl.data.prompts import eval_prompt

    samples = [s for task in _samples(synthetic_small) for s in task.test[:3]]
    jobs = [(s, k, task) for s in samples for k, task in enumerate(TASKS)]  # every expert on every sample
    bodies = [chat_request(eval_prompt(s), storage.read_bytes(s.image), model=task) for s, _, task in jobs]
    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda b: _post(service, b), bodies))
    for (s, k, task), (status, out) in zip(jobs, replies):
        assert status == 200 and out["model"] == task and out["mllmcl"]["routing"]["mode"] == "pinned"
        if s.task == task:  # the stream runner cached expert k's answers on its own task's test split
            assert out["choices"][0]["message"]["content"] == _oracle(run, k, task)[s.uid]
    stats = serve.get_deployment_handle("experts", APP).stats.remote().result()
    assert len(stats["loaded"]) <= 2 and stats["loads"] > len(TASKS), stats  # LRU evicted and reloaded
    assert stats["mixed_forwards"] > 0 and stats["rows"] > stats["batches"], stats  # one forward, several experts


def test_models_and_health(service):
    models = _get(f"{service}/v1/models")
    assert [m["id"] for m in models["data"]] == ["served", *TASKS]  # the routed ensemble (run id), then experts
    assert models["data"][0]["mllmcl"]["kind"] == "ensemble" and models["data"][0]["mllmcl"]["routed"]
    assert [m["mllmcl"]["letter"] for m in models["data"][1:]] == ["A", "B", "C"]
    health = _get(f"{service}/healthz")
    assert health["status"] == "ok" and health["routed"] and health["stage"] == len(TASKS) - 1


def test_stock_openai_client_gets_routed_pinned_and_streamed_answers(run, service, synthetic_small):
    """The ``openai`` package as users run it: the ensemble id from ``models.list()`` reaches the
    router (the same answers and experts as the stream runner), an expert id pins it, and
    ``stream=True`` yields the answer through the SDK's streaming iterator."""
    import base64

    from openai import OpenAI

    from mllmcl import storage
    from mllmcl.data.prompts import eval_prompt

    client = OpenAI(base_url=f"{service}/v1", api_key="unused", max_retries=0, timeout=120)
    ids = [m.id for m in client.models.list()]
    assert ids == ["served", *TASKS]
    final = _final(run)
    samples = [task.test[0] for task in _samples(synthetic_small)]

    def messages(s):
        url = "data:image/png;base64," + base64.b64encode(storage.read_bytes(s.image)).decode()
        return [{"role": "user", "content": [{"type": "text", "text": eval_prompt(s)},
                                             {"type": "image_url", "image_url": {"url": url}}]}]

    for s in samples:
        routed = client.chat.completions.create(model=ids[0], messages=messages(s))
        assert (routed.model, routed.choices[0].message.content) == (final[s.uid]["expert"], final[s.uid]["prediction"])
        assert routed.model_extra["mllmcl"]["routing"]["mode"] == "router"
        pinned = client.chat.completions.create(model=s.task, messages=messages(s))
        assert pinned.model == s.task and pinned.model_extra["mllmcl"]["routing"]["mode"] == "pinned"
        chunks = list(client.chat.completions.create(model=ids[0], messages=messages(s), stream=True,
                                                     stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == routed.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == routed.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == routed.usage.completion_tokens
    from openai import NotFoundError

    with pytest.raises(NotFoundError, match="routed ensemble"):
        client.chat.completions.create(model="nope", messages=messages(samples[0]))


def test_bad_requests_get_4xx_and_the_service_stays_up(service, synthetic_small):
    from mllmcl import storage

    sample = _samples(synthetic_small).tasks[0].test[0]
    good = chat_request(sample.question, storage.read_bytes(sample.image))
    for name, body, status, words in BAD_REQUESTS:
        got, out = _post(service, body)
        assert got == status and words in out["error"]["message"], (name, got, out)
    raw = urllib.request.Request(f"{service}/v1/chat/completions", data=b"\x00" * 200_000,
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:  # a body beyond every limit is refused unread
        urllib.request.urlopen(raw, timeout=60)
    assert e.value.code == 413
    status, out = _post(service, good)
    assert status == 200 and out["choices"][0]["message"]["content"] is not None
    status, out = _post(service, {**good, "max_tokens": 9, "ignore_eos": True})  # vLLM's fixed-length extension
    assert status == 200 and out["usage"]["completion_tokens"] == 9 and out["choices"][0]["finish_reason"] == "length"
    status, out = _post(service, {**good, "min_tokens": 300})  # above the expert's own budget: say so, not clamp
    assert status == 400 and "answer budget" in out["error"]["message"]


def test_the_service_routes_with_the_runs_own_router(run, service, synthetic_small):
    """The same experts re-routed by ``ridge`` and by the ``oracle`` (jobs/reroute.py's sibling runs),
    each deployed in place of the module's app: the ridge run's service answers as that run's
    stream did, question by question; the oracle's refuses a request that names no expert (it
    routes by the question's task, which a request does not carry) and answers a pinned one.
    It leaves the oracle's app deployed for the replica-kill test after it."""
    from mllmcl import storage
    from mllmcl.data.prompts import eval_prompt
    from mllmcl.runner.reroute import reroute
    from mllmcl.serving.app import start

    port = int(service.rsplit(":", 1)[1])
    cfg = load_serve_config(None, [f"port={port}", f"app_name={APP}", "batch_wait_timeout_s=0.05", *LIMITS,
                                   "limits.max_prompt_tokens=300"])
    samples = [s for task in _samples(synthetic_small) for s in task.test]
    bodies = [chat_request(eval_prompt(s), storage.read_bytes(s.image)) for s in samples]

    ridge = Path(reroute(str(run), "ridge").run_dir)
    start(str(ridge), cfg)
    assert _get(f"{service}/healthz")["run_id"] == ridge.name
    final = _final(ridge)
    mllm = _final(run)
    assert any(final[u]["expert"] != mllm[u]["expert"] for u in final), "ridge routes as mllm: nothing to tell apart"
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda b: _post(service, b), bodies))
    for s, (status, out) in zip(samples, replies):
        assert status == 200, out
        want = final[s.uid]
        assert (out["model"], out["choices"][0]["message"]["content"]) == (want["expert"], want["prediction"]), s.uid

    oracle = Path(reroute(str(run), "oracle").run_dir)
    start(str(oracle), cfg)
    assert _get(f"{service}/healthz")["run_id"] == oracle.name
    status, out = _post(service, bodies[0])
    assert status == 400 and "oracle" in out["error"]["message"] and out["error"]["param"] == "model", out
    status, out = _post(service, {**bodies[-1], "model": TASKS[-1]})
    # the pinned expert is the run's own (copied byte for byte): it answers as the source run's cache holds
    assert status == 200 and out["choices"][0]["message"]["content"] == _oracle(run, len(TASKS) - 1,
                                                                                TASKS[-1])[samples[-1].uid]


def test_a_killed_expert_replica_fails_requests_clearly_and_recovers(run, service, synthetic_small):
    """Chaos: the expert pool's one replica killed under a steady load of 6 clients. Requests it
    held fail with a 503 (never a hang: each answers within its timeout); Serve starts a new
    replica; once one request has succeeded again, none fails. Prints failed requests and the
    recovery time (the issue note quotes them). Runs on the app the test before it left (the
    oracle's re-routed run, whose experts answer pinned requests)."""
    import threading
    import time

    import ray
    from ray import serve

    from mllmcl import storage
    from mllmcl.data.prompts import eval_prompt

    sample = _samples(synthetic_small).tasks[0].test[0]
    body = chat_request(eval_prompt(sample), storage.read_bytes(sample.image), model=TASKS[0])
    results: list[tuple[float, float, int]] = []  # (sent, answered, status)
    stop = threading.Event()

    def client():
        while not stop.is_set():
            t0 = time.time()
            status, _ = _post(service, body)  # urllib's timeout (120 s) would show a hang as a failure
            results.append((t0, time.time(), status))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(3)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{APP}#experts#")]
    assert len(names) == 1, names
    killed = time.time()
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    deadline = killed + 120
    while time.time() < deadline and not any(t0 > killed and s == 200 for t0, _, s in results):
        time.sleep(0.2)
    recovered = min((t1 for t0, t1, s in results if t0 > killed and s == 200), default=None)
    time.sleep(3)  # the load goes on after recovery
    stop.set()
    for t in threads:
        t.join(timeout=150)
    assert recovered is not None, "no request succeeded within 120 s of the kill"
    failed = [(round(t1 - t0, 1), s) for t0, t1, s in results if s != 200]
    print(f"\nreplica killed under load: {len(results)} requests, {len(failed)} failed {failed}, recovery "
          f"{recovered - killed:.1f} s")
    assert all(s == 503 for _, s in failed), failed  # a clear 5xx, the retryable kind
    assert all(d < 120 for d, _ in failed)
    assert all(s == 200 for t0, _, s in results if t0 > recovered), "a request failed after recovery"
    new = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
           if a["name"].startswith(f"SERVE_REPLICA::{APP}#experts#")]
    assert new and new != names  # Serve replaced the replica
    assert serve.status().applications[APP].status == "RUNNING"


def test_keys_and_a_bounded_queue(run, service, synthetic_small, tmp_path):
    """The app redeployed with API keys (a file) and a one-request ingress queue: the stock
    ``openai`` client is refused without a key or with a wrong one (401) and served with the
    right one; a burst gets 503s with Retry-After, never a hang, and every other request its
    answer; no key reaches Ray's logs. Deployed in place of the module's app (the last test
    that uses it)."""
    import time

    import ray
    from openai import AuthenticationError, OpenAI

    from mllmcl import storage
    from mllmcl.data.prompts import eval_prompt
    from mllmcl.serving.app import start

    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    port = int(service.rsplit(":", 1)[1])
    cfg = load_serve_config(None, [f"port={port}", f"app_name={APP}", "batch_wait_timeout_s=0", *LIMITS,
                                   f"auth.keys_file={keys}", "auth.keys_env=", "ingress.max_ongoing_requests=1",
                                   "ingress.max_queued_requests=1", "retry_after_s=2"])
    start(str(run), cfg)
    sample = _samples(synthetic_small).tasks[0].test[0]
    body = chat_request(eval_prompt(sample), storage.read_bytes(sample.image), model=TASKS[0])
    for bad in (None, "wrong-key-0123456789abcdef"):
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {bad}"} if bad else {})}
        req = urllib.request.Request(f"{service}/v1/chat/completions", data=json.dumps(body).encode(), headers=headers)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert e.value.code == 401 and e.value.headers["WWW-Authenticate"] == "Bearer"
        assert json.loads(e.value.read())["error"]["code"] == "invalid_api_key"
    assert _get(f"{service}/healthz") == {"status": "ok"}  # open to probes, says nothing of the run
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{service}/v1", api_key="wrong-key-0123456789abcdef", max_retries=0).models.list()
    client = OpenAI(base_url=f"{service}/v1", api_key=KEY, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == ["served", *TASKS]

    def post(_):
        req = urllib.request.Request(f"{service}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        t0 = time.time()
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, None, time.time() - t0
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Retry-After"), time.time() - t0

    with ThreadPoolExecutor(24) as pool:
        burst = list(pool.map(post, range(24)))
    codes = [c for c, _, _ in burst]
    assert set(codes) <= {200, 503} and codes.count(200) >= 1 and codes.count(503) >= 1, codes
    assert all(r == "2" for c, r, _ in burst if c == 503), burst
    assert max(t for c, _, t in burst if c == 503) < 30, burst  # refused at once, not after a wait
    session = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    leaked = [p.name for p in session.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert not leaked, leaked


def test_evaluate_job_reproduces_the_stream_score(run, synthetic_small, ray_session, capsys):
    """jobs/evaluate.py through Ray Data: same predictions, experts and score as the stream runner."""
    import importlib.util

    final = json.loads((run / "metrics" / "metrics.json").read_text())["final"]
    spec = importlib.util.spec_from_file_location("evaluate_job", Path(__file__).parents[1] / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = run.parent / "eval-ray"
    data = Path(synthetic_small) / "Domain_data" / "AD"
    assert job.main(["--run", str(run), "--data", str(data), "--out", str(out), "--batch-size", "4"]) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert scores["accuracy"] == final["AD"] and scores["n"] == 6
    stream_rows = read_predictions(str(run / "eval" / f"stage_{len(TASKS) - 1}" / "AD.parquet"))
    rows = read_predictions(str(out / "AD.parquet"))
    key = lambda r: (r.question_id, r.prediction, r.expert, r.score)  # noqa: E731
    assert sorted(map(key, rows)) == sorted(map(key, stream_rows))
    # bad input: a clear error and exit code 2, nothing written
    assert job.main(["--run", str(run), "--data", str(data.parent / "Nope")]) == 2
    assert "no test.json" in capsys.readouterr().err


def test_cluster_serve_config_builds_the_app(run):
    """cluster/serve.yaml parses, names the app builder, and its overrides are valid settings;
    the builder makes the application of a run (without deploying it)."""
    import importlib

    import yaml
    from ray.serve import Application

    doc = yaml.safe_load((Path(__file__).parents[1] / "cluster" / "serve.yaml").read_text())
    app = doc["applications"][0]
    module, _, name = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    cfg = load_serve_config(None, app["args"]["overrides"])
    assert cfg.experts.max_replicas >= cfg.experts.min_replicas >= 1 and doc["http_options"]["port"] == 8000
    assert isinstance(builder({"run": str(run), "overrides": app["args"]["overrides"]}), Application)
    with pytest.raises(ConfigError):
        builder({"run": str(run), "overrides": ["experts.num_gpus=-1"]})
