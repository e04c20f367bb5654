"""Backbone families beyond LLaVA (Qwen2-VL, InternVL): a tiny random checkpoint of each real
architecture, written to a folder and to S3 by the test, loads through the same code as LLaVA,
batches images of different sizes (variable image-token counts: Qwen2-VL's patch grids,
InternVL's tiles), trains experts with their own projector copy, and serves mixed-expert
batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _reference import assert_mixed_batch_matches_reference

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
# InternVL-hf's tokenizer: Qwen2.5-VL's plus InternVL's image tokens, named as the processor reads them
# (transformers' convert_internvl_weights_to_hf.py: extra_special_tokens)
INTERNVL_NAMED = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                  "video_token": "<video>"}
INTERNVL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *INTERNVL_NAMED.values()]
# the chat template transformers' conversion writes into InternVL3-*-hf (processor and tokenizer)
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}")


def _tokenizer(specials: list[str], seed: int = 0, **named):
    """A byte-level BPE tokenizer trained here (ChatML specials, as the Qwen2 tokenizers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mllmcl.models.tiny import tokenizer_corpus

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(tokenizer_corpus(seed), trainers.BpeTrainer(
        vocab_size=1024, special_tokens=specials, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=1024, **({"extra_special_tokens": named} if named else {}))


def _retype_image_processor(dest: Path, image_processor_type: str, processor_class: str) -> None:
    """The names the released checkpoints' preprocessor_config.json carries."""
    conf = json.loads((dest / "preprocessor_config.json").read_text())
    conf.update(image_processor_type=image_processor_type, processor_class=processor_class)
    (dest / "preprocessor_config.json").write_text(json.dumps(conf, indent=2))


def build_tiny_qwen_vl(dest: Path, arch: str = "qwen2_vl", seed: int = 0) -> Path:
    """A randomly initialised Qwen2-VL or Qwen2.5-VL (2 text layers of width 64, 2 vision
    blocks, 4-px patches, 2x2 merge) with a byte-level BPE tokenizer trained here, saved as
    a Hugging Face folder laid out like Qwen/Qwen2(.5)-VL-*-Instruct."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil)

    tok = _tokenizer(QWEN_SPECIALS, seed)
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
    _retype_image_processor(dest, "Qwen2VLImageProcessor", "Qwen2VLProcessor")
    return dest


INTERNVL_TILE = 16  # px per tile (InternVL3: 448)
INTERNVL_PER_TILE = 4  # tokens per tile: (16 / 4-px patches)^2 = 16 patches, pixel shuffle 0.5 -> 4 (InternVL3: 256)


def build_tiny_internvl(dest: Path, seed: int = 0) -> Path:
    """A randomly initialised InternVL (InternVLForConditionalGeneration: a 2-layer InternViT of width
    32 on 16-px tiles of 4-px patches, pixel shuffle 0.5, the LayerNorm + 2-linear projector, a 2-layer
    Qwen2 of width 64) with a byte-level BPE tokenizer trained here, saved as a Hugging Face folder
    laid out like OpenGVLab/InternVL3-*-hf: tokenizer with the named image tokens and the chat
    template, GotOcr2 image processor (up to 4 tiles + thumbnail), processor_config.json's
    image_seq_length (building InternVLProcessor needs torchvision for its video processor)."""
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration

    tok = _tokenizer(INTERNVL_SPECIALS, seed, **INTERNVL_NAMED)
    tok.chat_template = INTERNVL_CHAT_TEMPLATE
    images = GotOcr2ImageProcessorPil(size={"height": INTERNVL_TILE, "width": INTERNVL_TILE}, min_patches=1,
                                      max_patches=4, image_mean=[0.485, 0.456, 0.406],
                                      image_std=[0.229, 0.224, 0.225])  # crop_to_patches False, as released
    ids = {t: tok.convert_tokens_to_ids(t) for t in INTERNVL_SPECIALS}
    cfg = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=INTERNVL_TILE, patch_size=4),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=False,
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        image_token_id=ids["<IMG_CONTEXT>"], image_seq_length=INTERNVL_PER_TILE, downsample_ratio=0.5,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    images.save_pretrained(dest)
    _retype_image_processor(dest, "GotOcr2ImageProcessorFast", "InternVLProcessor")
    (dest / "processor_config.json").write_text(json.dumps(
        {"image_seq_length": INTERNVL_PER_TILE, "processor_class": "InternVLProcessor"}, indent=2))
    (dest / "chat_template.jinja").write_text(INTERNVL_CHAT_TEMPLATE)
    return dest


@pytest.fixture(scope="session")
def backbone_paths(tmp_path_factory):
    """The tiny checkpoints by architecture, each built once per session when first asked for."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            dest = tmp_path_factory.mktemp(f"tiny-{arch}") / "ckpt"
            built[arch] = build_tiny_internvl(dest) if arch == "internvl" else build_tiny_qwen_vl(dest, arch)
        return built[arch]
    return get


@pytest.fixture(scope="session")
def internvl_path(backbone_paths) -> Path:
    return backbone_paths("internvl")


def _images():
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    out = []
    for w, h in ((32, 32), (48, 24), (24, 40)):  # different sizes: different image-token counts
        arr = (torch.rand(h, w, 3, generator=rng) * 255).to(torch.uint8).numpy()
        out.append(Image.fromarray(arr))
    return out


@pytest.mark.s3
@pytest.mark.parametrize("arch,family,cls", [("qwen2_vl", "qwen2-vl", "Qwen2VLForConditionalGeneration"),
                                             ("internvl", "internvl", "InternVLForConditionalGeneration")])
def test_loads_from_a_folder_and_from_s3(backbone_paths, s3_bucket, arch, family, cls):
    from mllmcl import storage
    from mllmcl.models import load_backbone

    path = backbone_paths(arch)
    local = load_backbone(str(path))
    assert local.family.name == family and type(local.model).__name__ == cls
    uri = f"{s3_bucket}/{arch}-tiny"
    storage.upload_dir(str(path), uri)
    remote = load_backbone(uri)
    assert remote.local_path != local.local_path and remote.family == local.family
    for (k, a), b in zip(local.model.state_dict().items(), remote.model.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(Exception, match="no config.json"):
        load_backbone(f"{s3_bucket}/nothing-here")


def test_internvls_remote_code_format_is_refused_with_the_format_to_use(tmp_path):
    """OpenGVLab's own InternVL folders (model_type internvl_chat, remote code) are refused from
    config.json, before transformers would ask to run their code."""
    from mllmcl.errors import ModelLoadError
    from mllmcl.models import load_backbone

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl_chat", "auto_map": {
        "AutoConfig": "configuration_internvl_chat.InternVLChatConfig"}}))
    with pytest.raises(ModelLoadError, match="remote-code format: use the transformers-format checkpoint"):
        load_backbone(str(tmp_path))


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_prompts_carry_each_images_tokens_and_variable_sized_images_batch(backbone_paths, arch):
    """Each image's block has as many tokens as its patch grid (4-px patches, 2x2 merge);
    a left-padded batch of images of different
    sizes answers like each row alone (mrope positions under padding)."""
    from mllmcl.models import load_backbone

    bb = load_backbone(str(backbone_paths(arch)))
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


