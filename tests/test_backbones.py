"""A second backbone family (Qwen2-VL): a tiny random checkpoint of the real architecture,
written to a folder and to S3 by the test, loads through the same code as LLaVA, batches
images of different sizes (variable image-token counts), trains experts with their own
projector copy, and serves mixed-expert batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _reference import assert_mixed_batch_matches_reference

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def build_tiny_qwen_vl(dest: Path, arch: str = "qwen2_vl", seed: int = 0) -> Path:
    """A randomly initialised Qwen2-VL or Qwen2.5-VL (2 text layers of width 64, 2 vision
    blocks, 4-px patches, 2x2 merge) with a byte-level BPE tokenizer trained here, saved as
    a Hugging Face folder laid out like Qwen/Qwen2(.5)-VL-*-Instruct."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil)

    from mllmcl.models.tiny import tokenizer_corpus

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(tokenizer_corpus(seed), trainers.BpeTrainer(
        vocab_size=1024, special_tokens=QWEN_SPECIALS, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  model_max_length=1024)
    images = Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2,
                                      size={"shortest_edge": 16 * 16, "longest_edge": 48 * 48})
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    if arch == "qwen2_vl":
        config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2)
    else:  # Qwen2.5-VL: windowed attention in the vision tower (one 16-px window block, one full block)
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
    cfg = config_cls(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = model_cls(cfg)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(dest)
    # the tokenizer and image processor files, as in the released checkpoints (building
    # transformers' Qwen2VLProcessor needs torchvision for its video processor)
    tok.save_pretrained(dest)
    images.save_pretrained(dest)
    conf = json.loads((dest / "preprocessor_config.json").read_text())
    conf.update(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2VLProcessor")
    (dest / "preprocessor_config.json").write_text(json.dumps(conf, indent=2))
    return dest


@pytest.fixture(scope="module")
def qwen_paths(tmp_path_factory):
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_qwen_vl(tmp_path_factory.mktemp(f"tiny-{arch}") / "ckpt", arch)
        return built[arch]
    return get


@pytest.fixture(scope="module")
def qwen_path(qwen_paths) -> Path:
    return qwen_paths("qwen2_vl")


def _images():
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    out = []
    for w, h in ((32, 32), (48, 24), (24, 40)):  # different sizes: different image-token counts
        arr = (torch.rand(h, w, 3, generator=rng) * 255).to(torch.uint8).numpy()
        out.append(Image.fromarray(arr))
    return out


@pytest.mark.s3
def test_loads_from_a_folder_and_from_s3(qwen_path, s3_bucket):
    from mllmcl import storage
    from mllmcl.models import load_backbone

    local = load_backbone(str(qwen_path))
    assert local.family.name == "qwen2-vl" and type(local.model).__name__ == "Qwen2VLForConditionalGeneration"
    uri = f"{s3_bucket}/qwen2-vl-tiny"
    storage.upload_dir(str(qwen_path), uri)
    remote = load_backbone(uri)
    assert remote.local_path != local.local_path and remote.family == local.family
    for (k, a), b in zip(local.model.state_dict().items(), remote.model.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(Exception, match="no config.json"):
        load_backbone(f"{s3_bucket}/nothing-here")


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_prompts_carry_each_images_tokens_and_variable_sized_images_batch(qwen_paths, arch):
    """Each image's block has as many tokens as its patch grid (4-px patches, 2x2 merge);
    a left-padded batch of images of different
    sizes answers like each row alone (mrope positions under padding)."""
    from mllmcl.models import load_backbone

    bb = load_backbone(str(qwen_paths(arch)))
    assert bb.family.name == "qwen2-vl" and bb.model.config.model_type == arch
    col = bb.collator
    images = _images()
    pixels = col.images.pixels(images)
    # (w x h) 32x32 -> 8x8 patches; 48x24 -> 6x12; 24x40 -> 10x6; tokens = patches / 4
    assert pixels.tokens == [16, 18, 15] and pixels.tensors["image_grid_thw"].tolist() == [[1, 8, 8], [1, 6, 12],
                                                                                          [1, 10, 6]]
    assert pixels.tokens == [col.images.tokens_for_size(*im.size) for im in images]  # the service's count
    questions = ["What is in the image?", "How many circles are there?", "Is it red?"]
    batch = col.prompt_batch(questions, pixels)
    tok = bb.processor.tokenizer
    start, pad, end = (tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"))
    for i, q in enumerate(questions):
        row = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        assert tok.decode(row).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                          "<|im_start|>user\n<|vision_start|>")
        assert tok.decode(row).endswith(f"<|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n")
        k = row.index(start)
        assert row[k + 1:k + 1 + pixels.tokens[i]] == [pad] * pixels.tokens[i] and row[k + 1 + pixels.tokens[i]] == end
    with torch.no_grad():
        together = bb.model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)[:, -5:]
        for i in range(3):
            alone = col.prompt_batch([questions[i]], col.images.pixels([images[i]]))
            assert bb.model.generate(**alone, max_new_tokens=5, min_new_tokens=5,
                                     do_sample=False)[0, -5:].tolist() == together[i].tolist()
    answers = ["A", "3", "yes"]
    train = col.train_batch(questions, answers, pixels)
    assert torch.isfinite(bb.model(**train).loss)
    for lab, a in zip(train["labels"], answers):  # the loss is on the answer and the end of the turn only
        assert tok.decode(lab[lab != -100]) == f"{a}<|im_end|>"
    # sequences run to the model's context (1024 here), not to a fixed cap
    assert col.max_length == bb.context == 1024
    per_word = len(tok("describe " * 100)["input_ids"]) / 100
    long = col.train_batch(["describe " * int(700 / per_word)], ["A"], col.images.pixels(images[:1]))
    assert 512 < long["input_ids"].shape[1] <= 1024
    with pytest.raises(ValueError, match="exceeds max_length=1024"):
        col.train_batch(["describe " * int(1100 / per_word)], ["A"], col.images.pixels(images[:1]))


def test_an_mr_lora_stream_on_qwen2_vl_trains_and_serves(qwen_path, synthetic_small, tmp_path):
    """MR-LoRA on the Qwen2-VL checkpoint (experts with their own merger copy, router); the
    service counts each image's own prompt tokens, and a mixed-expert batch of experts with
    projector copies is split per expert (PEFT cannot route the merger's patch rows)."""
    from peft.utils import load_peft_weights

    from mllmcl.config import load_config
    from mllmcl.data.prompts import eval_prompt
    from mllmcl.data.release import load_image
    from mllmcl.data.source import load_configured_stream
    from mllmcl.serving import load_serve_config, load_served_run
    from mllmcl.serving.app import _TokenCounter
    from mllmcl.serving.ensemble import Ensemble
    from mllmcl import run_stream

    cfg = load_config(None, [f"model.path={qwen_path}", f"data.root={synthetic_small}", "data.tasks=[RS,Med]",
                             "method.name=mr_lora", "lora.train_projector=true", "train.max_steps=3",
                             "train.batch_size=4", "eval.max_new_tokens=3", "method.router_epochs=1",
                             "method.router_samples_per_task=4", "method.router_batch_size=4",
                             "scaling.backend=local", "run.progress=false", "lora.dropout=0",
                             f"storage.root={tmp_path}"])
    result = run_stream(cfg, "qwen-mr")
    assert len(result.matrix.rows) == 2
    run = Path(result.run_dir)
    for k, task in enumerate(["RS", "Med"]):  # each expert stores its own copy of the merger (the projector)
        w = load_peft_weights(str(run / "tasks" / f"{k}_{task}" / "expert"))
        assert any("visual.merger.mlp.0" in n for n in w) and any("visual.merger.mlp.2" in n for n in w), task
        assert any("language_model" in n and "lora_A" in n for n in w) and not any("visual.blocks" in n for n in w)
    router = load_peft_weights(str(run / "tasks" / "1_Med" / "router"))
    assert not any("visual.merger" in n for n in router)

    engine = Ensemble(load_served_run(str(run))).engine
    stream = load_configured_stream(cfg.data, progress=False)
    rows = [(s, t.name) for t in stream for s in t.test[:3]]
    rows = rows[::2] + rows[1::2]
    texts, images = [eval_prompt(s) for s, _ in rows], [load_image(s.image) for s, _ in rows]
    # the service's prompt-length check counts each image's own tokens, without the model
    counter = _TokenCounter(load_served_run(str(run)), load_serve_config(None, []))
    for text, image in zip(texts[:3], images[:3]):
        n = engine.collator.prompt_batch([text], engine.pixels([image]))["input_ids"].shape[1]
        assert counter.count(text, image.size) == n
    served = load_served_run(str(run))
    experts = [t for _, t in rows]
    assert not engine.one_forward(experts)  # the merger sees all patches at once: one generate per expert
    assert_mixed_batch_matches_reference(engine, str(qwen_path), served.experts, texts, images, 3, 3)




def test_mixed_expert_batch_runs_in_one_forward_on_qwen2_vl(qwen_path, tmp_path):
    """Language-model LoRA experts (no projector copy) of different rows share one generate."""
    from peft import get_peft_model

    from mllmcl.models import load_backbone
    from mllmcl.models.adapters import save_adapter
    from mllmcl.models.lora import LoraSettings
    from mllmcl.engine import Engine
    from mllmcl.models.lora import peft_config

    for k in range(2):  # two random experts (PEFT's B starts at zero; random init makes them differ)
        model = load_backbone(str(qwen_path)).model
        config = peft_config(LoraSettings(rank=4, dropout=0.0))
        config.init_lora_weights = False
        torch.manual_seed(k)
        save_adapter(get_peft_model(model, config), str(tmp_path / f"e{k}"), {"task": f"e{k}"})
    engine = Engine(str(qwen_path))
    for k in range(2):
        engine.load(str(tmp_path / f"e{k}"), name=f"e{k}")
    images = _images() * 2
    texts = ["What is it?", "Count the circles.", "Which color?"] * 2
    adapters = ["e0", "e1", None, "e1", "e0", "e1"]
    assert engine.one_forward(adapters)
    assert_mixed_batch_matches_reference(engine, str(qwen_path), {"e0": str(tmp_path / "e0"),
                                                                  "e1": str(tmp_path / "e1"), None: None},
                                         texts, images, 3, 3)
    answers = engine.generate(texts, images, adapters, [3] * 6, [3] * 6)
    assert len({a.text for a in answers}) > 1
