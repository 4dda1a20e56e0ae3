"""Scoring rules of the paper's section 3, as pure functions.

- Multiple choice (section 3): the completion with the highest likelihood, normalised by
  its number of characters (Gao et al. 2021, lm-evaluation-harness' acc_norm) by default;
  for OpenBookQA and BoolQ the calibrated score of Brown et al. (2020),
  log P(completion | context) - log P(completion | "Answer:"). Plain sum and per-token
  mean are there for comparison; WinoGrande uses partial scoring (Sakaguchi et al. 2020).
- Closed-book QA (section 3.2): exact match after cutting and normalising the answer.
- Mathematical reasoning (section 3.4): maj1@k, a majority vote over k samples.
- Code (section 3.5): pass@k with the unbiased estimator of Chen et al. (2021).
- TruthfulQA (section 5.4) as multiple choice: MC2, the normalised probability of the true
  answers; results by subset (MMLU categories, CrowS-Pairs bias types, WinoGender pronouns).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Literal

__all__ = [
    "CALIBRATION_CONTEXT", "MC_METHODS", "MAJ_K", "PASS_AT_K_PRESETS", "mc_scores", "mc_predict",
    "calibration_requests", "winogrande_partial_requests", "cut_answer", "normalize_answer", "exact_match",
    "gsm8k_answer", "math_answer", "last_boxed", "majority_vote", "pass_at_k", "mean_pass_at_k",
    "mc2_score", "group_means",
]

# Brown et al. (2020), section 2: the unconditional context of the calibrated score.
CALIBRATION_CONTEXT = "Answer:"

Method = Literal["char_norm", "calibrated", "sum", "token_mean"]
MC_METHODS: tuple[str, ...] = ("char_norm", "calibrated", "sum", "token_mean")

# Section 3.4: maj1@k with k=256 samples for MATH and k=100 for GSM8k.
MAJ_K = {"math": 256, "gsm8k": 100}
# Section 3.5: pass@1 sampled at temperature 0.1, pass@100 (HumanEval) / pass@80 (MBPP) at 0.8.
PASS_AT_K_PRESETS = {
    "humaneval": {1: 0.1, 100: 0.8},
    "mbpp": {1: 0.1, 80: 0.8},
}


# -- multiple choice -------------------------------------------------------------------------


def mc_scores(logliks: Sequence[float], choices: Sequence[str], method: Method = "char_norm", *,
              token_counts: Sequence[int] | None = None,
              unconditional: Sequence[float] | None = None) -> list[float]:
    """Per-choice scores; the prediction is their argmax.

    logliks: log P(choice | context); choices: the continuation strings as scored (their
    character count normalises char_norm, as lm-eval's acc_norm); token_counts: continuation
    tokens (token_mean); unconditional: log P(choice | "Answer:") (calibrated).
    """
    if len(logliks) != len(choices):
        raise ValueError(f"{len(logliks)} log-likelihoods for {len(choices)} choices")
    if method == "sum":
        return [float(x) for x in logliks]
    if method == "char_norm":
        if any(len(c) == 0 for c in choices):
            raise ValueError("char_norm needs non-empty choices (it divides by their length)")
        # As lm-eval's acc_norm: the target delimiter (the one space between context and
        # choice) is not part of the choice's length.
        return [x / len(c.removeprefix(" ") or c) for x, c in zip(logliks, choices)]
    if method == "token_mean":
        if token_counts is None or len(token_counts) != len(choices) or min(token_counts) < 1:
            raise ValueError("method 'token_mean' needs token_counts: one count >= 1 per choice")
        return [x / n for x, n in zip(logliks, token_counts)]
    if method == "calibrated":
        if unconditional is None or len(unconditional) != len(choices):
            raise ValueError(f"method 'calibrated' needs unconditional: log P(choice | {CALIBRATION_CONTEXT!r}) "
                             "per choice (see calibration_requests)")
        return [x - u for x, u in zip(logliks, unconditional)]
    raise ValueError(f"unknown multiple-choice method {method!r}; choose one of {', '.join(MC_METHODS)}")


def argmax(scores: Sequence[float]) -> int:
    # The first best on ties, as numpy.argmax.
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def mc_predict(logliks: Sequence[float], choices: Sequence[str], method: Method = "char_norm", **kwargs) -> int:
    return argmax(mc_scores(logliks, choices, method, **kwargs))


def mc2_score(logliks: Sequence[float], labels: Sequence[int | bool]) -> float:
    """TruthfulQA MC2 (Lin et al. 2022): the probability mass of the true answers (label 1),
    normalised over all the answers: sum_true p_i / sum_all p_i, with p_i = exp(loglik_i)."""
    if len(logliks) != len(labels) or not logliks:
        raise ValueError(f"MC2 needs one label per answer, got {len(logliks)} log-likelihoods and {len(labels)} labels")
    if not any(labels):
        raise ValueError("MC2 needs at least one true answer (label 1)")
    top = max(logliks)  # shift before exp: log-likelihoods of long answers underflow
    p = [math.exp(x - top) for x in logliks]
    return sum(pi for pi, lab in zip(p, labels) if lab) / sum(p)


def group_means(values: Sequence[float], groups: Sequence[Sequence[str]]) -> dict[str, tuple[float, int]]:
    """{group: (mean of the values of its examples, number of examples)}, each example counted
    in every group it names; groups in order of first appearance."""
    if len(values) != len(groups):
        raise ValueError(f"{len(values)} values for {len(groups)} group lists")
    sums: dict[str, list[float]] = {}
    for v, gs in zip(values, groups):
        for g in gs:
            acc = sums.setdefault(g, [0.0, 0])
            acc[0] += float(v)
            acc[1] += 1
    return {g: (total / n, int(n)) for g, (total, n) in sums.items()}


def calibration_requests(choices: Sequence[str]) -> list[tuple[str, str]]:
    # The second set of requests of the calibrated score: each choice after "Answer:".
    return [(CALIBRATION_CONTEXT, c) for c in choices]


def winogrande_partial_requests(sentence: str, options: Sequence[str]) -> list[tuple[str, str]]:
    """Partial scoring: fill the blank `_` with each option and score the shared rest of the
    sentence after each filled prefix (the same continuation for every option, so plain sums
    compare). As lm-evaluation-harness' winogrande task."""
    idx = sentence.find("_")
    if idx < 0:
        raise ValueError(f"a WinoGrande sentence needs a blank '_': {sentence!r}")
    target = " " + sentence[idx + 1:].strip()
    return [(sentence[:idx] + opt, target) for opt in options]


# -- closed-book question answering ------------------------------------------------------------

_FINAL_PUNCT = re.compile(r"[.,](?=\s|$)")


def cut_answer(text: str) -> str:
    """The answer part of a greedy generation (section 3.2): up to the first line break, then
    up to the first dot or comma that ends a word (so '3.5' and '1,000' stay whole)."""
    text = text.lstrip().split("\n", 1)[0]
    m = _FINAL_PUNCT.search(text)
    return (text[: m.start()] if m else text).strip()


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    # SQuAD / TriviaQA normalisation: lower case, punctuation and articles removed, whitespace collapsed.
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(generation: str, aliases: Sequence[str] | str, cut: bool = True) -> bool:
    if isinstance(aliases, str):
        aliases = [aliases]
    pred = normalize_answer(cut_answer(generation) if cut else generation)
    return any(pred == normalize_answer(a) for a in aliases)


# -- maj1@k for GSM8k and MATH -----------------------------------------------------------------

_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def _canonical_number(s: str) -> str | None:
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        x = float(s)
    except ValueError:
        return s or None
    if math.isfinite(x) and x == int(x):
        return str(int(x))
    return repr(x)


def gsm8k_answer(text: str) -> str | None:
    """The final answer of a GSM8k solution: the number after '####' (the dataset's format),
    else the last number in the text; canonical form ('1,000.0' -> '1000')."""
    if "####" in text:
        tail = text.split("####")[-1]
        m = _NUMBER.search(tail)
        return _canonical_number(m.group()) if m else _canonical_number(tail.split("\n")[0])
    nums = _NUMBER.findall(text)
    return _canonical_number(nums[-1]) if nums else None


def last_boxed(text: str) -> str | None:
    # The content of the last \boxed{...} (braces balanced) or \fbox{...}, or of "\boxed x".
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    rest = text[i:]
    brace = rest.find("{")
    if rest.startswith("\\boxed ") and (brace < 0 or brace > len("\\boxed ")):
        return rest[len("\\boxed "):].split("$")[0].strip()
    if brace < 0:
        return None
    depth = 0
    for j in range(brace, len(rest)):
        depth += {"{": 1, "}": -1}.get(rest[j], 0)
        if depth == 0:
            return rest[brace + 1: j]
    return None


def _strip_math(s: str) -> str:
    # A light version of Hendrycks et al.'s MATH answer normalisation.
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("dfrac", "frac"), ("tfrac", "frac"),
                     ("^\\circ", ""), ("^{\\circ}", ""), ("\\$", ""), ("$", ""), ("\\%", ""), ("%", ""),
                     (" ", "")):
        s = s.replace(old, new)
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    s = s.rstrip(".")
    if s.startswith("."):
        s = "0" + s
    return s


def math_answer(text: str) -> str | None:
    """The final answer of a MATH solution: the last \\boxed{...}, lightly normalised."""
    boxed = last_boxed(text)
    return None if boxed is None else _strip_math(boxed)


def majority_vote(answers: Sequence[str | None]) -> str | None:
    # The most frequent extracted answer (samples without one do not vote); ties: first seen.
    counts = Counter(a for a in answers if a is not None)
    return counts.most_common(1)[0][0] if counts else None


# -- pass@k ----------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k) for n samples of which c
    pass, as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs at least k={k} samples per problem, got n={n}: sample more or lower k")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(results: Sequence[tuple[int, int]], k: int) -> float:
    # Mean over problems of pass@k, from (n samples, c correct) per problem.
    if not results:
        raise ValueError("no problems to average pass@k over")
    return sum(pass_at_k(n, c, k) for n, c in results) / len(results)
