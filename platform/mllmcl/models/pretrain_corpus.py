"""Generic captioned scenes used to "pre-train" the tiny base (never the task images).

Real MLLMs arrive knowing colours, counts, positions and trends; the tiny base gets
that from these scenes, described in captions and a few generic questions. The
benchmark tasks use other drawings and other question styles, so the base stays near
chance on them until a task's LoRA is trained.
"""

from __future__ import annotations

import numpy as np
from PIL import ImageDraw

from mllmcl.data.synthetic.draw import COLOURS, font, jitter, noise_canvas, non_overlapping_centres, plain_canvas, shape

NUM = ["zero", "one", "two", "three", "four", "five", "six"]
SCENE_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "gray", "pink", "brown", "black"]
WORDS = ["cat", "tree", "house", "river", "window", "mountain", "pen", "road", "garden", "music", "bird", "lamp"]


def _where(x: float, y: float, size: int) -> str:
    dx, dy = x - size / 2, y - size / 2
    if max(abs(dx), abs(dy)) < size * 0.12:
        return "in the middle"
    if abs(dx) > abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


def _pick(rng, xs):
    return xs[int(rng.integers(len(xs)))]


def scene(rng: np.random.Generator, size: int = 64):
    """Return ``(image, question, answer)`` for one generic scene."""
    kind = int(rng.integers(6))
    if kind == 0:  # shapes: count, colour, position
        n = int(rng.integers(1, 5))
        col = _pick(rng, SCENE_COLOURS)
        k = _pick(rng, ["circle", "square", "triangle"])
        img = plain_canvas(size, jitter((240, 240, 240), rng, 12))
        d = ImageDraw.Draw(img)
        r = size * rng.uniform(0.07, 0.12)
        pts = non_overlapping_centres(rng, n, size, r)
        for cx, cy in pts:
            shape(d, k, cx, cy, r, jitter(COLOURS[col], rng, 12))
        mx, my = np.mean(pts, axis=0)
        q = _pick(rng, ["Describe the image.", "How many shapes are there?", "What colour are the shapes?"])
        if q.startswith("How many"):
            return img, q, NUM[n]
        if q.startswith("What colour"):
            return img, q, col
        return img, q, f"{NUM[n]} {col} {k}{'s' if n > 1 else ''} {_where(mx, my, size) if n == 1 else ''}".strip()
    if kind == 1:  # texture with a patch
        bg, fg = rng.choice(len(SCENE_COLOURS), 2, replace=False)
        bg, fg = SCENE_COLOURS[bg], SCENE_COLOURS[fg]
        img = noise_canvas(size, jitter(COLOURS[bg], rng, 10), rng, 18)
        d = ImageDraw.Draw(img)
        r = size * rng.uniform(0.12, 0.2)
        cx, cy = rng.uniform(r, size - r, 2)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=jitter(COLOURS[fg], rng, 10))
        if rng.random() < 0.5:
            return img, "What colour is the background?", bg
        return img, "Describe the image.", f"a {fg} patch {_where(cx, cy, size)} on a {bg} texture"
    if kind == 2:  # a line chart
        trend = _pick(rng, ["up", "down", "flat"])
        img = plain_canvas(size, (255, 255, 255))
        d = ImageDraw.Draw(img)
        slope = {"up": -0.7, "down": 0.7, "flat": 0.0}[trend]
        y = size / 2 - slope * size / 2
        pts = []
        for i in range(8):
            x = 4 + i * (size - 8) / 7
            pts.append((x, y + rng.normal(0, 2)))
            y += slope * size / 8
        d.line(pts, fill=jitter(COLOURS[_pick(rng, ["blue", "black", "red"])], rng), width=2)
        return img, "Describe the image.", f"a line chart going {trend}" if trend != "flat" else "a flat line chart"
    if kind == 3:  # text extent
        w = _pick(rng, WORDS)
        img = plain_canvas(size, jitter((240, 240, 230), rng, 12))
        d = ImageDraw.Draw(img)
        d.text((rng.uniform(1, 6), rng.uniform(size * 0.15, size * 0.6)), w.upper(), fill=(20, 20, 20),
               font=font(int(size * 0.21)))
        return img, "Describe the image.", f"a word with {NUM[len(w)] if len(w) < len(NUM) else 'many'} letters"
    if kind == 4:  # a grid of panels, one coloured
        rows, cols = _pick(rng, [(2, 2), (2, 3)])
        img = plain_canvas(size, jitter((250, 250, 250), rng, 5))
        d = ImageDraw.Draw(img)
        tr, tc = int(rng.integers(rows)), int(rng.integers(cols))
        col = _pick(rng, SCENE_COLOURS)
        for r_ in range(rows):
            for c_ in range(cols):
                x0, y0 = c_ * size / cols + 2, r_ * size / rows + 2
                fill = jitter(COLOURS[col], rng) if (r_, c_) == (tr, tc) else (200, 200, 200)
                d.rectangle([x0, y0, x0 + size / cols - 4, y0 + size / rows - 4], fill=fill)
        vert = "top" if tr == 0 else "bottom"
        horiz = ["left", "middle", "right"][tc] if cols == 3 else ["left", "right"][tc]
        return img, "Describe the image.", f"a grid of boxes, the {vert} {horiz} box is {col}"
    # bars
    n = int(rng.integers(2, 6))
    img = plain_canvas(size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    heights = rng.uniform(0.2, 0.9, n)
    slot = (size - 8) / n
    for i, h in enumerate(heights):
        x0 = 4 + i * slot + slot * 0.15
        d.rectangle([x0, size - 4 - h * (size - 8), x0 + slot * 0.7, size - 5],
                    fill=jitter(COLOURS[_pick(rng, ["blue", "green", "orange"])], rng))
    ords = ["first", "second", "third", "fourth", "fifth"]
    return img, "Describe the image.", f"{NUM[n]} bars, the {ords[int(np.argmax(heights))]} is the tallest"


def corpus_texts(n: int = 400, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        _, q, a = scene(rng, 32)
        out.append(f"{q} {a}")
    return out
