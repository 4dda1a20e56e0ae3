"""One forward pass per engine step (issue 18): the decoding rows' tokens and the step's prompt
runs side by side in one row of tokens (inference/paged.py's Ragged, engine._ragged_step), so that
the products read the weights once for all of them, as llama.cpp's server batches; each request
gets the tokens and log-probabilities it gets from separate passes."""

from __future__ import annotations

import collections
import time

import pytest
import torch

from llamaworks.inference import native
from llamaworks.inference.load import load_model
from llamaworks.inference.paged import (
    PAGED_MAX_QUERIES,
    PagedKVCache,
    PagedRead,
    Ragged,
    RaggedGroup,
    RaggedRead,
    paged_attention_reference,
    ragged_attention,
    ragged_groups,
    setup_paged_caches,
)
from llamaworks.serve import engine as engine_module
from llamaworks.serve.engine import Engine, Request
from llamaworks.serve.tp import LocalRunner

from .test_paged import _load, _run_all
from .test_prefix_batch import _burst

PROMPTS = ["The king", "Love is", "O fair lady of the night, speak to me of the moon and of the sea", "Thou art"]


def test_ragged_groups_lay_out_runs_by_kind():
    # (first position, tokens): decoding rows, prompts from 0, a short rest, a rest after a prefix.
    runs = [(40, 1), (0, 20), (7, 1), (0, 20), (16, 3), (0, 12), (16, 20)]
    order, groups = ragged_groups(runs)
    assert order == [0, 2, 1, 3, 4, 5, 6]
    assert groups == [RaggedGroup(0, 0, 2, 1, None),  # one-token runs at any positions: the paged kernel
                      RaggedGroup(2, 2, 2, 20, 0),  # equal runs at the same positions: one batched call
                      RaggedGroup(42, 4, 1, 3, None),
                      RaggedGroup(45, 5, 1, 12, 0),
                      RaggedGroup(57, 6, 1, 20, 16)]
    assert ragged_groups([(0, PAGED_MAX_QUERIES + 1)])[1][0].start == 0
    assert ragged_groups([(5, PAGED_MAX_QUERIES)])[1][0].start is None


