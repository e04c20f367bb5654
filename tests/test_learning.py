"""The calibration promise, on the default settings: a task's own LoRA expert learns it
(>= 85%), the zero-shot base does not, and one LoRA trained on the next task forgets it."""

import copy

import pytest

from mllmcl.config import load_config
from mllmcl.data.source import load_configured_stream
from mllmcl.data.release import load_image
from mllmcl.engine import Engine, evaluate_task
from mllmcl.models.batching import PixelCache
from mllmcl.models import attach_lora, load_backbone
from mllmcl.training import fit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_setup():
    cfg = load_config(None, ["data.tasks=[RS, Med]", "run.progress=false"])
    stream = load_configured_stream(cfg.data, progress=False)
    backbone = load_backbone(cfg.model.path)
    return cfg, stream, backbone


def test_expert_learns_and_sequential_lora_forgets(default_setup):
    cfg, stream, bb = default_setup
    rs, med = stream.tasks
    pixels = PixelCache(bb.collator.images, load_image)
    ev = lambda m, task: evaluate_task(Engine.from_model(m, bb.collator, pixels), task.spec, task.test,
                                       max_new_tokens=8).accuracy

    zero_shot = ev(bb.model, rs)
    model = attach_lora(copy.deepcopy(bb.model), cfg.lora.settings())
    losses = fit(model, bb.collator, pixels, rs.train, cfg.train.settings(cfg.run.seed))
    assert losses[-1] < losses[0] / 5
    expert = ev(model, rs)
    fit(model, bb.collator, pixels, med.train, cfg.train.settings(cfg.run.seed))
    after_med = ev(model, rs)

    assert zero_shot < 42.0, "zero-shot base should stay at or below chance on RS"
    assert expert >= 85.0
    assert after_med <= expert - 30.0, "one LoRA trained on Med next should forget RS"
