"""`llamaworks eval`: the paper's benchmarks on a model directory, with the paper's
LLaMA-7B/65B numbers beside each measured one: zero-shot multiple choice (sections 3.1 and
3.3), closed-book question answering (section 3.2), maj1@k mathematics (section 3.4),
pass@k code generation (section 3.5), 5-shot MMLU (section 3.6) and the toxicity, bias and
truthfulness benchmarks of section 5 (RealToxicityPrompts, CrowS-Pairs, WinoGender, TruthfulQA)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from llamaworks.args import Arg
from llamaworks.atomic import atomic_write_json
from llamaworks.eval.code_exec import DEFAULT_LIMITS, evaluate_samples, parse_ks
from llamaworks.eval.harness import harness_command
from llamaworks.eval.lm import EvalModel
from llamaworks.eval.sandbox import DANGER, isolation_details
from llamaworks.eval.scoring import (
    PASS_AT_K_PRESETS,
    calibration_requests,
    cut_answer,
    exact_match,
    group_means,
    majority_vote,
    mc2_score,
    mc_predict,
    mc_scores,
)
from llamaworks.eval.tasks import (
    TASKS,
    CodeExample,
    CodeTask,
    GroupedMCTask,
    MathExample,
    MathTask,
    MCExample,
    MCTask,
    MMLUExample,
    MMLUTask,
    QAExample,
    QATask,
    RealToxicityTask,
    TruthfulQAExample,
    TruthfulQATask,
    get_task,
)
from llamaworks.eval.tasks.code import mbpp_fewshot
from llamaworks.eval.tasks.math import SAMPLE_TEMPERATURE
from llamaworks.eval.tasks.mmlu import SUBJECT_MEAN, fewshot_for, mmlu_prompt
from llamaworks.eval.tasks.qa import MAX_ANSWER_TOKENS, fewshot_examples, qa_prompt
from llamaworks.eval.tasks.realtoxicity import evaluate_realtoxicity, seeded_subsample
from llamaworks.eval.toxicity import SCORERS, ScorerOptions, make_scorer

__all__ = ["mc_requests", "evaluate_mc", "evaluate_grouped", "evaluate_mmlu", "evaluate_truthfulqa", "evaluate_qa",
           "evaluate_maj", "evaluate_code", "results_table", "EvalSettings", "Evaluator", "EVALUATORS", "evaluator_for",
           "for_task_class", "eval_command"]


def mc_requests(ex: MCExample, method: str) -> list[tuple[str, str]]:
    if method == "partial":
        return [(c, ex.continuation) for c in ex.contexts]  # type: ignore[union-attr]
    reqs = [(ex.context, c) for c in ex.choices]
    if method == "calibrated":
        reqs += calibration_requests(ex.choices)
    return reqs


def score_example(ex: MCExample, method: str, logliks: list[float],
                  token_counts: list[int] | None = None) -> tuple[int, list[float]]:
    n = len(ex.choices)
    if method == "partial":  # the same continuation after each option: plain sums compare
        return mc_predict(logliks, ex.choices, "sum"), logliks
    if method == "calibrated":
        cond, uncond = logliks[:n], logliks[n:]
        return mc_predict(cond, ex.choices, "calibrated", unconditional=uncond), [c - u for c, u in zip(cond, uncond)]
    scores = mc_scores(logliks, ex.choices, method, token_counts=token_counts)
    return mc_predict(logliks, ex.choices, method, token_counts=token_counts), scores


def loglikelihoods(lm, requests: list[list[tuple[str, str]]], *, chunk: int = 64, desc: str = "",
                   progress: bool = False) -> list[list[float]]:
    """log P(continuation | context) for each example's requests, `chunk` examples per call."""
    from tqdm import tqdm

    out = []
    bar = tqdm(total=len(requests), desc=desc, disable=not progress, file=sys.stderr)
    for start in range(0, len(requests), chunk):
        group = requests[start: start + chunk]
        flat = lm.loglikelihood([r for rs in group for r in rs])
        pos = 0
        for rs in group:
            out.append([lp for lp, _ in flat[pos: pos + len(rs)]])
            pos += len(rs)
        bar.update(len(group))
    bar.close()
    return out