# Sequences of runs: two decoding rows, two prompts from 0, a short rest, a rest after a prefix
# whose blocks are scattered; each sequence in its own blocks. Or a decode pass: one token a row
# (ragged_attention's one-call path).
MIXED_RUNS = [(13, 1), (0, 11), (5, 1), (0, 11), (9, 3), (8, 10)]
DECODE_RUNS = [(13, 1), (5, 1), (20, 1), (2, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("runs", [MIXED_RUNS, DECODE_RUNS], ids=["mixed", "decode"])
def test_ragged_attention_equals_each_runs_masked_gather(dtype, kv_heads, runs):
    g = torch.Generator().manual_seed(kv_heads)
    size, heads, head_dim, num_blocks = 4, 4, 16, 64
    pool_k = torch.randn(kv_heads, num_blocks, size, head_dim, generator=g).to(dtype)
    pool_v = torch.randn(kv_heads, num_blocks, size, head_dim, generator=g).to(dtype)
    order, groups = ragged_groups(runs)
    runs = [runs[j] for j in order]
    width = 6
    perm = torch.randperm(num_blocks - 1, generator=g) + 1
    blocks = perm[: len(runs) * width].view(len(runs), width)
    pos = torch.cat([torch.arange(a, a + n) for a, n in runs])
    row_of = torch.repeat_interleave(torch.arange(len(runs)), torch.tensor([n for _, n in runs]))
    slots = blocks[row_of, pos // size] * size + pos % size
    new_k = torch.randn(len(pos), kv_heads, head_dim, generator=g).to(dtype)
    new_v = torch.randn(len(pos), kv_heads, head_dim, generator=g).to(dtype)
    pool_k.view(kv_heads, -1, head_dim)[:, slots] = new_k.transpose(0, 1)  # as PagedKVCache.update writes
    pool_v.view(kv_heads, -1, head_dim)[:, slots] = new_v.transpose(0, 1)
    q = torch.randn(1, len(pos), heads, head_dim, generator=g).to(dtype).transpose(1, 2)  # (1, heads, T, hd)
    got = ragged_attention(q, RaggedRead(pool_k, blocks, pos, new_k, tuple(groups)),
                           RaggedRead(pool_v, blocks, pos, new_v, tuple(groups)))
    assert got.shape == q.shape and got.dtype == dtype
    # Without `new` (PagedKVCache.rope_update), the runs' own keys are read back at their slots: the same.
    read_back = ragged_attention(q, RaggedRead(pool_k, blocks, pos, None, tuple(groups), slots),
                                 RaggedRead(pool_v, blocks, pos, None, tuple(groups), slots))
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    # The native kernels read any strides alike; SDPA (not built) may sum in another order.
    torch.testing.assert_close(read_back, got, **(dict(atol=0, rtol=0) if native.available() else tol))
    at = 0
    for r, (a, n) in enumerate(runs):
        p = torch.arange(a, a + n).unsqueeze(0)
        want = paged_attention_reference(q[:, :, at:at + n], PagedRead(pool_k, blocks[r:r + 1], p),
                                         PagedRead(pool_v, blocks[r:r + 1], p))
        torch.testing.assert_close(got[:, :, at:at + n], want, **tol)
        at += n


class Passes(LocalRunner):
    """The engine's forward passes: per pass, its engine step and tokens; and decode passes."""

    def __init__(self, model):
        super().__init__(model)
        self.engine = None
        self.forwards: list[tuple[int, tuple[int, ...]]] = []
        self.decodes = 0

    def forward(self, tokens, pos, rows=None, last=None):
        self.forwards.append((self.engine._steps, tuple(tokens.shape)))
        return super().forward(tokens, pos, rows, last)

    def decode(self, step, tokens, pos):
        self.decodes += 1
        return super().decode(step, tokens, pos)


def _requests(tok):
    long_ids = (tok.encode(" ".join(PROMPTS * 3)) * 2)[:90]
    greedy = [Request(tok.encode(p), 12) for p in PROMPTS] + [Request(long_ids, 6, stop_ids=())]
    sampled = [Request(tok.encode(p), 12, temperature=0.9, top_k=40, seed=3) for p in PROMPTS[:2]]
    scored = [Request(tok.encode(PROMPTS[2]), 4, logprobs=2, prompt_logprobs=True)]
    return greedy + sampled + scored


def _serve(model_dir, reqs, **kw):
    model, tok = _load(model_dir)
    eng = Engine(model, tok, max_batch=3, block_size=4, **kw).start()
    try:
        for _ in range(2):  # the second round meets the first's cached blocks (with the prefix cache)
            out = _run_all(eng, reqs(tok))
        return eng, out
    finally:
        eng.stop(cancel=True, timeout=30)


@pytest.fixture(scope="module")
def separate(tiny_model_dir):
    """Each step's prompts in passes of their own, then the decode step's pass."""
    eng, reqs = _serve(tiny_model_dir, _requests, ragged=False, prefix_cache=False)
    assert not eng._ragged
    return reqs


@pytest.mark.parametrize("chunk", [None, 3, 8, 32])
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_one_pass_per_step_gives_the_tokens_of_separate_passes(tiny_model_dir, separate, chunk, prefix_cache):
    eng, reqs = _serve(tiny_model_dir, _requests, prefill_chunk=chunk, prefix_cache=prefix_cache)
    assert eng._ragged
    for got, want in zip(reqs, separate):
        assert got.tokens == want.tokens
        for name in ("token_logprobs", "prompt_token_logprobs"):
            a, b = getattr(got, name), getattr(want, name)
            assert len(a) == len(b)
            torch.testing.assert_close([p for p, _ in a], [p for p, _ in b], atol=1e-4, rtol=0)
            assert [[i for i, _ in alt] for _, alt in a] == [[i for i, _ in alt] for _, alt in b]


def _wait(req, timeout=60.0):
    deadline = time.monotonic() + timeout
    while req.finish_reason is None:
        assert time.monotonic() < deadline, "the request did not finish"
        time.sleep(0.01)


def test_a_step_is_one_pass_of_the_decoding_rows_and_a_prompt_chunk(tiny_model_dir):
    chunk = 4
    model, tok = _load(tiny_model_dir)
    runner = Passes(model)
    eng = Engine(model, tok, max_batch=3, block_size=4, prefill_chunk=chunk, prefix_cache=False, runner=runner)
    runner.engine = eng
    eng.start()
    long = Request((tok.encode(" ".join(PROMPTS * 3)) * 2)[:30], 3, stop_ids=())
    try:
        # The long prompt arrives as the running request gets its first token (the engine thread
        # submits it): every chunk of it is prefilled while the running request decodes.
        running = Request(tok.encode("The king"), 40, stop_ids=())
        running.on_event = lambda ev: long.submitted or eng.submit(long)
        _run_all(eng, [running])
        _wait(long)
    finally:
        eng.stop(cancel=True, timeout=30)
    assert runner.decodes == 0  # no decode pass of its own
    per_step = collections.Counter(step for step, _ in runner.forwards)
    assert set(per_step.values()) == {1}  # one forward pass per engine step
    log = list(eng.step_log)
    chunks = [e for e in log if e[0] == "prefill" and e[1] == 2]
    assert [(s, t) for _, _, s, t, _ in chunks] == [(s, min(s + chunk, 30)) for s in range(0, 30, chunk)]
    shapes = dict(runner.forwards)
    for _, _, s, t, step in chunks:  # the chunk and the running request's token, in one pass
        assert shapes[step] == (1, t - s + 1)
    after = log.index(chunks[-1])
    assert log[after + 1] == ("decode", (1,))  # in the last chunk's pass
    assert log[after + 2] == ("decode", (1, 2))  # then both decode together
    assert long.finish_reason == "length" and len(long.tokens) == 3 and len(running.tokens) == 40


def test_whole_prompts_arriving_together_share_a_pass_up_to_pass_tokens(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(engine_module, "PASS_TOKENS", 10)
    model, tok = _load(tiny_model_dir)
    runner = Passes(model)
    eng = Engine(model, tok, max_batch=4, block_size=4, prefix_cache=False, runner=runner)
    runner.engine = eng
    eng.start()
    try:
        reqs = _burst(eng, [Request([1] + [7 + j] * 7, 2, stop_ids=()) for j in range(3)])  # 8 tokens each
    finally:
        eng.stop(cancel=True, timeout=30)
    # Prompts join the pass while it holds fewer than PASS_TOKENS: two (16 tokens), then the third
    # beside the first two's decoding tokens.
    assert [shape for _, shape in runner.forwards][:2] == [(1, 16), (1, 8 + 2)]
    assert all(len(r.tokens) == 2 for r in reqs)


def test_the_ragged_pass_is_off_where_it_cannot_run(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    assert not Engine(model, tok, ragged=False)._ragged
    assert not Engine(model, tok, compile=True)._ragged  # the compiled decode step keeps its own pass
    assert Engine(model, tok)._ragged == model.layers[0].attention.kv_cache.splits_prefill
    eng = Engine(model, tok, max_batch=2, block_size=4).start()
    try:
        eng.complete(Request(tok.encode("The king"), 3), timeout=60)
    finally:
        eng.stop(cancel=True, timeout=30)
    assert eng._table.ragged is None  # cleared after each pass: other passes read the table as before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_cache_write_in_one_call_equal_the_operators_bit_for_bit(tiny_model_dir, dtype, monkeypatch):
    # A ragged pass of the fused attention takes PagedKVCache.rope_update (llamaworks::rope_cache on the
    # pool seen as one row, q token-major): logits and both pools after the pass are those of
    # apply_rotary_emb + update's write (rope_in_one off), bit for bit; runs of one token (decoding
    # rows), a prompt from 0, a rest after a prefix, and a short rest.
    if not native.available():
        pytest.skip("the native kernels are not built here")
    model, _ = load_model(tiny_model_dir, dtype=dtype, tokenizer=False)
    size, width = 4, 8
    table = setup_paged_caches(model, 64, size, model.args.max_seq_len)
    g = torch.Generator().manual_seed(1)
    runs = [(13, 1), (0, 11), (5, 1), (8, 10), (9, 3)]
    order, groups = ragged_groups(runs)
    runs = [runs[j] for j in order]
    blocks = (torch.randperm(63, generator=g) + 1)[: len(runs) * width].view(len(runs), width)
    pos = torch.cat([torch.arange(a, a + n) for a, n in runs])
    row_of = torch.repeat_interleave(torch.arange(len(runs)), torch.tensor([n for _, n in runs]))
    slots = blocks[row_of, pos // size] * size + pos % size
    ids = torch.randint(3, model.args.vocab_size, (1, len(pos)), generator=g)
    start = [(c.k.clone(), c.v.clone()) for c in (layer.attention.kv_cache for layer in model.layers)]
    for k, v in start:  # the earlier positions' keys: anything, the same for both passes
        k.copy_(torch.randn(k.shape, generator=g))
        v.copy_(torch.randn(v.shape, generator=g))
    calls = []
    real = PagedKVCache.rope_update
    monkeypatch.setattr(PagedKVCache, "rope_update", lambda self, *a: calls.append(1) or real(self, *a))

    def run(in_one: bool):
        for layer, (k, v) in zip(model.layers, start):
            cache = layer.attention.kv_cache
            cache.rope_in_one = in_one
            cache.k.copy_(k)
            cache.v.copy_(v)
        table.blocks, table.ragged = blocks, Ragged(slots, tuple(groups))
        try:
            with torch.no_grad():
                logits = model(ids, pos.unsqueeze(0))
        finally:
            table.ragged = None
        return logits, [(layer.attention.kv_cache.k.clone(), layer.attention.kv_cache.v.clone())
                        for layer in model.layers]

    want, want_pools = run(False)
    assert calls == []
    got, got_pools = run(True)
    assert len(calls) == len(model.layers)
    assert torch.equal(got, want)
    for (k, v), (wk, wv) in zip(got_pools, want_pools):
        assert torch.equal(k, wk) and torch.equal(v, wv)
