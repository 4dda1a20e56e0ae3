"""Prefill attention over the paged KV cache (inference/paged.py, issue 18): a prompt's chunk
attends causally over its own keys and unmasked over its prefix, the parts merged by their
log-sum-exp, and gives the gather + masked SDPA path's attention, logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamaworks.inference.paged import (
    PagedKVCache,
    PrefillRead,
    gather,
    merge_attention,
    prefill_attention,
    prefix_keys,
    setup_paged_caches,
)
from llamaworks.model import ModelArgs, build_model
from llamaworks.serve.engine import BATCH_PREFILL, SHORT_PREFILL, Engine, Request, prefill_groups

from .test_paged import _load, _run_all
from .test_prefix_batch import SIZE, Recorder, _alone, _burst, _check_same


def _reference(q, pool_k, pool_v, blocks, start):
    """The gather path: every block of the table, keys at positions <= each query's."""
    keys, values = gather(pool_k, blocks), gather(pool_v, blocks)
    qpos = torch.arange(start, start + q.shape[2])
    mask = torch.arange(keys.shape[2]).view(1, -1) <= qpos.view(-1, 1)  # (seq, width*B)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=keys.shape[1] != q.shape[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("start", [0, 8, 13])  # no prefix, a block boundary, inside a block
@pytest.mark.parametrize("scattered", [False, True])
def test_prefill_attention_equals_the_masked_gather(dtype, kv_heads, start, scattered):
    g = torch.Generator().manual_seed(start + kv_heads)
    size, seq, heads, head_dim = 4, 11, 4, 16
    pool_k = torch.randn(kv_heads, 40, size, head_dim, generator=g).to(dtype)
    pool_v = torch.randn(kv_heads, 40, size, head_dim, generator=g).to(dtype)
    width = -(-(start + seq) // size) + 1  # one entry past the end, as a rounded table width
    row = [9, 31, 2, 17, 25, 5, 38][:width] if scattered else list(range(20, 20 + width))
    blocks = torch.tensor([row])
    q = torch.randn(1, heads, seq, head_dim, generator=g).to(dtype)
    # The chunk's keys as the cache holds them (the pass wrote them at positions start..start+seq-1).
    pos = torch.arange(start, start + seq)
    phys, off = blocks[0, pos // size], pos % size
    chunk_k, chunk_v = pool_k[:, phys, off].unsqueeze(0), pool_v[:, phys, off].unsqueeze(0)
    k = PrefillRead(prefix_keys(pool_k, blocks, start), chunk_k)
    v = PrefillRead(prefix_keys(pool_v, blocks, start), chunk_v)
    assert k.prefix.shape == (1, kv_heads, start, head_dim)
    got = prefill_attention(q, k, v)
    want = _reference(q, pool_k, pool_v, blocks, start)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    assert got.dtype == dtype and got.shape == q.shape


@pytest.mark.parametrize("second", [[20, 21, 22, 35, 36], [20, 21, 22, 3, 4], [7, 8, 9, 10, 11]])
def test_prefill_attention_of_rows_at_the_same_positions(second):
    # Two prompts' rests after a shared cached prefix (the same first blocks), or after different ones.
    g = torch.Generator().manual_seed(2)
    size, start, seq, heads, head_dim = 4, 10, 9, 4, 16
    pool_k, pool_v = (torch.randn(heads, 40, size, head_dim, generator=g) for _ in range(2))
    blocks = torch.tensor([[20, 21, 22, 30, 31], second])
    q = torch.randn(2, heads, seq, head_dim, generator=g)
    pos = torch.arange(start, start + seq)
    chunk_k = torch.stack([pool_k[:, blocks[b, pos // size], pos % size] for b in range(2)])
    chunk_v = torch.stack([pool_v[:, blocks[b, pos // size], pos % size] for b in range(2)])
    got = prefill_attention(q, PrefillRead(prefix_keys(pool_k, blocks, start), chunk_k),
                            PrefillRead(prefix_keys(pool_v, blocks, start), chunk_v))
    torch.testing.assert_close(got, _reference(q, pool_k, pool_v, blocks, start), atol=1e-5, rtol=1e-5)


def test_prefix_keys_is_a_view_of_blocks_in_order_else_a_gather():
    pool = torch.randn(2, 12, 4, 8)
    in_order = prefix_keys(pool, torch.tensor([[3, 4, 5, 6]]), 10)
    assert in_order.untyped_storage().data_ptr() == pool.untyped_storage().data_ptr()  # no copy
    torch.testing.assert_close(in_order, gather(pool, torch.tensor([[3, 4, 5]]))[:, :, :10], atol=0, rtol=0)
    scattered = prefix_keys(pool, torch.tensor([[3, 9, 5, 6]]), 10)
    torch.testing.assert_close(scattered, gather(pool, torch.tensor([[3, 9, 5]]))[:, :, :10], atol=0, rtol=0)
    two_rows = prefix_keys(pool, torch.tensor([[3, 4, 5], [7, 8, 9]]), 6)
    torch.testing.assert_close(two_rows, gather(pool, torch.tensor([[3, 4], [7, 8]]))[:, :, :6], atol=0, rtol=0)
    shared = prefix_keys(pool, torch.tensor([[3, 4, 5], [3, 4, 9]]), 7)  # a shared system prompt's blocks
    assert shared.untyped_storage().data_ptr() == pool.untyped_storage().data_ptr()
    torch.testing.assert_close(shared, gather(pool, torch.tensor([[3, 4], [3, 4]]))[:, :, :7], atol=0, rtol=0)
    assert prefix_keys(pool, torch.tensor([[3, 4], [7, 8]]), 0).shape == (2, 2, 0, 8)


def test_merge_attention_of_two_halves_is_attention_over_all_keys():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    k = k * 4  # scores far apart: the weights must not overflow or vanish
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out, lse = flash(q, k[:, :, :2], v[:, :, :2])
    out2, lse2 = flash(q, k[:, :, 2:], v[:, :, 2:])
    torch.testing.assert_close(merge_attention(out, lse, out2, lse2), F.scaled_dot_product_attention(q, k, v),
                               atol=1e-5, rtol=1e-5)


def _cache(model):
    return setup_paged_caches(model, 64, 4, 64), model.layers[0].attention.kv_cache


def test_update_splits_prefill_passes_only_where_the_rows_share_positions():
    model = build_model(ModelArgs.from_name("tiny", n_layers=1), seed=0).eval()
    table, cache = _cache(model)
    assert isinstance(cache, PagedKVCache) and cache.splits_prefill
    k = torch.randn(2, 12, cache.k.shape[0], cache.k.shape[-1])
    table.blocks = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    with torch.no_grad():
        same = cache.update(torch.arange(4, 16).expand(2, 12), k, k)
        assert isinstance(same[0], PrefillRead) and same[0].prefix.shape[2] == 4
        apart = cache.update(torch.stack([torch.arange(4, 16), torch.arange(0, 12)]), k, k)
        assert isinstance(apart[0], torch.Tensor)  # rows at different positions: the gather path
    cache.splits_prefill = False
    with torch.no_grad():
        assert isinstance(cache.update(torch.arange(4, 16).expand(2, 12), k, k)[0], torch.Tensor)


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_prefill_chunks_give_the_gather_paths_logits(n_kv_heads):
    args = ModelArgs.from_name("tiny", n_layers=2, n_kv_heads=n_kv_heads)
    split, gathered = build_model(args, seed=0).eval(), build_model(args, seed=0).eval()
    prompt = torch.randint(0, args.vocab_size, (1, 45), generator=torch.Generator().manual_seed(0))
    blocks = torch.tensor([[5, 17, 2, 30, 11, 8, 21, 14, 26, 3, 33, 19, 40]])  # 52 positions, scattered
    outs = {}
    for name, model in (("split", split), ("gather", gathered)):
        table, _ = _cache(model)
        for layer in model.layers:
            layer.attention.kv_cache.splits_prefill = name == "split"
        table.blocks = blocks
        with torch.no_grad():  # 3 chunks: from 0, from a block boundary, from inside a block
            spans = ((0, 16), (16, 29), (29, 45))
            outs[name] = torch.cat([model(prompt[:, a:b], torch.arange(a, b)) for a, b in spans], 1)
    torch.testing.assert_close(outs["split"], outs["gather"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [None, 12, 24])
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_engine_greedy_tokens_equal_with_the_gather_path(tiny_model_dir, tiny_tokenizer, monkeypatch, chunk,
                                                        prefix_cache):
    from llamaworks.inference.load import load_model

    prompts = ["O fair lady of the night, speak to me of the moon and of the sea and of the stars above "
               "the hills where the shepherds keep their flocks", "The king", "Love is not love which alters"]
    tokens = {}
    for path in ("1", "0"):
        monkeypatch.setenv("LLAMAWORKS_PAGED_PREFILL", path)
        model, tok = load_model(tiny_model_dir)
        eng = Engine(model.eval(), tok, max_batch=2, block_size=4, prefill_chunk=chunk,
                     prefix_cache=prefix_cache).start()
        try:
            assert model.layers[0].attention.kv_cache.splits_prefill == (path == "1")
            runs = []
            for _ in range(2):  # the second round meets the first's cached blocks
                runs.append([r.tokens for r in _run_all(eng, [Request(tiny_tokenizer.encode(p), 10)
                                                              for p in prompts])])
            tokens[path] = runs
        finally:
            eng.stop(cancel=True, timeout=30)
    assert len(tiny_tokenizer.encode(prompts[0])) > 24  # several chunks
    assert tokens["1"] == tokens["0"]
    assert tokens["1"][0] == tokens["1"][1]


# --- batched prefill of longer rests at the same positions (engine.prefill_groups) ----------------


def test_prefill_groups_batch_short_rests_anywhere_and_longer_ones_at_one_start():
    assert SHORT_PREFILL < 129 <= BATCH_PREFILL
    assert prefill_groups([(0, 10), (40, 64), (8, 1)]) == [[1, 0, 2]]  # short: one pass, whatever the start
    assert prefill_groups([(0, 129)] * 7) == [list(range(7))]  # serve.py's mixed prompts: one pass
    assert prefill_groups([(1024, 65)] * 3) == [[0, 1, 2]]  # rests after a shared system prompt
    # Longer rests: only at the same start, and at least half as long as the group's longest.
    assert prefill_groups([(0, 200), (0, 90), (0, 120), (16, 150)]) == [[0, 2], [3], [1]]
    assert prefill_groups([(0, 100), (0, 40)]) == [[0], [1]]
    assert prefill_groups([]) == []


def test_fresh_prompts_longer_than_short_rests_are_prefilled_in_one_pass_and_stay_exact(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    runner = Recorder(model)
    eng = Engine(model, tok, max_batch=4, block_size=SIZE, runner=runner, ragged=False).start()  # separate passes
    gen = torch.Generator().manual_seed(3)
    lengths = [SHORT_PREFILL + 30, SHORT_PREFILL + 10, SHORT_PREFILL + 30]
    prompts = [torch.randint(3, tok.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    try:
        reqs = _burst(eng, [Request(p, 6, stop_ids=(), logprobs=2) for p in prompts])
    finally:
        eng.stop(cancel=True, timeout=30)
    assert runner.prefills == [(3, SHORT_PREFILL + 30)], runner.prefills  # one pass, padded to the longest
    _check_same(reqs, _alone(tiny_model_dir, reqs))