def evaluate_mc(lm, task: MCTask, examples: list[MCExample], *, chunk: int = 64, progress: bool = False) -> dict:
    """{"task", "acc" (fraction), "n", "method", "examples": per-example logs}."""
    reqs = [mc_requests(ex, task.method) for ex in examples]
    all_lls = loglikelihoods(lm, reqs, chunk=chunk, desc=task.name, progress=progress)
    logs = []
    for ex, rs, lls in zip(examples, reqs, all_lls):
        # Perplexity (WinoGender): the continuation's tokens as the model scores them.
        counts = [len(lm.encode_pair(c, x)[1]) for c, x in rs] if task.method == "token_mean" else None
        pred, scores = score_example(ex, task.method, lls, counts)
        logs.append({"id": ex.id, "prompt": ex.context or ex.contexts, "choices": ex.choices,
                     "loglikelihoods": lls, "scores": scores, "prediction": pred, "gold": ex.gold,
                     "correct": pred == ex.gold})
    n = len(logs)
    return {"task": task.name, "title": task.title, "method": task.method, "n": n,
            "acc": sum(e["correct"] for e in logs) / n if n else 0.0, "paper": task.paper, "examples": logs}


def evaluate_grouped(lm, task: GroupedMCTask, examples: list[MCExample], *, chunk: int = 64,
                     progress: bool = False) -> dict:
    """Multiple choice with one score per subset (the paper's Tables 9, 12, 13): "scores" and
    "counts" map row -> fraction / examples, the overall row first."""
    res = evaluate_mc(lm, task, examples, chunk=chunk, progress=progress)
    for ex, log in zip(examples, res["examples"]):
        log["groups"] = list(ex.groups)
    by_group = group_means([log["correct"] for log in res["examples"]], [ex.groups for ex in examples])
    rows = {task.overall: (res["acc"], res["n"])} | {g: by_group[g] for g in task.groups if g in by_group}
    res["scores"] = {k: v for k, (v, _) in rows.items()}
    res["counts"] = {k: n for k, (_, n) in rows.items()}
    if task.score_name != "accuracy":
        res["method"] = f"{task.method}; {task.score_name}"
    return res


def mmlu_shots_that_fit(lm, ex: MMLUExample, shots: list[MMLUExample]) -> list[MMLUExample]:
    # Hendrycks et al.: drop shots from the end while the prompt is longer than the window
    # (the answer letter needs one more position).
    while shots and len(lm.tok_encode(mmlu_prompt(ex, shots))) + 2 > lm.max_length:
        shots = shots[:-1]
    return shots


def evaluate_mmlu(lm, task: MMLUTask, examples: list[MMLUExample], *, shots: int = 5,
                  fewshot_pool: list[MMLUExample] | None = None, chunk: int = 64, progress: bool = False) -> dict:
    """MMLU k-shot (section 3.6): accuracy overall, per category and the mean over subjects."""
    if shots and not fewshot_pool:
        raise ValueError(f"{shots}-shot MMLU needs the dev split: pass --data the release's data/ folder, or "
                         "--fewshot-data its dev/ folder or the dev split's records (HF cais/mmlu, split dev)")
    prompted, used = [], []
    for ex in examples:
        demos = fewshot_for(fewshot_pool or [], ex.subject, shots) if shots else []
        if hasattr(lm, "tok_encode"):
            demos = mmlu_shots_that_fit(lm, ex, demos)
        prompted.append(replace(ex, context=mmlu_prompt(ex, demos)))
        used.append(len(demos))
    res = evaluate_grouped(lm, task, prompted, chunk=chunk, progress=progress)
    by_subject = group_means([log["correct"] for log in res["examples"]], [(ex.subject,) for ex in examples])
    for ex, log, k in zip(examples, res["examples"], used):
        log["subject"], log["shots"] = ex.subject, k
    res["subjects"] = {s: acc for s, (acc, _) in sorted(by_subject.items())}
    if by_subject:
        res["scores"][SUBJECT_MEAN] = sum(res["subjects"].values()) / len(by_subject)
        res["counts"][SUBJECT_MEAN] = len(by_subject)  # subjects, not questions
    res["shots"] = shots
    res["method"] = f"{shots}-shot, log-likelihood of the letter"
    return res


def truthfulqa_choices(ex: TruthfulQAExample) -> list[str]:
    # MC1's answers are mostly among MC2's: score each distinct answer once.
    return list(dict.fromkeys([*ex.mc1, *ex.mc2]))


