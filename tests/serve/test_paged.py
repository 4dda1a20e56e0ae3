"""The paged KV cache (inference/paged.py), its block pool and prefix cache (serve/kvpool.py),
and the engine over them: outputs equal to generate()'s (the static cache) whatever is shared,
cached or evicted."""

from __future__ import annotations

import queue

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamaworks.inference import native
from llamaworks.inference.generate import generate
from llamaworks.inference.paged import block_bytes, setup_paged_caches
from llamaworks.model import ModelArgs, build_model
from llamaworks.serve.engine import Engine, Request
from llamaworks.serve.kvpool import BlockPool, chain_hash, prompt_hashes

SYSTEM = "You are a helpful assistant. Answer the question of the user briefly and well. "
QUESTIONS = ["The king", "Love is", "O fair lady of the night, speak", "Thou art", "A"]


# --- the paged cache against the static one, one forward at a time ---------------------------


@pytest.mark.parametrize("reads_table", [True, False])
@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_paged_cache_gives_the_static_caches_logits(n_kv_heads, reads_table, monkeypatch):
    # reads_table: decode through the block table (llamaworks::paged_attention, where the native
    # kernels are built), or the gather path (LLAMAWORKS_PAGED_ATTENTION=0).
    monkeypatch.setenv("LLAMAWORKS_PAGED_ATTENTION", "1" if reads_table else "0")
    args = ModelArgs.from_name("tiny", n_layers=2, n_kv_heads=n_kv_heads)
    static = build_model(args, seed=0).eval()
    paged = build_model(args, seed=0).eval()
    static.setup_caches(2, 64)
    size = 4
    table = setup_paged_caches(paged, 40, size, 64)
    assert paged.layers[0].attention.kv_cache.reads_table == (reads_table and native.available())
    # Two sequences in scattered, interleaved physical blocks; a third table row for a
    # sequence that is not there (the null block), as the engine's free rows.
    blocks = [[7, 3, 30, 12, 5, 22, 9, 17, 1, 33, 2, 25], [11, 8, 39, 4, 26, 16, 6, 34, 13, 20, 19, 38]]
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, args.vocab_size, (2, 21), generator=gen)
    with torch.no_grad():
        # Prefill each sequence alone, the second in two chunks.
        want = static(prompts, torch.arange(21))
        table.blocks = torch.tensor([blocks[0][:8]])
        got0 = paged(prompts[:1], torch.arange(21), rows=torch.tensor([0]))
        table.blocks = torch.tensor([blocks[1][:8]])
        got1a = paged(prompts[1:, :13], torch.arange(13), rows=torch.tensor([0]))
        got1b = paged(prompts[1:, 13:], torch.arange(13, 21), rows=torch.tensor([0]))
        torch.testing.assert_close(got0, want[:1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.cat([got1a, got1b], 1), want[1:], atol=1e-5, rtol=1e-5)
        # Decode both at once, beside an empty row, across block boundaries.
        table.blocks = torch.tensor([blocks[0][:8], blocks[1][:8], [0] * 8])
        tok = prompts[:, -1:]
        for p in range(21, 30):
            want = static(tok, torch.full((2, 1), p))
            got = paged(torch.cat([tok, torch.zeros(1, 1, dtype=torch.long)]),
                        torch.tensor([[p], [p], [0]]))
            torch.testing.assert_close(got[:2], want, atol=1e-5, rtol=1e-5)
            tok = want[:, -1].argmax(-1, keepdim=True)


# --- the block pool --------------------------------------------------------------------------


def test_chain_hash_names_the_whole_prefix():
    a = prompt_hashes(list(range(10)), 4)
    assert len(a) == 2 and a[1] == chain_hash(chain_hash(b"", [0, 1, 2, 3]), [4, 5, 6, 7])
    b = prompt_hashes([9, 1, 2, 3, 4, 5, 6, 7], 4)
    assert a[1] != b[1]  # same block, other parent
    assert prompt_hashes(list(range(10)), 4, limit=1) == a[:1]


def test_pool_reserves_shares_and_evicts_least_recent_first():
    pool = BlockPool(7, 4)  # 6 usable blocks
    h = prompt_hashes(list(range(12)), 4)
    assert pool.admit(h[:2], 3, 12) == [] and pool.available() == 3
    seq = [pool.allocate() for _ in range(3)]
    for b, x in zip(seq, h):
        pool.register(b, x)
    assert pool.admit([], 4, 4) is None  # 3 free, 4 asked: refused, nothing changed
    assert pool.stats()["kv_blocks_used"] == 3 and pool.reserved == 0
    shared = pool.admit(h[:2], 3, 12)
    assert shared == seq[:2] and pool.stats()["kv_blocks_shared"] == 2
    assert pool.stats()["prefix_cache_hits"] == 8 and pool.stats()["prefix_cache_queries"] == 24
    own = pool.allocate()
    pool.release(shared + [own], 0)
    pool.release(seq, 0)
    st_ = pool.stats()
    assert st_["kv_blocks_used"] == 0 and st_["kv_blocks_cached"] == 3 and st_["kv_blocks_free"] == 3
    # Everything is available again; allocating past the free blocks evicts the chain's tail first.
    assert pool.admit([], 5, 4) == []
    got = [pool.allocate() for _ in range(5)]
    assert seq[2] in got and seq[1] in got and seq[0] not in got and pool.stats()["kv_blocks_evicted"] == 2
    assert pool.match(h) == [seq[0]]


def test_pool_without_prefix_caching_shares_nothing():
    pool = BlockPool(5, 4, prefix_caching=False)
    h = prompt_hashes(list(range(8)), 4)
    pool.admit(h, 2, 8)
    b = pool.allocate()
    pool.register(b, h[0])
    assert pool.match(h) == [] and pool.stats()["prefix_cache_hits"] == 0
    with pytest.raises(ValueError, match="kv-cache-gb"):
        BlockPool(1, 4)


# --- the engine --------------------------------------------------------------------------------


def _load(model_dir):
    from llamaworks.inference.load import load_model

    model, tok = load_model(model_dir)
    return model.eval(), tok


def _run_all(eng, reqs, timeout=120):
    done = queue.Queue()
    for r in reqs:
        r.on_event = lambda ev, q=done, user=r.on_event: (user and user(ev), ev.kind in ("done", "error") and q.put(ev))
        eng.submit(r)
    events = [done.get(timeout=timeout) for _ in reqs]
    assert all(ev.kind == "done" for ev in events), [ev.text for ev in events]
    return reqs


@pytest.fixture(scope="module")
def references(tiny_model, tiny_tokenizer):
    """Greedy tokens generate() (the static cache) gives each system-prompted question."""
    out = {}
    for q in QUESTIONS:
        ids = tiny_tokenizer.encode(SYSTEM + q)
        out[tuple(ids)] = generate(tiny_model, tiny_tokenizer, SYSTEM + q, 16, temperature=0)[0].tokens
    return out


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_greedy_equals_generate_with_the_prefix_cache_on_and_off(tiny_model_dir, tiny_tokenizer, references,
                                                                 prefix_cache):
    model, tok = _load(tiny_model_dir)
    eng = Engine(model, tok, max_batch=3, block_size=4, prefix_cache=prefix_cache).start()
    try:
        for _ in range(2):  # the second round finds the first's blocks cached
            reqs = _run_all(eng, [Request(list(ids), 16) for ids in references])
            assert [r.tokens for r in reqs] == list(references.values())
        stats = eng.stats()
        assert stats["kv_blocks_used"] == 0 and stats["kv_blocks_reserved"] == 0
        assert (stats["prefix_cache_hits"] > 0) == prefix_cache
    finally:
        eng.stop(cancel=True, timeout=30)


def test_rows_of_very_different_lengths_decode_alike_through_the_table_and_the_gather(tiny_model_dir, tiny_tokenizer,
                                                                                     references, monkeypatch):
    # A long prompt (the system prompt repeated) beside the short ones, sharing prefix blocks,
    # with free rows (null blocks): the same greedy tokens with the paged kernel and the gather.
    long_ids = tiny_tokenizer.encode(SYSTEM * 4 + QUESTIONS[0])[:200]
    prompts = [long_ids] + [list(ids) for ids in references]
    got = {}
    for reads_table in (True, False):
        monkeypatch.setenv("LLAMAWORKS_PAGED_ATTENTION", "1" if reads_table else "0")
        model, tok = _load(tiny_model_dir)
        eng = Engine(model, tok, max_batch=8, block_size=4, prefill_chunk=16).start()
        try:
            got[reads_table] = [r.tokens for r in _run_all(eng, [Request(list(p), 16) for p in prompts])]
        finally:
            eng.stop(cancel=True, timeout=30)
        assert model.layers[0].attention.kv_cache.reads_table == (reads_table and native.available())
    assert got[True] == got[False]
    assert got[True][1:] == list(references.values())


def test_a_shared_system_prompt_is_prefilled_once(tiny_model_dir, tiny_tokenizer, references):
    model, tok = _load(tiny_model_dir)
    eng = Engine(model, tok, max_batch=4, block_size=4).start()
    try:
        ids = [list(k) for k in references]
        first = eng.complete(Request(ids[0], 16), timeout=60)
        assert first.tokens == references[tuple(ids[0])]
        common = len(tok.encode(SYSTEM))  # the prompts share at least this many tokens (bos + system)
        while ids[0][:common] != ids[1][:common]:
            common -= 1
        shared_blocks = common // 4
        before = eng.stats()
        assert before["kv_blocks_cached"] >= shared_blocks
        second = eng.complete(Request(ids[1], 16), timeout=60)
        assert second.tokens == references[tuple(ids[1])]
        after = eng.stats()
        assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == shared_blocks * 4
        prefill = [e for e in eng.step_log if e[0] == "prefill"]
        assert prefill[-1][2] == shared_blocks * 4  # its prefill started after the shared blocks
        # Two running together share the blocks: counted once, and as shared.
        gate = queue.Queue()
        a = Request(ids[2], 16, stop_ids=(), on_event=lambda ev: gate.put(eng.stats()))
        b = Request(ids[2], 16, stop_ids=())
        _run_all(eng, [a, b])
        both = [s for s in list(gate.queue) if s["kv_blocks_shared"] > 0]
        assert both and a.tokens == b.tokens
    finally:
        eng.stop(cancel=True, timeout=30)


def test_a_request_larger_than_the_whole_cache_is_refused_at_submit(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    gb = 10.5 * block_bytes(model, 4) / 2**30  # 10 blocks: one null, 9 of 4 tokens = 36 positions
    eng = Engine(model, tok, max_batch=2, block_size=4, kv_cache_gb=gb)
    assert eng.stats()["kv_blocks_total"] == 9
    eng.check(Request([1] * 20, 17))  # 36 positions written: fits
    with pytest.raises(ValueError, match="more than the whole cache holds.*--kv-cache-gb"):
        eng.submit(Request([1] * 20, 18))
    with pytest.raises(ValueError, match="kv_cache_gb"):
        Engine(model, tok, kv_cache_gb=0)
    with pytest.raises(ValueError, match="raise it"):
        Engine(model, tok, kv_cache_gb=1e-9)


@pytest.fixture(scope="module")
def tiny_budget_engine(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    # 24 usable blocks of 4 tokens: two or three requests at a time, the rest wait, and every
    # admission evicts cached blocks of earlier prompts.
    eng = Engine(model, tok, max_batch=3, block_size=4, kv_cache_gb=25.5 * block_bytes(model, 4) / 2**30,
                 prefill_chunk=5).start()
    yield eng
    eng.stop(cancel=True, timeout=30)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mix=st.lists(st.tuples(st.integers(0, len(QUESTIONS) - 1), st.integers(1, 16)), min_size=1, max_size=6))
def test_eviction_under_a_tiny_budget_never_corrupts_a_running_sequence(tiny_budget_engine, references, mix):
    eng = tiny_budget_engine
    keys = list(references)
    reqs = _run_all(eng, [Request(list(keys[q]), n) for q, n in mix])
    for (q, n), r in zip(mix, reqs):
        assert r.tokens == references[keys[q]][:n], (q, n)
    stats = eng.stats()
    assert stats["kv_blocks_used"] == 0 and stats["kv_blocks_reserved"] == 0
    assert stats["kv_blocks_free"] + stats["kv_blocks_cached"] == stats["kv_blocks_total"]


def test_one_request_after_another_evicts_cached_blocks_and_stays_exact(tiny_budget_engine, tiny_model,
                                                                       tiny_tokenizer):
    eng = tiny_budget_engine
    # Prompts sharing little, each leaving several cached blocks: more than the 24 there are.
    prompts = [" ".join([q] * 3) for q in QUESTIONS]
    want = [generate(tiny_model, tiny_tokenizer, p, 8, temperature=0)[0].tokens for p in prompts]
    evicted = eng.stats()["kv_blocks_evicted"]
    for _ in range(2):
        for p, w in zip(prompts, want):
            assert eng.complete(Request(tiny_tokenizer.encode(p), 8), timeout=60).tokens == w
    assert eng.stats()["kv_blocks_evicted"] > evicted


@pytest.mark.slow
def test_compiled_decode_over_the_paged_cache_is_one_graph_and_exact(tiny_model_dir, references):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, tok = _load(tiny_model_dir)
    # The compiled step reads the whole-context table, rewritten in place: one graph whatever
    # the sequences' lengths, their blocks or the prefill chunks between steps.
    eng = Engine(model, tok, max_batch=3, block_size=4, compile=True, prefill_chunk=7).start()
    try:
        reqs = _run_all(eng, [Request(list(ids), 16) for ids in references], timeout=600)
        assert [r.tokens for r in reqs] == list(references.values())
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        eng.stop(cancel=True, timeout=30)



def test_requests_arriving_together_share_the_system_prompt_they_have_in_common(tiny_model_dir, references):
    # Waiting before the engine's first step: their short rests would be prefilled in one batched
    # pass, before any of them had cached the shared blocks. The engine prefills the first ones
    # before admitting a request whose first block is theirs, so the later ones hit the cache.
    model, tok = _load(tiny_model_dir)
    eng = Engine(model, tok, max_batch=4, block_size=4)
    ids = [list(k) for k in references][:3]
    common = min(next((j for j, (a, b) in enumerate(zip(ids[0], other)) if a != b), len(other)) for other in ids[1:])
    shared_blocks = common // 4
    assert shared_blocks > 0
    done = queue.Queue()
    reqs = [Request(p, 16, on_event=lambda ev: ev.kind in ("done", "error") and done.put(ev)) for p in ids]
    for r in reqs:
        eng.submit(r)
    eng.start()
    try:
        assert all(done.get(timeout=120).kind == "done" for _ in reqs)
        assert [r.tokens for r in reqs] == [references[tuple(p)] for p in ids]
        assert eng.stats()["prefix_cache_hits"] >= shared_blocks * 4 * (len(reqs) - 1)
    finally:
        eng.stop(cancel=True, timeout=30)
