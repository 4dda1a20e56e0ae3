"""llamaworks::prefill_attention (csrc/prefill_attn.cpp, issue 18): a prefill chunk's causal
attention over its own keys and, unmasked, its prefix's, in one pass with an online softmax,
at every instruction set, against masked SDPA over the keys concatenated (in fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamaworks.inference import native, paged
from llamaworks.inference.paged import PrefillRead, prefill_attention

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ops = torch.ops.llamaworks


def case(g, dtype, bsz, heads, kv_heads, seq, start, head_dim):
    """q (bsz, heads, seq, head_dim); the chunk's keys and values as the cache's update hands them
    over, a (bsz, seq, kv_heads, head_dim) tensor transposed (strided); a prefix of `start` positions."""
    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q = rand(bsz, heads, seq, head_dim)
    k, v = rand(bsz, seq, kv_heads, head_dim).transpose(1, 2), rand(bsz, seq, kv_heads, head_dim).transpose(1, 2)
    kp, vp = rand(bsz, kv_heads, start, head_dim), rand(bsz, kv_heads, start, head_dim)
    return q, k, v, kp, vp


def reference(q, k, v, kp, vp):
    """Masked SDPA in fp32 over prefix + chunk: query s (position start + s) sees keys 0..start+s."""
    start, seq = kp.shape[2], q.shape[2]
    keys, values = torch.cat([kp, k], 2).float(), torch.cat([vp, v], 2).float()
    mask = torch.arange(start + seq).view(1, -1) <= (start + torch.arange(seq)).view(-1, 1)
    return F.scaled_dot_product_attention(q.float(), keys, values, attn_mask=mask,
                                          enable_gqa=keys.shape[1] != q.shape[1])


def tolerance(dtype):
    # bf16: the output rounded to bf16 (2^-9 relative) on values of order 1; fp32: the sums' order.
    return dict(atol=1.6e-2, rtol=1.6e-2) if dtype == torch.bfloat16 else dict(atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("isa", native.ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [
    (1, 4, 4, 1, 0, 16),     # one query, no prefix
    (1, 4, 4, 33, 0, 64),    # past one tile of keys and one block of rows, no prefix
    (2, 4, 2, 70, 13, 32),   # GQA, two sequences, a prefix inside a tile, past a query tile of 64
    (1, 6, 1, 31, 32, 16),   # one key head for six query heads, a prefix of exactly one tile
    (1, 2, 2, 5, 97, 128),   # a short chunk after a long prefix, head_dim 128
])
def test_prefill_kernel_equals_masked_sdpa(isa, dtype, shape):
    bsz, heads, kv_heads, seq, start, head_dim = shape
    g = torch.Generator().manual_seed(seq * 31 + start)
    q, k, v, kp, vp = case(g, dtype, bsz, heads, kv_heads, seq, start, head_dim)
    got = ops.prefill_attention(q, k, v, kp, vp)
    assert got.dtype == dtype and got.shape == q.shape and got.is_contiguous()
    torch.testing.assert_close(got.float(), reference(q, k, v, kp, vp), **tolerance(dtype))


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"], indirect=True)
def test_causal_edges_each_query_sees_exactly_its_keys(isa):
    # Values one-hot in the key's position and scores all equal (zero queries): the output is the
    # uniform average over exactly the keys each query may see, 1 / (start + s + 1) each.
    start, seq = 5, 40
    n = start + seq  # <= 64 = head_dim: key j's value is the unit vector j
    q = torch.zeros(1, 1, seq, 64)
    keys = torch.randn(1, 1, n, 64)
    values = torch.zeros(1, 1, n, 64)
    values[0, 0, torch.arange(n), torch.arange(n)] = 1.0
    out = ops.prefill_attention(q, keys[:, :, start:], values[:, :, start:], keys[:, :, :start], values[:, :, :start])
    seen = torch.arange(64).view(1, -1) <= (start + torch.arange(seq)).view(-1, 1)  # (seq, 64)
    want = seen.float() / (start + torch.arange(seq) + 1).view(-1, 1)
    torch.testing.assert_close(out[0, 0], want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"], indirect=True)
def test_scores_far_apart_give_zero_weights_not_nan(isa):
    # Queries 40x larger: scores hundreds apart, so e^(s - max) runs far below e^-87 (each vector
    # exp flushes those to exactly 0, never subnormal) and the softmax is near one-hot.
    g = torch.Generator().manual_seed(8)
    q, k, v, kp, vp = case(g, torch.float32, 1, 4, 2, 70, 13, 32)
    q = q * 40
    got = ops.prefill_attention(q, k, v, kp, vp)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference(q, k, v, kp, vp), atol=2e-5, rtol=2e-4)


def test_prefix_as_a_shared_view_and_two_threads(native_lib):
    # prefix_keys hands over one sequence's blocks expanded over the batch (a batch stride of 0);
    # two threads take work items from a shared counter: the same result as one.
    g = torch.Generator().manual_seed(5)
    q, k, v, kp, vp = case(g, torch.float32, 3, 4, 2, 150, 40, 32)
    kp, vp = kp[:1].expand(3, -1, -1, -1), vp[:1].expand(3, -1, -1, -1)
    one = ops.prefill_attention(q, k, v, kp, vp)
    torch.testing.assert_close(one, reference(q, k, v, kp, vp), **tolerance(torch.float32))
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(ops.prefill_attention(q, k, v, kp, vp), one)
    finally:
        torch.set_num_threads(n)


def test_prefill_kernel_checks_its_operands_and_traces(native_lib):
    g = torch.Generator().manual_seed(6)
    q, k, v, kp, vp = case(g, torch.float32, 1, 4, 2, 9, 3, 16)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.prefill_attention(q, k.bfloat16(), v, kp, vp)
    with pytest.raises(RuntimeError, match="head_dim"):
        ops.prefill_attention(q[..., :8], k[..., :8], v[..., :8], kp[..., :8], vp[..., :8])
    with pytest.raises(RuntimeError, match="query heads"):
        ops.prefill_attention(q[:, :3], k, v, kp, vp)
    with pytest.raises(RuntimeError, match="q's length"):
        ops.prefill_attention(q, k[:, :, :4], v, kp, vp)
    torch.library.opcheck(ops.prefill_attention, (q, k, v, kp, vp), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_attention_takes_the_kernel_unless_switched_off(native_lib, monkeypatch, dtype):
    g = torch.Generator().manual_seed(7)
    q, k, v, kp, vp = case(g, dtype, 1, 4, 2, 20, 12, 16)
    kr, vr = PrefillRead(kp, k), PrefillRead(vp, v)
    calls = []
    real = paged.prefill_kernel_applies
    monkeypatch.setattr(paged, "prefill_kernel_applies", lambda *a: calls.append(real(*a)) or calls[-1])
    on = prefill_attention(q, kr, vr)
    monkeypatch.setenv("LLAMAWORKS_PREFILL_KERNEL", "0")
    off = prefill_attention(q, kr, vr)  # the SDPA parts merged by their log-sum-exp
    assert calls == [True, False]
    torch.testing.assert_close(on.float(), off.float(), **tolerance(dtype))
    monkeypatch.delenv("LLAMAWORKS_PREFILL_KERNEL")
    with torch.enable_grad():
        assert not paged.prefill_kernel_applies(q.requires_grad_(), kr, vr)


# bf16 on AVX512_BF16 CPUs (the avx512bf16 level): vdpbf16ps for q.k (exact products, fp32 sums) and
# p.v (the probabilities rounded to bf16, normalised by the sum of the rounded values).
U = 2.0**-8  # bf16's unit roundoff: 8 significant bits, round to nearest


@pytest.mark.parametrize("isa", ["avx512bf16"], indirect=True)
@pytest.mark.parametrize("shape", [
    (1, 4, 4, 70, 13, 64),   # odd tiles (13 prefix keys, 70 chunk keys), past a query tile of 64
    (2, 6, 2, 33, 40, 128),  # GQA, two sequences, head_dim 128
    (1, 2, 1, 1, 0, 16),     # one query, one key: a pair with its second half missing
])
def test_bf16_dot_products_stay_within_the_probabilities_rounding(isa, shape, monkeypatch):
    # With p~_j = p_j (1 + d_j), |d_j| <= U, out~ = sum p~ v / sum p~ differs from fp32 math's out by
    # sum p_j d_j (v_j - out) / sum p~ (the sum p_j (v_j - out) is 0), at most U max_j |v_j - out| / (1 - U);
    # then out~ is rounded to bf16 (U |out|). The scores' fp32 sums of exact products move the probabilities
    # by ~1e-6 relative. So |got - want| <= U (max |v - want| + |want|) + 1e-5 per element, with max |v - want|
    # bounded by max |v| + |want|. Values offset by 3: a common offset the normalisation must cancel.
    bsz, heads, kv_heads, seq, start, head_dim = shape
    g = torch.Generator().manual_seed(seq + start)
    q, k, v, kp, vp = case(g, torch.bfloat16, bsz, heads, kv_heads, seq, start, head_dim)
    v, vp = (v.float() + 3).bfloat16(), (vp.float() + 3).bfloat16()
    got = ops.prefill_attention(q, k, v, kp, vp).float()
    want = reference(q, k, v, kp, vp)
    vmax = max(v.float().abs().max().item(), vp.float().abs().max().item() if start else 0.0)
    bound = U * (vmax + 2 * want.abs()) / (1 - U) + 1e-5
    assert ((got - want).abs() <= bound).all(), ((got - want).abs() - bound).max()
    # The dot-product path ran: the widening path (LLAMAWORKS_PREFILL_DOT=0, avx512's code) rounds only
    # the output, so it is closer to fp32 math and not the same bits.
    monkeypatch.setenv("LLAMAWORKS_PREFILL_DOT", "0")
    widened = ops.prefill_attention(q, k, v, kp, vp).float()
    assert ((widened - want).abs() <= U * want.abs() + 1e-5).all()
    if shape[3] > 1:  # one key: p = 1, exact in bf16 either way
        assert not torch.equal(widened, got)


@pytest.mark.parametrize("isa", ["avx512bf16"], indirect=True)
def test_bf16_dot_products_mask_exactly_the_causal_keys(isa):
    # As test_causal_edges_each_query_sees_exactly_its_keys, in bf16: zero queries give every seen key
    # p = 1 (exact in bf16), one-hot values, so each output is 1 / (keys seen) or 0, rounded to bf16.
    start, seq = 5, 40
    n = start + seq
    q = torch.zeros(1, 1, seq, 64, dtype=torch.bfloat16)
    keys = torch.randn(1, 1, n, 64).bfloat16()
    values = torch.zeros(1, 1, n, 64, dtype=torch.bfloat16)
    values[0, 0, torch.arange(n), torch.arange(n)] = 1.0
    out = ops.prefill_attention(q, keys[:, :, start:], values[:, :, start:], keys[:, :, :start], values[:, :, :start])
    seen = torch.arange(64).view(1, -1) <= (start + torch.arange(seq)).view(-1, 1)  # (seq, 64)
    want = (seen.float() / (start + torch.arange(seq) + 1).view(-1, 1)).bfloat16()
    assert torch.equal(out[0, 0], want)
