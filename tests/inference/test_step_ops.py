"""The eager decode step's native operators (csrc/step.cpp): rope_cache equals apply_rotary_emb
and KVCache.update bit for bit (fp32, bf16, grouped-query heads, several tokens, explicit cache
rows); rms_norm equals RMSNorm to rounding; the layers that call them (fuse.FusedAttention,
kernels.NativeRMSNorm) give fp32 eager's greedy tokens, and compiled graphs, gradients and
other caches keep the PyTorch code."""

from __future__ import annotations

import copy

import pytest
import torch
from peaked import sharpen

from llamaworks.inference import generate
from llamaworks.inference.fuse import FusedAttention, fuse_projections
from llamaworks.inference.generate import decode_step, generate_ids
from llamaworks.inference.kernels import NativeRMSNorm, use_native_kernels
from llamaworks.kvcache import KVCache
from llamaworks.model import ModelArgs, RMSNorm, apply_rotary_emb, build_model, model_inv_freq, rope_table

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ops = torch.ops.llamaworks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq,rows", [(1, None), (3, None), (1, [2, 0, 3]), (2, [1, 3, 0])])
def test_rope_cache_equals_rope_and_cache_update(native_lib, dtype, seq, rows):
    bsz, heads, kv_heads, head_dim, cache_rows, positions = 3, 4, 2, 32, 4, 16
    g = torch.Generator().manual_seed(0)
    qkv = (3 * torch.randn(bsz, seq, (heads + 2 * kv_heads) * head_dim, generator=g)).to(dtype)
    table = rope_table(model_inv_freq(ModelArgs(dim=heads * head_dim, n_heads=heads)), positions)
    pos = torch.tensor([[5 + i + b for i in range(seq)] for b in range(bsz)])
    freqs = table[pos]  # (bsz, seq, head_dim/2, 2) as Transformer.forward indexes it
    row_t = None if rows is None else torch.tensor(rows)

    want = KVCache(cache_rows, positions, kv_heads, head_dim, dtype)
    want.k.normal_(generator=g)  # what was there stays where nothing is written
    want.v.normal_(generator=g)
    got = copy.deepcopy(want)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = apply_rotary_emb(q.view(bsz, seq, heads, head_dim), freqs).transpose(1, 2)
    want.update(pos, apply_rotary_emb(k.view(bsz, seq, kv_heads, head_dim), freqs),
                v.view(bsz, seq, kv_heads, head_dim), row_t)

    q_got = ops.rope_cache(qkv, freqs, pos, torch.empty(0, dtype=torch.long) if rows is None else row_t,
                           got.k, got.v, heads, kv_heads)
    assert q_got.shape == (bsz, heads, seq, head_dim) and q_got.dtype == dtype and q_got.is_contiguous()
    assert torch.equal(q_got, q)
    assert torch.equal(got.k, want.k) and torch.equal(got.v, want.v)
    # one table row for every sequence (3-d freqs) broadcasts as apply_rotary_emb does
    shared = table[7:8].expand(seq, -1, -1)  # (seq, head_dim/2, 2)
    q_shared = ops.rope_cache(qkv, shared, torch.full((bsz, seq), 7), torch.empty(0, dtype=torch.long),
                              got.k, got.v, heads, kv_heads)
    assert torch.equal(q_shared, apply_rotary_emb(qkv[..., : heads * head_dim].view(bsz, seq, heads, head_dim),
                                                  shared).transpose(1, 2))


def test_rope_cache_refuses_positions_outside_the_cache(native_lib):
    cache = KVCache(1, 8, 1, 16, torch.float32)
    qkv, freqs = torch.randn(1, 1, 48), torch.randn(1, 1, 8, 2)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.rope_cache(qkv, freqs, torch.tensor([[8]]), torch.empty(0, dtype=torch.long), cache.k, cache.v, 1, 1)
    with pytest.raises(RuntimeError, match="float32 or all bfloat16"):
        ops.rope_cache(qkv.bfloat16(), freqs, torch.tensor([[0]]), torch.empty(0, dtype=torch.long), cache.k,
                       cache.v, 1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 384), (2, 3, 768), (5, 96)])
def test_rms_norm_equals_rmsnorm(native_lib, dtype, shape):
    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(shape[-1], eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(shape[-1], generator=g))
    x = (4 * torch.randn(shape, generator=g)).to(dtype)
    with torch.no_grad():
        want = norm(x)
        got = ops.rms_norm(x, norm.weight, norm.eps)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    else:  # the fp32 scale within an ulp: at most one bf16 rounding step apart, twice
        assert ((got.float() - want.float()).abs() <= 2 * 2 ** -7 * want.float().abs() + 1e-6).all()
        assert (got == want).float().mean() > 0.95


def _fused_fast(model):
    m = copy.deepcopy(model)
    fuse_projections(m)
    use_native_kernels(m)
    assert any(isinstance(x, FusedAttention) for x in m.modules())
    assert any(type(x) is NativeRMSNorm for x in m.modules())
    return m


ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=64)
PROMPTS = [[1, 5, 9, 23], [1, 77, 3], [1], [1, 2, 3, 4, 5, 6, 7], [1, 9]]


