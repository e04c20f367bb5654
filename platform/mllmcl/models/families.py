"""What differs between backbone families, in one place: the chat format, how images
become model inputs (fixed-size pixels, variable patch grids or a variable number of
tiles), and the vision projector's linear layers (``lora.train_projector``). LoRA targets the language model's
linears by name, which every supported family shares (q/k/v/o, gate/up/down)."""

from __future__ import annotations

from dataclasses import dataclass

from mllmcl.models.chat import INTERNVL, LLAVA_15, QWEN_VL, ChatFormat
from mllmcl.models.vision import FixedImages, GridImages, TileImages


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # ``config.model_type`` of the checkpoints it covers
    chat: ChatFormat
    images: type  # FixedImages | GridImages | TileImages
    projector: tuple[str, ...]  # the vision-to-language projector's linears (PEFT modules_to_save)
    # its transformers processor also holds a video processor, which transformers builds only
    # with torchvision; without it the tokenizer and image processor load on their own
    video_processor: bool = False


FAMILIES = (
    Family("llava-1.5", ("llava",), LLAVA_15, FixedImages,
           ("multi_modal_projector.linear_1", "multi_modal_projector.linear_2")),
    Family("qwen2-vl", ("qwen2_vl", "qwen2_5_vl"), QWEN_VL, GridImages,
           ("visual.merger.mlp.0", "visual.merger.mlp.2"), video_processor=True),
    # transformers' InternVL (InternVLForConditionalGeneration: InternVL3-*-hf and whatever transformers'
    # conversion script writes, InternVL2.5 included): the projector is LayerNorm -> linear_1 -> GELU -> linear_2, its linears named
    # as LLaVA's
    Family("internvl", ("internvl",), INTERNVL, TileImages,
           ("multi_modal_projector.linear_1", "multi_modal_projector.linear_2"), video_processor=True),
)
LLAVA = FAMILIES[0]
# every family's projector linears: PEFT matches modules_to_save by name suffix, so each
# architecture picks up its own (PEFT batches rows of different adapters through wrapped
# Linear modules, not through a wrapped composite module)
PROJECTOR_LINEARS = tuple(dict.fromkeys(n for f in FAMILIES for n in f.projector))


def family_for(model_type: str) -> Family:
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    hint = ""
    if model_type == "internvl_chat":  # OpenGVLab's own format (remote code)
        hint = ("; this is InternVL's remote-code format: use the transformers-format checkpoint "
                "(OpenGVLab/InternVL3-8B-hf and the like, model_type 'internvl')")
    raise KeyError(f"model_type {model_type!r} is not a supported backbone family: supported {supported}{hint}")

