"""Procedural twins of the nine MLLM-CL tasks.

Each generator draws one image and one question about a visual cue that a tiny
VLM at 32 px can learn (colour, coarse position, small counts, trend, extent), in
the question style of the real task. Answer vocabularies overlap across tasks
(yes/no, letters, small numbers, colours) so that one LoRA trained task after task
forgets. See ``jobs/calibrate_synthetic.py`` for the measured learnability.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw

from mllmcl.data.synthetic.draw import (
    COLOURS, blob, font, jitter, noise_canvas, non_overlapping_centres, plain_canvas, shape,
)


@dataclass
class Item:
    image: Image.Image
    question: str
    answer: str | list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    prefix: str = ""  # image file-name prefix (Sci's scorer reads it)
    qtype: str = ""


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


# --------------------------------------------------------------------------- DCL

LAND = {"forest": (35, 105, 45), "farmland": (195, 175, 85), "urban": (140, 140, 140)}
WATER_Q = ["Is there a water area in the image?", "Is a water body present in this image?",
           "Can you see water in this aerial image?"]
LAND_Q = ["What is the main land cover in the image?", "What is the dominant land use in this area?"]


def remote_sensing(rng: np.random.Generator, size: int) -> Item:
    cover = _pick(rng, list(LAND))
    img = noise_canvas(size, jitter(LAND[cover], rng, 12), rng, 18)
    d = ImageDraw.Draw(img)
    if cover == "farmland":
        step = int(rng.integers(5, 9))
        for y in range(0, size, step):
            d.line([(0, y), (size, y + int(rng.integers(-3, 4)))], fill=jitter((150, 140, 60), rng), width=2)
    elif cover == "urban":
        for _ in range(int(rng.integers(6, 12))):
            x, y = rng.integers(0, size - 6, 2)
            w, h = rng.integers(3, 8, 2)
            d.rectangle([x, y, x + w, y + h], fill=jitter((215, 215, 210), rng))
        d.line([(0, size // 2), (size, size // 2)], fill=(70, 70, 70), width=2)
    else:
        for _ in range(int(rng.integers(15, 30))):
            x, y = rng.uniform(0, size, 2)
            r = rng.uniform(1.5, 3.5)
            d.ellipse([x - r, y - r, x + r, y + r], fill=jitter((20, 70, 25), rng))
    water = bool(rng.random() < 0.5)
    if water:
        r = size * rng.uniform(0.16, 0.22)
        cx, cy = rng.uniform(r, size - r, 2)
        blob(d, cx, cy, r, jitter((45, 85, 200), rng, 12), rng)
    if rng.random() < 0.5:
        return Item(img, _pick(rng, WATER_Q), "yes" if water else "no", qtype="presence")
    return Item(img, _pick(rng, LAND_Q), cover, qtype="land_cover")


STAINS = {"pink": (235, 165, 195), "purple": (165, 110, 195), "brown": (190, 145, 100)}
ABNORMAL_Q = ["Are abnormal cells present in this tissue?", "Does this slide show abnormal cells?"]
STAIN_Q = ["What is the colour of the stain in this slide?", "What colour is the tissue stained?"]


def medical(rng: np.random.Generator, size: int) -> Item:
    stain = _pick(rng, list(STAINS))
    img = noise_canvas(size, jitter(STAINS[stain], rng, 10), rng, 16)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(20, 40))):  # normal nuclei: small dark dots
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(0.8, 1.8)
        d.ellipse([x - r, y - r, x + r, y + r], fill=jitter((90, 50, 110), rng))
    abnormal = bool(rng.random() < 0.5)
    if abnormal:  # large dark clusters
        for _ in range(int(rng.integers(2, 4))):
            r = size * rng.uniform(0.09, 0.13)
            cx, cy = rng.uniform(r, size - r, 2)
            blob(d, cx, cy, r, jitter((55, 20, 75), rng, 10), rng)
    if rng.random() < 0.5:
        return Item(img, _pick(rng, ABNORMAL_Q), "yes" if abnormal else "no", qtype="abnormality")
    return Item(img, _pick(rng, STAIN_Q), stain, qtype="stain")


LIGHTS = {"red": COLOURS["red"], "green": COLOURS["green"], "yellow": COLOURS["yellow"]}
LIGHT_Q = ["What is the status of the traffic light in front of the ego vehicle?",
           "What colour is the traffic light ahead of the ego car?"]
BEHIND_Q = ["Is there a vehicle behind the ego vehicle?", "Is any car visible in the back camera?"]
CAR_COLOURS = [(200, 200, 205), (30, 30, 35), (160, 30, 30), (40, 60, 150), (230, 230, 230)]


def _camera_view(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    view = Image.new("RGB", (w, h), jitter((150, 190, 225), rng, 15))
    d = ImageDraw.Draw(view)
    horizon = int(h * rng.uniform(0.4, 0.55))
    d.rectangle([0, horizon, w, h], fill=jitter((95, 95, 100), rng, 10))
    return view


def driving(rng: np.random.Generator, size: int) -> Item:
    """A 2x3 mosaic: front-left, front, front-right / back-left, back, back-right."""
    w, h = size // 3, size // 2
    img = Image.new("RGB", (w * 3, h * 2))
    light = _pick(rng, list(LIGHTS))
    car_behind = bool(rng.random() < 0.5)
    for row in range(2):
        for col in range(3):
            view = _camera_view(rng, w, h)
            d = ImageDraw.Draw(view)
            if (row, col) == (0, 1):  # front camera: the traffic light
                bx = w / 2 + rng.uniform(-1, 1)
                d.rectangle([bx - w * 0.36, h * 0.06, bx + w * 0.36, h * 0.9], fill=(25, 25, 25))
                r = w * 0.3
                cy = h * 0.48
                d.ellipse([bx - r, cy - r, bx + r, cy + r], fill=jitter(LIGHTS[light], rng, 12))
            elif (row, col) == (1, 1):
                if car_behind:
                    cw, ch = w * rng.uniform(0.75, 0.95), h * rng.uniform(0.45, 0.6)
                    cx = w / 2 + rng.uniform(-1, 1)
                    d.rectangle([cx - cw / 2, h - ch - 2, cx + cw / 2, h - 2], fill=jitter(_pick(rng, CAR_COLOURS), rng))
            elif rng.random() < 0.4:  # distractor cars in side views
                cw, ch = w * rng.uniform(0.4, 0.7), h * rng.uniform(0.3, 0.45)
                cx = rng.uniform(cw / 2, w - cw / 2)
                d.rectangle([cx - cw / 2, h - ch - 2, cx + cw / 2, h - 2], fill=jitter(_pick(rng, CAR_COLOURS), rng))
            img.paste(view, (col * w, row * h))
    img = img.resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        return Item(img, _pick(rng, LIGHT_Q), light, qtype="perception")
    return Item(img, _pick(rng, BEHIND_Q), "yes" if car_behind else "no", qtype="prediction")


SCI_POS = ["top", "right", "bottom", "left"]
SCI_Q = ["Which stage of the cycle is highlighted in the diagram?",
         "Which part of the diagram is marked in colour?"]


def science(rng: np.random.Generator, size: int) -> Item:
    img = plain_canvas(size, jitter((245, 245, 240), rng, 8))
    d = ImageDraw.Draw(img)
    c = size / 2
    off = size * 0.32
    r = size * 0.12
    centres = {"top": (c, c - off), "right": (c + off, c), "bottom": (c, c + off), "left": (c - off, c)}
    target = _pick(rng, SCI_POS)
    for pos, (x, y) in centres.items():
        d.line([(c, c), (x, y)], fill=(90, 90, 90), width=1)
    d.ellipse([c - r * 0.6, c - r * 0.6, c + r * 0.6, c + r * 0.6], outline=(60, 60, 60), width=1)
    for pos, (x, y) in centres.items():
        if pos == target:
            d.ellipse([x - r, y - r, x + r, y + r], fill=jitter(_pick(rng, [COLOURS["red"], COLOURS["blue"],
                                                                            COLOURS["green"], COLOURS["orange"]]), rng))
        else:
            d.ellipse([x - r, y - r, x + r, y + r], fill=(250, 250, 250), outline=(60, 60, 60), width=1)
    letters = "ABCD"
    options = "\n".join(f"{letters[i]}. {p}" for i, p in enumerate(SCI_POS))
    q = f"{_pick(rng, SCI_Q)}\n{options}\n{LETTER_HINT}"
    return Item(img, q, letters[SCI_POS.index(target)], prefix="AI2D", qtype="diagram")


LETTER_HINT = "Answer with the option's letter from the given choices directly."
FIN_YN_Q = ["Is the overall price trend of this stock upward?", "Did the stock price rise over this period?"]
FIN_MC_Q = "What is the overall trend of the price in this candlestick chart?\nA. rising\nB. falling\nC. flat"


def finance(rng: np.random.Generator, size: int) -> Item:
    img = plain_canvas(size, jitter((250, 250, 250), rng, 5))
    d = ImageDraw.Draw(img)
    trend = _pick(rng, ["rising", "falling", "flat"])
    n = 10
    drift = {"rising": 1.0, "falling": -1.0, "flat": 0.0}[trend] * size * 0.6 / n
    price = size / 2 - drift * n / 2 + rng.normal(0, 2)
    cw = size / (n + 1)
    for i in range(n):
        o = price
        cl = o + drift + rng.normal(0, size * 0.025)
        hi, lo = max(o, cl) + rng.uniform(1, 4), min(o, cl) - rng.uniform(1, 4)
        x = cw * (i + 1)
        col = (30, 160, 60) if cl >= o else (200, 40, 40)
        to_y = lambda v: size - 4 - v * (size - 8) / size
        d.line([(x, to_y(hi)), (x, to_y(lo))], fill=(60, 60, 60), width=1)
        y0, y1 = sorted((to_y(o), to_y(cl)))
        d.rectangle([x - cw * 0.35, y0, x + cw * 0.35, max(y1, y0 + 1)], fill=col)
        price = cl
    if trend != "flat" and rng.random() < 0.5:
        return Item(img, _pick(rng, FIN_YN_Q), "yes" if trend == "rising" else "no", qtype="yes_no")
    return Item(img, FIN_MC_Q, "ABC"[["rising", "falling", "flat"].index(trend)], qtype="multiple_choice")


# --------------------------------------------------------------------------- ACL

OCR_WORDS = ["no", "blue", "orange", "calendar"]
OCR_Q = ["What is written in the image?", "What text is shown in this image?", "Read the word in the image."]


def ocr(rng: np.random.Generator, size: int) -> Item:
    img = plain_canvas(size, jitter((235, 235, 225), rng, 18))
    d = ImageDraw.Draw(img)
    word = _pick(rng, OCR_WORDS)
    px = int(size * 0.21)
    x = rng.uniform(1, 4)
    y = rng.uniform(size * 0.15, size * 0.6)
    ink = jitter(_pick(rng, [(20, 20, 20), (30, 30, 120), (120, 20, 20)]), rng, 10)
    d.text((x, y), word.upper(), fill=ink, font=FONT(px))
    return Item(img, _pick(rng, OCR_Q), [word], meta={"answer_type": "Regular Text Recognition"}, qtype="text")


def FONT(px: int):
    return font(px)


ORDINALS = ["first", "second", "third", "fourth"]
MATH_HINT_MC = ("Hint: Please answer the question and provide the correct option letter, "
                "e.g., A, B, C, D, at the end.")
MATH_HINT_INT = "Hint: Please answer the question requiring an integer answer and provide the final value at the end."


def math_logic(rng: np.random.Generator, size: int) -> Item:
    img = plain_canvas(size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.line([(3, size - 4), (size - 2, size - 4)], fill=(0, 0, 0), width=1)
    d.line([(3, 2), (3, size - 4)], fill=(0, 0, 0), width=1)
    colour = jitter(_pick(rng, [COLOURS["blue"], COLOURS["orange"], COLOURS["green"], COLOURS["purple"]]), rng)
    if rng.random() < 0.5:
        n = 4
        tallest = int(rng.integers(n))
        heights = rng.uniform(0.2, 0.6, n)
        heights[tallest] = rng.uniform(0.8, 0.95)
        slot = (size - 8) / n
        for i, hgt in enumerate(heights):
            x0 = 5 + i * slot + slot * 0.15
            d.rectangle([x0, size - 4 - hgt * (size - 8), x0 + slot * 0.7, size - 5], fill=colour)
        choices = [f"the {o} bar" for o in ORDINALS]
        opts = "\n".join(f"({'ABCD'[i]}) {c}" for i, c in enumerate(choices))
        q = f"{MATH_HINT_MC}\nQuestion: Which bar is the tallest in the chart?\nChoices:\n{opts}"
        return Item(img, q, "ABCD"[tallest],
                    meta={"question_type": "multi_choice", "answer_type": "text", "choices": choices},
                    qtype="multi_choice")
    n = int(rng.integers(2, 6))
    slot = (size - 8) / 5
    start = 5 + (5 - n) * slot / 2
    for i in range(n):
        hgt = rng.uniform(0.3, 0.9)
        x0 = start + i * slot + slot * 0.15
        d.rectangle([x0, size - 4 - hgt * (size - 8), x0 + slot * 0.7, size - 5], fill=colour)
    q = f"{MATH_HINT_INT}\nQuestion: How many bars are there in the chart?"
    return Item(img, q, str(n), meta={"question_type": "free_form", "answer_type": "integer", "choices": None},
                qtype="free_form")


COUNT_OBJECTS = {"circle": "circles", "square": "squares", "triangle": "triangles"}


def visual_perception(rng: np.random.Generator, size: int) -> Item:
    img = plain_canvas(size, jitter((230, 230, 230), rng, 20))
    d = ImageDraw.Draw(img)
    kind = _pick(rng, list(COUNT_OBJECTS))
    n = int(rng.integers(1, 5))
    r = size * 0.1
    for cx, cy in non_overlapping_centres(rng, n, size, r):
        shape(d, kind, cx, cy, r, jitter(_pick(rng, [COLOURS["red"], COLOURS["blue"], COLOURS["green"],
                                                      COLOURS["purple"], COLOURS["orange"]]), rng))
    opts = "\n".join(f"({'ABCD'[i]}) {i + 1}" for i in range(4))
    q = f"How many {COUNT_OBJECTS[kind]} are in the image? Select from the following choices.\n{opts}"
    return Item(img, q, f"({'ABCD'[n - 1]})", meta={"type": "2D", "task": "Count"}, qtype="count")


GUI_POS = ["top left", "top right", "bottom left", "bottom right"]
GUI_Q = ["Which button is currently selected on this screen?", "Which button should be tapped next? It is highlighted."]


def gui_agent(rng: np.random.Generator, size: int) -> Item:
    img = plain_canvas(size, jitter((248, 248, 248), rng, 6))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, size, size * 0.14], fill=jitter(_pick(rng, [(40, 40, 60), (30, 90, 160), (90, 30, 120)]), rng))
    target = int(rng.integers(4))
    accent = jitter(_pick(rng, [COLOURS["blue"], COLOURS["green"], COLOURS["orange"]]), rng)
    bw, bh = size * 0.38, size * 0.26
    for i in range(4):
        col, row = i % 2, i // 2
        x0 = size * 0.08 + col * size * 0.46
        y0 = size * 0.24 + row * size * 0.38
        fill = accent if i == target else (205, 205, 205)
        d.rounded_rectangle([x0, y0, x0 + bw, y0 + bh], radius=3, fill=fill, outline=(120, 120, 120))
    opts = "\n".join(f"{'ABCD'[i]}. {p}" for i, p in enumerate(GUI_POS))
    q = f"{_pick(rng, GUI_Q)}\nOptions:\n{opts}\n{LETTER_HINT}"
    return Item(img, q, "ABCD"[target], meta={"category": "gui_navigation"}, qtype="gui")


GENERATORS: dict[str, Callable[[np.random.Generator, int], Item]] = {
    "RS": remote_sensing,
    "Med": medical,
    "AD": driving,
    "Sci": science,
    "Fin": finance,
    "OCR": ocr,
    "Math": math_logic,
    "VP": visual_perception,
    "APP": gui_agent,
}