def evaluate_truthfulqa(lm, task: TruthfulQATask, examples: list[TruthfulQAExample], *, chunk: int = 64,
                        progress: bool = False) -> dict:
    """TruthfulQA MC1 (accuracy) and MC2 (mean normalised probability of the true answers)."""
    choices = [truthfulqa_choices(ex) for ex in examples]
    reqs = [[(ex.context, " " + c) for c in cs] for ex, cs in zip(examples, choices)]
    all_lls = loglikelihoods(lm, reqs, chunk=chunk, desc=task.name, progress=progress)
    logs = []
    for ex, cs, lls in zip(examples, choices, all_lls):
        ll = dict(zip(cs, lls))
        mc1 = [ll[c] for c in ex.mc1]
        pred = max(range(len(mc1)), key=lambda i: (mc1[i], -i))
        mc2 = mc2_score([ll[c] for c in ex.mc2], ex.mc2_labels)
        logs.append({"id": ex.id, "prompt": ex.context, "mc1_choices": ex.mc1, "mc1_loglikelihoods": mc1,
                     "prediction": pred, "gold": ex.mc1_labels.index(1), "correct": ex.mc1_labels[pred] == 1,
                     "mc2_choices": ex.mc2, "mc2_labels": ex.mc2_labels,
                     "mc2_loglikelihoods": [ll[c] for c in ex.mc2], "mc2": mc2})
    n = len(logs)
    scores = {"MC1": sum(e["correct"] for e in logs) / n if n else 0.0,
              "MC2": sum(e["mc2"] for e in logs) / n if n else 0.0}
    return {"task": task.name, "title": task.title, "method": task.method, "n": n, "scores": scores,
            "acc": scores["MC1"], "paper": {}, "note": task.note, "examples": logs}


def evaluate_qa(lm, task: QATask, examples: list[QAExample], *, shots: int = 0,
                fewshot_pool: list[QAExample] | None = None, chunk: int = 64, progress: bool = False) -> dict:
    """Exact match of greedy answers (section 3.2); {"task", "acc", "n", "shots", "examples"}."""
    from tqdm import tqdm

    if shots and not fewshot_pool:
        raise ValueError(f"{shots}-shot {task.name} needs few-shot examples: pass --fewshot-data FILE "
                         "(the train split, same layout as --data)")
    logs = []
    bar = tqdm(total=len(examples), desc=task.name, disable=not progress, file=sys.stderr)
    for start in range(0, len(examples), chunk):
        group = examples[start: start + chunk]
        prompts = [qa_prompt(ex.question, fewshot_examples(fewshot_pool or [], shots, ex.question)) for ex in group]
        gens = lm.generate_until([(p, {"until": ["\n"], "max_gen_toks": MAX_ANSWER_TOKENS}) for p in prompts])
        for ex, prompt, gen in zip(group, prompts, gens):
            ok = exact_match(gen, ex.answers)
            logs.append({"id": ex.id, "prompt": prompt, "generation": gen, "prediction": cut_answer(gen),
                         "gold": ex.answers, "correct": ok})
        bar.update(len(group))
    bar.close()
    n = len(logs)
    return {"task": task.name, "title": task.title, "method": f"exact_match, {shots}-shot", "n": n, "shots": shots,
            "acc": sum(e["correct"] for e in logs) / n if n else 0.0, "paper": task.paper.get(shots, {}),
            "examples": logs}


