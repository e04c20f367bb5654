"""Backbones: tiny preset build + cache, loading by path, LoRA placement, batching, generation."""

import hashlib
import os
import time

import pytest
import torch

from mllmcl.errors import ModelLoadError
from mllmcl.models import LoraSettings, attach_lora, load_backbone
from mllmcl.models.batching import IGNORE_INDEX


def _weights_digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_tiny_base_is_a_normal_hf_folder(small_tiny_path):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "meta.json"):
        assert (small_tiny_path / name).exists(), name
    bb = load_backbone(str(small_tiny_path))
    assert type(bb.model).__name__ == "LlavaForConditionalGeneration"
    assert bb.meta["preset"] == "tiny-llava" and bb.meta["parameters"] > 100_000
    assert bb.family.name == "llava-1.5" and bb.collator.images.n_tokens == 16


def test_tiny_build_is_deterministic_and_cached(small_tiny_spec, small_tiny_path, tmp_path, monkeypatch):
    from mllmcl.models.tiny import build_tiny_base

    monkeypatch.setenv("MLLMCL_CACHE", str(tmp_path))
    other = build_tiny_base(small_tiny_spec, progress=False)
    assert other != small_tiny_path
    assert _weights_digest(other) == _weights_digest(small_tiny_path)
    t0 = time.time()
    assert build_tiny_base(small_tiny_spec, progress=False) == other  # second call: cache hit
    assert time.time() - t0 < 1.0


def test_hub_ids_fail_fast_offline():
    t0 = time.time()
    with pytest.raises(ModelLoadError, match="hub ids are not downloaded"):
        load_backbone("llava-hf/llava-1.5-7b-hf")
    assert time.time() - t0 < 5


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_backbone(str(tmp_path))


def test_lora_wraps_only_the_language_model(small_tiny_path):
    bb = load_backbone(str(small_tiny_path))
    model = attach_lora(bb.model, LoraSettings(rank=4, alpha=8, dropout=0.0))
    wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A"))]
    assert wrapped, "no LoRA layers"
    assert all(".language_model." in n for n in wrapped)
    assert not any(k in n for n in wrapped for k in ("vision_tower", "multi_modal_projector", "lm_head"))
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    cfg = model.peft_config["default"]
    assert cfg.r == 4 and cfg.lora_alpha == 8


def test_train_batch_masks_the_prompt(small_tiny_path):
    bb = load_backbone(str(small_tiny_path))
    col = bb.collator
    from mllmcl.models.vision import Pixels

    pix = Pixels({"pixel_values": torch.zeros(2, 3, 32, 32)}, [16, 16])
    batch = col.train_batch(["Is there water?", "What colour is it? Answer briefly."], ["yes", "dark green"], pix)
    for i, ans in enumerate(["yes", "dark green"]):
        lab = batch["labels"][i]
        kept = lab[lab != IGNORE_INDEX].tolist()
        assert col.tok.decode(kept, skip_special_tokens=True).strip() == ans
        assert kept[-1] == col.tok.eos_token_id
        # exactly the image's tokens of image placeholders per row
        assert int((batch["input_ids"][i] == col.tok.convert_tokens_to_ids("<image>")).sum()) == 16
    loss = bb.model(**batch).loss
    assert torch.isfinite(loss)


def test_pixel_cache_is_bounded_in_bytes(small_tiny_path):
    from PIL import Image

    from mllmcl.models.batching import PixelCache

    col = load_backbone(str(small_tiny_path)).collator
    loads = []

    def load(uri):
        loads.append(uri)
        return Image.new("RGB", (40, 40), (int(uri), 0, 0))

    one = 3 * 32 * 32 * 4  # one preprocessed 32 px image, float32
    cache = PixelCache(col.images, load, max_bytes=2 * one + one // 2)
    pix = cache.get(["1", "2", "3"])
    assert len(pix) == 3 and pix.tensors["pixel_values"].shape == (3, 3, 32, 32)
    assert cache.nbytes == 2 * one and loads == ["1", "2", "3"]  # the oldest went
    cache.get(["3", "2"])
    cache.get(["1"])  # evicted earlier: loaded again, and "3" (least recent) goes
    assert loads == ["1", "2", "3", "1"]
    cache.get(["2"])
    assert loads[-1] == "1" and cache.nbytes == 2 * one


def test_generation_on_a_task_split(small_tiny_path, synthetic_small):
    from mllmcl.data import load_task
    from mllmcl.engine import Engine, evaluate_task

    bb = load_backbone(str(small_tiny_path))
    task = load_task(str(synthetic_small), "dcl", "Fin")
    ev = evaluate_task(Engine.from_model(bb.model, bb.collator), task.spec, task.test, batch_size=4,
                       max_new_tokens=4)
    assert len(ev.rows) == len(task.test) and 0.0 <= ev.accuracy <= 100.0
    assert all(r.prompt.endswith(("directly.", "directly")) for r in ev.rows)  # Fin instruction appended


@pytest.mark.s3
def test_load_checkpoint_from_s3(small_tiny_path, s3_bucket, tmp_path, monkeypatch):
    from mllmcl import storage

    monkeypatch.setenv("MLLMCL_CACHE", str(tmp_path / "cache"))
    uri = f"{s3_bucket}/models/tiny"
    storage.upload_dir(str(small_tiny_path), uri)
    bb = load_backbone(uri)
    local = load_backbone(str(small_tiny_path))
    for (n1, p1), (n2, p2) in zip(bb.model.state_dict().items(), local.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    staged = os.listdir(tmp_path / "cache" / "checkpoints")
    assert len(staged) == 1  # downloaded once into the node cache
    load_backbone(uri)
    assert os.listdir(tmp_path / "cache" / "checkpoints") == staged
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_backbone(f"{s3_bucket}/models/missing")
