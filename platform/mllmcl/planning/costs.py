"""Memory and FLOPs of a fit and of an evaluation, from a model's shape (:mod:`.shapes`).

Memory per GPU of one fit (data parallel over ``workers``; ZeRO partitions what it partitions):

- **weights**: every parameter at the model's dtype (ZeRO-3: split over the workers);
- **trainable state**: LoRA (and the projector copy, where trained) at 16 bytes a parameter
  (fp32 weight, gradient, Adam's two moments; ZeRO-1/2 split the optimizer state/gradients);
- **activations** of one micro-batch of ``seq_len`` tokens through the language model:
  34 × tokens × hidden bytes per layer at 16-bit (Korthikanti et al. 2022, without the
  attention-score term, which fused SDPA attention does not store), twice that at fp32. With
  activation checkpointing each layer keeps only its input (2 bytes × tokens × hidden at
  16-bit) and one layer's activations are live during its recomputation;
- **logits**: tokens × vocabulary at the compute dtype, plus their fp32 copy and gradient
  for the loss (the largest single tensor for a 32k+ vocabulary);
- a fixed **runtime** share (CUDA context, allocator, NCCL buffers).

FLOPs per training sample: a forward pass is 2 × parameters × tokens plus attention
(4 × layers × tokens² × hidden); LoRA on a frozen base needs the input gradients only
(one more forward's worth, not two), checkpointing one more forward; the frozen vision tower
runs forward only. Decoding is bound by reading the weights once per step (batched rows share
it), prefill by compute.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024 ** 3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class FitShape:
    """What one fit's memory and FLOPs depend on, read from the config."""

    rank: int
    targets: tuple[str, ...]
    train_projector: bool
    micro_batch: int
    seq_len: int
    workers: int
    dtype: str  # the weights' dtype
    compute: str  # the activations' dtype (bf16 under mixed precision)
    zero_stage: int = 0  # 0 = DDP
    gpu: bool = True


@dataclass(frozen=True)
class Memory:
    weights: float
    trainable: float
    activations: float
    logits: float
    runtime: float

    @property
    def total(self) -> float:
        return self.weights + self.trainable + self.activations + self.logits + self.runtime

    def gib(self) -> dict[str, float]:
        return {k: round(getattr(self, k) / GIB, 2) for k in ("weights", "trainable", "activations", "logits",
                                                                "runtime", "total")}


def fit_memory(shape, fit: FitShape, checkpointing: bool) -> Memory:
    w = fit.workers
    weights = shape.params * BYTES[fit.dtype] / (w if fit.zero_stage >= 3 else 1)
    n_train = shape.lora_params(fit.rank, fit.targets) + (shape.projector_params if fit.train_projector else 0)
    optimizer = 8 / (w if fit.zero_stage >= 1 else 1)
    grads = 4 / (w if fit.zero_stage >= 2 else 1)
    trainable = n_train * (4 + grads + optimizer)
    tokens = fit.micro_batch * fit.seq_len
    c = BYTES[fit.compute]
    per_layer = 34 * tokens * shape.hidden * c / 2
    if checkpointing:
        activations = shape.layers * tokens * shape.hidden * c + per_layer
    else:
        activations = shape.layers * per_layer
    if fit.train_projector:  # the projector's input is kept for its weight gradient
        activations += fit.micro_batch * shape.image_tokens * shape.projector_in * c
    logits = tokens * shape.vocab * (c + 8)
    runtime = 1.5 * GIB if fit.gpu else 0.4 * GIB  # CUDA context + allocator; on CPU torch's own buffers
    return Memory(weights, trainable, activations, logits, runtime)


def forward_flops(shape, tokens: int, images: int = 1) -> float:
    """One forward pass of a sequence of ``tokens`` (``images`` through the vision tower)."""
    lm = 2 * (shape.lm_params - shape.vocab * shape.hidden) * tokens + 4 * shape.layers * tokens ** 2 * shape.hidden
    vision = images * (2 * shape.vision_params * shape.vision_tokens +
                       2 * shape.projector_params * shape.image_tokens + 4 * shape.vision_layers *
                       shape.vision_tokens ** 2 * shape.vision_hidden)
    return lm + vision


def train_flops_per_sample(shape, seq_len: int, checkpointing: bool) -> float:
    lm = forward_flops(shape, seq_len, images=0)
    vision = forward_flops(shape, 0, images=1)
    return lm * (3 if checkpointing else 2) + vision


def fit_seconds(shape, samples: int, epochs: float, seq_len: int, workers: int, cluster, checkpointing: bool,
                weight_bytes: float) -> float:
    """Wall time of one fit: start-up and reading the base, then the samples' FLOPs on ``workers``
    devices at the cluster's MFU."""
    compute = samples * epochs * train_flops_per_sample(shape, seq_len, checkpointing)
    rate = workers * cluster.device.tflops * 1e12 * cluster.mfu
    return cluster.startup_s + weight_bytes / (cluster.storage_gbs * 1e9) + compute / rate


def generation_seconds(shape, rows: int, prompt_tokens: int, new_tokens: int, batch: int, cluster,
                       weight_bytes: float) -> float:
    """Wall time of ``rows`` greedy answers on one device: prefill at the MFU, then decoding in
    batches of ``batch``, each step bound by reading the weights or by its FLOPs."""
    if rows <= 0:
        return 0.0
    peak = cluster.device.tflops * 1e12 * cluster.mfu
    prefill = rows * forward_flops(shape, prompt_tokens) / peak
    steps = -(-rows // batch) * new_tokens
    per_step = max(weight_bytes / (cluster.device.bandwidth_gbs * 1e9),
                   batch * 2 * shape.params / peak)
    return prefill + steps * per_step
