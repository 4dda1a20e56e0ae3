from __future__ import annotations

import csv
import json

import pytest

from llamaworks.cli import main
from llamaworks.eval.run import evaluate_mc, evaluate_mmlu, results_table
from llamaworks.eval.tasks import get_task
from llamaworks.eval.tasks.mmlu import SUBJECT_CATEGORY, fewshot_for, mmlu_prompt


class StubLM:
    """log P(continuation | context) = score(context, continuation); words are tokens."""

    def __init__(self, score, max_length: int = 2048):
        self.score, self.max_length, self.requests = score, max_length, []

    def loglikelihood(self, requests):
        self.requests += list(requests)
        return [(float(self.score(c, x)), False) for c, x in requests]

    def tok_encode(self, text):
        return text.split()

    def encode_pair(self, context, continuation):
        return self.tok_encode(context), self.tok_encode(continuation)


# -- RACE ------------------------------------------------------------------------------------

ARTICLE = "Tom has a red cat. It sleeps all day."


def write_race_release(root):
    (root / "test" / "middle").mkdir(parents=True)
    (root / "test" / "high").mkdir(parents=True)
    (root / "test" / "middle" / "7.txt").write_text(json.dumps({
        "id": "middle7.txt", "article": ARTICLE, "answers": ["B", "A"],
        "questions": ["What colour is the cat?", "Who has a cat?"],
        "options": [["blue", "red", "green", "black"], ["Tom", "Ann", "Bob", "Sue"]]}))
    (root / "test" / "high" / "9.txt").write_text(json.dumps({
        "id": "high9.txt", "article": "A long text.", "answers": ["D"], "questions": ["Why?"],
        "options": [["a", "b", "c", "d"]]}))
    return root


def test_race_reads_the_release_folder_and_the_hf_layout(tmp_path):
    root = write_race_release(tmp_path / "RACE")
    middle = get_task("race_middle")
    orig = middle.load(root)
    assert [e.id for e in orig] == ["middle7.txt/0", "middle7.txt/1"]
    assert orig[0].context == f"Article: {ARTICLE}\n\nQuestion: What colour is the cat?\nAnswer:"
    assert orig[0].choices == [" blue", " red", " green", " black"] and orig[0].gold == 1 and orig[1].gold == 0
    assert [e.id for e in get_task("race_high").load(root)] == ["high9.txt/0"]
    assert middle.load(root / "test" / "middle", limit=1)[0].context == orig[0].context  # a level folder
    hf = tmp_path / "race.jsonl"
    hf.write_text(json.dumps({"example_id": "middle7.txt", "article": ARTICLE, "answer": "B",
                              "question": "What colour is the cat?", "options": ["blue", "red", "green", "black"]})
                  + "\n")
    (h,) = middle.load(hf)
    assert (h.context, h.choices, h.gold, h.id) == (orig[0].context, orig[0].choices, 1, "middle7.txt")


def test_race_is_char_normalised_by_hand(tmp_path):
    # " red" has the lower total but the higher per-character log-likelihood: -3/3 > -8/5.
    lls = {" blue": -8.0, " red": -3.0, " green": -20.0, " black": -20.0, " Tom": -1.0, " Ann": -0.5,
           " Bob": -9.0, " Sue": -9.0}
    examples = get_task("race_middle").load(write_race_release(tmp_path / "RACE"))
    res = evaluate_mc(StubLM(lambda c, x: lls[x]), get_task("race_middle"), examples)
    assert res["examples"][0]["scores"] == pytest.approx([-2.0, -1.0, -4.0, -4.0])
    assert [e["prediction"] for e in res["examples"]] == [1, 1] and res["acc"] == 0.5
    table = results_table([res])
    assert "RACE-middle" in table and "61.1" in table and "67.9" in table


def test_race_missing_data_names_task_layout_and_source(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"task race_high.*RACE/.*cmu.edu"):
        get_task("race_high").load(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"task race_middle.*example_id.*cmu.edu"):
        get_task("race_middle").load(tmp_path / "race.jsonl")


# -- MMLU ------------------------------------------------------------------------------------

def rows(subject: str, n: int, answers: str = "ABCD"):
    return [[f"{subject} q{i}?", f"a{i}", f"b{i}", f"c{i}", f"d{i}", answers[i % len(answers)]] for i in range(n)]


