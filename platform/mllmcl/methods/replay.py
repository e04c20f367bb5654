"""replay: lora_ft with a bounded random buffer of earlier tasks' training samples.

At stage k the buffer holds, for every earlier task i < k, ``method.replay_per_task``
of its train samples (or, with ``replay_per_task=0``, ``replay_ratio`` × the size of
task k's train split shared equally among the earlier tasks). The samples of task i are
a seeded random draw that depends only on (seed, i), so a task's share of the buffer
stays the same from stage to stage and across resumed runs.
"""

from dataclasses import dataclass

import numpy as np

from mllmcl.methods import register
from mllmcl.methods.base import MethodOptions, Stage
from mllmcl.methods.lora_ft import LoraFT


@dataclass(frozen=True)
class ReplayOptions(MethodOptions):
    replay_per_task: int = 100  # samples kept per earlier task (0 = use replay_ratio)
    replay_ratio: float = 0.0  # buffer size as a fraction of the current task's train split

    def check(self) -> list[str]:
        p = []
        if self.replay_per_task < 0:
            p.append(f"method.replay_per_task={self.replay_per_task}: must be >= 0")
        if not 0 <= self.replay_ratio <= 10:
            p.append(f"method.replay_ratio={self.replay_ratio}: must be in [0, 10]")
        return p


@register("replay")
class Replay(LoraFT):
    Options = ReplayOptions

    def __init__(self, cfg, stream):
        super().__init__(cfg, stream)
        self.buffer: dict[str, list[str]] = {}

    def per_task(self, stage: Stage) -> int:
        m = self.options
        if m.replay_per_task:
            return m.replay_per_task
        return max(1, int(round(m.replay_ratio * len(stage.task.train) / max(1, stage.k))))

    def training_samples(self, stage: Stage):
        samples = list(stage.task.train)
        quota = self.per_task(stage)
        self.buffer = {}
        for i, task in enumerate(stage.stream.tasks[: stage.k]):
            rng = np.random.default_rng([self.cfg.run.seed, 104729, i])
            order = rng.permutation(len(task.train))[:quota]
            kept = [task.train[j] for j in sorted(order.tolist())]
            self.buffer[task.name] = [s.uid for s in kept]
            samples += kept
        return samples

    def state_dict(self) -> dict:
        return {"buffer_sizes": {k: len(v) for k, v in self.buffer.items()}}
