from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llamaworks.eval.scoring import (
    CALIBRATION_CONTEXT,
    MAJ_K,
    PASS_AT_K_PRESETS,
    calibration_requests,
    cut_answer,
    exact_match,
    gsm8k_answer,
    last_boxed,
    majority_vote,
    math_answer,
    mc_predict,
    mc_scores,
    mean_pass_at_k,
    normalize_answer,
    pass_at_k,
    winogrande_partial_requests,
)


def test_char_norm_is_the_default_and_can_flip_the_sum():
    # " ab" (2 chars: lm-eval does not count the delimiter space; -2.0 -> -1.0/char) vs
    # " longer answer" (13 chars, -6.5 -> -0.5/char)
    lls, choices = [-2.0, -6.5], [" ab", " longer answer"]
    assert mc_predict(lls, choices, "sum") == 0
    assert mc_predict(lls, choices) == 1
    assert mc_scores(lls, choices) == [-1.0, -0.5]


def test_token_mean_and_calibrated():
    lls, choices = [-6.0, -4.0], [" yes", " no"]
    assert mc_scores(lls, choices, "token_mean", token_counts=[3, 1]) == [-2.0, -4.0]
    assert mc_predict(lls, choices, "token_mean", token_counts=[3, 1]) == 0
    # log P(c|ctx) - log P(c|"Answer:"): " yes" is a priori likely, so its evidence is weaker.
    assert mc_scores(lls, choices, "calibrated", unconditional=[-1.0, -5.0]) == [-5.0, 1.0]
    assert mc_predict(lls, choices, "calibrated", unconditional=[-1.0, -5.0]) == 1
    assert calibration_requests([" yes", " no"]) == [(CALIBRATION_CONTEXT, " yes"), ("Answer:", " no")]


def test_mc_errors_name_the_fix():
    with pytest.raises(ValueError, match="unconditional"):
        mc_scores([-1.0], ["a"], "calibrated")
    with pytest.raises(ValueError, match="token_counts"):
        mc_scores([-1.0], ["a"], "token_mean")
    with pytest.raises(ValueError, match="char_norm, calibrated"):
        mc_scores([-1.0], ["a"], "nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 choices"):
        mc_scores([-1.0], ["a", "b"])


def test_ties_go_to_the_first_choice():
    assert mc_predict([-1.0, -1.0], ["a", "b"], "sum") == 0


def test_winogrande_partial_scoring():
    reqs = winogrande_partial_requests("Sarah was a much better surgeon than Maria so _ always got the harder cases.",
                                       ["Sarah", "Maria"])
    assert reqs == [("Sarah was a much better surgeon than Maria so Sarah", " always got the harder cases."),
                    ("Sarah was a much better surgeon than Maria so Maria", " always got the harder cases.")]
    with pytest.raises(ValueError, match="blank"):
        winogrande_partial_requests("no blank", ["a"])


@pytest.mark.parametrize("text, answer", [
    (" Paris\nQuestion: next", "Paris"),
    (" George Washington. He was", "George Washington"),
    (" Paris, France", "Paris"),
    (" 3.5 meters.", "3.5 meters"),
    (" 1,000 people", "1,000 people"),
    ("", ""),
])
def test_cut_answer(text, answer):
    assert cut_answer(text) == answer


def test_normalize_and_exact_match():
    assert normalize_answer("  The  Beatles!") == "beatles"
    assert normalize_answer("An apple, a day") == "apple day"
    assert exact_match(" the Beatles.\nQ:", ["Beatles", "The Fab Four"])
    assert exact_match(" fab four, of course", ["Beatles", "The Fab Four"])
    assert not exact_match(" Rolling Stones", ["Beatles"])
    assert exact_match("Beatles", "beatles")


def test_gsm8k_answer():
    assert gsm8k_answer("She has 3 + 4 = 7 apples.\n#### 7") == "7"
    assert gsm8k_answer("#### 1,000") == "1000"
    assert gsm8k_answer("So the answer is 12.0 dollars.") == "12"
    assert gsm8k_answer("It costs $-3.50 in the end") == "-3.5"
    assert gsm8k_answer("no number here") is None


def test_math_answer():
    assert last_boxed(r"so $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{1} then \boxed{ {2} }") == " {2} "
    assert last_boxed(r"\boxed 5$") == "5"
    assert last_boxed("none") is None and last_boxed(r"\boxed{unclosed") is None
    assert math_answer(r"$\boxed{\dfrac{1}{2}}$") == r"\frac{1}{2}"
    assert math_answer(r"\boxed{10\%}") == "10"
    assert math_answer(r"\boxed{.5}") == "0.5"


def test_majority_vote():
    assert majority_vote(["7", None, "8", "7", None, None]) == "7"
    assert majority_vote(["8", "7"]) == "8"
    assert majority_vote([None, None]) is None
    # maj1@k as evaluate_maj computes it: the vote of the answers extracted from the samples.
    answers = [gsm8k_answer(s) for s in ["... #### 7", "... the answer is 8", "#### 7", "7 apples"]]
    assert majority_vote(answers) == "7"
    assert majority_vote(answers[:2]) == "7"  # 7 vs 8: a tie, the first seen wins
    assert majority_vote(answers[1:3]) == "8"  # 8 first, then 7
    assert MAJ_K == {"math": 256, "gsm8k": 100}


def _pass_at_k_enumerated(n: int, c: int, k: int) -> Fraction:
    # The definition: the fraction of k-subsets of the n samples holding a correct one.
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in s) for s in subsets), len(subsets))


def test_pass_at_k_against_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = _pass_at_k_enumerated(n, c, k)
                assert exact == 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)


@given(st.integers(1, 300), st.data())
def test_pass_at_k_matches_binomials(n, data):
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-9)


def test_pass_at_k_large_n_is_stable():
    # C(1000, 500) overflows a float; the product form does not.
    assert 0 < pass_at_k(1000, 1, 500) == pytest.approx(0.5)
    assert pass_at_k(200, 0, 100) == 0.0 and pass_at_k(200, 150, 100) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert mean_pass_at_k([(10, 3), (10, 0)], 1) == pytest.approx(0.15)
    with pytest.raises(ValueError, match="lower k"):
        pass_at_k(5, 1, 10)
    assert PASS_AT_K_PRESETS["humaneval"] == {1: 0.1, 100: 0.8}
    assert PASS_AT_K_PRESETS["mbpp"] == {1: 0.1, 80: 0.8}
