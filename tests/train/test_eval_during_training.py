"""Benchmark scores during training (Figure 2): the trainer logs eval/<task> every N steps."""

from __future__ import annotations

import json

import pytest

from llamaworks.train.metrics_log import read_metrics


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    with open(root / "piqa.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"goal": f"How do I greet the king {i}?", "sol1": "Bow to him.",
                                "sol2": "Throw a sword at the crown.", "label": i % 2}) + "\n")
    with open(root / "naturalquestions.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"question": f"who is the king of scene {i}", "answer": ["the lord"]}) + "\n")
    return root


def test_trainer_logs_task_scores_every_n_steps(make_config, tmp_path, task_data):
    from llamaworks.train.trainer import train

    cfg = make_config(tmp_path / "run", eval={"tasks": ["piqa", "naturalquestions"], "task_data": str(task_data),
                                              "task_limit": 4, "task_every": 3})
    train(cfg)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/piqa" in r]
    assert [r["step"] for r in rows] == [3, 6]
    for r in rows:
        assert r["tokens"] == r["step"] * 128
        assert r["eval/piqa"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 examples
        assert 0.0 <= r["eval/naturalquestions"] <= 1.0 and r["eval/seconds"] > 0
    # the training lines are unaffected: one per step, with the loss
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r] == list(range(1, 9))


def test_scores_match_llamaworks_eval_and_restore_training_mode(tiny_model, tiny_tokenizer, task_data):
    from llamaworks.eval.during_training import evaluate_tasks
    from llamaworks.eval.lm import EvalModel
    from llamaworks.eval.run import evaluate_mc
    from llamaworks.eval.tasks import get_task

    piqa = get_task("piqa")
    examples = piqa.load(task_data / "piqa.jsonl")
    tiny_model.train()
    try:
        got = evaluate_tasks(tiny_model, tiny_tokenizer, [(piqa, examples)])
        assert tiny_model.training
    finally:
        tiny_model.eval()
    assert got == {"eval/piqa": evaluate_mc(EvalModel(tiny_model, tiny_tokenizer), piqa, examples)["acc"]}


def test_bad_task_settings_fail_before_training(make_config, tmp_path, task_data):
    from llamaworks.train.trainer import train

    with pytest.raises(ValueError, match="task_data"):
        train(make_config(tmp_path / "a", eval={"tasks": ["piqa"], "task_data": str(tmp_path / "none")}))
    with pytest.raises(ValueError, match="gsm8k"):
        train(make_config(tmp_path / "b", eval={"tasks": ["gsm8k"], "task_data": str(task_data)}))
    with pytest.raises(FileNotFoundError, match="boolq"):
        train(make_config(tmp_path / "c", eval={"tasks": ["boolq"], "task_data": str(task_data)}))
