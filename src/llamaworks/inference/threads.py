"""Set-up work in a thread of its own, so that its OpenMP workers end with it.

Why: torch's CPU operators run their parallel regions on the OpenMP team of the calling thread,
and libgomp keeps each thread's team (its worker threads) until that thread exits. It counts the
workers of every team, and once they outnumber the CPUs it throttles them: a worker spins about
1,000 rounds instead of 300,000 before it sleeps on a futex, so the next parallel region pays a
wake-up. A server that loads its model in the main thread (one team) and then decodes in the
engine's thread (a second team) is in that state, and a decode step is dozens of short parallel
regions: on 2 vCPUs (Sapphire Rapids, `small`, batch 8) each product took 80-130 us longer and
the mixed workload of benchmarks/serve_split.py ran 2.67 s instead of 2.11 s (session 14). Loaded
in a thread that then exits, the set-up's team is freed and the engine's is the only one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_in_own_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) in a new thread, waited for; its result, or its exception re-raised
    here (the same object, traceback included). Meant for loading a model and building what a
    serving thread will use, from a thread that then serves no compute (see the module docstring)."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the caller as it is
            box["error"] = e

    t = threading.Thread(target=target, name="llamaworks-setup", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]
