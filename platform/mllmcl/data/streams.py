"""The two MLLM-CL streams, by name, with their task order and folder layout."""

from __future__ import annotations

from dataclasses import dataclass

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
