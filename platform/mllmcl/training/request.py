"""What one fine-tuning job needs, in a form that travels to Ray Train workers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mllmcl.data.types import Sample
from mllmcl.models.lora import LoraSettings
from mllmcl.training.loop import TrainSettings


def sample_to_dict(s: Sample) -> dict:
    return {"uid": s.uid, "task": s.task, "split": s.split, "image": s.image, "image_rel": s.image_rel,
            "question": s.question, "answer": list(s.answer) if isinstance(s.answer, tuple) else s.answer,
            "meta": dict(s.meta)}


def sample_from_dict(d: dict) -> Sample:
    ans = d["answer"]
    return Sample(uid=d["uid"], task=d["task"], split=d["split"], image=d["image"], image_rel=d["image_rel"],
                  question=d["question"], answer=tuple(ans) if isinstance(ans, list) else ans, meta=d["meta"])


@dataclass
class TrainRequest:
    """Fine-tune one adapter: on ``samples``, from ``init_adapter`` (or fresh), into ``output_uri``."""

    stage: int
    task: str
    kind: str  # expert | lora | router
    samples: list[Sample]
    output_uri: str
    lora: LoraSettings
    train: TrainSettings
    init_adapter: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    recipe: str = "lora"  # how the worker builds, regularises and saves the adapter (training.recipes)
    recipe_args: dict[str, Any] = field(default_factory=dict)

    def to_config(self) -> dict:
        return {"stage": self.stage, "task": self.task, "kind": self.kind,
                "samples": [sample_to_dict(s) for s in self.samples], "output_uri": self.output_uri,
                "lora": asdict(self.lora), "train": asdict(self.train), "init_adapter": self.init_adapter,
                "meta": self.meta, "recipe": self.recipe, "recipe_args": self.recipe_args}

    @classmethod
    def from_config(cls, d: dict) -> "TrainRequest":
        lora = dict(d["lora"])
        lora["target_modules"] = tuple(lora["target_modules"])
        return cls(stage=d["stage"], task=d["task"], kind=d["kind"],
                   samples=[sample_from_dict(s) for s in d["samples"]], output_uri=d["output_uri"],
                   lora=LoraSettings(**lora), train=TrainSettings(**d["train"]), init_adapter=d["init_adapter"],
                   meta=d["meta"], recipe=d.get("recipe", "lora"), recipe_args=d.get("recipe_args") or {})
