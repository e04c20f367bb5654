"""disco_select: one LoRA expert per task (trained from the frozen base, as MR-LoRA's),
chosen at test time by identity: the cosine similarity between the question's text
embedding and each seen task's prototype (DISCO / HiDe-style task-identity selection).

The embedding is the base model's own language model, mean-pooled over the question's
tokens (no download, works for every backbone); a task's prototype is the mean embedding
of ``method.prototype_samples_per_task`` of its train questions, computed once, after
the task is trained, and stored in the run (``tasks/<k>_<task>/prototype.json``). This is
a second, cheaper router to compare with MR-LoRA's MLLM router: selection accuracy is
reported under the same keys (``router_accuracy``...).
"""

from __future__ import annotations

import numpy as np

from mllmcl import storage
from mllmcl.data.prompts import eval_prompt
from mllmcl.methods import register
from mllmcl.methods.base import Answers, CLMethod, NotServable, Stage, request, routed_answer


@register("disco_select")
class DiscoSelect(CLMethod):
    routed = True

    def plan(self, stage: Stage):
        return [request(stage, "expert", stage.task.train, stage.expert_uri())]

    @staticmethod
    def prototype_uri(stage: Stage, k: int) -> str:
        return storage.join(stage.layout.task_dir(k, stage.stream.tasks[k].name), "prototype.json")

    def finish(self, stage: Stage, predictor) -> None:
        uri = self.prototype_uri(stage, stage.k)
        if storage.exists(uri):
            return
        train = stage.task.train
        n = min(self.cfg.method.prototype_samples_per_task, len(train))
        rng = np.random.default_rng([self.cfg.run.seed, 6151, stage.k])
        pick = sorted(rng.choice(len(train), n, replace=False).tolist())
        emb = np.asarray(predictor.embed([eval_prompt(train[j]) for j in pick]), dtype=np.float64)
        proto = emb.mean(axis=0)
        proto /= max(np.linalg.norm(proto), 1e-12)
        storage.write_json(uri, {"task": stage.task.name, "samples": n, "uids": [train[j].uid for j in pick],
                                 "embedding": proto.tolist()})

    def prototypes(self, stage: Stage) -> np.ndarray:
        return np.asarray([storage.read_json(self.prototype_uri(stage, i))["embedding"] for i in range(stage.k + 1)])

    def select(self, stage: Stage, predictor, task_index: int) -> list[int]:
        """Expert index per test sample of seen task ``task_index``."""
        task = stage.seen[task_index]
        if stage.k == 0:
            return [0] * len(task.test)
        q = np.asarray(predictor.embed([eval_prompt(s) for s in task.test]), dtype=np.float64)
        return (q @ self.prototypes(stage).T).argmax(axis=1).tolist()

    def answer(self, stage: Stage, predictor) -> Answers:
        answers = routed_answer(stage, predictor, lambda j: (self.select(stage, predictor, j), 0))
        answers.info["selector"] = "text-prototype cosine"
        return answers

    def serving(self, stage: Stage):
        raise NotServable("disco_select routes by text prototypes, which the service does not implement "
                          "(it serves MR-LoRA's MLLM router); evaluate it with the stream runner")
