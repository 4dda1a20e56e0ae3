"""The lm-evaluation-harness adapter against lm-eval's own transformers backend (HFLM)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from llamaworks.eval.harness import _gen_options, harness_available

needs_lm_eval = pytest.mark.skipif(not harness_available(),
                                   reason="lm-evaluation-harness not installed (pip install 'llamaworks[harness]')")

TASK_HEAD = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""
TASKS = {
    "tiny_mc": """output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "tiny_ppl": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{question}}}}"
metric_list:
  - metric: word_perplexity
""",
    "tiny_gen": """output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices[0]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    import random

    rng = random.Random(0)
    words = "the king queen lord lady speak love night day sword crown heart blood fair foul good".split()
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    with open(root / "data.jsonl", "w") as f:
        for _ in range(10):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
            choices = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) for _ in range(4)]
            f.write(json.dumps({"question": q, "choices": choices, "label": rng.randrange(4)}) + "\n")
    for name, body in TASKS.items():
        (root / f"{name}.yaml").write_text(f"task: {name}\n" + TASK_HEAD.format(data=root / "data.jsonl")
                                           + body.format())
    return root


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_model, tiny_tokenizer):
    from llamaworks.convert.formats import save_checkpoint

    return save_checkpoint("hf", tiny_model, tiny_tokenizer, tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def task_manager(task_dir):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir))  # indexes lm-eval's own YAMLs too: once


def _evaluate(model, tasks, task_manager, **kw):
    import lm_eval

    out = lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=task_manager, log_samples=True, **kw)
    return {t: sorted(out["samples"][t], key=lambda s: s["doc_id"]) for t in tasks}


def _clean(text: str) -> bool:
    # Where a random model emits byte-fallback tokens of invalid UTF-8 or <unk>, the same token
    # ids decode differently (transformers replaces a whole run of bytes with U+FFFD and drops
    # <unk>; SentencePiece replaces only the invalid bytes and writes " ⁇ "): compare the rest.
    return not re.search("[\ufffd\u2047]|<unk>", text)


@needs_lm_eval
@pytest.mark.parametrize("add_bos", [True, False])
def test_adapter_matches_lm_evals_transformers_backend(tiny_model_dir, hf_dir, task_manager, add_bos):
    from llamaworks.eval.harness import LlamaworksLM
    from llamaworks.eval.lm import EvalModel

    # lm-eval's HFLM leaves BOS to the tokenizer (the exported LLaMA tokenizer adds it), which
    # is add_bos=True; add_bos_token=False is add_bos=False. With BOS from the tokenizer, HFLM's
    # rolling log-likelihood also scores <s> after the <s> prefix, so compare it without BOS only.
    tasks = ["tiny_mc", "tiny_gen"] + ([] if add_bos else ["tiny_ppl"])
    adapter = LlamaworksLM(str(tiny_model_dir), batch_size=3, add_bos=add_bos, device="cpu")
    ours = _evaluate(adapter, tasks, task_manager)
    hf_args = f"pretrained={hf_dir},dtype=float32" + ("" if add_bos else ",add_bos_token=False")
    theirs = _evaluate("hf", tasks, task_manager, model_args=hf_args, batch_size=4, device="cpu")
    for a, b in zip(ours["tiny_mc"], theirs["tiny_mc"]):
        assert a["doc_id"] == b["doc_id"] and a["arguments"] == b["arguments"]
        for (lp_a, greedy_a), (lp_b, greedy_b) in zip([r[0] for r in a["resps"]], [r[0] for r in b["resps"]]):
            assert float(lp_a) == pytest.approx(float(lp_b), abs=1e-4)
            assert bool(greedy_a) == bool(greedy_b)
    for a, b in zip(ours.get("tiny_ppl", []), theirs.get("tiny_ppl", [])):
        assert float(a["resps"][0][0]) == pytest.approx(float(b["resps"][0][0]), abs=1e-4)
    # Generations: the adapter passes lm-eval's arguments through to EvalModel unchanged ...
    lm = EvalModel.from_dir(tiny_model_dir, device="cpu", add_bos=add_bos)
    direct = lm.generate_until([(a["arguments"][0][0], {"until": ["\n"], "max_gen_toks": 8}) for a in ours["tiny_gen"]])
    assert [a["resps"][0][0] for a in ours["tiny_gen"]] == direct
    # ... and give transformers' greedy text. HFLM decodes the generated tokens alone, and
    # transformers' LLaMA decoder then drops the space of a leading "▁" (EvalModel decodes after
    # the prompt: "Answer:" -> " Paris").
    pairs = [(a["resps"][0][0], b["resps"][0][0]) for a, b in zip(ours["tiny_gen"], theirs["tiny_gen"])]
    for x, y in pairs:
        if _clean(x) and _clean(y):
            assert x.removeprefix(" ") == y
    assert len(ours["tiny_mc"]) == 10 and len(ours["tiny_gen"]) == 10


