"""int4 weights times int8 activations (csrc/gemv_avx512vnni.cpp's int4_vnni): the activations
quantised per block of 128 columns (native.quantize_activations_q8(x, 128)) and exact integer
dot products with AVX512_VNNI for groups of 128, 256, ...; every other level and group keeps its
own path (native.int4_activations). Against a reference written in torch with the same
integers, every instruction set this CPU can run (lower ones forced, as on an AVX2-only CPU),
odd shapes, chunks of rows; the error against the unquantised product stays within the
activations' rounding; a row gets the same bits alone or in a batch; the tiny model's greedy
tokens; the operator inside torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peaked import sharpen

from llamaworks.inference import native
from llamaworks.inference.generate import generate_ids
from llamaworks.inference.kernels import use_native_kernels
from llamaworks.inference.quant import (
    dequantize_int4,
    native_int4_layout,
    pack_int4,
    quantize_int4,
    quantize_model,
    unpack_int4,
)
from llamaworks.model import ModelArgs, build_model

from . import test_kernels as base

# test_kernels' helpers and fixtures (the library built once, an instruction set forced)
close, int4_args = base.close, base.int4_args  # the `isa` fixture is in conftest.py

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ops = torch.ops.llamaworks


def q8_128_reference(x: torch.Tensor, packed, scales, zeros, group: int) -> torch.Tensor:
    """int4_vnni's arithmetic in torch: per row and block of 128, q_x = round(x * 127 / max|x|)
    and d = max|x| / 127; per group, scale * sum_b d_b * (q_w . q_x)_b (integers, exact) plus
    (zero - 8 * scale) * sum_b d_b * sum(q_x)_b. In float64: the kernel differs by fp32 sums."""
    rows, k = x.shape
    blocks = x.float().reshape(rows, k // 128, 128)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.div(torch.full_like(amax, 127.0), amax), torch.zeros_like(amax))
    qx = torch.round(blocks * inv).to(torch.int64)  # (rows, K/128, 128), |q| <= 127
    d = (amax / 127.0).double().squeeze(-1)  # (rows, K/128)
    qw = unpack_int4(packed).to(torch.int64).reshape(-1, k // 128, 128)  # (N, K/128, 128) in 0..15
    dots = torch.einsum("rbk,nbk->rnb", qx, qw)  # integers
    per = group // 128  # blocks per group
    s = scales.double().repeat_interleave(per, 1)  # (N, K/128)
    o = (zeros - 8 * scales).double().repeat_interleave(per, 1)
    sums = qx.sum(-1).double() * d  # (rows, K/128)
    return (dots.double() * d[:, None, :] * s[None]).sum(-1) + sums @ o.T


def test_the_policy_names_each_path():
    assert native.int4_activations("avx512vnni", 128) == "q8_128"
    assert native.int4_activations("avx512bf16", 256) == "q8_128"
    assert native.int4_activations("avx512bf16", 64) == "bf16"  # bf16 dot products keep groups of 32, 64
    assert native.int4_activations("avx512vnni", 64) == "q8_32"
    assert native.int4_activations("avx512", 128) == "q8_32"  # no VNNI: AVX2 maddubs
    assert native.int4_activations("avx2", 128) == "q8_32"
    assert native.int4_activations("scalar", 128) == "fp32"
    x = torch.randn(2, 256)
    assert torch.equal(native.int4_activations_as_taken(x, "avx512vnni", 128), native.quantize_activations_q8(x, 128))
    assert not torch.equal(native.quantize_activations_q8(x, 128), native.quantize_activations_q8(x))


@pytest.mark.parametrize("isa", native.ISAS, indirect=True)
def test_int4_products_equal_the_integer_reference(isa):
    g = torch.Generator().manual_seed(0)
    for n, k, group in ((37, 128, 128), (64, 512, 128), (16, 1024, 256), (5, 384, 128), (48, 256, 64)):
        w = torch.randn(n, k, generator=g)
        packed, s, z, args = int4_args(w, group)
        ref_w = dequantize_int4(packed, s, z, group)
        how = native.int4_activations(isa, group)
        for rows in (1, 2, 3, 4, 5, 6, 7, 8, 11, 19):  # 11, 19: chunks of 8 and a remainder
            x = torch.randn(rows, k, generator=g) * torch.rand(rows, k, generator=g).pow(3) * 4  # uneven blocks
            if rows > 2:
                x[1, :128] = 0  # an all-zero block: scale 0, no division by zero
            got = ops.gemv_int4(x, *args, group)
            assert got.shape == (rows, n) and got.dtype == torch.float32
            if how == "q8_128":
                close(got, q8_128_reference(x, packed, s, z, group).float())
            close(got, F.linear(native.int4_activations_as_taken(x, isa, group), ref_w))
        # bf16 activations: the same products, rounded once to bf16 at the end
        xb = torch.randn(3, k, generator=g).bfloat16()
        want = F.linear(native.int4_activations_as_taken(xb.float(), isa, group), ref_w)
        torch.testing.assert_close(ops.gemv_int4(xb, *args, group).float(), want, rtol=2**-8,
                                   atol=1e-4 * float(want.abs().max()) + 1e-5)


@pytest.mark.parametrize("isa", ["avx512vnni", "avx512bf16"], indirect=True)
def test_error_against_the_unquantised_product_stays_within_the_rounding(isa):
    # Each activation moves by at most half its block's step d = max|x| / 127 (blocks of 128),
    # so |error| <= sum_k |w_k| * d(k) / 2 against the dequantised weights, plus fp32 sums.
    g = torch.Generator().manual_seed(2)
    for n, k in ((48, 256), (64, 2048)):
        w = torch.randn(n, k, generator=g)
        packed, s, z, args = int4_args(w, 128)
        ref_w = dequantize_int4(packed, s, z, 128)
        x = torch.randn(5, k, generator=g) * torch.rand(5, k, generator=g).pow(4) * 10
        step = x.reshape(5, -1, 128).abs().amax(-1).repeat_interleave(128, -1) / 127
        bound = (step / 2) @ ref_w.abs().T
        want = F.linear(x, ref_w)
        err = (ops.gemv_int4(x, *args, 128) - want).abs()
        assert bool((err <= bound * 1.001 + 1e-4 * float(want.abs().max())).all()), float((err - bound).max())
        assert float(err.max()) > 0  # the activations really are quantised


def test_shapes_the_kernel_cannot_take_are_errors_or_other_paths(native_lib):
    w = torch.randn(8, 192)
    _, _, _, args = int4_args(w, 64)
    with pytest.raises(RuntimeError, match="group size"):
        ops.gemv_int4(torch.randn(1, 192), *args, 128)  # 128 does not divide 192
    packed, s, z, args = int4_args(w, 96)  # a multiple of 32, not of 128: the avx2 or bf16 path
    x = torch.randn(2, 192)
    close(ops.gemv_int4(x, *args, 96),
          F.linear(native.int4_activations_as_taken(x, native.current_isa(), 96), dequantize_int4(packed, s, z, 96)))


@pytest.mark.parametrize("isa", native.ISAS, indirect=True)
def test_a_row_gets_the_same_bits_alone_or_in_a_batch(isa):
    g = torch.Generator().manual_seed(1)
    _, _, _, args = int4_args(torch.randn(37, 384, generator=g), 128)
    x = torch.randn(13, 384, generator=g)
    batch = ops.gemv_int4(x, *args, 128)
    for rows in (1, 3, 5, 8):
        assert torch.equal(ops.gemv_int4(x[:rows], *args, 128), batch[:rows])
    assert torch.equal(ops.gemv_int4(x[9:10], *args, 128), batch[9:10])


def test_greedy_tokens_against_the_float_path(native_lib):
    # The tiny model in groups of 128 through int4_vnni (or this CPU's best path) against the
    # portable float kernels (activations as they are), batch 1 and a batch of 3: the first
    # token of each sequence stays, and whole sequences mostly (measured: all of them here).
    args = ModelArgs(dim=128, n_layers=2, n_heads=4, vocab_size=128, multiple_of=128, max_seq_len=64)
    model = quantize_model(sharpen(build_model(args)), "int4", group_size=128)
    use_native_kernels(model)
    prompts = [[1, 5, 9, 23], [1, 77, 3], [1, 2, 3, 4, 5, 6, 7]]

    def run(batch):
        return torch.cat([t for t, _ in generate_ids(model, batch, 16, temperature=0.0)], 1)

    try:
        native.configure(limit="scalar")
        want = run(prompts)
        native.configure()
        got, alone = run(prompts), run(prompts[:1])
    finally:
        native.configure()
    assert torch.equal(got[:, 0], want[:, 0])
    assert int((got == want).all(1).sum()) >= 2
    assert torch.equal(got[0], alone[0])


def test_the_operator_traces_with_its_fake(native_lib):
    w = torch.randn(24, 256)
    _, _, _, args = int4_args(w, 128)
    x = torch.randn(3, 256)
    torch.library.opcheck(ops.gemv_int4, (x, *args, 128), test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda x: ops.gemv_int4(x, *args, 128) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), ops.gemv_int4(x, *args, 128) * 2)


@pytest.mark.slow  # inductor compiles C++: tens of seconds on 2 busy cores
def test_under_inductor_gives_eager_results(native_lib):
    w = torch.randn(40, 256)
    _, _, _, args = int4_args(w, 128)

    def step(x):
        return (ops.gemv_int4(torch.nn.functional.silu(x) * 2, *args, 128)).relu()

    torch.compiler.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    for rows in (1, 8):
        x = torch.randn(rows, 256)
        assert torch.equal(compiled(x), step(x))


def test_quantize_int4_round_trips_through_the_kernel_layout():
    # int4_vnni reads native_int4_layout's bytes 64 at a time (four blocks of 32 columns)
    q = torch.randint(0, 16, (2, 256), dtype=torch.uint8)
    packed, _, _ = quantize_int4(torch.randn(2, 256), 128)
    assert native_int4_layout(packed).shape == (2, 128)
    lay = native_int4_layout(pack_int4(q))
    lo, hi = lay.reshape(2, 2, 64) & 15, lay.reshape(2, 2, 64) >> 4  # per 128 columns: 64 bytes
    cols = torch.arange(128).reshape(4, 32)
    assert torch.equal(lo, q.reshape(2, 2, 128)[:, :, cols[:, :16].reshape(-1)])
    assert torch.equal(hi, q.reshape(2, 2, 128)[:, :, cols[:, 16:].reshape(-1)])
