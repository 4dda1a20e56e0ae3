"""Profiling on demand: `profile.steps = [a, b]` records optimizer steps a..b (1-based,
inclusive) with torch.profiler and writes, per rank, into OUT/profile:

- trace_steps_A-B_rankR.json: a Chrome trace (chrome://tracing, ui.perfetto.dev) of every op,
  each step a named range ("step N"), with shapes and memory events;
- memory_steps_A-B_rankR.txt: the ops that allocated most (the profiler's memory profile), and
  on CUDA memory_snapshot_steps_A-B_rankR.pickle, the allocator's history
  (torch.cuda.memory._dump_snapshot; drop it on pytorch.org/memory_viz).

Only the chosen steps are profiled, so a long run pays nothing outside them.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch

log = logging.getLogger("llamaworks")


def profile_window(steps: list[int]) -> tuple[int, int] | None:
    """profile.steps as (first, last), checked; None when profiling is off ([])."""
    if not steps:
        return None
    if len(steps) != 2 or not all(isinstance(s, int) for s in steps) or not 1 <= steps[0] <= steps[1]:
        raise ValueError(f"profile.steps must be [first, last] optimizer steps with 1 <= first <= last, got "
                         f"{steps!r}; e.g. profile.steps = [5, 7], or [] for no profiling")
    return steps[0], steps[1]


class StepProfiler:
    """Wraps each training step (`step(n)` is its context); profiles the steps of the window."""

    def __init__(self, out: Path, window: tuple[int, int] | None, device: torch.device, rank: int = 0):
        self.out, self.window, self.device, self.rank = Path(out), window, device, rank
        self.prof = None
        self.done = False
        self.paths: list[Path] = []

    def step(self, n: int):
        """The context step n (1-based) runs in."""
        if self.window is None or self.done or n < self.window[0]:
            return nullcontext()
        if self.prof is None:
            self._start()
        return _StepRange(self, n)

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        if self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self.prof = profile(activities=activities, record_shapes=True, profile_memory=True)
        self.prof.start()

    def _after(self, n: int) -> None:
        if n >= self.window[1]:
            self.stop(n)

    def stop(self, last: int | None = None) -> None:
        """Write the files (also when the run ends inside the window)."""
        if self.prof is None or self.done:
            return
        self.prof.stop()
        self.done = True
        first = self.window[0]
        tag = f"steps_{first}-{last if last is not None else self.window[1]}_rank{self.rank}"
        folder = self.out / "profile"
        folder.mkdir(parents=True, exist_ok=True)
        trace = folder / f"trace_{tag}.json"
        self.prof.export_chrome_trace(str(trace))
        memory = folder / f"memory_{tag}.txt"
        sort = "self_cuda_memory_usage" if self.device.type == "cuda" else "self_cpu_memory_usage"
        memory.write_text(self.prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")
        self.paths = [trace, memory]
        if self.device.type == "cuda":
            snapshot = folder / f"memory_snapshot_{tag}.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.paths.append(snapshot)
        log.info("profile of steps %s written: %s", tag, ", ".join(str(p) for p in self.paths))


class _StepRange:
    def __init__(self, profiler: StepProfiler, n: int):
        self.profiler, self.n = profiler, n

    def __enter__(self):
        self.range = torch.profiler.record_function(f"step {self.n}")
        self.range.__enter__()

    def __exit__(self, *exc):
        self.range.__exit__(*exc)
        self.profiler._after(self.n)
        return False
