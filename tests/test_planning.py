"""The planner (jobs/plan.py, mllmcl.planning): model shapes against the published parameter
counts, the memory model on numbers worked by hand, plans of the paper's presets on 8 and 40
GPUs through the stream's own scheduler, a refusal with the numbers, and activation
checkpointing (train.gradient_checkpointing) training the same adapter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mllmcl.config import load_config
from mllmcl.planning import ClusterSpec, model_shape, plan_run
from mllmcl.planning.costs import GIB, FitShape, fit_memory, train_flops_per_sample
from mllmcl.planning.shapes import KNOWN, ModelShape

REPO = Path(__file__).resolve().parents[1]
MR_7B = str(REPO / "jobs" / "configs" / "dcl" / "mr_lora_llava15_7b.yaml")
FT_7B = str(REPO / "jobs" / "configs" / "dcl" / "lora_ft_llava15_7b.yaml")
WIDE = ["scaling.gpus_per_worker=1", "scaling.eval_gpus=1", "scaling.eval_replicas=8"]


def test_shapes_match_the_published_parameter_counts():
    llava = ModelShape.from_config(KNOWN["llava-1.5-7b"])
    assert abs(llava.params - 7.06e9) / 7.06e9 < 0.01 and llava.image_tokens == 576
    qwen = ModelShape.from_config(KNOWN["qwen2-vl-7b"])
    assert abs(qwen.params - 8.29e9) / 8.29e9 < 0.02 and qwen.image_tokens == 256
    internvl = ModelShape.from_config(KNOWN["internvl3-8b"])  # one 448-px tile: 1024 patches, pixel shuffle 0.5
    assert abs(internvl.params - 7.94e9) / 7.94e9 < 0.01 and internvl.image_tokens == 256
    assert internvl.vision_tokens == 1025 and internvl.projector_in == 4096
    assert model_shape("/models/InternVL3-8B-hf").name == "internvl3-8b"
    assert model_shape("/models/llava-1.5-7b-hf").name == "llava-1.5-7b"  # a cluster path, by its name
    assert llava.lora_params(32, ("q_proj",)) == 32 * 32 * (4096 + 4096)


def test_memory_model_on_numbers_worked_by_hand():
    shape = ModelShape("toy", layers=2, hidden=8, intermediate=16, heads=2, kv_heads=2, vocab=10, tied=False,
                       vision_layers=1, vision_hidden=4, vision_intermediate=8, vision_tokens=5, image_tokens=4,
                       projector_in=4)
    fit = FitShape(rank=1, targets=("q_proj",), train_projector=False, micro_batch=2, seq_len=3, workers=1,
                   dtype="float32", compute="float32", gpu=True)
    m = fit_memory(shape, fit, checkpointing=False)
    assert m.weights == shape.params * 4
    assert m.trainable == 2 * (8 + 8) * 16  # 2 layers x rank 1 x (in + out), 16 bytes each
    assert m.activations == 2 * 34 * 6 * 8 * 4 / 2  # layers x 34 x tokens x hidden x (4 bytes / 2)
    assert m.logits == 6 * 10 * (4 + 8) and m.runtime == 1.5 * GIB
    ckpt = fit_memory(shape, fit, checkpointing=True)
    assert ckpt.activations == 2 * 6 * 8 * 4 + 34 * 6 * 8 * 4 / 2  # every layer's input + one layer live
    assert train_flops_per_sample(shape, 3, True) > train_flops_per_sample(shape, 3, False)


def test_mr_lora_on_40_gpus_is_planned_at_a_fraction_of_8():
    a100 = lambda nodes: ClusterSpec.parse(nodes, 8, "A100-40GB")  # noqa: E731
    eight = plan_run(load_config(MR_7B, []), a100(1))
    forty = plan_run(load_config(MR_7B, WIDE), a100(5))
    assert eight.schedules["sequential"].max_fits_at_once == 1 and forty.schedules["concurrent"].max_fits_at_once > 1
    assert forty.schedules["concurrent"].wall_s <= 0.35 * eight.schedules["sequential"].wall_s
    assert [f.kind for f in eight.fits].count("router") == 4 and not eight.problems(False)
    ft = plan_run(load_config(FT_7B, []), a100(1))
    gain = ft.schedules["concurrent"].wall_s / ft.schedules["sequential"].wall_s
    assert 0.5 < gain < 1.0  # only the evaluation of stage k beside the fit of stage k + 1
    assert ft.schedules["concurrent"].gpu_hours_busy == pytest.approx(ft.schedules["sequential"].gpu_hours_busy)


def _plan(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "plan.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_plan_cli_refuses_what_does_not_fit_with_the_numbers():
    # (the README tier runs the two plans that fit, verbatim: test_readme.py::test_the_planner_commands)
    small = _plan("--config", MR_7B, "--gpu", "A10G")
    assert small.returncode == 2
    assert "does not fit" in small.stderr and "GiB per GPU > 24 GiB (A10G)" in small.stderr
    assert "weights 13.2" in small.stderr  # the numbers, not only the verdict
    bad = _plan("--config", MR_7B, "--gpu", "B300", "--nodes", "0")
    assert bad.returncode == 2 and "--gpu 'B300'" in bad.stderr and "--nodes 0" in bad.stderr


def test_gradient_checkpointing_trains_the_same_adapter(tmp_path, stream_overrides):
    from peft.utils import load_peft_weights

    from mllmcl import run_stream

    runs = {}
    for gc in ("false", "true"):
        cfg = load_config(None, [*stream_overrides, f"storage.root={tmp_path}", "scaling.backend=local",
                                 "method.name=lora_ft", "data.tasks=[RS]", f"train.gradient_checkpointing={gc}"])
        runs[gc] = run_stream(cfg, f"gc-{gc}")
    w = {gc: load_peft_weights(str(Path(r.run_dir) / "tasks" / "0_RS" / "expert")) for gc, r in runs.items()}
    assert max(float((w["false"][k] - w["true"][k]).abs().max()) for k in w["false"]) < 1e-6
    assert runs["false"].matrix.rows == runs["true"].matrix.rows