def test_bos_changes_the_scores(tiny_model, tiny_tokenizer):
    # The parity above is not vacuous: with and without <s> the log-likelihoods differ.
    from llamaworks.eval.lm import EvalModel

    reqs = [("Question: the king\nAnswer:", " good night"), ("Thou art", " fair")]
    a, b = (EvalModel(tiny_model, tiny_tokenizer, add_bos=bos).loglikelihood(reqs) for bos in (True, False))
    assert max(abs(x[0] - y[0]) for x, y in zip(a, b)) > 1e-3


@needs_lm_eval
def test_eval_command_harness(tiny_model_dir, task_dir, tmp_path, capsys):
    from llamaworks.cli import main

    out = tmp_path / "res.json"
    rc = main(["eval", "--harness", "lm-eval", "--tasks", "tiny_mc", "--include-path", str(task_dir),
               "--checkpoint", str(tiny_model_dir), "--limit", "4", "--device", "cpu", "--output", str(out)])
    assert rc == 0
    assert "tiny_mc" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["harness"] == "lm-eval" and 0 <= res["results"]["tiny_mc"]["acc,none"] <= 1
    assert len(res["samples"]["tiny_mc"]) == 4
    rc = main(["eval", "--harness", "lm-eval", "--tasks", "no_such_task", "--include-path", str(task_dir),
               "--checkpoint", str(tiny_model_dir)])
    assert rc == 2 and "no_such_task" in capsys.readouterr().err


def test_cli_rejects_mixed_options(tiny_model_dir, capsys):
    from llamaworks.cli import main

    assert main(["eval", "--checkpoint", str(tiny_model_dir), "--task", "boolq", "--tasks", "piqa"]) == 2
    assert main(["eval", "--checkpoint", str(tiny_model_dir), "--task", "boolq", "--include-path", "x"]) == 2
    assert main(["eval", "--checkpoint", str(tiny_model_dir), "--harness", "lm-eval", "--tasks", "x",
                 "--data", "d.jsonl"]) == 2


def test_gen_options_from_lm_eval_kwargs():
    assert _gen_options({"until": ["\n"], "do_sample": False, "num_beams": 1, "top_k": None}) == {
        "until": ["\n"], "do_sample": False}
    with pytest.raises(ValueError, match="top_k"):
        _gen_options({"top_k": 40})


def test_module_imports_without_lm_eval():
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "import llamaworks.eval.harness as h\n"
            "assert not h.harness_available()\n"
            "try:\n    h.LlamaworksLM\nexcept ImportError as e:\n    assert 'llamaworks[harness]' in str(e)\n"
            "else:\n    raise SystemExit('no ImportError')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@needs_lm_eval
def test_lm_eval_local_completions_against_the_server(tiny_model_dir, hf_dir, task_manager):
    # lm-eval's own OpenAI-completions client (echo + logprobs for log-likelihoods, stop strings
    # for generation) against `llamaworks serve`, scored like the in-process adapter.
    pytest.importorskip("fastapi")
    from serve.conftest import MODEL, running_server  # tests/ is on sys.path (rootdir-relative packages)

    from llamaworks.eval.harness import LlamaworksLM

    tasks = ["tiny_mc", "tiny_gen"]
    ours = _evaluate(LlamaworksLM(str(tiny_model_dir), batch_size=3, add_bos=False, device="cpu"), tasks,
                     task_manager)
    with running_server(tiny_model_dir) as served:
        args = (f"base_url={served.url}/v1/completions,model={MODEL},tokenizer={hf_dir},"
                "tokenizer_backend=huggingface,tokenized_requests=True,max_retries=1")
        theirs = _evaluate("local-completions", tasks, task_manager, model_args=args)
    for a, b in zip(ours["tiny_mc"], theirs["tiny_mc"]):
        assert a["doc_id"] == b["doc_id"]
        for (lp_a, greedy_a), (lp_b, greedy_b) in zip([r[0] for r in a["resps"]], [r[0] for r in b["resps"]]):
            assert float(lp_a) == pytest.approx(float(lp_b), abs=1e-4)
            assert bool(greedy_a) == bool(greedy_b)
    for a, b in zip(ours["tiny_gen"], theirs["tiny_gen"]):
        if _clean(a["resps"][0][0]):
            assert a["resps"][0][0] == b["resps"][0][0]
    assert len(theirs["tiny_mc"]) == 10
