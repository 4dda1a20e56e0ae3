"""Chunked prefill: prompts prefilled `prefill_chunk` tokens per engine step, interleaved with the
decode steps of the running requests, give the outputs of whole-prompt prefill."""

from __future__ import annotations

import collections
import queue
import threading

import pytest

from llamaworks.inference.generate import generate
from llamaworks.serve.engine import Engine, Request

from .test_paged import _run_all

PROMPTS = ["The king", "Love is", "O fair lady of the night, speak to me of the moon and of the sea", "Thou art"]


def _engine(model_dir, **kw):
    from llamaworks.inference.load import load_model

    model, tok = load_model(model_dir)
    return Engine(model.eval(), tok, max_batch=3, block_size=4, **kw).start(), tok


@pytest.fixture(scope="module")
def whole(tiny_model_dir):
    """Outputs with whole prompts prefilled (and the prefix cache off), greedy and sampled."""
    eng, tok = _engine(tiny_model_dir, prefix_cache=False)
    try:
        reqs = _run_all(eng, _requests(tok))
        return [(r.tokens, r.prompt_token_logprobs) for r in reqs]
    finally:
        eng.stop(cancel=True, timeout=30)


def _requests(tok):
    greedy = [Request(tok.encode(p), 12) for p in PROMPTS]
    sampled = [Request(tok.encode(p), 12, temperature=0.9, top_k=40, seed=3) for p in PROMPTS[:2]]
    scored = [Request(tok.encode(PROMPTS[2]), 4, logprobs=2, prompt_logprobs=True)]
    return greedy + sampled + scored


def test_whole_prompts_equal_generate(whole, tiny_model, tiny_tokenizer):
    for p, (tokens, _) in zip(PROMPTS, whole):
        assert tokens == generate(tiny_model, tiny_tokenizer, p, 12, temperature=0)[0].tokens


@pytest.mark.parametrize("chunk", [1, 3, 8])
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_chunked_outputs_equal_whole_prompt_outputs(tiny_model_dir, whole, chunk, prefix_cache):
    eng, tok = _engine(tiny_model_dir, prefill_chunk=chunk, prefix_cache=prefix_cache)
    try:
        for _ in range(2):  # the second round meets the first's cached blocks
            reqs = _run_all(eng, _requests(tok))
            for r, (tokens, prompt_lp) in zip(reqs, whole):
                assert r.tokens == tokens
                assert len(r.prompt_token_logprobs) == len(prompt_lp)
                for (a, alt_a), (b, alt_b) in zip(r.prompt_token_logprobs, prompt_lp):
                    assert a == pytest.approx(b, abs=1e-4) and [i for i, _ in alt_a] == [i for i, _ in alt_b]
        # Per engine step at most `chunk` prompt tokens, of one prompt or several.
        steps = collections.Counter()
        for e in eng.step_log:
            if e[0] == "prefill":
                steps[e[4]] += e[3] - e[2]
        assert steps and max(steps.values()) <= chunk
        per_step = collections.Counter(e[4] for e in eng.step_log if e[0] == "prefill")
        assert chunk == 1 or max(per_step.values()) > 1  # a prompt's tail and the next one's start share a step
    finally:
        eng.stop(cancel=True, timeout=30)


def test_a_running_request_keeps_decoding_while_a_long_prompt_is_prefilled(tiny_model_dir):
    chunk = 4
    eng, tok = _engine(tiny_model_dir, prefill_chunk=chunk, prefix_cache=False)  # the whole prompt prefilled
    try:
        started = threading.Event()
        # No stop ids: it runs its 150 tokens, long enough to outlast the other's prefill.
        done = queue.Queue()
        running = Request(tok.encode("The king"), 150, stop_ids=(),
                          on_event=lambda ev: (started.set(), ev.kind in ("done", "error") and done.put(ev)))
        eng.submit(running)
        assert started.wait(60)
        long_ids = (tok.encode(" ".join(PROMPTS * 3)) * 2)[:90]
        long = eng.complete(Request(long_ids, 3, stop_ids=()), timeout=120)
        assert done.get(timeout=120).kind == "done" and len(running.tokens) == 150
        log = list(eng.step_log)
        first = next(j for j, e in enumerate(log) if e[0] == "prefill" and e[1] == 2)
        last = max(j for j, e in enumerate(log) if e[0] == "prefill" and e[1] == 2)
        chunks = [e for e in log[first:last + 1] if e[0] == "prefill"]
        assert [(s, t) for _, _, s, t, _ in chunks] == [(s, min(s + chunk, 90)) for s in range(0, 90, chunk)]
        # Between every two chunks of the long prompt, one decode step of the running request.
        between = log[first:last + 1]
        assert [e[0] for e in between] == ["prefill", "decode"] * (len(chunks) - 1) + ["prefill"]
        assert all(e[1] == (1,) for e in between if e[0] == "decode")
        if eng._ragged:  # the last chunk's pass decodes the running request too (test_ragged.py)
            assert log[last + 1] == ("decode", (1,))
            last += 1
        assert log[last + 1] == ("decode", (1, 2))  # then both decode together
        assert long.finish_reason == "length"
    finally:
        eng.stop(cancel=True, timeout=30)


def test_prefill_chunk_must_be_positive(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(tiny_model, tiny_tokenizer, prefill_chunk=0)
