from __future__ import annotations

import math

import pytest

from llamaworks.train.schedule import lr_at


def test_warmup_is_linear_and_reaches_peak():
    lrs = [lr_at(s, 3e-4, warmup_steps=2000, decay_steps=10_000) for s in range(2000)]
    assert lrs[0] == pytest.approx(3e-4 / 2000)
    assert lrs[999] == pytest.approx(3e-4 * 1000 / 2000)
    assert lrs[1999] == pytest.approx(3e-4)
    assert all(b > a for a, b in zip(lrs, lrs[1:]))


def test_cosine_ends_at_ten_percent():
    peak = 1.5e-4
    assert lr_at(2000, peak, 2000, 10_000) == pytest.approx(peak)
    mid = 2000 + (10_000 - 2000) // 2
    assert lr_at(mid, peak, 2000, 10_000) == pytest.approx(0.1 * peak + 0.45 * peak)
    assert lr_at(10_000, peak, 2000, 10_000) == pytest.approx(0.1 * peak)
    assert lr_at(50_000, peak, 2000, 10_000) == pytest.approx(0.1 * peak)
    decay = [lr_at(s, peak, 2000, 10_000) for s in range(2000, 10_001, 100)]
    assert all(b <= a for a, b in zip(decay, decay[1:]))


def test_cosine_shape_matches_formula():
    for s in (2500, 4000, 7777):
        p = (s - 2000) / 8000
        want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))
        assert lr_at(s, 1.0, 2000, 10_000) == pytest.approx(want)


def test_no_warmup():
    assert lr_at(0, 1.0, warmup_steps=0, decay_steps=100) == pytest.approx(1.0)
