"""What the in-process serving benchmarks (prefix_ttft.py, speculative_serve.py, paged_decode.py,
prefill.py) share: the model presets they run with random weights, a tokenizer for random token
ids, and the mixed workload (short prompts, every so often a long one) timed by the engine's parts."""

from __future__ import annotations

import time
import types

import torch

from llamaworks.model import ModelArgs
from llamaworks.serve.engine import Request

# "Config A" of the issue tracker (benchmarks/decode.py): ~60M parameters.
PRESETS = {"A": dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000, multiple_of=256, max_seq_len=2048),
           "tiny": dict(ModelArgs.from_name("tiny").to_params(), max_seq_len=2048)}


class NullTokenizer:
    """What the engine reads of a tokenizer, for random token ids: no text; requests pass
    stop_ids=() so eos is never sampled as an end."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eos_id, self.bos_id = vocab_size, 2, 1

    def stream_decoder(self, prefix_ids=()):
        return types.SimpleNamespace(push=lambda token: "", flush=lambda: "")


def timed(parts: dict[str, float], name: str, fn):
    """fn, adding the seconds of each call to parts[name]."""
    def wrapper(*args, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            parts[name] += time.perf_counter() - t0
    return wrapper


def mixed_requests(vocab_size: int, n: int, short_tokens: int, long_tokens: int, long_every: int,
                   max_tokens: int, long_first: bool) -> list[Request]:
    """n requests of random token ids (seed 0), every long_every-th prompt long: the first of each
    run of long_every when long_first (serve.py's order), else the last."""
    g = torch.Generator().manual_seed(0)
    at = 0 if long_first else long_every - 1
    return [Request(torch.randint(3, vocab_size, (long_tokens if i % long_every == at else short_tokens,),
                                  generator=g).tolist(), max_tokens, stop_ids=()) for i in range(n)]


def run_workload(eng, reqs: list[Request], parts: dict[str, float]) -> tuple[float, int]:
    """Start `eng`, warm it up, zero `parts`, run `reqs` to their end and stop it: the wall seconds
    and the engine steps the requests took."""
    eng.start()
    try:
        eng.complete(Request([1, 5, 9], 4, stop_ids=()), timeout=600)  # warm-up
        for k in parts:
            parts[k] = 0.0
        steps0 = eng.metrics.steps
        t0 = time.perf_counter()
        for r in reqs:
            eng.submit(r)
        for r in reqs:
            while r.finish_reason is None:
                time.sleep(0.002)
        return time.perf_counter() - t0, eng.metrics.steps - steps0
    finally:
        eng.stop(cancel=True, timeout=60)
