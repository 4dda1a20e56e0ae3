"""Benchmark scores during training (the paper's Figure 2: accuracy on six benchmarks as
training proceeds).

The trainer scores a small task set every `eval.task_every` steps on the weights it is
training and logs one metrics.jsonl line {"step", "tokens", "eval/<task>": score, ...}.
Tasks are llamaworks' own (`llamaworks.eval.tasks`): multiple choice (accuracy, the paper's
scoring for each task) and closed-book QA (exact match, zero-shot). Their files are read
once, at the start of the run, from `eval.task_data`: a directory holding NAME.jsonl per task
(as `llamaworks eval --data DIR`), and the first `eval.task_limit` examples of each are kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from llamaworks.eval.lm import EvalModel
from llamaworks.eval.run import evaluate_mc, evaluate_qa, for_task_class
from llamaworks.eval.tasks import MCTask, QATask, get_task

__all__ = ["TRAINING_EVALUATORS", "TaskEvaluator", "evaluate_tasks", "training_evaluator"]

# The task kinds scored during training, zero-shot: fast enough to run every few hundred steps
# (a subclass, e.g. MMLU's, is scored as its base: its zero-shot multiple choice).
TRAINING_EVALUATORS = {MCTask: evaluate_mc, QATask: evaluate_qa}


def training_evaluator(task):
    evaluate = for_task_class(TRAINING_EVALUATORS, type(task))
    if evaluate is None:
        raise ValueError(f"eval.tasks: {task.name} is not scored during training (multiple choice and closed-book QA "
                         "are); use `llamaworks eval` on a checkpoint")
    return evaluate


def evaluate_tasks(model, tokenizer, task_sets, *, batch_size: int = 8) -> dict[str, float]:
    """{"eval/<task>": accuracy} of `model` on (task, examples) pairs; the model's train/eval
    mode is restored afterwards."""
    was_training = model.training
    try:
        lm = EvalModel(model, tokenizer, batch_size=batch_size)
        scores = {}
        for task, examples in task_sets:
            scores[f"eval/{task.name}"] = training_evaluator(task)(lm, task, examples)["acc"]
        return scores
    finally:
        model.train(was_training)


@dataclass
class TaskEvaluator:
    """The task set of a training run, loaded once; `run` scores it (see the module doc)."""

    task_sets: list
    every: int
    batch_size: int = 8

    @classmethod
    def from_config(cls, cfg) -> TaskEvaluator | None:
        """From an `EvalConfig` (tasks, task_data, task_limit, task_every); None without tasks."""
        if not cfg.tasks:
            return None
        every = cfg.task_every or cfg.every
        if every <= 0:
            raise ValueError("eval.tasks is set but eval.task_every (and eval.every) is 0: set eval.task_every")
        if cfg.task_limit is not None and cfg.task_limit < 1:
            raise ValueError(f"eval.task_limit must be >= 1, got {cfg.task_limit}")
        if not cfg.task_data or not Path(cfg.task_data).is_dir():
            raise ValueError(f"eval.task_data must be a directory holding NAME.jsonl for each of eval.tasks "
                             f"({', '.join(cfg.tasks)}), got {cfg.task_data!r}")
        sets = []
        for name in cfg.tasks:
            task = get_task(name)
            training_evaluator(task)  # fails now, before the run, for a task kind not scored during training
            sets.append((task, task.load(Path(cfg.task_data) / f"{name}.jsonl", cfg.task_limit)))
        return cls(sets, every)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def run(self, model, tokenizer) -> dict[str, float]:
        t0 = time.perf_counter()
        scores = evaluate_tasks(model, tokenizer, self.task_sets, batch_size=self.batch_size)
        return {**scores, "eval/seconds": time.perf_counter() - t0}
