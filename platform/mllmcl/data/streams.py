"""The two MLLM-CL streams, by name, with their task order and folder layout."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from mllmcl.data.types import TaskSpec


@dataclass(frozen=True)
class StreamSpec:
    name: str
    title: str
    folder: str  # top folder of the release: Domain_data or Ability_data
    separate_test_folder: bool  # ACL keeps test sets in <X>_test/
    tasks: tuple[TaskSpec, ...]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(
            f"unknown task {name!r} for stream {self.name!r}: expected one of {self.task_names}"
        )

    def train_dir(self, task: str) -> str:
        return f"{self.folder}/{task}"

    def test_dir(self, task: str) -> str:
        return f"{self.folder}/{task}_test" if self.separate_test_folder else f"{self.folder}/{task}"


DCL = StreamSpec(
    name="dcl",
    title="Domain continual learning",
    folder="Domain_data",
    separate_test_folder=False,
    tasks=(
        TaskSpec("RS", "dcl", "Remote sensing", "rs_ad", 128,
                 "remote sensing: aerial and satellite images, land cover, water, buildings"),
        TaskSpec("Med", "dcl", "Medical", "med", 128,
                 "medical: pathology slides, tissue, cells and staining"),
        TaskSpec("AD", "dcl", "Autonomous driving", "rs_ad", 128,
                 "autonomous driving: multi-camera road scenes, traffic lights, vehicles"),
        TaskSpec("Sci", "dcl", "Science", "sci", 128,
                 "science: diagrams, maps and textbook figures with multiple choice"),
        TaskSpec("Fin", "dcl", "Finance", "fin", 128,
                 "finance: stock candlestick charts, price trends"),
    ),
)

ACL = StreamSpec(
    name="acl",
    title="Ability continual learning",
    folder="Ability_data",
    separate_test_folder=True,
    tasks=(
        TaskSpec("OCR", "acl", "OCR", "ocrbench", 32,
                 "OCR: reading text written in the image"),
        TaskSpec("Math", "acl", "Math & logic", "math", 32,
                 "math and logic: charts, plots and arithmetic reasoning"),
        TaskSpec("VP", "acl", "Visual perception", "count", 32,
                 "visual perception: counting objects"),
        TaskSpec("APP", "acl", "GUI agent", "choice", 32,
                 "GUI agent: app screens, buttons and interface elements"),
    ),
)

STREAMS: dict[str, StreamSpec] = {s.name: s for s in (DCL, ACL)}


def get_stream_spec(name: str) -> StreamSpec:
    key = name.lower()
    if key not in STREAMS:
        raise KeyError(f"unknown stream {name!r}: expected one of {sorted(STREAMS)}")
    return STREAMS[key]


ORDERS = ("paper", "reverse", "random:<seed>", "a list of the tasks' names")


def order_problems(names: Sequence[str], order: str | Sequence[str]) -> list[str]:
    """What is wrong with ``order`` (``data.order``) for the tasks ``names`` (empty: nothing)."""
    if isinstance(order, str):
        if order in ("paper", "reverse"):
            return []
        if order.startswith("random:"):
            seed = order.split(":", 1)[1]
            return [] if seed.lstrip("-").isdigit() else [f"data.order={order!r}: random:<seed> needs an integer seed"]
        if "," not in order:
            return [f"data.order={order!r}: expected one of {', '.join(ORDERS)}"]
        order = _listed(order)
    given = list(order)
    problems = []
    unknown = [t for t in given if t not in names]
    if unknown:
        problems.append(f"data.order: {unknown} not among the stream's tasks {list(names)}")
    twice = sorted({t for t in given if given.count(t) > 1})
    if twice:
        problems.append(f"data.order: {twice} named more than once")
    missing = [t for t in names if t not in given]
    if missing and not unknown:
        problems.append(f"data.order: a permutation of {list(names)} is expected; {missing} missing")
    return problems


def ordered(names: Sequence[str], order: str | Sequence[str]) -> list[str]:
    """The tasks ``names`` (the stream's, or ``data.tasks``, in their order) in the order
    ``data.order`` asks for: ``paper`` keeps them, ``reverse`` reverses them, ``random:<seed>``
    shuffles them with that seed (the same permutation on every machine), a list is taken as
    given (a permutation of ``names``)."""
    problems = order_problems(names, order)
    if problems:
        raise ValueError("; ".join(problems))
    if order == "paper":
        return list(names)
    if order == "reverse":
        return list(reversed(names))
    if isinstance(order, str) and order.startswith("random:"):
        out = list(names)
        random.Random(int(order.split(":", 1)[1])).shuffle(out)
        return out
    return _listed(order) if isinstance(order, str) else list(order)


def _listed(order: str) -> list[str]:
    """``"Med,RS"`` or ``"[Med, RS]"`` (a list quoted as a string, as a sweep file may hold it)."""
    return [t.strip() for t in order.strip().removeprefix("[").removesuffix("]").split(",") if t.strip()]
