"""int4 weights in 16-row tiles (csrc/int4_tiles.cpp, quant.py's int4_tiles): Int4Linear's decode
layout from avx2 up for groups of 128, 256, ... The products equal the integer reference of
test_kernels_q8 (activations quantised per block of 128, exact integer dots) on VNNI, and the
float product of the activations as gemv_int4 takes them at every lower level (forced, as on an
AVX2-only CPU: per block of 32, AVX2 maddubs; the largest integer sums neither saturate nor wrap);
the layout holds each nibble where the kernel reads it; Int4Linear picks it by
the level at load and gives gemv_int4's results; a row gets the same bits alone or in a batch;
the operator traces with its fake; use_hugepages moves the layouts into its arena."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peaked import sharpen

from llamaworks.inference import hugepages, native
from llamaworks.inference.fuse import fuse_projections
from llamaworks.inference.generate import generate_ids
from llamaworks.inference.hugepages import use_hugepages
from llamaworks.inference.kernels import KERNEL_ALIGN, KERNEL_MAX_ROWS, use_native_kernels
from llamaworks.inference.quant import (
    Int4Linear,
    dequantize_int4,
    int4_tiles,
    int4_tiles_apply,
    pack_int4,
    quantize_int4,
    quantize_model,
)
from llamaworks.model import ModelArgs, build_model

from . import test_kernels as base
from .test_kernels_q8 import q8_128_reference

close = base.close  # the `isa` fixture is in conftest.py

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ops = torch.ops.llamaworks


def tiles_args(w: torch.Tensor, group: int):
    packed, s, z = quantize_int4(w, group)
    return packed, s, z, int4_tiles(packed, s, z)


def test_the_layout_puts_each_nibble_where_the_kernel_reads_it():
    q = torch.randint(0, 16, (32, 256), dtype=torch.uint8)
    s, z = torch.rand(32, 2) + 0.1, torch.randn(32, 2)
    w, ts, to = int4_tiles(pack_int4(q), s, z)
    assert w.shape == (2, 2048) and ts.shape == to.shape == (2, 2, 16)
    v = w.view(2, 32, 16, 4)  # (tile, chunk of 8 columns, row, byte)
    for t, c, r, i in ((0, 0, 0, 0), (1, 31, 15, 3), (0, 17, 9, 2), (1, 5, 3, 1)):
        assert int(v[t, c, r, i]) & 15 == int(q[16 * t + r, 8 * c + i])
        assert int(v[t, c, r, i]) >> 4 == int(q[16 * t + r, 8 * c + 4 + i])
    assert float(ts[1, 1, 7]) == float(s[23, 1])
    assert float(to[0, 1, 3]) == float(z[3, 1] - 8 * s[3, 1])


def test_the_policy():
    assert int4_tiles_apply("avx512vnni", 48, 128) and int4_tiles_apply("avx512bf16", 32000, 256)
    assert int4_tiles_apply("avx512", 48, 128) and int4_tiles_apply("avx2", 48, 128)  # no VNNI: AVX2 maddubs
    assert not int4_tiles_apply("scalar", 48, 128)  # the portable loop: gemv_int4's layout
    assert not int4_tiles_apply("avx512bf16", 40, 128)  # not a whole number of tiles
    assert not int4_tiles_apply("avx512bf16", 48, 64)  # groups of 32, 64 keep the bf16 dots


@pytest.mark.parametrize("isa", native.ISAS, indirect=True)
def test_products_equal_the_reference_at_every_level(isa):
    g = torch.Generator().manual_seed(0)
    for n, k, group in ((16, 128, 128), (48, 512, 128), (80, 1024, 256), (32, 384, 128)):
        w = torch.randn(n, k, generator=g)
        packed, s, z, args = tiles_args(w, group)
        ref_w = dequantize_int4(packed, s, z, group)
        how = native.int4_activations(isa, group)
        for rows in (1, 2, 3, 4, 5, 6, 7, 8, 11, 19):  # 11, 19: chunks of 8 and a remainder
            x = torch.randn(rows, k, generator=g) * torch.rand(rows, k, generator=g).pow(3) * 4
            if rows > 2:
                x[1, :128] = 0  # an all-zero block: scale 0
            got = ops.gemv_int4_tiles(x, *args, group)
            assert got.shape == (rows, n) and got.dtype == torch.float32
            if how == "q8_128":
                close(got, q8_128_reference(x, packed, s, z, group).float())
            close(got, F.linear(native.int4_activations_as_taken(x, isa, group), ref_w))
        xb = torch.randn(3, k, generator=g).bfloat16()
        want = F.linear(native.int4_activations_as_taken(xb.float(), isa, group), ref_w)
        got = ops.gemv_int4_tiles(xb, *args, group)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-4 * float(want.abs().max()) + 1e-5)


@pytest.mark.parametrize("isa", ["avx2", "avx512vnni"], indirect=True)
def test_the_largest_integer_sums_neither_saturate_nor_wrap(isa):
    # Every nibble 15 and every activation +-127 after quantisation (a block of equal values): AVX2
    # sums a block's 32 products in int16 pairs (8 * 2 * 15 * 127 = 30480 < 2^15) before int32.
    q = torch.full((32, 256), 15, dtype=torch.uint8)
    s, z = torch.full((32, 2), 0.01), torch.zeros(32, 2)
    packed = pack_int4(q)
    args = int4_tiles(packed, s, z)
    x = torch.ones(2, 256) * 3.0
    x[1] = -3.0
    got = ops.gemv_int4_tiles(x, *args, 128)
    want = F.linear(x, dequantize_int4(packed, s, z, 128))  # quantisation exact: every value is max|x|
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("isa", ["avx512vnni", "avx512bf16", "avx2"], indirect=True)
def test_a_row_gets_the_same_bits_alone_or_in_a_batch(isa):
    g = torch.Generator().manual_seed(1)
    *_, args = tiles_args(torch.randn(112, 384, generator=g), 128)  # 7 tiles: groups of 4, 2 and a rest
    x = torch.randn(13, 384, generator=g)
    batch = ops.gemv_int4_tiles(x, *args, 128)
    for rows in (1, 2, 3, 5, 8):
        assert torch.equal(ops.gemv_int4_tiles(x[:rows], *args, 128), batch[:rows])
    assert torch.equal(ops.gemv_int4_tiles(x[9:10], *args, 128), batch[9:10])


def test_shapes_it_cannot_take_are_errors(native_lib):
    *_, args = tiles_args(torch.randn(16, 256), 128)
    with pytest.raises(RuntimeError, match="group size"):
        ops.gemv_int4_tiles(torch.randn(1, 256), *args, 64)
    with pytest.raises(RuntimeError, match="x must be"):
        ops.gemv_int4_tiles(torch.randn(1, 128), *args, 128)
    with pytest.raises(RuntimeError, match="scales and offsets"):
        ops.gemv_int4_tiles(torch.randn(1, 256), args[0], args[1][:, :1].contiguous(), args[2], 128)


def test_int4linear_takes_the_tiles_where_they_apply_with_gemv_int4s_results(native_lib):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 48, bias=False)
    best = native.current_isa()
    layer = quantize_model(torch.nn.Sequential(lin), "int4", group_size=128)[0]
    assert isinstance(layer, Int4Linear) and layer._tiled == int4_tiles_apply(best, 48, 128)
    assert set(layer.kernel_tensors()) == {"native weight", "native scales", "native offsets"}
    x = torch.randn(3, 256)
    with torch.no_grad():
        got = layer(x)
        s, z = layer.scales, layer.zeros
        old = ops.gemv_int4(x, *base.int4_args(lin.weight.detach(), 128)[3], 128)
        close(got, old)  # the same activations and integers, another summation order
        close(got, F.linear(native.int4_activations_as_taken(x, best, 128),
                            dequantize_int4(layer.weight, s, z, 128)))
    try:  # built at the scalar level: gemv_int4's layout
        native.configure(limit="scalar")
        layer.refresh()
        assert not layer._tiled
    finally:
        native.configure()
    layer.refresh()
    assert layer._tiled == int4_tiles_apply(best, 48, 128)


@pytest.mark.parametrize("isa", ["avx2", "avx512", "avx512vnni", "avx512bf16"], indirect=True)
def test_int4linear_takes_prompts_of_any_length_through_the_tiles(isa):
    # Prefill too (more than KERNEL_MAX_ROWS rows): the integer product in slices, not a dequantised
    # weight and an fp32 matmul; each row gets the bits it gets alone, as a decode step computes it,
    # with the activations as the level takes them (per 128 on VNNI, per 32 below: an AVX2-only CPU).
    torch.manual_seed(0)
    layer = quantize_model(torch.nn.Sequential(torch.nn.Linear(256, 48, bias=False)), "int4", group_size=128)[0]
    assert layer._tiled
    x = torch.randn(2, 40, 256)  # 80 rows > KERNEL_MAX_ROWS
    assert x.numel() // 256 > KERNEL_MAX_ROWS
    with torch.no_grad():
        got = layer(x)
        assert got.shape == (2, 40, 48) and torch.equal(got, ops.gemv_int4_tiles(x, *layer._native, 128))
        assert torch.equal(got[1, 7], layer(x[1, 7:8])[0])
        flat = x.reshape(-1, 256)
        if native.int4_activations(isa, 128) == "q8_128":
            close(got.reshape(-1, 48), q8_128_reference(flat, layer.weight, layer.scales, layer.zeros, 128).float())
        close(got.reshape(-1, 48), F.linear(native.int4_activations_as_taken(flat, isa, 128),
                                            dequantize_int4(layer.weight, layer.scales, layer.zeros, 128)))


def test_the_operator_traces_with_its_fake(native_lib):
    *_, args = tiles_args(torch.randn(32, 256), 128)
    x = torch.randn(3, 256)
    torch.library.opcheck(ops.gemv_int4_tiles, (x, *args, 128), test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda x: ops.gemv_int4_tiles(x, *args, 128) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), ops.gemv_int4_tiles(x, *args, 128) * 2)


@pytest.mark.skipif(not hugepages.hugepages_supported(), reason="no transparent huge pages (Linux only)")
def test_use_hugepages_moves_the_kernel_layouts_and_tokens_stay(native_lib):
    # The layouts decode reads are plain attributes (Int4Linear.hugepage_attrs), not buffers.
    args = ModelArgs(dim=128, n_layers=2, n_heads=4, vocab_size=256, multiple_of=128, max_seq_len=64)
    m = quantize_model(sharpen(build_model(args, seed=0)), "int4", group_size=128)
    fuse_projections(m)
    use_native_kernels(m)
    layers = [mod for mod in m.modules() if isinstance(mod, Int4Linear)]
    assert layers and all(layer._native is not None for layer in layers)

    def greedy():
        return torch.cat([t for t, _ in generate_ids(m, [[1, 17, 250, 3], [1, 5]], 8, temperature=0.0)], 1)

    want = greedy()
    before = [tuple(t.clone() for t in layer._native) for layer in layers]
    assert use_hugepages(m, min_bytes=0) > 0
    for layer, old in zip(layers, before):
        for t, o in zip(layer._native, old):
            assert t.untyped_storage().data_ptr() in hugepages._arenas and torch.equal(t, o)
            assert t.data_ptr() % KERNEL_ALIGN == 0
    assert torch.equal(greedy(), want)