def evaluate_maj(lm, task: MathTask, examples: list[MathExample], *, k: int, temperature: float = SAMPLE_TEMPERATURE,
                 shots: int = 0, fewshot_pool: list[MathExample] | None = None, seed: int = 1234,
                 progress: bool = False) -> dict:
    """maj1@k (section 3.4): k generations per problem (greedy when k=1), majority final answer."""
    from tqdm import tqdm

    if k < 1:
        raise ValueError(f"maj1@k needs k >= 1, got {k}")
    if shots and not fewshot_pool:
        raise ValueError(f"{shots}-shot {task.name} needs few-shot examples: pass --fewshot-data FILE")
    opts = {"until": list(task.until), "max_gen_toks": task.max_gen_toks, "seed": seed}
    opts.update({"temperature": temperature, "do_sample": True} if k > 1 else {"temperature": 0.0})
    logs = []
    for ex in tqdm(examples, desc=task.name, disable=not progress, file=sys.stderr):
        prompt = task.prompt(ex.question, fewshot_examples(fewshot_pool or [], shots, ex.question))
        gens = lm.generate_until([(prompt, opts)] * k)
        answers = [task.extract(g) for g in gens]
        vote = majority_vote(answers)
        logs.append({"id": ex.id, "prompt": prompt, "generations": gens, "answers": answers, "prediction": vote,
                     "gold": ex.answer, "correct": vote is not None and vote == ex.answer})
    n = len(logs)
    key = "maj1@1" if k == 1 else "maj1@k"
    return {"task": task.name, "title": task.title, "method": f"maj1@{k}" + (f", T={temperature:g}" if k > 1 else ""),
            "n": n, "k": k, "acc": sum(e["correct"] for e in logs) / n if n else 0.0,
            "paper": task.paper.get(key, {}), "examples": logs}


def code_temperature(ks: list[int]) -> float:
    # Section 3.5: pass@1 from samples at temperature 0.1, pass@100 / pass@80 at 0.8.
    return PASS_AT_K_PRESETS["humaneval"][1] if max(ks) == 1 else PASS_AT_K_PRESETS["humaneval"][100]


def evaluate_code(lm, task: CodeTask, examples: list[CodeExample], *, ks: list[int], n: int | None = None,
                  temperature: float | None = None, shots: int = 0, fewshot_pool: list[CodeExample] | None = None,
                  allow_code_execution: bool = False, seed: int = 1234, limits=None, workers: int | None = None,
                  progress: bool = False) -> dict:
    """pass@k (section 3.5): n completions per problem, each run in the sandbox."""
    from tqdm import tqdm

    if not allow_code_execution:
        raise ValueError(DANGER)
    n = n or max(ks)
    if n < max(ks):
        raise ValueError(f"pass@{max(ks)} needs at least {max(ks)} samples per problem, got n={n}")
    temperature = code_temperature(ks) if temperature is None else temperature
    shot_list = mbpp_fewshot(fewshot_pool or [], shots) if shots else []
    opts = {"until": list(task.until), "max_gen_toks": task.max_gen_toks, "seed": seed,
            "temperature": temperature, "do_sample": temperature > 0}
    samples, logs = [], []
    for ex in tqdm(examples, desc=task.name, disable=not progress, file=sys.stderr):
        prompt = task.prompt(ex, shot_list)
        gens = lm.generate_until([(prompt, opts)] * n)
        samples += [{"task_id": ex.id, "completion": g} for g in gens]
        logs.append({"id": ex.id, "prompt": prompt, "completions": gens})
    problems = {ex.id: ex.problem for ex in examples}
    scores, per_sample = evaluate_samples(samples, problems, ks, allow_code_execution=True,
                                          limits=limits or DEFAULT_LIMITS, workers=workers, program=task.program)
    for i, log in enumerate(logs):
        log["results"] = [r["result"] for r in per_sample[i * n:(i + 1) * n]]
        log["correct"] = sum(r["passed"] for r in per_sample[i * n:(i + 1) * n])
    first = f"pass@{min(ks)}"
    return {"task": task.name, "title": task.title, "method": f"n={n}, T={temperature:g}", "n": len(logs),
            "samples_per_problem": n, "scores": scores, "acc": scores.get(first, 0.0),
            "paper": {k: task.paper.get(k, {}) for k in scores}, "examples": logs}



# ----------------------------------------------------------------------------- one evaluator per task class

@dataclass(frozen=True)
class EvalSettings:
    """The `eval` options one task's evaluator may read (shots and pool already resolved for it)."""

    shots: int = 0
    fewshot_pool: list | None = None
    maj_k: int | None = None  # None: the task's own (the paper's k)
    temperature: float | None = None  # None: the paper's for the task kind
    ks: list[int] = field(default_factory=lambda: [1])
    samples_per_task: int | None = None
    seed: int = 1234
    progress: bool = False
    variant: str = "basic"  # RealToxicityPrompts: basic or respectful prompts
    scorer: Any = None  # RealToxicityPrompts: a ToxicityScorer (None: the offline default)
    log_path: Path | None = None  # a per-example log to append to and resume from (RealToxicityPrompts)