def _tiled_images():
    """Images of 1, 3, 4 and 5 InternVL tiles (16-px tiles, at most 4 + a thumbnail)."""
    from PIL import Image

    rng = torch.Generator().manual_seed(1)
    out = []
    for w, h in ((16, 16), (32, 16), (16, 48), (40, 40)):
        arr = (torch.rand(h, w, 3, generator=rng) * 255).to(torch.uint8).numpy()
        out.append(Image.fromarray(arr))
    return out


def test_internvl_prompts_carry_each_images_tiles_and_images_of_different_tile_counts_batch(internvl_path, tmp_path):
    """Each image becomes the tiles of its grid (+ a thumbnail beyond one tile), each tile 4 tokens in
    ``<img>...</img>``; the prompt is what the checkpoint's chat template and InternVLProcessor write; a
    left-padded batch of images of different tile counts answers like each row alone."""
    import shutil
    from types import SimpleNamespace

    from mllmcl.models import load_backbone
    from mllmcl.models.loading import load_processor
    from mllmcl.models.vision import TileImages

    bb = load_backbone(str(internvl_path))
    assert bb.family.name == "internvl" and type(bb.model).__name__ == "InternVLForConditionalGeneration"
    assert bb.processor.image_seq_length == INTERNVL_PER_TILE  # processor_config.json's
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(internvl_path / f, tmp_path / f)  # without processor_config.json: config.json's
    assert load_processor(tmp_path, bb.family).image_seq_length == INTERNVL_PER_TILE
    col = bb.collator
    images = _tiled_images()
    pixels = col.images.pixels(images)
    # (w x h) 16x16 -> one tile; 32x16 -> 2x1 grid + thumbnail; 16x48 -> 1x3 + thumbnail; 40x40 -> 2x2 + thumbnail
    tiles = [1, 3, 4, 5]
    assert pixels.tokens == [t * INTERNVL_PER_TILE for t in tiles] == [4, 12, 16, 20]
    assert tuple(pixels.tensors["pixel_values"].shape) == (sum(tiles), 3, INTERNVL_TILE, INTERNVL_TILE)
    assert [col.images.tiles_for_size(*im.size) for im in images] == tiles
    assert pixels.tokens == [col.images.tokens_for_size(*im.size) for im in images]  # the service's count
    assert not col.images.image_rows  # the projector's rows are tiles: PEFT cannot route them per image
    one_tile = TileImages(SimpleNamespace(image_processor=SimpleNamespace(max_patches=1), image_seq_length=4))
    assert one_tile.image_rows
    questions = ["What is in the image?", "How many circles are there?", "Is it red?", "Which shape?"]
    batch = col.prompt_batch(questions, pixels)
    tok = bb.processor.tokenizer
    start, ctx, end = (tok.convert_tokens_to_ids(t) for t in ("<img>", "<IMG_CONTEXT>", "</img>"))
    assert ctx == bb.model.config.image_token_id
    for i, q in enumerate(questions):
        row = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        # the checkpoint's chat template, then the processor's image block for this image's tiles
        templated = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                            tokenize=False, add_generation_prompt=True)
        assert templated.count("<IMG_CONTEXT>") == 1
        want = templated.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * pixels.tokens[i] + "</img>")
        assert tok.decode(row) == want
        assert want.startswith("<|im_start|>user\n<img>") and want.endswith(
            f"</img>\n{q}<|im_end|>\n<|im_start|>assistant\n")
        k = row.index(start)
        assert row[k + 1:k + 1 + pixels.tokens[i]] == [ctx] * pixels.tokens[i] and row[k + 1 + pixels.tokens[i]] == end
    with torch.no_grad():
        together = bb.model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)[:, -4:]
        for i in range(len(images)):
            alone = col.prompt_batch([questions[i]], col.images.pixels([images[i]]))
            assert bb.model.generate(**alone, max_new_tokens=4, min_new_tokens=4,
                                     do_sample=False)[0, -4:].tolist() == together[i].tolist()
    answers = ["A", "3", "yes", "circle"]
    train = col.train_batch(questions, answers, pixels)
    assert torch.isfinite(bb.model(**train).loss)
    for lab, a in zip(train["labels"], answers):  # the loss is on the answer and the end of the turn only
        assert tok.decode(lab[lab != -100]) == f"{a}<|im_end|>"
    assert col.max_length == bb.context == 1024


