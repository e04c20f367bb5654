"""The calibration promise, on the default settings: a task's own LoRA expert learns it
(>= 85%), the zero-shot base does not, and one LoRA trained on the next task forgets it.

The work runs in a fresh Python process (which inherits the session's isolated caches, so the
default base it uses is the session's), in the background from the session's start, after the
default base's build, on the cores the other tests leave idle (conftest's ``IdleQueue``): the
test waits for its result. In the foreground it took 72-84 s of a ~28-minute suite on 2 cores.
"""

import json
import sys
import textwrap

import pytest


SCRIPT = textwrap.dedent("""
    import copy, json

    from mllmcl.config import load_config
    from mllmcl.data.release import load_image
    from mllmcl.data.source import load_configured_stream
    from mllmcl.engine import Engine, evaluate_task
    from mllmcl.models import attach_lora, load_backbone
    from mllmcl.models.batching import PixelCache
    from mllmcl.training import fit

    cfg = load_config(None, ["data.tasks=[RS, Med]", "run.progress=false"])
    stream = load_configured_stream(cfg.data, progress=False)
    bb = load_backbone(cfg.model.path)
    rs, med = stream.tasks
    pixels = PixelCache(bb.collator.images, load_image)
    ev = lambda m, task: evaluate_task(Engine.from_model(m, bb.collator, pixels), task.spec, task.test,
                                       max_new_tokens=8).accuracy

    zero_shot = ev(bb.model, rs)
    model = attach_lora(copy.deepcopy(bb.model), cfg.lora.settings())
    losses = fit(model, bb.collator, pixels, rs.train, cfg.train.settings(cfg.run.seed))
    expert = ev(model, rs)
    fit(model, bb.collator, pixels, med.train, cfg.train.settings(cfg.run.seed))
    after_med = ev(model, rs)
    print("RESULT " + json.dumps({"zero_shot": zero_shot, "expert": expert, "after_med": after_med,
                                  "loss_first": losses[0], "loss_last": losses[-1]}))
""")


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("default_assets"),
              pytest.mark.background([sys.executable, "-c", SCRIPT])]


def test_expert_learns_and_sequential_lora_forgets(background_result):
    out = background_result
    assert out.returncode == 0, out.stderr[-4000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, out.stdout[-2000:] + out.stderr[-2000:]
    r = json.loads(line[-1][len("RESULT "):])

    assert r["loss_last"] < r["loss_first"] / 5
    assert r["zero_shot"] < 42.0, "zero-shot base should stay at or below chance on RS"
    assert r["expert"] >= 85.0
    assert r["after_med"] <= r["expert"] - 30.0, "one LoRA trained on Med next should forget RS"