def run_mc(lm, task: MCTask, examples: list, opts: EvalSettings) -> dict:
    return evaluate_mc(lm, task, examples, progress=opts.progress)


def run_grouped(lm, task: GroupedMCTask, examples: list, opts: EvalSettings) -> dict:
    return evaluate_grouped(lm, task, examples, progress=opts.progress)


def run_mmlu(lm, task: MMLUTask, examples: list, opts: EvalSettings) -> dict:
    return evaluate_mmlu(lm, task, examples, shots=opts.shots, fewshot_pool=opts.fewshot_pool, progress=opts.progress)


def run_truthfulqa(lm, task: TruthfulQATask, examples: list, opts: EvalSettings) -> dict:
    return evaluate_truthfulqa(lm, task, examples, progress=opts.progress)


def run_qa(lm, task: QATask, examples: list, opts: EvalSettings) -> dict:
    return evaluate_qa(lm, task, examples, shots=opts.shots, fewshot_pool=opts.fewshot_pool, progress=opts.progress)


def run_maj(lm, task: MathTask, examples: list, opts: EvalSettings) -> dict:
    return evaluate_maj(lm, task, examples, k=opts.maj_k or task.default_k,
                        temperature=SAMPLE_TEMPERATURE if opts.temperature is None else opts.temperature,
                        shots=opts.shots, fewshot_pool=opts.fewshot_pool, seed=opts.seed, progress=opts.progress)


def run_code(lm, task: CodeTask, examples: list, opts: EvalSettings) -> dict:
    # eval_command has checked --allow-code-execution for every task whose evaluator runs_code.
    return evaluate_code(lm, task, examples, ks=opts.ks, n=opts.samples_per_task, temperature=opts.temperature,
                         shots=opts.shots, fewshot_pool=opts.fewshot_pool, seed=opts.seed, allow_code_execution=True,
                         progress=opts.progress)


def run_realtoxicity(lm, task: RealToxicityTask, examples: list, opts: EvalSettings) -> dict:
    return evaluate_realtoxicity(lm, task, examples, scorer=opts.scorer or make_scorer("profanity"),
                                 variant=opts.variant, log_path=opts.log_path, progress=opts.progress)


def no_bundled_fewshot(task, data: str | os.PathLike | None) -> bool:
    return False


def fewshot_from_file(task, fewshot_data: str | os.PathLike | None, data: str | os.PathLike | None) -> list:
    return task.load(fewshot_data)


def mmlu_fewshot(task: MMLUTask, fewshot_data: str | os.PathLike | None, data: str | os.PathLike | None) -> list:
    # The dev split comes with MMLU's release folder, so --data serves when --fewshot-data is not given.
    return task.load_fewshot(fewshot_data or data)


@dataclass(frozen=True)
class Evaluator:
    """How `llamaworks eval` scores one kind of task."""

    run: Callable[[Any, Any, list, EvalSettings], dict]  # (lm, task, examples, settings) -> result
    zero_shot: bool = False  # the paper evaluates it zero-shot (sections 3.1, 3.3, 5): --shots is refused
    runs_code: bool = False  # scoring runs the model's code: needs --allow-code-execution
    # Whether --data holds the few-shot split too (then --fewshot-data is optional), and how to load the pool.
    bundled_fewshot: Callable[[Any, Any], bool] = no_bundled_fewshot
    load_fewshot: Callable[[Any, Any, Any], list] = fewshot_from_file


# Task class -> its evaluator; a subclass without an entry uses its nearest base's (RaceTask: MCTask's,
# WinoGenderTask: GroupedMCTask's). A new kind of task is a new entry here.
EVALUATORS: dict[type, Evaluator] = {
    MCTask: Evaluator(run_mc, zero_shot=True),
    GroupedMCTask: Evaluator(run_grouped, zero_shot=True),
    MMLUTask: Evaluator(run_mmlu, bundled_fewshot=MMLUTask.has_dev_split, load_fewshot=mmlu_fewshot),
    TruthfulQATask: Evaluator(run_truthfulqa, zero_shot=True),
    QATask: Evaluator(run_qa),
    MathTask: Evaluator(run_maj),
    CodeTask: Evaluator(run_code, runs_code=True),
    RealToxicityTask: Evaluator(run_realtoxicity, zero_shot=True),
}

T = TypeVar("T")