@pytest.mark.parametrize("arch,projector,frozen", [
    ("qwen2_vl", ("visual.merger.mlp.0", "visual.merger.mlp.2"), ("visual.blocks",)),
    ("internvl", ("multi_modal_projector.linear_1", "multi_modal_projector.linear_2"),
     ("vision_tower", "multi_modal_projector.layer_norm"))])
def test_an_mr_lora_stream_trains_and_serves(backbone_paths, synthetic_small, tmp_path, arch, projector, frozen):
    """MR-LoRA on the Qwen2-VL / InternVL checkpoint (experts with their own projector copy: Qwen2-VL's
    merger, InternVL's projector linears; router); the service counts each image's own prompt tokens,
    and a mixed-expert batch of experts with projector copies is split per expert (PEFT cannot route
    the projector's rows: Qwen2-VL's merger sees every image's patches as one sequence, InternVL's
    projector one row per tile)."""
    from peft.utils import load_peft_weights

    from mllmcl.config import load_config
    from mllmcl.data.prompts import eval_prompt
    from mllmcl.data.release import load_image
    from mllmcl.data.source import load_configured_stream
    from mllmcl.serving import load_serve_config, load_served_run
    from mllmcl.serving.app import _TokenCounter
    from mllmcl.serving.ensemble import Ensemble
    from mllmcl import run_stream

    path = backbone_paths(arch)
    cfg = load_config(None, [f"model.path={path}", f"data.root={synthetic_small}", "data.tasks=[RS,Med]",
                             "method.name=mr_lora", "lora.train_projector=true", "train.max_steps=3",
                             "train.batch_size=4", "eval.max_new_tokens=3", "method.router_epochs=1",
                             "method.router_samples_per_task=4", "method.router_batch_size=4",
                             "scaling.backend=local", "run.progress=false", "lora.dropout=0",
                             f"storage.root={tmp_path}"])
    result = run_stream(cfg, f"{arch}-mr")
    assert len(result.matrix.rows) == 2
    run = Path(result.run_dir)
    for k, task in enumerate(["RS", "Med"]):  # each expert stores its own copy of the projector
        w = load_peft_weights(str(run / "tasks" / f"{k}_{task}" / "expert"))
        assert all(any(p in n for n in w) for p in projector), task
        assert any("language_model" in n and "lora_A" in n for n in w)
        assert not any(f in n for f in frozen for n in w)  # the vision tower is never trained
    router = load_peft_weights(str(run / "tasks" / "1_Med" / "router"))
    assert not any(p in n for p in projector for n in router)

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
    assert not engine.one_forward(experts)  # the projector's rows are not the batch's: one generate per expert
    assert_mixed_batch_matches_reference(engine, str(path), served.experts, texts, images, 3, 3)


