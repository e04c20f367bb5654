"""GPU check: one MR-LoRA expert fine-tuning on a ~1B-parameter VLM-shaped model built from
config (LLaVA architecture: CLIP-style vision tower + Llama language model, random
weights, no download), with plain DDP and with DeepSpeed ZeRO-2, bf16, a fixed number of
steps each. Prints samples/s, peak GPU memory and model FLOPs utilisation.

    bash bench/gpu_check.sh                  # on a machine with one GPU (< 8 minutes)
    python bench/gpu_check.py --tiny         # the same code path on CPU with a tiny model (smoke test)

Both strategies run the project's own loop (``mllmcl.training.loop.train_steps`` pieces: the
token-weighted loss, :class:`TorchStepper` / DeepSpeed's stepper) on synthetic batches
(random token ids and pixels; the speed does not depend on the data). MFU counts the
forward and input-gradient matmuls of the frozen model (4 x parameters x tokens per
sample; LoRA's own FLOPs are negligible) against the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "platform"))

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def build_model(tiny: bool):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if tiny:
        text = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=8)
    else:  # ~1.1 B: a TinyLlama-shaped language model + a ViT-B/16-shaped vision tower at 224 px
        text = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
        vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, image_size=224, patch_size=16)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=text.vocab_size - 1,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg), cfg


def batches(cfg, batch: int, text_len: int, steps: int, device):
    """Synthetic batches: image tokens then text, labels on the last quarter (the answer)."""
    v = cfg.vision_config
    n_img = (v.image_size // v.patch_size) ** 2
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        ids = torch.randint(3, cfg.text_config.vocab_size - 2, (batch, n_img + text_len), generator=g)
        ids[:, :n_img] = cfg.image_token_index
        labels = ids.clone()
        labels[:, : n_img + text_len * 3 // 4] = -100
        pix = torch.randn(batch, 3, v.image_size, v.image_size, generator=g)
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "pixel_values": pix.to(device), "labels": labels.to(device)})
    return out, n_img + text_len


def run(strategy: str, args, device) -> dict:
    import torch.distributed as dist

    from mllmcl.models.lora import LoraSettings, attach_lora
    from mllmcl.training.loop import TorchStepper, TrainSettings, make_optimizer

    if not dist.is_initialized():
        fd, path = tempfile.mkstemp(prefix="gpu-check-pg-")
        os.close(fd)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{path}",
                                rank=0, world_size=1)
    model, cfg = build_model(args.tiny)
    model = attach_lora(model, LoraSettings(rank=32, alpha=64, dropout=0.05))
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    settings = TrainSettings(epochs=1, max_steps=args.steps, batch_size=args.batch, lr=1e-4, seed=0)
    bf16 = device.type == "cuda"
    if strategy == "ddp":
        model = model.to(device)
        optimizer, scheduler = make_optimizer(model, settings, args.steps)
        model = torch.nn.parallel.DistributedDataParallel(model) if device.type == "cuda" else model
        stepper = TorchStepper([p for p in model.parameters() if p.requires_grad], optimizer, scheduler, 1.0)
        engine = model
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else None
    else:
        from mllmcl.training.deepspeed import DeepSpeedRun

        model = model.to(device)
        optimizer, scheduler = make_optimizer(model, settings, args.steps)
        ds = DeepSpeedRun(model, optimizer, scheduler, batch_size=args.batch, world=1, zero_stage=2, offload="none",
                          grad_clip=1.0, bf16=bf16)
        engine, stepper, autocast = ds.engine, ds.stepper, None
    data, seq = batches(cfg, args.batch, args.text_len, args.warmup + args.steps, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    engine.train()
    t0 = None
    for i, b in enumerate(data):
        if i == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        ctx = autocast() if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            loss = engine(**b).loss.float()
        stepper.backward(loss, last=True)
        stepper.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    samples = args.steps * args.batch
    tokens = samples * seq
    peak = next((v for k, v in PEAK_BF16.items() if k in torch.cuda.get_device_name(0)), None) \
        if device.type == "cuda" else None
    flops = 4 * n_params * tokens / seconds
    out = {"strategy": strategy if strategy == "ddp" else "deepspeed-zero2", "params": n_params,
           "trainable": n_train, "batch": args.batch, "seq": seq, "steps": args.steps,
           "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None,
           "mfu": flops / peak if peak else None, "final_loss": float(loss)}
    del engine, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny dims on CPU: a smoke test of the code path")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-len", type=int, default=256)
    ap.add_argument("--strategies", default="ddp,deepspeed")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        args.steps, args.warmup, args.batch, args.text_len = min(args.steps, 4), 1, 2, 16
    print(f"device: {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}",
          flush=True)
    results = []
    for strategy in args.strategies.split(","):
        t = time.time()
        r = run(strategy, args, device)
        r["wall_s"] = time.time() - t
        results.append(r)
        mem = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else "n/a"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{r['strategy']:>16}: {r['samples_per_s']:.2f} samples/s, {r['tokens_per_s']:.0f} tokens/s, "
              f"peak {mem}, MFU {mfu}, {r['params'] / 1e9:.2f} B params ({r['trainable'] / 1e6:.1f} M trainable), "
              f"loss {r['final_loss']:.3f}, {r['wall_s']:.0f} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