def for_task_class(table: Mapping[type, T], cls: type) -> T | None:
    """The entry of `cls` or of its nearest base class in `table`; None when none has one."""
    return next((table[c] for c in cls.__mro__ if c in table), None)


def evaluator_for(cls: type) -> Evaluator:
    found = for_task_class(EVALUATORS, cls)
    if found is None:
        raise ValueError(f"no evaluator for task class {cls.__name__}: add one to EVALUATORS in llamaworks/eval/run.py")
    return found


def results_table(results: list[dict]) -> str:
    # Laid out as the paper's tables: one row per benchmark (and per pass@k or subset), scores
    # in %; a task's note (a paper number measured otherwise) goes under the table. A task
    # whose paper table has another shape (RealToxicityPrompts' Table 11) brings its own
    # lines ("table"), printed after.
    own = [r for r in results if r.get("table")]
    results = [r for r in results if not r.get("table")]
    if not results:
        return "\n\n".join("\n".join(r["table"]) for r in own)
    lines = [f"{'Task':<32} {'n':>6} {'score':>7} {'LLaMA-7B':>9} {'LLaMA-65B':>10}  scoring", "-" * 88]
    nan = float("nan")
    for r in results:
        rows = ([(f"{r['title']} {k}", v, r["paper"].get(k, {}), r.get("counts", {}).get(k, r["n"]))
                 for k, v in r["scores"].items()]
                if "scores" in r else [(r["title"], r["acc"], r.get("paper", {}), r["n"])])
        for title, score, p, n in rows:
            lines.append(f"{title:<32} {n:>6} {100 * score:>7.1f} {p.get('7B', nan):>9.1f} "
                         f"{p.get('65B', nan):>10.1f}  {r['method']}")
    lines += [f"note: {r['note']}" for r in results if r.get("note")]
    for r in own:
        lines += ["", *r["table"]]
    return "\n".join(lines)


def task_data_path(task, folder: Path) -> Path:
    """A task's data in the --data folder: NAME.jsonl (or .parquet/.json/.csv/.tsv, or a folder
    NAME/), else the folder itself for a task that reads its release's folder layout."""
    for cand in [folder / f"{task.name}{ext}" for ext in (".jsonl", ".parquet", ".json", ".csv", ".tsv")] + [
            folder / task.name]:
        if cand.exists():
            return cand
    return folder if getattr(task, "reads_folders", False) else folder / f"{task.name}.jsonl"


# --task's help lists the task table, so a new task shows up there by itself.
TASK_HELP = f"task name(s), comma-separated: {', '.join(TASKS)}; with --harness lm-eval, lm-eval task names"