@pytest.mark.parametrize("arch", ["qwen2_vl", "internvl"])
def test_mixed_expert_batch_runs_in_one_forward(backbone_paths, tmp_path, arch):
    """Language-model LoRA experts (no projector copy) of different rows share one generate
    (images of different token counts: Qwen2-VL's patch grids, InternVL's tiles)."""
    from peft import get_peft_model

    from mllmcl.models import load_backbone
    from mllmcl.models.adapters import save_adapter
    from mllmcl.models.lora import LoraSettings
    from mllmcl.engine import Engine
    from mllmcl.models.lora import peft_config

    path = backbone_paths(arch)
    for k in range(2):  # two random experts (PEFT's B starts at zero; random init makes them differ)
        model = load_backbone(str(path)).model
        config = peft_config(LoraSettings(rank=4, dropout=0.0))
        config.init_lora_weights = False
        torch.manual_seed(k)
        save_adapter(get_peft_model(model, config), str(tmp_path / f"e{k}"), {"task": f"e{k}"})
    engine = Engine(str(path))
    for k in range(2):
        engine.load(str(tmp_path / f"e{k}"), name=f"e{k}")
    images = (_images() if arch == "qwen2_vl" else _tiled_images()[1:]) * 2
    texts = ["What is it?", "Count the circles.", "Which color?"] * 2
    adapters = ["e0", "e1", None, "e1", "e0", "e1"]
    assert engine.one_forward(adapters)
    assert_mixed_batch_matches_reference(engine, str(path), {"e0": str(tmp_path / "e0"),
                                                                  "e1": str(tmp_path / "e1"), None: None},
                                         texts, images, 3, 3)
    answers = engine.generate(texts, images, adapters, [3] * 6, [3] * 6)
    assert len({a.text for a in answers}) > 1