def write_mmlu_release(root):
    data = {("dev", "astronomy"): rows("astronomy", 6), ("test", "astronomy"): rows("astronomy", 2, "BC"),
            ("dev", "virology"): rows("virology", 5), ("test", "virology"): rows("virology", 1, "D")}
    for (split, subject), rs in data.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        with open(root / split / f"{subject}_{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rs)
    return root


def as_hf(rs, subject):
    return "".join(json.dumps({"question": r[0], "subject": subject, "choices": r[1:5],
                               "answer": "ABCD".index(r[5])}) + "\n" for r in rs)


def test_mmlu_prompt_text_exactly(tmp_path):
    task = get_task("mmlu")
    root = write_mmlu_release(tmp_path / "data")
    test, dev = task.load(root), task.load_fewshot(root)
    assert [e.subject for e in test] == ["astronomy", "astronomy", "virology"] and len(dev) == 11
    assert [e.gold for e in test] == [1, 2, 3] and test[0].choices == [" A", " B", " C", " D"]
    prompt = mmlu_prompt(test[0], fewshot_for(dev, "astronomy", 2))
    assert prompt == (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "astronomy q0?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer: A\n\n"
        "astronomy q1?\nA. a1\nB. b1\nC. c1\nD. d1\nAnswer: B\n\n"
        "astronomy q0?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer:")
    # The zero-shot context (what evaluate_mc alone would score) has the header and the question.
    assert test[2].context == ("The following are multiple choice questions (with answers) about virology.\n\n"
                               "virology q0?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer:")


def test_mmlu_layouts_agree_and_fewshot_is_deterministic(tmp_path):
    task = get_task("mmlu")
    root = write_mmlu_release(tmp_path / "data")
    (tmp_path / "test.jsonl").write_text(as_hf(rows("astronomy", 2, "BC"), "astronomy")
                                         + as_hf(rows("virology", 1, "D"), "virology"))
    (tmp_path / "dev.jsonl").write_text(as_hf(rows("virology", 5), "virology") + as_hf(rows("astronomy", 6),
                                                                                        "astronomy"))
    orig, hf = task.load(root), task.load(tmp_path / "test.jsonl")
    assert [(e.context, e.choices, e.gold, e.subject) for e in orig] == [
        (e.context, e.choices, e.gold, e.subject) for e in hf]
    assert task.load(root / "test" / "astronomy_test.csv")[1].gold == 2  # one CSV file
    # The first five dev questions of the subject, whatever the order of the other subjects.
    for pool in (task.load_fewshot(root), task.load_fewshot(tmp_path / "dev.jsonl"),
                 task.load_fewshot(root / "dev")):
        shots = fewshot_for(pool, "astronomy", 5)
        assert [s.question_block.split("?")[0] for s in shots] == [f"astronomy q{i}" for i in range(5)]
    with pytest.raises(ValueError, match="6 dev questions of virology"):
        fewshot_for(task.load_fewshot(root), "virology", 6)
    assert len(SUBJECT_CATEGORY) == 57 and SUBJECT_CATEGORY["anatomy"] == "Other"
    assert SUBJECT_CATEGORY["astronomy"] == "STEM" and SUBJECT_CATEGORY["virology"] == "Other"


def test_mmlu_scores_by_hand(tmp_path):
    task = get_task("mmlu")
    root = write_mmlu_release(tmp_path / "data")
    # The model answers "B" to every question: astronomy q0 (B) right, q1 (C) wrong, virology (D) wrong...
    # except virology q0, where it answers "D".
    def score(ctx, cont):
        pick = " D" if ctx.endswith("virology q0?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer:") else " B"
        return 0.0 if cont == pick else -1.0

    lm = StubLM(score)
    res = evaluate_mmlu(lm, task, task.load(root), shots=5, fewshot_pool=task.load_fewshot(root))
    assert [e["prediction"] for e in res["examples"]] == [1, 1, 3]
    assert res["scores"]["Average"] == pytest.approx(2 / 3) and res["acc"] == pytest.approx(2 / 3)
    assert res["scores"]["STEM"] == 0.5 and res["scores"]["Other"] == 1.0
    assert "Humanities" not in res["scores"]  # no question of that category
    assert res["scores"]["subject mean"] == pytest.approx(0.75) and res["counts"]["subject mean"] == 2
    assert res["subjects"] == {"astronomy": 0.5, "virology": 1.0} and res["counts"]["STEM"] == 2
    assert all(e["shots"] == 5 for e in res["examples"])
    assert res["examples"][0]["prompt"].count("Answer:") == 6
    assert {x for _, x in lm.requests} == {" A", " B", " C", " D"}
    table = results_table([res])
    assert "MMLU Average" in table and "63.4" in table and "MMLU STEM" in table and "51.7" in table
    # A short window drops shots from the end, as Hendrycks et al.
    short = evaluate_mmlu(StubLM(score, max_length=40), task, task.load(root)[:1], shots=5,
                          fewshot_pool=task.load_fewshot(root))
    assert short["examples"][0]["shots"] < 5
    assert len(short["examples"][0]["prompt"].split()) + 2 <= 40
    with pytest.raises(ValueError, match="dev split"):
        evaluate_mmlu(lm, task, task.load(root), shots=5)


def test_mmlu_missing_data_names_task_layout_and_source(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"task mmlu.*_test.csv.*hendrycks"):
        get_task("mmlu").load(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"task mmlu.*cais/mmlu.*hendrycks"):
        get_task("mmlu").load(tmp_path / "mmlu.parquet")
    with pytest.raises(ValueError, match="needs --data"):
        get_task("mmlu").load(None)


def test_eval_command_mmlu_and_race_folders(tiny_model_dir, tmp_path, capsys):
    root = write_mmlu_release(tmp_path / "data")
    out = tmp_path / "mmlu.json"
    assert main(["eval", "--checkpoint", str(tiny_model_dir), "--task", "mmlu", "--data", str(root),
                 "--output", str(out), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "MMLU Average" in table and "35.1" in table and "MMLU Other" in table
    res = json.loads(out.read_text())["results"]["mmlu"]
    assert res["n"] == 3 and res["shots"] == 5 and {"prompt", "choices", "subject", "gold"} <= set(res["examples"][0])
    race = write_race_release(tmp_path / "RACE")
    assert main(["eval", "--checkpoint", str(tiny_model_dir), "--task", "race_middle,race_high", "--data", str(race),
                 "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "RACE-middle" in table and "RACE-high" in table and "51.6" in table
    assert main(["eval", "--checkpoint", str(tiny_model_dir), "--task", "race_high", "--shots", "1"]) == 2
    assert "zero-shot" in capsys.readouterr().err
