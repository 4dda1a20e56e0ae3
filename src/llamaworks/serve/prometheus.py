"""Prometheus text exposition (format 0.0.4), written by hand: a few counters, gauges and
histograms need no client library.

Latency histograms: time to first token (submission to the first token, queueing and prefill
included), time between tokens (one observation per generated token after the first: the
gap since the previous one, as the HTTP layer sees the engine emit them) and end-to-end
request latency. Gauges: queue depth and running requests; the engine's own `stats()` (a
dict of numbers, e.g. the prefix cache's hit rate), each key as `llamaworks_engine_KEY`.
"""

from __future__ import annotations

import bisect
import collections
import math
import re
from collections.abc import Mapping

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Decode steps take ~1 ms (a tiny model on a GPU) to ~1 s (a 7B model on a few CPU cores).
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_METRIC_NAME = re.compile(r"[^a-zA-Z0-9_]")


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for le, c in zip([*map(repr, self.buckets), "+Inf"], self.counts):
            total += c
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return [*out, f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class Metrics:
    """Written by the engine thread, read by the HTTP thread: plain ints under the GIL."""

    def __init__(self, slots: int):
        self.slots = slots
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.steps = 0
        self.rejected = 0
        self.finished: collections.Counter[str] = collections.Counter()
        self.http: collections.Counter[tuple[str, int]] = collections.Counter()  # (endpoint, status)
        self.latency = Histogram()
        self.ttft = Histogram()
        self.tbt = Histogram(TOKEN_GAP_BUCKETS)
        self.timeouts = 0

    def render(self, queue_length: int, active: int, stats: Mapping | None = None) -> str:
        """The exposition; `stats` is the engine's stats() dict when it has one (numbers only
        are exported; other values are skipped)."""
        lines: list[str] = []

        def metric(name, kind, help_, samples):
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(samples)

        metric("llamaworks_http_requests_total", "counter", "HTTP requests by endpoint and status code.",
               [f'llamaworks_http_requests_total{{endpoint="{e}",code="{c}"}} {n}'
                for (e, c), n in sorted(self.http.items())])
        metric("llamaworks_requests_finished_total", "counter", "Generation requests by finish reason.",
               [f'llamaworks_requests_finished_total{{finish_reason="{r}"}} {n}'
                for r, n in sorted(self.finished.items())])
        metric("llamaworks_requests_rejected_total", "counter", "Requests refused because the queue was full.",
               [f"llamaworks_requests_rejected_total {self.rejected}"])
        metric("llamaworks_prompt_tokens_total", "counter", "Prompt tokens prefilled.",
               [f"llamaworks_prompt_tokens_total {self.prompt_tokens}"])
        metric("llamaworks_generation_tokens_total", "counter", "Tokens generated.",
               [f"llamaworks_generation_tokens_total {self.generation_tokens}"])
        metric("llamaworks_decode_steps_total", "counter", "Batched decode steps run.",
               [f"llamaworks_decode_steps_total {self.steps}"])
        metric("llamaworks_queue_length", "gauge", "Requests waiting for a slot.",
               [f"llamaworks_queue_length {queue_length}"])
        metric("llamaworks_active_slots", "gauge", "Slots (KV-cache rows) holding a running request.",
               [f"llamaworks_active_slots {active}"])
        metric("llamaworks_slots", "gauge", "Slots in the batch (--max-batch).", [f"llamaworks_slots {self.slots}"])
        metric("llamaworks_requests_timed_out_total", "counter", "Requests ended by --request-timeout.",
               [f"llamaworks_requests_timed_out_total {self.timeouts}"])
        metric("llamaworks_requests_running", "gauge", "Requests being generated (prefilled and decoding).",
               [f"llamaworks_requests_running {active}"])
        metric("llamaworks_request_latency_seconds", "histogram", "Time from submission to the last token.",
               self.latency.lines("llamaworks_request_latency_seconds"))
        metric("llamaworks_time_to_first_token_seconds", "histogram", "Time from submission to the first token.",
               self.ttft.lines("llamaworks_time_to_first_token_seconds"))
        metric("llamaworks_time_between_tokens_seconds", "histogram",
               "Gap between consecutive tokens of a request, one observation per token after the first.",
               self.tbt.lines("llamaworks_time_between_tokens_seconds"))
        for key, value in sorted((stats or {}).items(), key=lambda kv: str(kv[0])):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            name = "llamaworks_engine_" + _METRIC_NAME.sub("_", str(key))
            metric(name, "gauge", f"The engine's {_METRIC_NAME.sub('_', str(key))} (Engine.stats()).",
                   [f"{name} {value}"])
        return "\n".join(lines) + "\n"
