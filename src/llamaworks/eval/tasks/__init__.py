"""Benchmarks of the paper's sections 3 and 5 as local files in their public formats.

A task reads its examples from a file the user holds (no network: the paper's benchmarks
have their own licences and hosts); `get_task(name)` gives the loader, the prompt, the
scoring rule and the paper's LLaMA-7B/65B numbers to compare against.
"""

from __future__ import annotations

from llamaworks.eval.tasks.base import GroupedMCTask, MCExample, MCTask, read_records
from llamaworks.eval.tasks.bias import BIAS_TASKS
from llamaworks.eval.tasks.code import CODE_TASKS, CodeExample, CodeTask
from llamaworks.eval.tasks.common_sense import COMMON_SENSE
from llamaworks.eval.tasks.math import MATH_TASKS, MathExample, MathTask
from llamaworks.eval.tasks.mmlu import MMLU_TASKS, MMLUExample, MMLUTask
from llamaworks.eval.tasks.qa import QA_TASKS, QAExample, QATask
from llamaworks.eval.tasks.reading import RACE_TASKS
from llamaworks.eval.tasks.realtoxicity import REALTOXICITY_TASKS, RealToxicityTask, RTPExample
from llamaworks.eval.tasks.truthfulqa import TRUTHFULQA_TASKS, TruthfulQAExample, TruthfulQATask

__all__ = ["MCExample", "MCTask", "GroupedMCTask", "QAExample", "QATask", "MathExample", "MathTask", "CodeExample",
           "CodeTask", "MMLUExample", "MMLUTask", "TruthfulQAExample", "TruthfulQATask", "RealToxicityTask",
           "RTPExample", "TASKS", "get_task", "read_records"]

Task = MCTask | QATask | MathTask | CodeTask | TruthfulQATask | RealToxicityTask
TASKS: dict[str, Task] = {t.name: t for t in [*COMMON_SENSE, *QA_TASKS, *RACE_TASKS, *MATH_TASKS, *CODE_TASKS,
                                              *MMLU_TASKS, *BIAS_TASKS, *TRUTHFULQA_TASKS, *REALTOXICITY_TASKS]}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]
