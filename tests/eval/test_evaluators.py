"""Every kind of task has one evaluator (eval/run.py's EVALUATORS), found by its class."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass

import pytest

import llamaworks.eval.tasks as tasks_package
from llamaworks.cli import main
from llamaworks.eval.during_training import TRAINING_EVALUATORS, training_evaluator
from llamaworks.eval.run import (
    EVALUATORS,
    evaluate_mc,
    evaluate_qa,
    evaluator_for,
    for_task_class,
    run_grouped,
    run_mc,
    run_mmlu,
)
from llamaworks.eval.tasks import TASKS, GroupedMCTask, MCTask, MMLUTask, QATask
from llamaworks.eval.tasks.bias import WinoGenderTask
from llamaworks.eval.tasks.reading import RaceTask


def task_classes() -> list[type]:
    """The classes of eval/tasks/* that load a benchmark (their examples are plain records)."""
    found = {}
    for info in pkgutil.iter_modules(tasks_package.__path__, tasks_package.__name__ + "."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and callable(getattr(cls, "load", None)):
                found[cls.__qualname__] = cls
    return list(found.values())


def test_the_task_classes_are_found():
    names = {cls.__name__ for cls in task_classes()}
    assert {"MCTask", "GroupedMCTask", "QATask", "MathTask", "CodeTask", "MMLUTask", "TruthfulQATask", "RaceTask",
            "WinoGenderTask"} <= names


@pytest.mark.parametrize("cls", task_classes(), ids=lambda c: c.__name__)
def test_every_task_class_has_an_evaluator(cls):
    assert evaluator_for(cls) in EVALUATORS.values()


def test_every_task_has_an_evaluator():
    assert all(evaluator_for(type(t)) for t in TASKS.values())


def test_a_subclass_uses_its_nearest_base_unless_it_has_its_own():
    assert evaluator_for(RaceTask).run is run_mc
    assert evaluator_for(WinoGenderTask).run is run_grouped
    assert evaluator_for(MMLUTask).run is run_mmlu  # MMLUTask is a GroupedMCTask with its own
    assert for_task_class({MCTask: 1, GroupedMCTask: 2}, MMLUTask) == 2
    assert for_task_class({QATask: 1}, MCTask) is None


def test_a_task_class_without_an_evaluator_is_a_clear_error():
    @dataclass(frozen=True)
    class SummaryTask:
        name: str = "summaries"

        def load(self, path, limit=None):
            return []

    with pytest.raises(ValueError, match="no evaluator for task class SummaryTask: add one to EVALUATORS"):
        evaluator_for(SummaryTask)


def test_which_tasks_the_paper_evaluates_zero_shot():
    zero_shot = {name for name, t in TASKS.items() if evaluator_for(type(t)).zero_shot}
    multiple_choice_but_mmlu = {name for name, t in TASKS.items() if isinstance(t, MCTask) and name != "mmlu"}
    assert zero_shot == multiple_choice_but_mmlu | {"truthfulqa_mc", "realtoxicityprompts"}
    assert {name for name, t in TASKS.items() if evaluator_for(type(t)).runs_code} == {"humaneval", "mbpp"}


def test_tasks_scored_during_training():
    assert TRAINING_EVALUATORS == {MCTask: evaluate_mc, QATask: evaluate_qa}
    for t in TASKS.values():
        if isinstance(t, (MCTask, QATask)):
            assert training_evaluator(t) is (evaluate_mc if isinstance(t, MCTask) else evaluate_qa)
        else:
            with pytest.raises(ValueError, match="not scored during training"):
                training_evaluator(t)


def test_every_task_is_listed_in_eval_help(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps the option help
    assert all(name in help_text for name in TASKS)
