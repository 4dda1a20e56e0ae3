"""/metrics: the Prometheus exposition parses (prometheus_client's parser when installed,
else a strict line grammar), histograms are cumulative with _sum and _count, the latency
histograms (time to first token, time between tokens, end to end) count what was served,
and the engine's stats() dict is exported when it has one."""

from __future__ import annotations

import math
import re

import pytest

from llamaworks.serve.prometheus import Histogram, Metrics

from .conftest import MODEL, running_server

httpx = pytest.importorskip("httpx")

_LINE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"\\\n]*",?)*\})? '
                   r'(-?[0-9.e+-]+|\+Inf|NaN)$')


def parse(text: str) -> dict[str, dict[str, list[tuple[dict, float]]]]:
    """family -> {"type": kind, "samples": [(labels, value)]}."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        text_string_to_metric_families = None
    out = {}
    if text_string_to_metric_families is not None:
        for fam in text_string_to_metric_families(text):
            out[fam.name] = {"type": fam.type, "samples": [(s.name, dict(s.labels), s.value) for s in fam.samples]}
        return out
    fam = None
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            fam = out.setdefault(name, {"type": kind, "samples": []})
        elif line.startswith("# HELP "):
            continue
        else:
            assert _LINE.match(line), line
            name, value = line.rsplit(" ", 1)
            labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"', name))
            fam["samples"].append((name.split("{")[0], labels, float(value)))
    return out


def check_histogram(fam, name):
    assert fam["type"] == "histogram"
    buckets = [(s[1]["le"], s[2]) for s in fam["samples"] if s[0] == name + "_bucket"]
    assert buckets[-1][0] in ("+Inf", "inf") and [float(le) for le, _ in buckets] == sorted(float(le) for le, _ in
                                                                                           buckets)
    counts = [c for _, c in buckets]
    assert counts == sorted(counts), "buckets must be cumulative"
    total = next(s[2] for s in fam["samples"] if s[0] == name + "_count")
    assert total == counts[-1]
    assert next(s[2] for s in fam["samples"] if s[0] == name + "_sum") >= 0
    return total


def test_histogram_is_cumulative():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.lines("x") == ['x_bucket{le="0.1"} 2', 'x_bucket{le="1.0"} 3', 'x_bucket{le="+Inf"} 4', "x_sum 3.65",
                            "x_count 4"]


def test_engine_stats_are_exported_guarded():
    text = Metrics(2).render(0, 0, {"prefix_cache_hit_rate": 0.25, "blocks free": 7, "name": "x", "nan": math.nan,
                                    "flag": True})
    fams = parse(text)
    assert fams["llamaworks_engine_prefix_cache_hit_rate"]["samples"][0][2] == 0.25
    assert fams["llamaworks_engine_blocks_free"]["samples"][0][2] == 7
    assert not any(k in fams for k in ("llamaworks_engine_name", "llamaworks_engine_nan", "llamaworks_engine_flag"))


def test_served_metrics(tiny_model_dir):
    with running_server(tiny_model_dir, max_batch=2) as s:
        s.engine.stats = lambda: {"prefix_cache_hits": 3, "prefix_cache_hit_rate": 0.5}
        for _ in range(2):
            r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "The king", "max_tokens": 6,
                                                            "temperature": 0}, timeout=60)
            assert r.status_code == 200
        r = httpx.get(s.url + "/metrics")
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        fams = parse(r.text)
        generated = s.engine.metrics.generation_tokens
    assert check_histogram(fams["llamaworks_time_to_first_token_seconds"],
                           "llamaworks_time_to_first_token_seconds") == 2
    assert check_histogram(fams["llamaworks_request_latency_seconds"], "llamaworks_request_latency_seconds") == 2
    # One gap per token after each request's first.
    assert check_histogram(fams["llamaworks_time_between_tokens_seconds"],
                           "llamaworks_time_between_tokens_seconds") == generated - 2
    assert fams["llamaworks_queue_length"]["type"] == "gauge"
    assert fams["llamaworks_requests_running"]["samples"][0][2] == 0
    assert fams["llamaworks_engine_prefix_cache_hit_rate"]["samples"][0][2] == 0.5
    assert fams["llamaworks_engine_prefix_cache_hits"]["samples"][0][2] == 3
