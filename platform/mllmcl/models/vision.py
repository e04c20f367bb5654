"""Images as model inputs, per layout.

``FixedImages`` (LLaVA): every image is resized to one size, ``pixel_values`` stack to
(B, C, H, W) and each image takes the same number of tokens.
``GridImages`` (Qwen2-VL / Qwen2.5-VL): each image keeps (about) its aspect ratio and
resolution, becomes a variable number of patches; ``pixel_values`` of a batch are the
images' patches concatenated, ``image_grid_thw`` says how many belong to each, and an
image takes ``t*h*w / merge**2`` tokens.
``TileImages`` (InternVL): each image is cut into square tiles on the grid (columns x rows,
between the image processor's ``min_patches`` and ``max_patches`` tiles) whose aspect ratio
is closest to the image's, plus a thumbnail of the whole image when there is more than one
tile (GotOcr2's ``crop_to_patches``, which InternVL's processor always turns on); every tile
takes the same ``image_seq_length`` tokens, so an image takes ``tiles * image_seq_length``.
``pixel_values`` of a batch are the images' tiles concatenated, (sum of tiles, C, H, W): the
model scatters the tiles' tokens into the image tokens in order, so it needs no per-image count.

Each processes images into per-image items (what :class:`PixelCache` keeps) and collate
items into :class:`Pixels`: the batch's tensors plus each row's image token count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Pixels:
    tensors: dict[str, torch.Tensor]  # model inputs: pixel_values (+ image_grid_thw)
    tokens: list[int]  # image tokens row i's image takes in the prompt

    def __len__(self) -> int:
        return len(self.tokens)


class _Layout:
    def pixels(self, images: Sequence) -> Pixels:
        """Decoded images -> the batch's model inputs."""
        return self.collate(self.process(images))


class FixedImages(_Layout):
    token_types = False  # the model finds image positions by the image token alone
    image_rows = True  # the projector's input has one row per image (PEFT can route its rows by adapter)

    def __init__(self, processor):
        self.image_processor = processor.image_processor
        self.n_tokens = self._count(processor)

    @staticmethod
    def _count(processor) -> int:
        from PIL import Image

        from mllmcl.models.chat import IMAGE_TOKEN

        crop = getattr(processor.image_processor, "crop_size", None) or {}
        size = int(crop.get("height", 32)) if isinstance(crop, dict) else 32
        enc = processor(text=[IMAGE_TOKEN], images=[Image.new("RGB", (size, size))], return_tensors="pt")
        return int((enc["input_ids"] == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).sum())

    def process(self, images: Sequence) -> list[dict[str, torch.Tensor]]:
        pix = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return [{"pixel_values": p.clone()} for p in pix]  # own storage: the cache frees images one by one

    def collate(self, items: Sequence[dict[str, torch.Tensor]]) -> Pixels:
        return Pixels({"pixel_values": torch.stack([it["pixel_values"] for it in items])}, [self.n_tokens] * len(items))

    def tokens_for_size(self, width: int, height: int) -> int:
        return self.n_tokens


class GridImages(_Layout):
    token_types = True  # the model also takes ``mm_token_type_ids`` (1 = image) for its 3-D rotary positions
    image_rows = False  # the projector (merger) sees every image's patches as rows of one sequence

    def __init__(self, processor):
        self.image_processor = processor.image_processor
        self.merge = int(self.image_processor.merge_size)

    def process(self, images: Sequence) -> list[dict[str, torch.Tensor]]:
        out = self.image_processor(images=list(images), return_tensors="pt")
        grids = out["image_grid_thw"]
        parts = torch.split(out["pixel_values"], grids.prod(-1).tolist())
        return [{"pixel_values": p.clone(), "image_grid_thw": g.clone()} for p, g in zip(parts, grids)]

    def collate(self, items: Sequence[dict[str, torch.Tensor]]) -> Pixels:
        grids = torch.stack([it["image_grid_thw"] for it in items])
        return Pixels({"pixel_values": torch.cat([it["pixel_values"] for it in items]), "image_grid_thw": grids},
                      [int(g.prod()) // self.merge ** 2 for g in grids])

    def tokens_for_size(self, width: int, height: int) -> int:
        return self.image_processor.get_number_of_image_patches(height, width, {}) // self.merge ** 2


class TileImages(_Layout):
    token_types = False  # the model finds image positions by the image token alone

    def __init__(self, processor):
        self.image_processor = processor.image_processor
        per_tile = getattr(processor, "image_seq_length", None)
        if not per_tile:
            raise ValueError("an InternVL processor without image_seq_length (tokens per tile): neither "
                             "processor_config.json nor config.json of the checkpoint gives it")
        self.per_tile = int(per_tile)
        # the projector's input has one row per tile: one row per image only when an image is one tile
        self.image_rows = int(getattr(self.image_processor, "max_patches", 1)) <= 1

    def process(self, images: Sequence) -> list[dict[str, torch.Tensor]]:
        out = self.image_processor(images=list(images), crop_to_patches=True, return_tensors="pt")
        parts = torch.split(out["pixel_values"], [int(n) for n in out["num_patches"]])
        return [{"pixel_values": p.clone()} for p in parts]

    def collate(self, items: Sequence[dict[str, torch.Tensor]]) -> Pixels:
        return Pixels({"pixel_values": torch.cat([it["pixel_values"] for it in items])},
                      [it["pixel_values"].shape[0] * self.per_tile for it in items])

    def tiles_for_size(self, width: int, height: int) -> int:
        return self.image_processor.get_number_of_image_patches(height, width, {"crop_to_patches": True})

    def tokens_for_size(self, width: int, height: int) -> int:
        return self.tiles_for_size(width, height) * self.per_tile
