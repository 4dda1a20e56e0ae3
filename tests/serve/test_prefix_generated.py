"""Prefix caching of generated tokens (issue 18): the full blocks an answer fills join the
prefix cache under the chain hash of prompt + answer, so the next turn of a chat, whose prompt
holds this turn's prompt and answer, prefills only what follows them."""

from __future__ import annotations

import pytest

from llamaworks.serve.engine import Engine, Request
from llamaworks.serve.kvpool import prompt_hashes

from .test_paged import SYSTEM, _load

SIZE = 4


def _turns(eng, tok, first_tokens: int):
    """Turn 1 (greedy, exactly `first_tokens` tokens), then turn 2 on its prompt + answer + a
    follow-up; (turn 1, turn 2, stats before turn 2, stats after)."""
    one = eng.complete(Request(tok.encode(SYSTEM + "The king"), first_tokens, stop_ids=()), timeout=60)
    follow = tok.encode(" And what of the queen?")[1:]  # no second BOS
    before = eng.stats()
    two = eng.complete(Request(one.prompt_ids + one.tokens + follow, 8, stop_ids=()), timeout=60)
    return one, two, before, eng.stats()


@pytest.mark.parametrize("first_tokens", [9, 12])
def test_the_next_turn_hits_every_full_block_of_prompt_and_answer(tiny_model_dir, first_tokens):
    model, tok = _load(tiny_model_dir)
    on = Engine(model, tok, max_batch=2, block_size=SIZE).start()
    try:
        one, two, before, after = _turns(on, tok, first_tokens)
    finally:
        on.stop(cancel=True, timeout=30)
    # Turn 1 wrote the keys of its prompt and of every answer token but the last (never fed).
    written = len(one.prompt_ids) + len(one.tokens) - 1
    blocks = written // SIZE
    assert blocks > len(one.prompt_ids) // SIZE  # the answer filled blocks of its own
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == blocks * SIZE
    prefill = [e for e in on.step_log if e[0] == "prefill"]
    assert prefill[-1][2] == blocks * SIZE  # turn 2's prefill started after them
    # The same turns with the cache off: the same tokens, every prompt prefilled whole.
    model, tok = _load(tiny_model_dir)
    off = Engine(model, tok, max_batch=2, block_size=SIZE, prefix_cache=False).start()
    try:
        one_off, two_off, _, stats = _turns(off, tok, first_tokens)
    finally:
        off.stop(cancel=True, timeout=30)
    assert (one_off.tokens, two_off.tokens) == (one.tokens, two.tokens)
    assert stats["prefix_cache_hits"] == 0


def test_a_sequence_publishes_its_generated_blocks_while_it_runs(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    eng = Engine(model, tok, max_batch=2, block_size=SIZE).start()
    seen = []
    try:
        prompt = tok.encode(SYSTEM + "Thou art")
        req = Request(prompt, 10, stop_ids=(), on_event=lambda ev: seen.append(eng.pool.stats()["kv_blocks_cached"]))
        eng.complete(req, timeout=60)
        cached = eng.stats()["kv_blocks_cached"]
        assert cached == (len(prompt) + 10 - 1) // SIZE  # all released now: prompt and answer blocks, evictable
        # Published as they filled (registered while referenced), not only at the end: a block
        # of the answer is matched by the chain of the prompt + answer prefix.
        chain = prompt_hashes(prompt + req.tokens, SIZE)
        assert len(eng.pool.match(chain)) == cached
    finally:
        eng.stop(cancel=True, timeout=30)
