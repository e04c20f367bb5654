"""The shape of a model, from its Hugging Face ``config.json`` (LLaVA, Qwen2-VL and InternVL families):
parameter counts of the language model, vision tower and projector, LoRA sizes, tokens per
image. A checkpoint that is not on this machine (a cluster's ``/models/...``) is planned from
the shape of the published model its folder is named after (:data:`KNOWN`), or from a
``config.json`` given with ``--model-config``."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from mllmcl.errors import ConfigError

# the published configs of the checkpoints the presets name (config.json values, no weights)
KNOWN = {
    "llava-1.5-7b": {"model_type": "llava", "projector_hidden_act": "gelu", "vision_feature_select_strategy": "default",
                     "text_config": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                                     "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064},
                     "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                                       "image_size": 336, "patch_size": 14}},
    "llava-1.5-13b": {"model_type": "llava", "projector_hidden_act": "gelu",
                      "vision_feature_select_strategy": "default",
                      "text_config": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                                      "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32064},
                      "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                                        "image_size": 336, "patch_size": 14}},
    "qwen2-vl-7b": {"model_type": "qwen2_vl", "hidden_size": 3584, "intermediate_size": 18944,
                    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                    "vocab_size": 152064, "tie_word_embeddings": False,
                    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "hidden_size": 3584,
                                      "patch_size": 14, "spatial_merge_size": 2}},
    # OpenGVLab/InternVL3-8B-hf: InternViT-300M-448px-V2_5 + Qwen2.5-7B (7.94B parameters)
    "internvl3-8b": {"model_type": "internvl", "downsample_ratio": 0.5,
                     "text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                                     "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 151674,
                                     "tie_word_embeddings": False},
                     "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                                       "image_size": [448, 448], "patch_size": [14, 14]}},
}
QWEN_IMAGE_PX = 448  # Qwen2-VL's tokens per image depend on the image: planned at 448 x 448 (256 tokens)
# InternVL's tokens per image depend on its tiles (1 to max_patches + a thumbnail): planned at the same
# 448 x 448 image, one tile (256 tokens; a large image of the release may take up to 13 tiles)


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    vision_layers: int
    vision_hidden: int
    vision_intermediate: int
    vision_tokens: int  # patches the vision tower runs on, per image
    image_tokens: int  # tokens an image takes in the language model's sequence
    projector_in: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear of one language-model layer, by PEFT's module names."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def lm_params(self) -> int:
        per_layer = sum(a * b for a, b in self.linears().values()) + 2 * self.hidden
        return self.layers * per_layer + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def vision_params(self) -> int:
        v, vi = self.vision_hidden, self.vision_intermediate
        return self.vision_layers * (4 * v * v + 2 * v * vi + 4 * v)

    @property
    def projector_params(self) -> int:
        return self.projector_in * self.hidden + self.hidden * self.hidden  # two linears (mlp2x)

    @property
    def params(self) -> int:
        return self.lm_params + self.vision_params + self.projector_params

    def lora_params(self, rank: int, targets: tuple[str, ...]) -> int:
        dims = self.linears()
        return self.layers * sum(rank * (a + b) for name, (a, b) in dims.items() if name in targets)

    @classmethod
    def from_config(cls, config: dict, name: str = "") -> "ModelShape":
        kind = config.get("model_type")
        if kind == "llava":
            t, v = config["text_config"], config["vision_config"]
            patches = (v["image_size"] // v["patch_size"]) ** 2
            image = patches + (1 if config.get("vision_feature_select_strategy") == "full" else 0)
            return cls(name or "llava", t["num_hidden_layers"], t["hidden_size"], t["intermediate_size"],
                       t["num_attention_heads"], t.get("num_key_value_heads") or t["num_attention_heads"],
                       t["vocab_size"], bool(t.get("tie_word_embeddings", False)), v["num_hidden_layers"],
                       v["hidden_size"], v["intermediate_size"], patches + 1, image, v["hidden_size"])
        if kind == "qwen2_vl":
            t = config.get("text_config") or config
            v = config["vision_config"]
            patches = (QWEN_IMAGE_PX // v["patch_size"]) ** 2
            merge = v.get("spatial_merge_size", 2) ** 2
            return cls(name or "qwen2_vl", t["num_hidden_layers"], t["hidden_size"], t["intermediate_size"],
                       t["num_attention_heads"], t.get("num_key_value_heads") or t["num_attention_heads"],
                       t["vocab_size"], bool(t.get("tie_word_embeddings", False)), v["depth"], v["embed_dim"],
                       v["embed_dim"] * v.get("mlp_ratio", 4), patches, patches // merge, v["embed_dim"] * merge)
        if kind == "internvl":
            t, v = config["text_config"], config["vision_config"]
            side = lambda x: int(x[0] if isinstance(x, (list, tuple)) else x)  # noqa: E731 (448 or [448, 448])
            patches = (side(v.get("image_size", 448)) // side(v.get("patch_size", 14))) ** 2
            shuffle = round(1 / config.get("downsample_ratio", 0.5)) ** 2  # pixel shuffle: 4 patches a token
            tied = t.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
            return cls(name or "internvl", t["num_hidden_layers"], t["hidden_size"], t["intermediate_size"],
                       t["num_attention_heads"], t.get("num_key_value_heads") or t["num_attention_heads"],
                       t["vocab_size"], bool(tied), v["num_hidden_layers"], v["hidden_size"], v["intermediate_size"],
                       patches + 1, patches // shuffle, v["hidden_size"] * shuffle)
        raise ConfigError(f"model_type {kind!r}: the planner knows llava, qwen2_vl and internvl")


def _known(path: str) -> str | None:
    base = Path(path.rstrip("/")).name.lower()
    for key in KNOWN:
        if re.sub(r"[^a-z0-9]", "", key) in re.sub(r"[^a-z0-9]", "", base):
            return key
    return None


def model_shape(model_path: str, config_file: str | None = None) -> ModelShape:
    """The shape of ``model_path``: its own ``config.json`` where it is readable here, else
    ``config_file``, else the published model its folder is named after."""
    from mllmcl import storage

    if config_file:
        return ModelShape.from_config(json.loads(Path(config_file).read_text()), Path(config_file).stem)
    if model_path == "tiny":  # the preset built offline (built now if it is not yet)
        from mllmcl.models.loading import resolve_checkpoint

        model_path = str(resolve_checkpoint(model_path))
    own = storage.join(model_path, "config.json")
    try:
        if storage.exists(own):
            return ModelShape.from_config(storage.read_json(own), Path(model_path.rstrip("/")).name)
    except OSError:
        pass
    key = _known(model_path)
    if key is None:
        raise ConfigError([f"model.path={model_path!r}: no config.json readable here and not a known checkpoint "
                           f"({', '.join(KNOWN)}); give its config with --model-config"])
    return ModelShape.from_config(KNOWN[key], key)