def _tokens(model, prompts=PROMPTS, compile=False):
    return torch.cat([t for t, _ in generate_ids(model, prompts, 24, temperature=0.0, compile=compile)], 1)


def test_eager_step_ops_give_fp32_eager_tokens(native_lib):
    fp32 = sharpen(build_model(ARGS))
    fast = _fused_fast(fp32)
    calls = {"rope_cache": 0, "rms_norm": 0}
    with torch.profiler.profile() as prof:
        got = _tokens(fast)
    for e in prof.key_averages():
        for name in calls:
            if e.key == f"llamaworks::{name}":
                calls[name] = e.count
    assert calls["rope_cache"] >= 2 * 23 and calls["rms_norm"] >= 5 * 23, calls  # the native ops ran
    assert torch.equal(got, _tokens(fp32))


def test_eager_rope_cache_logits_equal_pytorch_path(native_lib):
    # With RMSNorm's own code, the fused model with and without rope_cache: the same bits.
    model = sharpen(build_model(ARGS)).to(torch.bfloat16)
    fast = _fused_fast(model)
    for m in fast.modules():
        if type(m) is NativeRMSNorm:
            m.__class__ = RMSNorm
    slow = copy.deepcopy(fast)
    outs = []
    for m, native_step in ((fast, True), (slow, False)):
        m.setup_caches(2, 32)
        toks = torch.tensor([[3, 8, 1, 9, 4], [7, 7, 2, 5, 1]])
        with torch.no_grad():
            if not native_step:  # the PyTorch path: a cache of a subclass takes Attention.forward
                for layer in m.layers:
                    layer.attention.kv_cache.__class__ = type("OtherCache", (KVCache,), {})
            a = m(toks[:, :4], torch.arange(4))
            b = m(toks[:, 4:], torch.tensor([[4], [4]]), rows=torch.tensor([1, 0]))
        outs.append((a, b, m.layers[1].attention.kv_cache.k.clone()))
    for x, y in zip(*outs):
        assert torch.equal(x, y)


def test_compiled_step_and_gradients_keep_pytorch_code(native_lib):
    fp32 = sharpen(build_model(ARGS))
    fast = _fused_fast(fp32)
    assert torch.equal(_tokens(fast, PROMPTS[:2], compile=True), _tokens(fp32, PROMPTS[:2]))
    # With gradients to record, RMSNorm's and Attention's own code (the native ops have none).
    x = torch.randn(1, 3, ARGS.dim, requires_grad=True)
    norm = fast.layers[0].attention_norm
    norm(x).sum().backward()
    assert x.grad is not None
    fast.setup_caches(1, 16)
    step = torch.compile(decode_step, dynamic=False, fullgraph=True)
    with torch.no_grad():
        step(fast, torch.zeros(1, 1, dtype=torch.long), torch.tensor([[2]]), None, 0.0, None, 1.0)


def test_native_rms_norm_takes_decode_rows_only(native_lib):
    norm = NativeRMSNorm(32)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 32))
    for rows, native_call in ((8, True), (9, False)):  # prefill: RMSNorm's vectorised kernels
        x = torch.randn(1, rows, 32)
        with torch.no_grad(), torch.profiler.profile() as prof:
            got = norm(x)
        called = any(e.key == "llamaworks::rms_norm" for e in prof.key_averages())
        assert called == native_call, rows
        torch.testing.assert_close(got, RMSNorm.forward(norm, x), rtol=2e-6, atol=1e-6)


def test_compiled_steps_without_guard_checks_stay_with_their_model(native_lib, monkeypatch):
    # generate's decode loop calls the warmed-up step with only the guards that tell its compiled
    # graphs apart (generate.warmed_step): models of the same shapes, another dtype, another
    # cache length, in turn in one process, each still gives its own tokens (fp32: eager's; bf16,
    # which inductor rounds differently: the compiled step's with every guard checked).
    a = _fused_fast(sharpen(build_model(ARGS), seed=1))
    b = _fused_fast(sharpen(build_model(ARGS), seed=2))
    c = _fused_fast(sharpen(build_model(ARGS), seed=3).to(torch.bfloat16))
    prompts = PROMPTS[:2]
    want = {name: _tokens(m, prompts) for name, m in (("a", a), ("b", b))}
    with monkeypatch.context() as patch:
        patch.setattr(generate, "warmed_step", lambda step: step)
        want["c"] = _tokens(c, prompts, compile=True)
    assert not torch.equal(want["a"], want["b"])
    for name, m in (("a", a), ("b", b), ("c", c), ("a", a), ("b", b)):
        assert torch.equal(_tokens(m, prompts, compile=True), want[name]), name
    long = torch.cat([t for t, _ in generate_ids(a, [[1, 5, 9]], 40, temperature=0.0, compile=True)], 1)
    assert torch.equal(long, torch.cat([t for t, _ in generate_ids(a, [[1, 5, 9]], 40, temperature=0.0)], 1))