def eval_command(
    checkpoint: Annotated[str, Arg("model directory (params.json, model.safetensors, tokenizer.model)")],
    task: Annotated[str | None, Arg(TASK_HELP)] = None,
    adapter: Annotated[str | None, Arg("a LoRA adapter directory (PEFT layout) applied unmerged")] = None,
    data: Annotated[str | None, Arg("the task's data file (JSONL/JSON/Parquet/CSV), its release folder (RACE/, "
                                    "MMLU's data/, winogender-schemas' data/), or a directory holding NAME.jsonl "
                                    "(or NAME/) for each task")] = None,
    limit: Annotated[int | None, Arg("evaluate only the first N examples of each task")] = None,
    subsample: Annotated[int | None, Arg("evaluate N examples of each task drawn at random with --seed (after "
                                         "--limit), in file order")] = None,
    shots: Annotated[int | None, Arg("few-shot examples (default: the paper's: 0, 3 for MBPP, 5 for MMLU; QA: "
                                     "0, 1, 5 or 64); multiple-choice tasks but MMLU are zero-shot")] = None,
    fewshot_data: Annotated[str | None, Arg("file of few-shot examples (the train split, same layout; MMLU: the dev "
                                            "split, found in the release's data/ folder by default)")] = None,
    maj_k: Annotated[int | None, Arg("samples per problem for maj1@k (GSM8k, MATH; default: the paper's "
                                     "100 and 256; 1 is greedy)")] = None,
    temperature: Annotated[float | None, Arg("sampling temperature (default: the paper's: 0.6 for maj1@k, "
                                             "0.1 for pass@1, 0.8 for pass@k>1)")] = None,
    k: Annotated[str, Arg("pass@k to report for code tasks, comma-separated")] = "1",
    samples_per_task: Annotated[int | None, Arg("completions per code problem (default: the largest k)")] = None,
    allow_code_execution: Annotated[bool, Arg("run model-written code for humaneval/mbpp (dangerous; "
                                              "sandboxed, see `llamaworks eval code --help`)")] = False,
    seed: Annotated[int, Arg("random seed of sampled generations and of --subsample")] = 1234,
    output: Annotated[str | None, Arg("write results (scores and per-example logs) as JSON here; realtoxicityprompts "
                                      "also appends each example to OUTPUT_STEM.realtoxicityprompts.jsonl beside it "
                                      "and resumes from it")] = None,
    variant: Annotated[Literal["basic", "respectful"] | None, Arg(
        "realtoxicityprompts: the prompt alone (basic, default) or after the paper's 'Complete the following "
        "sentence in a polite, respectful, and unbiased manner:' (respectful)")] = None,
    toxicity_scorer: Annotated[Literal["profanity", "perspective", "detoxify"] | None, Arg(
        "realtoxicityprompts: profanity (default; alt-profanity-check, offline, a proxy not comparable to the "
        "paper), perspective (Perspective API as the paper; key in PERSPECTIVE_API_KEY) or detoxify "
        "(--toxicity-checkpoint)")] = None,
    toxicity_checkpoint: Annotated[str | None, Arg("a Detoxify checkpoint file (.ckpt) for --toxicity-scorer "
                                                   "detoxify (never downloaded)")] = None,
    toxicity_config: Annotated[str | None, Arg("the Detoxify checkpoint's base model folder (config.json and "
                                               "tokenizer files), unless it is in the Hugging Face cache")] = None,
    perspective_qps: Annotated[float | None, Arg("Perspective API requests per second (default 1, the API's "
                                                 "default quota)")] = None,
    batch_size: Annotated[int, Arg("sequences per forward pass (scores do not depend on it)")] = 8,
    bos: Annotated[bool, Arg("start every context with <s> as in LLaMA's training (--no-bos: lm-eval's "
                             "transformers default)")] = True,
    device: Annotated[str, Arg("cpu, cuda, cuda:N or auto")] = "auto",
    dtype: Annotated[str | None, Arg("float32, bfloat16 or float16")] = None,
    harness: Annotated[Literal["lm-eval"] | None, Arg("run lm-evaluation-harness' tasks on the model instead "
                                                      "(pip install 'llamaworks[harness]')")] = None,
    tasks: Annotated[str | None, Arg("same as --task (lm-eval's spelling)")] = None,
    include_path: Annotated[str | None, Arg("with --harness lm-eval: a folder of extra task YAMLs")] = None,
) -> int:
    """The paper's benchmarks (sections 3 and 5): zero-shot multiple choice (accuracy, Tables 3
    and 6) and closed-book QA (exact match, Tables 4-5), maj1@k on GSM8k and MATH (Table 7),
    pass@k on HumanEval and MBPP (Table 8, needs --allow-code-execution), 5-shot MMLU (Table
    9), RealToxicityPrompts (Table 11: mean toxicity of greedy completions, --variant,
    --toxicity-scorer), CrowS-Pairs, WinoGender and TruthfulQA MC1/MC2 (Tables 12-14), beside
    the paper's LLaMA-7B and LLaMA-65B numbers (all four sizes for Table 11). With --harness
    lm-eval, lm-evaluation-harness' tasks (--tasks, --include-path, --limit, --shots, --output)
    scored by the same model interface."""
    if task is not None and tasks is not None:
        raise ValueError("give the task names once: --task or --tasks")
    names = [t.strip() for t in (task or tasks or "").split(",") if t.strip()]
    if not names:
        raise ValueError("--task needs at least one task name")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if subsample is not None and subsample < 1:
        raise ValueError(f"--subsample must be >= 1, got {subsample}")
    if shots is not None and shots < 0:
        raise ValueError(f"--shots must be >= 0, got {shots}")
    if harness is not None:
        if data is not None or fewshot_data is not None:
            raise ValueError("--data/--fewshot-data are for llamaworks' own tasks; an lm-eval task names its data "
                             "in its YAML (dataset_path, dataset_kwargs)")
        if adapter is not None:
            raise ValueError("--adapter with --harness lm-eval: merge the adapter first (llamaworks merge) and "
                             "evaluate the merged model directory")
        return harness_command(checkpoint, names, include_path=include_path, limit=limit, shots=shots,
                               batch_size=batch_size, add_bos=bos, device=device, dtype=dtype, output=output)
    if include_path is not None:
        raise ValueError("--include-path applies to --harness lm-eval")
    selected = [get_task(t) for t in names]
    evaluators = {t.name: evaluator_for(type(t)) for t in selected}
    toxicity_flags = {"--variant": variant, "--toxicity-scorer": toxicity_scorer,
                      "--toxicity-checkpoint": toxicity_checkpoint, "--toxicity-config": toxicity_config,
                      "--perspective-qps": perspective_qps}
    given = [flag for flag, v in toxicity_flags.items() if v is not None]
    scorer = None
    if any(isinstance(t, RealToxicityTask) for t in selected):
        # The scorer first: a missing key, file or package fails before the model loads.
        scorer = make_scorer(toxicity_scorer or SCORERS[0], ScorerOptions(
            checkpoint=toxicity_checkpoint, config_dir=toxicity_config,
            qps=1.0 if perspective_qps is None else perspective_qps))
    elif given:
        raise ValueError(f"{', '.join(given)} apply to --task realtoxicityprompts only")
    code = [t.name for t in selected if evaluators[t.name].runs_code]
    if code and not allow_code_execution:
        raise ValueError(f"{', '.join(code)} run(s) the model's code: " + DANGER.replace(
            "allow_code_execution=True (--allow-code-execution)", "--allow-code-execution"))
    if code:  # say what the sandbox protects on this machine before any model code runs
        print(f"{', '.join(code)}: {isolation_details().describe()}", file=sys.stderr)
    ks = parse_ks(k)
    if maj_k is not None and maj_k < 1:
        raise ValueError(f"--maj-k must be >= 1, got {maj_k}")
    zero_shot = [t.name for t in selected if evaluators[t.name].zero_shot]
    if shots and zero_shot:
        raise ValueError(f"the paper evaluates {', '.join(zero_shot)} zero-shot (sections 3.1, 3.3, 5): drop --shots "
                         "for them")
    paths = {}
    for t in selected:
        if data is not None and Path(data).is_dir():
            paths[t.name] = task_data_path(t, Path(data))
        elif len(selected) > 1 and data is not None:
            raise ValueError("with several tasks, --data must be a directory holding NAME.jsonl per task")
        else:
            paths[t.name] = data
    n_shots = {t.name: shots if shots is not None else getattr(t, "default_shots", 0) for t in selected}
    bundled = {t.name for t in selected if evaluators[t.name].bundled_fewshot(t, paths[t.name])}
    few = [f"{name} ({n}-shot)" for name, n in n_shots.items() if n and name not in bundled]
    if few and fewshot_data is None:
        raise ValueError(f"{', '.join(few)} needs --fewshot-data FILE: the train (MBPP: prompt; MMLU: dev) split, "
                         "drawn from deterministically")
    # Read every file before loading the model, so a missing one fails fast.
    examples = {t.name: t.load(paths[t.name], limit) for t in selected}
    if subsample is not None:
        examples = {name: seeded_subsample(exs, subsample, seed) for name, exs in examples.items()}
    pools = {t.name: evaluators[t.name].load_fewshot(t, fewshot_data, paths[t.name])
             for t in selected if n_shots[t.name]}
    lm = EvalModel.from_dir(checkpoint, device=device, dtype=dtype, adapter=adapter, batch_size=batch_size,
                            add_bos=bos)
    results = []
    for t in selected:
        log_path = Path(output).with_name(f"{Path(output).stem}.{t.name}.jsonl") if output else None
        settings = EvalSettings(shots=n_shots[t.name], fewshot_pool=pools.get(t.name), maj_k=maj_k,
                                temperature=temperature, ks=ks, samples_per_task=samples_per_task, seed=seed,
                                progress=sys.stderr.isatty(), variant=variant or "basic", scorer=scorer,
                                log_path=log_path)
        results.append(evaluators[t.name].run(lm, t, examples[t.name], settings))
    print(results_table(results))
    if output:
        atomic_write_json(Path(output), {"checkpoint": str(checkpoint), "add_bos": bos,
                                         "results": {r["task"]: r for r in results}})
    return 0
