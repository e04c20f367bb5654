"""Small drawing primitives for the procedural images (PIL)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 170),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "pink": (235, 150, 185),
    "brown": (140, 90, 40),
}


def jitter(rgb, rng: np.random.Generator, amount: int = 18) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def noise_canvas(size: int, base, rng: np.random.Generator, amount: int = 14) -> Image.Image:
    """A canvas of colour ``base`` with per-pixel noise (texture)."""
    arr = np.asarray(base, dtype=np.int16)[None, None, :] + rng.integers(-amount, amount + 1, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def plain_canvas(size: int, base) -> Image.Image:
    return Image.new("RGB", (size, size), tuple(base))


def blob(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill, rng: np.random.Generator, lobes: int = 5):
    """An irregular filled blob made of overlapping ellipses."""
    for _ in range(lobes):
        dx, dy = rng.normal(0, r * 0.35, 2)
        rx, ry = r * rng.uniform(0.55, 0.9), r * rng.uniform(0.55, 0.9)
        draw.ellipse([cx + dx - rx, cy + dy - ry, cx + dx + rx, cy + dy + ry], fill=fill)


def shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill):
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r}")


def non_overlapping_centres(rng: np.random.Generator, n: int, size: int, r: float, tries: int = 500):
    """``n`` centres at least ``2.4 r`` apart and ``r`` from the border."""
    pts: list[tuple[float, float]] = []
    for _ in range(tries):
        if len(pts) == n:
            break
        p = tuple(rng.uniform(r + 1, size - r - 1, 2))
        if all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 >= (2.4 * r) ** 2 for q in pts):
            pts.append(p)
    if len(pts) < n:
        raise RuntimeError(f"could not place {n} objects of radius {r} on a {size}px canvas")
    return pts


_FONT_CACHE: dict[int, ImageFont.ImageFont] = {}


def font(px: int) -> ImageFont.ImageFont:
    """PIL's bundled scalable font (no system fonts needed)."""
    if px not in _FONT_CACHE:
        _FONT_CACHE[px] = ImageFont.load_default(size=px)
    return _FONT_CACHE[px]
