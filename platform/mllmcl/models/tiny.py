"""The tiny LLaVA-architecture preset: built from a config, tokenizer trained locally,
"pre-trained" on generic captioned scenes, saved as a normal Hugging Face folder and
cached (built once per spec, reused by every process afterwards).

The saved folder loads through the same code path as a real LLaVA-1.5 checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mllmcl.models.chat import IMAGE_TOKEN
from mllmcl.paths import cache_dir, file_lock

log = logging.getLogger(__name__)

PRESET_VERSION = 3  # bump when the recipe below changes
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN]


@dataclass(frozen=True)
class TinyVLMSpec:
    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    text_hidden: int = 128
    text_layers: int = 2
    heads: int = 4
    vocab_size: int = 1024
    pretrain_steps: int = 1500
    pretrain_batch: int = 32
    pretrain_lr: float = 1e-3
    pretrain_pool: int = 6000
    seed: int = 0

    def fingerprint(self) -> str:
        payload = json.dumps({**asdict(self), "version": PRESET_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def tokenizer_corpus(seed: int = 0) -> list[str]:
    """Text the tokenizer is trained on: generic captions plus the benchmark's question styles."""
    from mllmcl.data.prompts import LETTER_INSTRUCTION, MED_INSTRUCTION, YES_NO_INSTRUCTION
    from mllmcl.data.synthetic.tasks import GENERATORS
    from mllmcl.models.pretrain_corpus import corpus_texts

    rng = np.random.default_rng(seed)
    texts = corpus_texts(600, seed)
    for name in sorted(GENERATORS):
        for _ in range(60):
            item = GENERATORS[name](rng, 32)
            ans = item.answer if isinstance(item.answer, str) else " ".join(item.answer)
            texts.append(f"USER: {item.question} ASSISTANT: {ans}")
    from mllmcl.data.streams import STREAMS
    from mllmcl.data.prompts import router_prompt

    for stream in STREAMS.values():  # the MR-LoRA router's prompt, with every expert description
        texts += [router_prompt(stream.tasks, "Q") for _ in range(20)]
    texts += [MED_INSTRUCTION, YES_NO_INSTRUCTION, LETTER_INSTRUCTION,
              "USER: ASSISTANT: yes no A B C D (A) (B) (C) (D) 0 1 2 3 4 5 6 7 8 9 10"]
    return texts


def train_tokenizer(spec: TinyVLMSpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(spec.seed), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": IMAGE_TOKEN},
                                   model_max_length=512)
    fast.padding_side = "right"
    return fast


def make_processor(tokenizer, spec: TinyVLMSpec):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=True, do_resize=True, do_normalize=True,
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token=IMAGE_TOKEN)


def make_model(spec: TinyVLMSpec, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    n_patches = (spec.image_size // spec.patch_size) ** 2
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=spec.image_size, patch_size=spec.patch_size,
                                       hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 2,
                                       num_hidden_layers=spec.vision_layers, num_attention_heads=spec.heads,
                                       projection_dim=spec.vision_hidden),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.text_hidden,
                                intermediate_size=spec.text_hidden * 2, num_hidden_layers=spec.text_layers,
                                num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
                                max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=n_patches,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def pretrain(model, processor, spec: TinyVLMSpec, progress: bool = True) -> list[float]:
    """Full-parameter training on generic captioned scenes; returns the loss curve."""
    from tqdm.auto import tqdm

    from mllmcl.models.batching import Collator
    from mllmcl.models.pretrain_corpus import scene

    rng = np.random.default_rng(spec.seed)
    pool = [scene(rng, 64) for _ in range(spec.pretrain_pool)]
    collate = Collator(processor)  # LLaVA-1.5
    images = collate.images.process([p[0] for p in pool])
    torch.manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, weight_decay=0.01)
    warmup = max(1, spec.pretrain_steps // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / spec.pretrain_steps))))
    model.train()
    losses = []
    order = np.random.default_rng(spec.seed + 1)
    for step in tqdm(range(spec.pretrain_steps), desc="pre-training tiny base", disable=not progress):
        idx = order.integers(0, len(pool), spec.pretrain_batch)
        batch = collate.train_batch([pool[i][1] for i in idx], [pool[i][2] for i in idx],
                                   collate.images.collate([images[i] for i in idx]))
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
    model.eval()
    return losses


def tiny_base_path(spec: TinyVLMSpec = TinyVLMSpec()) -> Path:
    return cache_dir() / "models" / f"tiny-llava-{spec.fingerprint()}"


def build_tiny_base(spec: TinyVLMSpec = TinyVLMSpec(), progress: bool = True) -> Path:
    """Return the folder of the tiny base for ``spec``, building it once if needed.

    Safe to call from several processes at once (file lock; atomic rename).
    """
    dest = tiny_base_path(spec)
    if (dest / "meta.json").exists():
        return dest
    with file_lock(dest.parent / f".{dest.name}.lock"):
        if (dest / "meta.json").exists():
            return dest
        t0 = time.time()
        log.info("building tiny base %s (one-time, cached at %s)", spec.fingerprint(), dest)
        tokenizer = train_tokenizer(spec)
        processor = make_processor(tokenizer, spec)
        model = make_model(spec, tokenizer)
        losses = pretrain(model, processor, spec, progress=progress)
        tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        # transformers' save_pretrained reaches accelerate, which imports DeepSpeed where it is installed,
        # which imports MLflow, whose telemetry writes ~/.config/mlflow/telemetry.json: nothing here
        # asked for MLflow (a user's own setting wins)
        users = os.environ.get("MLFLOW_DISABLE_TELEMETRY")
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = users or "true"
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            if users is None:
                os.environ.pop("MLFLOW_DISABLE_TELEMETRY", None)
        processor.save_pretrained(tmp)
        meta = {
            "preset": "tiny-llava", "spec": asdict(spec), "fingerprint": spec.fingerprint(),
            "version": PRESET_VERSION, "parameters": sum(p.numel() for p in model.parameters()),
            "pretrain_loss_first": losses[0], "pretrain_loss_last": float(np.mean(losses[-50:])),
            "build_seconds": round(time.time() - t0, 1), "torch": torch.__version__,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        log.info("tiny base built in %.0fs, loss %.3f -> %.3f", meta["build_seconds"], losses[0],
                 meta["pretrain_loss_last"])
    return dest
