"""Short prefills after a prefix-cache hit go in one batched forward pass (issue 18): requests
whose uncached rest is short (engine.SHORT_PREFILL) are prefilled together, padded to the
longest, and each gets exactly the tokens (and log-probabilities) it gets served alone. These
are the separate passes (Engine(ragged=False): a draft model, a compiled decode step, tensor
parallelism); the default one-pass step lays rests side by side unpadded (test_ragged.py)."""

from __future__ import annotations

import queue

import pytest
import torch

from llamaworks.serve.engine import SHORT_PREFILL, Engine, Request
from llamaworks.serve.tp import LocalRunner

from .test_paged import SYSTEM, _load

SIZE = 4


class Recorder(LocalRunner):
    """The engine's forward passes, with the shape of each prefill."""

    def __init__(self, model):
        super().__init__(model)
        self.prefills: list[tuple[int, int]] = []

    def forward(self, tokens, pos, rows=None, last=None):
        self.prefills.append(tuple(tokens.shape))
        return super().forward(tokens, pos, rows, last)


def _burst(eng, reqs, timeout=120):
    """Submit `reqs` holding the engine's lock, so that its thread admits them all in one step;
    wait for them to finish."""
    done = queue.Queue()
    for r in reqs:
        r.on_event = lambda ev, q=done: ev.kind in ("done", "error") and q.put(ev)
    with eng._cv:
        for r in reqs:
            eng.submit(r)
    events = [done.get(timeout=timeout) for _ in reqs]
    assert all(ev.kind == "done" for ev in events), [ev.text for ev in events]
    return reqs


def _alone(model_dir, reqs, **kw):
    """Each request served by itself, on a fresh engine (no cache, no batch)."""
    model, tok = _load(model_dir)
    eng = Engine(model, tok, max_batch=1, block_size=SIZE, prefix_cache=False, **kw).start()
    try:
        return [eng.complete(Request(list(r.prompt_ids), r.max_tokens, stop_ids=(), logprobs=2), timeout=60)
                for r in reqs]
    finally:
        eng.stop(cancel=True, timeout=30)


def _check_same(got, want):
    for a, b in zip(got, want):
        assert a.tokens == b.tokens
        torch.testing.assert_close([p for p, _ in a.token_logprobs], [p for p, _ in b.token_logprobs],
                                   atol=1e-4, rtol=0)


def test_short_rests_after_a_cache_hit_are_prefilled_in_one_pass(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    system = tok.encode(SYSTEM * 3)
    assert len(system) > SHORT_PREFILL  # the first prompt's prefill is long: alone
    users = ["The king", "Love is", "O fair lady of the night, speak", "Thou art", "A"]
    runner = Recorder(model)
    eng = Engine(model, tok, max_batch=8, block_size=SIZE, runner=runner, ragged=False).start()  # separate passes
    try:
        eng.complete(Request(system, 1, stop_ids=()), timeout=60)  # caches the system prompt
        runner.prefills.clear()
        reqs = _burst(eng, [Request(system + tok.encode(u)[1:], 6, stop_ids=(), logprobs=2) for u in users])
        stats = eng.stats()
    finally:
        eng.stop(cancel=True, timeout=30)
    rests = [len(r.prompt_ids) - len(system) // SIZE * SIZE for r in reqs]  # past the cached blocks
    assert runner.prefills == [(len(reqs), max(rests))]  # one pass, padded to the longest rest
    assert stats["prefix_cache_hits"] >= len(reqs) * (len(system) // SIZE) * SIZE
    _check_same(reqs, _alone(tiny_model_dir, reqs))


def test_a_batch_padded_past_the_context_end_stays_exact(tiny_model_dir):
    # Context 40: a rest starting at 36 (after 9 cached blocks) is padded to the other's 30
    # tokens, positions 36..65, clamped to the context's last (39).
    model, tok = _load(tiny_model_dir)
    runner = Recorder(model)
    eng = Engine(model, tok, max_batch=4, block_size=SIZE, max_seq_len=40, runner=runner, ragged=False).start()
    gen = torch.Generator().manual_seed(0)
    base, other = (torch.randint(3, tok.vocab_size, (n,), generator=gen).tolist() for n in (38, 30))
    try:
        eng.complete(Request(base, 2, stop_ids=()), timeout=60)
        runner.prefills.clear()
        reqs = [Request(base[:36] + [5, 6], 2, stop_ids=(), logprobs=2), Request(other, 10, stop_ids=(), logprobs=2)]
        _burst(eng, reqs)
    finally:
        eng.stop(cancel=True, timeout=30)
    assert runner.prefills == [(2, 30)], runner.prefills
    _check_same(reqs, _alone(tiny_model_dir, reqs, max_seq_len=40))


@pytest.mark.parametrize("chunk", [None, 8])
def test_a_long_rest_is_prefilled_on_its_own(tiny_model_dir, chunk):
    model, tok = _load(tiny_model_dir)
    runner = Recorder(model)
    eng = Engine(model, tok, max_batch=4, block_size=SIZE, prefill_chunk=chunk, runner=runner, ragged=False)
    gen = torch.Generator().manual_seed(1)
    long = torch.randint(3, tok.vocab_size, (SHORT_PREFILL + 5,), generator=gen).tolist()
    reqs = [Request(long, 3, stop_ids=()), Request(long[-5:], 3, stop_ids=())]  # nothing in common
    for r in reqs:
        eng.submit(r)
    eng.start()
    try:
        eng.stop(timeout=60)  # finishes the queued requests, then ends
    finally:
        eng.stop(cancel=True, timeout=30)
    assert all(r.finish_reason == "length" for r in reqs)
    if chunk is None:
        assert runner.prefills == [(1, SHORT_PREFILL + 5), (1, 5)]
    else:  # chunked: the long one 8 tokens a step; the short one's whole rest fits a step: alone too
        assert all(shape[0] == 1 and shape[1] <= 8 for shape in runner.prefills), runner.prefills
