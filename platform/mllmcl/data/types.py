"""The benchmark's vocabulary: Sample, Task, Stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class Sample:
    """One question about one image.

    ``uid`` is the record's ``id`` (train) or ``question_id`` (test); ``image`` is the
    resolved path or URI of the image; ``image_rel`` is the path as written in the
    JSON; ``question`` is the user's text without the ``<image>`` placeholder;
    ``answer`` is a string, or a tuple of acceptable strings (OCRBench).
    ``meta`` keeps the release's extra fields (``answer_type``, ``type``, ``task``...).
    """

    uid: str
    task: str
    split: str
    image: str
    image_rel: str
    question: str
    answer: str | tuple[str, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def answers(self) -> tuple[str, ...]:
        return self.answer if isinstance(self.answer, tuple) else (self.answer,)

    @property
    def target(self) -> str:
        """The text a model is trained to produce (the first acceptable answer)."""
        return self.answers[0]


@dataclass(frozen=True)
class TaskSpec:
    """What the benchmark says about a task, independent of where its data lives."""

    name: str
    stream: str
    title: str
    scorer: str
    max_new_tokens: int
    description: str  # one line, shown to the MR-LoRA router


@dataclass(frozen=True)
class Task:
    """A task of a stream with its loaded train and test splits."""

    spec: TaskSpec
    index: int
    root: str
    train: Sequence[Sample]
    test: Sequence[Sample]

    @property
    def name(self) -> str:
        return self.spec.name

    def split(self, name: str) -> Sequence[Sample]:
        if name not in ("train", "test"):
            raise ValueError(f"unknown split {name!r}: expected 'train' or 'test'")
        return self.train if name == "train" else self.test


@dataclass(frozen=True)
class Stream:
    """Tasks in the order they are learned."""

    name: str
    root: str
    tasks: Sequence[Task]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def __iter__(self):
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"task {name!r} is not in stream {self.name!r} (tasks: {self.task_names})")
