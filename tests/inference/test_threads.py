"""run_in_own_thread: set-up work in a thread that exits (inference/threads.py)."""

from __future__ import annotations

import threading

import pytest

from llamaworks.inference.threads import run_in_own_thread


def test_returns_the_result_from_another_thread_that_has_ended():
    seen = []

    def work(a, b=0):
        seen.append(threading.current_thread())
        return a + b

    assert run_in_own_thread(work, 2, b=3) == 5
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()


def test_reraises_the_same_exception():
    err = ValueError("--kv-cache-gb must be positive")

    def fail():
        raise err

    with pytest.raises(ValueError) as info:
        run_in_own_thread(fail)
    assert info.value is err
