"""A bf16 KV cache under an fp32 model (`serve --kv-dtype bfloat16`): the native kernels read it
exactly as they read the same cache widened to fp32, keys and values are written rounded to bf16
as `.to(torch.bfloat16)` rounds fp32's, every path of the engine (one pass per step or separate
passes, whole or chunked prompts, prefix cache on or off) gives the same tokens, the cache holds
twice the blocks in the same memory, and dtypes it cannot take are refused by name."""

from __future__ import annotations

import pytest
import torch

from llamaworks.inference import native
from llamaworks.inference.paged import PagedRead, paged_attention_reference
from llamaworks.serve.engine import Engine

from .test_paged import _load
from .test_ragged import _requests, _serve

needs_native = pytest.mark.skipif(not native.available(), reason="native kernels not built")


@needs_native
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_paged_kernel_reads_a_bf16_pool_as_the_widened_pool(kv_heads):
    g = torch.Generator().manual_seed(0)
    heads, head_dim, size, blocks = 4, 64, 16, 40
    k = torch.randn(kv_heads, blocks, size, head_dim, generator=g).bfloat16()
    v = torch.randn(kv_heads, blocks, size, head_dim, generator=g).bfloat16()
    table = torch.randint(1, blocks, (3, 6), generator=g)
    pos = torch.tensor([[50, 51], [3, 4], [94, 95]])  # two query positions a row (a speculative verify)
    q = torch.randn(3, heads, 2, head_dim, generator=g)
    out = torch.ops.llamaworks.paged_attention(q, k, v, table, pos)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.ops.llamaworks.paged_attention(q, k.float(), v.float(), table, pos))
    ref = paged_attention_reference(q, PagedRead(k, table, pos), PagedRead(v, table, pos))  # the torch path
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("prefix", [0, 21])
def test_prefill_kernel_reads_bf16_keys_as_the_widened_keys(prefix):
    g = torch.Generator().manual_seed(1)
    b, heads, kv_heads, seq, head_dim = 2, 4, 2, 37, 64
    q = torch.randn(b, heads, seq, head_dim, generator=g)
    parts = [torch.randn(b, kv_heads, n, head_dim, generator=g).bfloat16() for n in (seq, seq, prefix, prefix)]
    out = torch.ops.llamaworks.prefill_attention(q, *parts)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.ops.llamaworks.prefill_attention(q, *(t.float() for t in parts)))


@needs_native
def test_rope_cache_writes_fp32_keys_rounded_as_to_bfloat16():
    g = torch.Generator().manual_seed(2)
    heads, kv_heads, head_dim, tokens = 4, 2, 64, 5
    qkv = torch.randn(tokens, 1, (heads + 2 * kv_heads) * head_dim, generator=g)
    freqs = torch.randn(tokens, 1, head_dim // 2, 2, generator=g)
    slots, rows = torch.tensor([3, 7, 9, 11, 50]).view(tokens, 1), torch.zeros(tokens, dtype=torch.long)
    caches16 = [torch.zeros(1, kv_heads, 64, head_dim, dtype=torch.bfloat16) for _ in range(2)]
    caches32 = [torch.zeros(1, kv_heads, 64, head_dim) for _ in range(2)]
    q16 = torch.ops.llamaworks.rope_cache(qkv, freqs, slots, rows, *caches16, heads, kv_heads)
    q32 = torch.ops.llamaworks.rope_cache(qkv, freqs, slots, rows, *caches32, heads, kv_heads)
    assert q16.dtype == torch.float32 and torch.equal(q16, q32)
    for c16, c32 in zip(caches16, caches32):
        assert torch.equal(c16, c32.bfloat16())
    with pytest.raises(RuntimeError, match="bfloat16 caches"):
        torch.ops.llamaworks.rope_cache(qkv.bfloat16(), freqs, slots, rows, *caches32, heads, kv_heads)


@pytest.fixture(scope="module")
def separate16(tiny_model_dir):
    """Separate passes per step over a bf16 cache: the reference of the other paths."""
    eng, reqs = _serve(tiny_model_dir, _requests, ragged=False, prefix_cache=False, kv_dtype=torch.bfloat16)
    assert not eng._ragged and eng.model.layers[0].attention.kv_cache.k.dtype == torch.bfloat16
    return reqs


@pytest.mark.parametrize("chunk", [None, 3, 8])
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_every_engine_path_gives_the_same_tokens_over_a_bf16_cache(tiny_model_dir, separate16, chunk, prefix_cache):
    eng, reqs = _serve(tiny_model_dir, _requests, prefill_chunk=chunk, prefix_cache=prefix_cache,
                       kv_dtype=torch.bfloat16)
    assert eng._ragged == native.available() and eng.kv_dtype == torch.bfloat16
    for got, want in zip(reqs, separate16):
        assert got.tokens == want.tokens
        torch.testing.assert_close([p for p, _ in got.token_logprobs], [p for p, _ in want.token_logprobs],
                                   atol=1e-4, rtol=0)


def test_a_bf16_cache_stays_close_to_the_fp32_cache(tiny_model_dir, separate16):
    _, fp32 = _serve(tiny_model_dir, _requests, ragged=False, prefix_cache=False)
    agree = sum(a.tokens[:4] == b.tokens[:4] for a, b in zip(separate16, fp32))
    assert agree >= len(fp32) - 2, [(a.tokens, b.tokens) for a, b in zip(separate16, fp32)]
    first = [(a.token_logprobs[0][0], b.token_logprobs[0][0]) for a, b in zip(separate16, fp32)
             if a.token_logprobs and b.token_logprobs]
    assert first and all(abs(x - y) < 0.05 for x, y in first), first


def test_a_bf16_cache_holds_twice_the_blocks(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    full = Engine(model, tok, max_batch=2, kv_cache_gb=0.001)
    half = Engine(model, tok, max_batch=2, kv_cache_gb=0.001, kv_dtype=torch.bfloat16)
    blocks = full.pool.capacity + 1  # the null block besides
    assert half.pool.capacity + 1 in (2 * blocks, 2 * blocks + 1)


def test_dtypes_the_cache_cannot_take_are_refused_by_name(tiny_model_dir):
    from llamaworks.serve.command import _kv_dtype

    model, tok = _load(tiny_model_dir)
    with pytest.raises(ValueError, match="--kv-dtype float16 under a float32 model"):
        Engine(model, tok, max_batch=1, kv_dtype=torch.float16)
    with pytest.raises(ValueError, match="--kv-dtype float32 under a bfloat16 model"):
        Engine(model.to(torch.bfloat16), tok, max_batch=1, kv_dtype=torch.float32)
    with pytest.raises(ValueError, match="--kv-dtype: unknown dtype 'int8'"):
        _kv_dtype("int8")
    assert _kv_dtype(None) is None and _kv_dtype("bf16") == torch.bfloat16


@needs_native
def test_one_pass_steps_rotate_and_write_a_bf16_cache_in_one_call(tiny_model_dir, monkeypatch):
    """The fused attention's rope_cache path (fuse.py) takes an fp32 model over a bf16 pool, rather
    than falling back to apply_rotary_emb and a separate write."""
    from llamaworks.inference.paged import PagedKVCache

    calls = []
    real = PagedKVCache.rope_update

    def counted(self, *args, **kwargs):
        calls.append(self.k.dtype)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PagedKVCache, "rope_update", counted)
    eng, reqs = _serve(tiny_model_dir, _requests, kv_dtype=torch.bfloat16)
    assert eng._ragged and calls and set(calls) == {torch.bfloat16}
