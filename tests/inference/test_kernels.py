"""The native decode kernels (inference/native.py, csrc/): each equals F.linear or the
dequantised product for 1..8 rows (and more, in chunks), odd shapes, non-contiguous and bf16
inputs, on every instruction set this CPU can run; dispatch falls back when a feature is
missing; the layers route through them and fall back without them; greedy tokens are fp32
eager's; the operators trace into torch.compile graphs.

The library is built once (cached) by the `native` fixture; on a machine without a compiler
these tests skip, and everything else runs the PyTorch paths."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from peaked import sharpen

from llamaworks.inference import native
from llamaworks.inference.fuse import FusedAttention, fuse_projections, unfuse
from llamaworks.inference.generate import generate_ids
from llamaworks.inference.kernels import (
    GemvLinear,
    NativeAttention,
    NativeLinear,
    use_gemv,
    use_native_attention,
    use_native_kernels,
)
from llamaworks.inference.quant import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    native_int4_layout,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_model,
)
from llamaworks.model import Attention, ModelArgs, build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ops = torch.ops.llamaworks
SHAPES = [(33, 77), (64, 512), (5, 96), (16, 1000)]  # (out, in): odd, tails of every width, int4-able


def int4_args(w: torch.Tensor, group: int):
    packed, s, z = quantize_int4(w, group)
    return packed, s, z, (native_int4_layout(packed), s.contiguous(), (z - 8 * s).contiguous())


def close(got, want):
    # Different summation orders in fp32: a few ulps of the largest terms.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()) + 1e-5)


def test_choose_isa_takes_the_best_the_features_allow():
    assert native.choose_isa({"avx512f", "avx2", "fma", "avx512bw"}) == "avx512"
    vnni = {"avx512f", "avx2", "fma", "avx512bw", "avx512vnni"}
    assert native.choose_isa(vnni) == "avx512vnni"  # Ice Lake, Cascade Lake
    assert native.choose_isa(vnni | {"avx512bf16"}) == "avx512bf16"  # Zen 4, Sapphire Rapids
    assert native.choose_isa(vnni | {"avx512bf16"}, limit="avx512vnni") == "avx512vnni"
    assert native.choose_isa(vnni - {"avx512vnni"} | {"avx512bf16"}) == "avx512"  # bf16 levels need VNNI too
    assert native.choose_isa({"avx512f", "avx2", "fma"}, limit="avx2") == "avx2"
    assert native.choose_isa({"avx2", "fma"}) == "avx2"
    assert native.choose_isa({"avx512f", "avx2"}) == "scalar"  # no FMA: neither vector set
    assert native.choose_isa({"avx2"}) == "scalar"
    assert native.choose_isa(set()) == "scalar"
    with pytest.raises(ValueError, match="LLAMAWORKS_ISA"):
        native.choose_isa({"avx2", "fma"}, limit="sse")


def test_native_int4_layout():
    q = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    lay = native_int4_layout(pack_int4(q))
    assert lay.shape == (3, 32) and lay.dtype == torch.uint8
    for b in range(2):  # per 32 columns: byte j = column j (low nibble), column 16 + j (high)
        block = lay[:, 16 * b: 16 * b + 16]
        assert torch.equal(block & 15, q[:, 32 * b: 32 * b + 16])
        assert torch.equal(block >> 4, q[:, 32 * b + 16: 32 * b + 32])


@pytest.mark.parametrize("isa", native.ISAS, indirect=True)
@pytest.mark.parametrize("kind", ["f32", "bf16", "int8", "int4"])
def test_kernels_equal_the_reference(isa, kind):
    g = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=g)
        if kind == "f32":
            ref_w, call = w, lambda x, w=w: ops.gemv_f32(x, w)
        elif kind == "bf16":
            wb = w.bfloat16()
            ref_w, call = wb.float(), lambda x, wb=wb: ops.gemv_bf16(x, wb)
        elif kind == "int8":
            q, s = quantize_int8(w)
            ref_w, call = q.float() * s[:, None], lambda x, q=q, s=s: ops.gemv_int8(x, q, s)
        else:
            if k % 32:
                continue
            group = 32 if n % 2 else 64  # the bf16 kernel's two paths (32 columns a step, or 64)
            packed, s, z, args = int4_args(w, group)
            ref_w = dequantize_int4(packed, s, z, group)
            call = lambda x, args=args, group=group: ops.gemv_int4(x, *args, group)  # noqa: E731
        # int4 kernels take the activations rounded to bf16 or quantised (native.int4_activations),
        # the int8 ones from avx2 up quantised per block of 32 (integer dot products)
        as_taken = lambda x: x  # noqa: E731
        if kind == "int4":
            as_taken = lambda x, group=group: native.int4_activations_as_taken(x, isa, group)  # noqa: E731
        elif kind == "int8" and native.int8_quantises_activations(isa, k):
            as_taken = native.quantize_activations_q8
        for rows in (1, 2, 3, 4, 5, 6, 7, 8, 11, 19):  # 11, 19: chunks of 8 and a remainder
            x = torch.randn(rows, k, generator=g)
            got = call(x)
            assert got.shape == (rows, n) and got.dtype == torch.float32
            close(got, F.linear(as_taken(x), ref_w))
        # a non-contiguous input (every other column of a wider tensor), and bf16 activations
        wide = torch.randn(3, 2 * k, generator=g)
        close(call(wide[:, ::2]), F.linear(as_taken(wide[:, ::2]), ref_w))
        for rows in (1, 5, 8, 11):  # bf16 activations (bf16 dot products for bf16 weights on avx512bf16)
            xb = torch.randn(rows, k, generator=g).bfloat16()
            got = call(xb)
            assert got.dtype == torch.bfloat16
            want = F.linear(as_taken(xb.float()), ref_w)
            # fp32 sums as above, then one rounding to bf16 (2^-9 relative)
            torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-4 * float(want.abs().max()) + 1e-5)


def test_kernels_check_their_operands(native_lib):
    w = torch.randn(8, 64)
    with pytest.raises(RuntimeError, match="x must be"):
        ops.gemv_f32(torch.randn(2, 63), w)
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.gemv_bf16(torch.randn(2, 64), w)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.gemv_f32(torch.randn(2, 8), w.t())
    q, s = quantize_int8(w)
    with pytest.raises(RuntimeError, match="scales must be"):
        ops.gemv_int8(torch.randn(1, 64), q, s[:4])
    _, _, _, args = int4_args(w, 32)
    with pytest.raises(RuntimeError, match="group size"):
        ops.gemv_int4(torch.randn(1, 64), *args, 48)
    assert ops.gemv_f32(torch.randn(0, 64), w).shape == (0, 8)


def test_threads_split_the_rows_without_changing_results(native_lib):
    # 1 MiB of weights: several tasks of at::parallel_for; each output is one thread's sum.
    w = torch.randn(1000, 256)
    x = torch.randn(3, 256)
    one = ops.gemv_f32(x, w)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(ops.gemv_f32(x, w), one)
        many = torch.randn(19, 256)  # chunks of 8 rows over slices of the weight, in each thread
        close(ops.gemv_f32(many, w), F.linear(many, w))
    finally:
        torch.set_num_threads(n)


def test_dispatch_falls_back_when_a_feature_is_missing(native_lib):
    best = native.choose_isa(native.cpu_features())
    try:
        assert native.configure(features=set()) == "scalar" and native.current_isa() == "scalar"
        have = native.cpu_features()
        if best == "avx512bf16":  # without AVX512_BF16: the float kernels for int4
            assert native.configure(features=have - {"avx512bf16"}) == "avx512vnni" == native.current_isa()
        if best in ("avx512vnni", "avx512bf16"):  # without VNNI: int8 through AVX2's maddubs
            assert native.configure(features=have - {"avx512vnni"}) == "avx512" == native.current_isa()
        if best != "scalar":
            # a CPU reported without AVX-512 (or without FMA) gets the AVX2 (or portable) kernels
            assert native.configure(features=have - {"avx512f"}) == "avx2" == native.current_isa()
            assert native.configure(features=have - {"fma"}) == "scalar"
        if "avx512f" not in have:
            # claiming a feature the CPU lacks is refused by the library, not run into a SIGILL
            with pytest.raises(AssertionError, match="cannot run"):
                native.configure(features={"avx512f", "avx2", "fma"})
    finally:
        native.configure()
    assert native.current_isa() == best


def test_layers_use_the_kernels_and_fall_back_without_them(native_lib):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 48, bias=False)
    quantised = {"int8": quantize_model(torch.nn.Sequential(copy.deepcopy(lin)), "int8")[0],
                 "int4": quantize_model(torch.nn.Sequential(copy.deepcopy(lin)), "int4", group_size=32)[0]}
    i8, i4 = quantised["int8"], quantised["int4"]
    assert isinstance(i8, Int8Linear) and isinstance(i4, Int4Linear)
    assert set(i4.kernel_tensors()) == {"native weight", "native scales", "native offsets"}
    deq = {"int8": i8.weight.float() * i8.scales[:, None],
           "int4": dequantize_int4(i4.weight, i4.scales, i4.zeros, 32)}
    plain = copy.deepcopy(lin)
    assert use_native_kernels(torch.nn.Sequential(lin)) == 1 and type(lin) is NativeLinear
    for shape in ((1, 1, 96), (96,), (8, 1, 96), (2, 3, 96), (40, 96)):  # 40 rows: prefill's path
        x = torch.randn(shape)
        with torch.no_grad():
            want = plain(x)
            close(lin(x), want)
            for mode, layer in quantised.items():
                isa, rows = native.current_isa(), x.numel() // 96
                taken = x
                if mode == "int4" and rows <= 32:
                    taken = native.int4_activations_as_taken(x, isa, 32)
                elif mode == "int8" and rows <= native.NATIVE_MAX_ROWS and native.int8_quantises_activations(isa, 96):
                    taken = native.quantize_activations_q8(x)
                elif mode == "int8" and rows > 32 and layer._bf16_matmul:  # prefill in bf16 (quant.bf16_matmul)
                    torch.testing.assert_close(layer(x), F.linear(x, deq[mode]), rtol=2e-2, atol=2e-2)
                    continue
                close(layer(x), F.linear(taken, deq[mode]))
    # forced fallback: the same module, PyTorch's paths (the torch kernels take bf16 activations)
    x = torch.randn(2, 1, 96)
    with torch.no_grad():
        native.disable("test")
        try:
            close(lin(x), plain(x))
            # quantised without the library: the torch kernel's layout, not the native one
            i4_off = quantize_model(torch.nn.Sequential(copy.deepcopy(plain)), "int4", group_size=32)[0]
            for mode, layer in (("int8", i8), ("int4", i4), ("int4", i4_off)):
                torch.testing.assert_close(layer(x), F.linear(x, deq[mode]), rtol=2e-2, atol=2e-2)
            assert set(i4_off.kernel_tensors()) == {"packed weight", "scales and zeros"}
            assert use_native_kernels(torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))) == 0
        finally:
            native.reset()
    assert native.available()


def test_use_native_kernels_swaps_float_linears_only(native_lib):
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=96, multiple_of=16, max_seq_len=32,
                     tie_word_embeddings=True)
    model = build_model(args)
    assert use_native_kernels(model) == 12  # wq wk wv wo w1 w2 w3 output, the attention, 3 RMSNorm
    assert model.output.weight is model.tok_embeddings.weight  # tied: the same parameter
    bf = build_model(args).to(torch.bfloat16)
    assert use_gemv(bf) == 8 and use_native_kernels(bf) == 12  # GemvLinear is taken over
    assert all(type(m) is NativeLinear for m in bf.modules() if isinstance(m, torch.nn.Linear))
    skip = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8, bias=False).half())
    assert use_native_kernels(skip) == 0  # a bias, fp16
    assert not any(isinstance(m, (NativeLinear, GemvLinear)) for m in skip)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_equal_eager(native_lib, dtype):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=64)
    fp32 = sharpen(build_model(args))
    eager = copy.deepcopy(fp32).to(dtype)
    fast = copy.deepcopy(eager)
    assert use_native_kernels(fast) == 22  # per block 7 Linear, an attention, 2 RMSNorm; the output and last norm
    prompts = [[1, 5, 9, 23], [1, 77, 3], [1], [1, 2, 3, 4, 5, 6, 7], [1, 9]]  # batch 5: 5-row products

    def run(model):
        return torch.cat([t for t, _ in generate_ids(model, prompts, 24, temperature=0.0)], 1)

    want, got = run(eager), run(fast)
    if dtype == torch.float32:
        assert torch.equal(got, want)
    else:
        # bf16 outputs rounded after different fp32 sums (and attention in fp32, where bf16 SDPA
        # rounds its intermediates): as close to the fp32 model's tokens as bf16 eager is, over
        # the first 8 (a late divergence is rounding, an early one a bug).
        ref = run(fp32)
        for i in range(len(prompts)):
            if torch.equal(want[i, :8], ref[i, :8]):
                assert torch.equal(got[i, :8], ref[i, :8]), i


def test_operators_trace_into_compiled_graphs(native_lib):
    w = torch.randn(24, 64)
    q, s = quantize_int8(w)
    _, _, _, args4 = int4_args(w, 32)
    x = torch.randn(2, 64)
    for op, rest in ((ops.gemv_f32, (w,)), (ops.gemv_bf16, (w.bfloat16(),)), (ops.gemv_int8, (q, s)),
                     (ops.gemv_int4, (*args4, 32))):
        torch.library.opcheck(op, (x, *rest), test_utils=("test_schema", "test_faketensor"))
    lin = torch.nn.Linear(64, 24, bias=False)
    use_native_kernels(torch.nn.Sequential(lin))
    layers = [lin, quantize_model(torch.nn.Sequential(copy.deepcopy(lin)), "int8")[0],
              quantize_model(torch.nn.Sequential(copy.deepcopy(lin)), "int4", group_size=32)[0]]
    for layer in layers:
        with torch.no_grad():
            compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # a graph break is an error
            torch.testing.assert_close(compiled(x), layer(x))


def test_unbuilt_or_turned_off_is_one_log_line_and_the_pytorch_path(native_lib, tmp_path):
    code = textwrap.dedent("""
        import logging, sys, torch
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        from llamaworks.inference import native
        from llamaworks.inference.kernels import use_native_kernels
        from llamaworks.inference.quant import quantize_model
        lin = torch.nn.Linear(64, 32, bias=False)
        m = quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False)), "int4", group_size=32)
        assert use_native_kernels(torch.nn.Sequential(lin)) == 0 and not native.available()
        with torch.no_grad():
            print(tuple(lin(torch.randn(1, 64)).shape), tuple(m(torch.randn(1, 64)).shape))
    """)
    for env, said in (({"LLAMAWORKS_NATIVE": "0"}, "LLAMAWORKS_NATIVE=0"),
                      ({"LLAMAWORKS_NATIVE_DIR": str(tmp_path)}, "not built")):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, **env})
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "(1, 32) (1, 32)"
        lines = [ln for ln in r.stderr.splitlines() if "native CPU kernels" in ln]
        assert len(lines) == 1 and said in lines[0], r.stderr


def test_build_command(native_lib, capsys):
    assert native.main(["build"]) == 0  # built already: a no-op that reports the library and its choice
    out = capsys.readouterr().out
    assert str(native.library_path()) in out and f"instruction set: {native.current_isa()}" in out
    assert native.main(["bogus"]) == 2 and "usage" in capsys.readouterr().err


@pytest.mark.parametrize("isa", native.ISAS, indirect=True)
def test_a_row_gets_the_same_bits_alone_or_in_a_batch(isa):
    # Batched decoding gives each sequence the tokens it would get alone (generate.py): every
    # kernel sums a row in the same order whatever the number of rows and its register blocking.
    g = torch.Generator().manual_seed(1)
    w = torch.randn(37, 320, generator=g)
    q, s = quantize_int8(w)
    _, _, _, args4 = int4_args(w, 64)
    calls = [lambda x: ops.gemv_f32(x, w), lambda x: ops.gemv_bf16(x, w.bfloat16()),
             lambda x: ops.gemv_bf16(x.bfloat16(), w.bfloat16()), lambda x: ops.gemv_int8(x, q, s),
             lambda x: ops.gemv_int4(x, *args4, 64)]
    x = torch.randn(13, 320, generator=g)
    for call in calls:
        batch = call(x)
        for rows in (1, 3, 5, 8):
            assert torch.equal(call(x[:rows]), batch[:rows])
        assert torch.equal(call(x[7:8]), batch[7:8])


@pytest.mark.slow  # inductor compiles C++ for the decode step: tens of seconds on 2 cores
@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_compiled_decoding_with_the_kernels_equals_eager(native_lib, mode):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=128, multiple_of=32, max_seq_len=64)
    model = sharpen(build_model(args))
    if mode:
        quantize_model(model, mode, group_size=32)
    use_native_kernels(model)
    torch.compiler.reset()

    def run(**kw):
        return torch.cat([t for t, _ in generate_ids(model, [[1, 2, 3]], 12, temperature=0.0, **kw)], 1)

    assert torch.equal(run(compile=True), run())


@pytest.mark.parametrize("isa", ["avx2", "avx512", "avx512vnni", "avx512bf16"], indirect=True)
def test_int8_with_quantised_activations_stays_within_the_activation_rounding(isa):
    # Against the unquantised product: each activation moves by at most half its block's step
    # d = max|x| / 127 when rounded, so |error| <= sum_k |w_k| * d(k) / 2, plus fp32 sums.
    g = torch.Generator().manual_seed(2)
    for n, k in ((48, 256), (7, 96), (64, 2048)):
        w = torch.randn(n, k, generator=g)
        q, s = quantize_int8(w)
        ref_w = q.float() * s[:, None]
        x = torch.randn(5, k, generator=g) * torch.rand(5, k, generator=g).pow(4) * 10  # uneven blocks
        x[2, :32] = 0  # an all-zero block: step 0, no division by zero
        step = x.reshape(5, -1, 32).abs().amax(-1).repeat_interleave(32, -1) / 127  # (rows, k)
        bound = (step / 2) @ ref_w.abs().T
        want = F.linear(x, ref_w)
        err = (ops.gemv_int8(x, q, s) - want).abs()
        assert bool((err <= bound * 1.001 + 1e-4 * float(want.abs().max())).all()), float((err - bound).max())
        assert float(err.max()) > 0  # the activations really are quantised here
    odd = torch.randn(3, 40, generator=g)  # in_features % 32 != 0: the float path, x as it is
    q, s = quantize_int8(torch.randn(9, 40, generator=g))
    close(ops.gemv_int8(odd, q, s), F.linear(odd, q.float() * s[:, None]))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_greedy_tokens_with_integer_kernels_equal_the_float_path(native_lib, mode):
    # The tiny model's greedy tokens through the best kernels (int8: activations quantised per
    # block; int4: rounded to bf16 on avx512bf16, quantised per block on avx2 to avx512vnni)
    # against the portable float kernels' (the activations as they are), batch 1 and a batch of 5.
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=64)
    model = quantize_model(sharpen(build_model(args)), mode, group_size=32)
    use_native_kernels(model)
    for m in model.modules():  # the decode kernels are compared: the prefill (35 rows) in fp32 for both
        if isinstance(m, Int8Linear):
            m._bf16_matmul = False
    prompts = [[1, 5, 9, 23], [1, 77, 3], [1], [1, 2, 3, 4, 5, 6, 7], [1, 9]]

    def run(batch):
        return torch.cat([t for t, _ in generate_ids(model, batch, 24, temperature=0.0)], 1)

    try:
        native.configure(limit="scalar")
        want = [run(prompts), run(prompts[:1])]
        native.configure()
        got = [run(prompts), run(prompts[:1])]
    finally:
        native.configure()
    # Quantised activations (int8: per-element error up to max|block| / 254) move this random
    # model's logits by up to ~8% of their spread (measured), which flips near ties (a top-2
    # gap of 0.008 in one step here): the first token of every sequence stays, and most
    # whole sequences (quantised activations 3 of 5 here, on avx2 too; int4's bf16 ones 5 of 5); a
    # divergence everywhere would be a bug.
    assert torch.equal(got[0][:, 0], want[0][:, 0]) and torch.equal(got[1][:, 0], want[1][:, 0])
    same = (got[0] == want[0]).all(1)
    rounded = mode == "int4" and native.int4_activations(native.current_isa(), 32) == "bf16"
    assert int(same.sum()) >= (5 if rounded else 3), (native.current_isa(), same)
    assert torch.equal(got[0][0], got[1][0])  # a sequence's tokens alone or in the batch


@pytest.mark.slow  # inductor compiles C++: ~20-40 s on 2 busy cores
def test_operators_under_inductor_give_eager_results(native_lib):
    w = torch.randn(40, 128)
    q, s = quantize_int8(w)
    _, _, _, args4 = int4_args(w, 64)
    wb = w.bfloat16()

    def step(x):  # the ops between other inductor kernels, as in a decode step
        h = torch.nn.functional.silu(x) * 2
        return (ops.gemv_f32(h, w) + ops.gemv_bf16(h, wb) + ops.gemv_int8(h, q, s)
                + ops.gemv_int4(h, *args4, 64)).relu()

    torch.compiler.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    for rows in (1, 8):
        x = torch.randn(rows, 128)
        assert torch.equal(compiled(x), step(x))


@pytest.mark.parametrize("isa", native.ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_sdpa(isa, dtype):
    g = torch.Generator().manual_seed(0)
    # (bsz, heads, kv heads, query rows, keys, head_dim): GQA, several query rows, head_dim 16..128
    cases = ((1, 8, 8, 1, 256, 64), (3, 8, 2, 2, 100, 32), (2, 4, 4, 3, 16, 128), (2, 2, 1, 1, 5, 16))
    for b, h, hkv, s, n, d in cases:
        q = torch.randn(b, s, h, d, generator=g).to(dtype).transpose(1, 2)  # the model's strides
        k, v = (torch.randn(b, hkv, n, d, generator=g).to(dtype) for _ in range(2))
        pos = torch.randint(0, n, (b, s), generator=g)
        mask = torch.arange(n).view(1, 1, 1, -1) <= pos.unsqueeze(1).unsqueeze(-1)  # (b, 1, s, n): broadcast heads
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=h != hkv)
        got = ops.decode_attention(q, k, v, mask)
        assert got.dtype == dtype and got.shape == (b, h, s, d)
        if dtype == torch.float32:
            close(got, want)
        else:  # fp32 inside, the output rounded to bf16 once
            torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
        # a cache slice with gaps between rows (a larger cache's first keys) reads the same
        big_k, big_v = (torch.cat([t, t], dim=2) for t in (k, v))
        close(ops.decode_attention(q, big_k[:, :, :n], big_v[:, :, :n], mask).float(), got.float())


def test_decode_attention_checks_its_operands_and_traces(native_lib):
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    mask = torch.ones(1, 1, 1, 8, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="bool"):
        ops.decode_attention(q, k, v, mask.float())
    with pytest.raises(RuntimeError, match="float32 or all bfloat16"):
        ops.decode_attention(q, k.bfloat16(), v, mask)
    with pytest.raises(RuntimeError, match="head_dim"):
        ops.decode_attention(q[..., :8], k[..., :8], v[..., :8], mask)
    torch.library.opcheck(ops.decode_attention, (q, k, v, mask), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_splits_heads_over_threads_with_the_same_bits(native_lib, dtype):
    # The base preset's decode shape (12 heads of 64, a cache of 256): its rows now go to both
    # threads, each with scratch of its own; a row is one thread's work, so the bits cannot move.
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 12, 64, generator=g).to(dtype).transpose(1, 2)
    k, v = (torch.randn(1, 12, 256, 64, generator=g).to(dtype) for _ in range(2))
    mask = (torch.arange(256) <= 150).view(1, 1, 1, -1)
    one = ops.decode_attention(q, k, v, mask)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(ops.decode_attention(q, k, v, mask), one)
    finally:
        torch.set_num_threads(n)


def test_native_attention_survives_fusion_and_gives_the_same_logits(native_lib):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=16, max_seq_len=32)
    ref = build_model(args).eval()
    model = copy.deepcopy(ref)
    assert use_native_attention(model) == 2 and use_native_attention(model) == 0  # once
    atts = [m for m in model.modules() if isinstance(m, Attention)]
    assert all(isinstance(m, NativeAttention) for m in atts)
    assert fuse_projections(model) == 4  # fused after use_native_attention too, and still native
    assert all(isinstance(m, NativeAttention) and isinstance(m, FusedAttention) for m in atts)
    tokens = torch.tensor([[1, 5, 9, 23, 4]])
    with torch.no_grad():
        for m in (ref, model):
            m.setup_caches(1, 16)
        want = [ref(tokens[:, :3], torch.arange(3))] + [ref(tokens[:, i:i + 1], torch.tensor([i])) for i in (3, 4)]
        got = [model(tokens[:, :3], torch.arange(3))] + [model(tokens[:, i:i + 1], torch.tensor([i])) for i in (3, 4)]
    for a, b in zip(got, want):
        close(a, b)
    assert unfuse(model) == 4
    assert all(isinstance(m, NativeAttention) and not isinstance(m, FusedAttention)
               for m in model.modules() if isinstance(m, Attention))


@pytest.mark.parametrize("block_bytes", [None, 4 * 96 * 7])  # one block; blocks of 7 rows (the last short)
def test_bf16_prompt_products_widen_the_weight_where_bf16_is_not_in_hardware(monkeypatch, native_lib, block_bytes):
    # Without hardware bf16 (AVX2-only) a bf16 model's prompt products go through fp32 GEMMs on the
    # widened weight (kernels.bf16_prompt_linear): the exact fp32 product of the bf16 values, the output
    # rounded to bf16 once; NativeLinear and GemvLinear take it for more rows than the native kernels.
    from llamaworks.inference import kernels

    if block_bytes is not None:
        monkeypatch.setattr(kernels, "UPCAST_BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(33, 96, generator=g).bfloat16()
    x = torch.randn(2, 20, 96, generator=g).bfloat16()
    want = (x.double() @ w.double().T).to(torch.bfloat16)  # one rounding of the exact product
    got = kernels.bf16_prompt_linear(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 20, 33)
    torch.testing.assert_close(got.float(), want.float(), rtol=0.0079, atol=1e-3)  # half a bf16 ulp either way
    monkeypatch.setattr(kernels, "bf16_matmul", lambda: False)
    calls = []
    real = kernels.bf16_prompt_linear
    monkeypatch.setattr(kernels, "bf16_prompt_linear", lambda a, b: calls.append(a.shape) or real(a, b))
    for cls in (NativeLinear, GemvLinear):
        layer = cls(96, 33, bias=False).to(torch.bfloat16)
        layer.weight.data.copy_(w)
        with torch.no_grad():
            assert torch.equal(layer(x), got)  # many rows: widened
            layer(x[:, :1])  # one row a sequence: the decode kernels
    assert calls == [x.shape, x.shape]
    monkeypatch.setattr(kernels, "bf16_matmul", lambda: True)
    with torch.no_grad():
        layer(x)
    assert len(calls) == 2  # hardware bf16: oneDNN's own bf16 matmul


@pytest.mark.parametrize("group", [32, 128])
def test_dequant_int4_widens_the_decode_layout_as_the_kernels_read_it(monkeypatch, native_lib, group):
    # Prompts over the kernels' rows widen the repacked weight in one native pass (ops.dequant_int4),
    # q * scale + offset: the portable dequantisation up to the rounding of that formula.
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(5))
    packed, s, z, native_args = int4_args(w, group)
    got = ops.dequant_int4(*native_args, group)
    want = dequantize_int4(packed, s, z, group, torch.float32)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6 * float(want.abs().max()))
    with pytest.raises(RuntimeError, match="group size"):
        ops.dequant_int4(*native_args, 48)
    # 40 outputs: not a whole number of tiles, so no level takes the tiled layout (which multiplies
    # prompts itself) and the widening path runs everywhere.
    layer = quantize_model(torch.nn.Sequential(torch.nn.Linear(256, 40, bias=False)), "int4", group_size=group)[0]
    assert not layer._tiled and layer._native is not None
    use_native_kernels(layer)
    x = torch.randn(3, 40, 256)  # 120 rows: a prompt
    wq = dequantize_int4(layer.weight, layer.scales, layer.zeros, group, torch.float32)
    from llamaworks.inference import quant

    monkeypatch.setattr(quant, "dequantize_int4", None)  # the PyTorch widening is not called
    with torch.no_grad():
        close(layer(x), F.linear(x, wq))


def test_bf16_models_compute_in_fp32_where_bf16_is_not_in_hardware(monkeypatch, native_lib):
    # kernels.use_fp32_activations: the projections keep their bf16 weights, the embedding table and the
    # norms are widened, so activations and the KV cache are fp32: the model computes what an fp32 model
    # with the bf16-rounded projection weights computes; a no-op where bf16 is in hardware or on models
    # with other layers (quantised).
    from llamaworks.inference import kernels

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=64)
    fp32 = sharpen(build_model(args))
    reference = copy.deepcopy(fp32)
    for p in reference.parameters():  # the weights as the bf16 model holds them, computed in fp32
        p.data = p.data.bfloat16().float()
    model = copy.deepcopy(fp32).to(torch.bfloat16)
    model.init_rope(torch.device("cpu"))
    fuse_projections(model)
    use_native_kernels(model)
    monkeypatch.setattr(kernels, "bf16_matmul", lambda: True)
    assert kernels.use_fp32_activations(model) == 0  # AVX512_BF16 / AMX: bf16 throughout
    monkeypatch.setattr(kernels, "bf16_matmul", lambda: False)
    assert kernels.use_fp32_activations(copy.deepcopy(quantize_model(copy.deepcopy(fp32), "int8"))) == 0
    assert kernels.use_fp32_activations(model) == 1 + 2 * args.n_layers + 1  # embedding, 2 norms a layer, norm
    assert model.tok_embeddings.weight.dtype == torch.float32 and model.norm.weight.dtype == torch.float32
    assert all(m.weight.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, torch.nn.Linear))
    prompts = [[1, 5, 9, 23], [1, 77, 3]]
    with torch.no_grad():
        tokens = torch.tensor([prompts[0]])
        close(model(tokens), reference(tokens))  # prompt products: the widened weights (bf16_prompt_linear)
    got = torch.cat([t for t, _ in generate_ids(model, prompts, 12, temperature=0.0)], 1)
    assert model.layers[0].attention.kv_cache.k.dtype == torch.float32
    want = torch.cat([t for t, _ in generate_ids(reference, prompts, 12, temperature=0.0)], 1)
    assert torch.equal(got, want)


def test_bf16_hardware_follows_onednns_own_cap(monkeypatch):
    """A run with oneDNN capped below bf16 (ONEDNN_MAX_CPU_ISA=AVX2, to measure the AVX2-only path
    on a newer CPU) takes the AVX2-only choices: oneDNN then emulates bf16 whatever the CPU has."""
    from llamaworks.inference import kernels

    allows = kernels.onednn_isa_allows_bf16
    assert allows("") and allows("ALL") and allows("avx512_core_bf16") and allows("AVX512_CORE_AMX")
    assert not allows("AVX2") and not allows("avx512_core_vnni") and not allows("AVX512_CORE")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(kernels, "_ONEDNN_ALLOWS_BF16", False)
    assert not kernels.bf16_matmul()
    monkeypatch.setattr(kernels, "_ONEDNN_ALLOWS_BF16", True)
    assert kernels.bf16_matmul()


def test_prompt_gemm_choice_follows_the_vendor_and_the_setting():
    from llamaworks.inference.kernels import choose_prompt_gemm

    assert choose_prompt_gemm(None, "AuthenticAMD", True) == "onednn"  # MKL's generic path there
    assert choose_prompt_gemm(None, "GenuineIntel", True) == "torch"  # MKL's own tuned path
    assert choose_prompt_gemm(None, "", True) == "torch"  # unknown (no /proc/cpuinfo): as before
    assert choose_prompt_gemm(None, "AuthenticAMD", False) == "torch"  # a torch without oneDNN
    assert choose_prompt_gemm("onednn", "GenuineIntel", True) == "onednn"
    assert choose_prompt_gemm("torch", "AuthenticAMD", True) == "torch"
    with pytest.raises(ValueError, match="LLAMAWORKS_PROMPT_GEMM='mkl'.*onednn, torch"):
        choose_prompt_gemm("mkl", "AuthenticAMD", True)
    with pytest.raises(ValueError, match="no oneDNN"):
        choose_prompt_gemm("onednn", "AuthenticAMD", False)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_prompt_products_through_onednn_equal_f_linear(monkeypatch, native_lib):
    # Many-row fp32 products in passes over a KV cache (kernels.cache_pass: NativeLinear's prompts,
    # Int8Linear's and Int4Linear's widened weights) take the library set_prompt_gemm picks: the same
    # product up to fp32 summation order, for 2-D, 3-D and non-contiguous activations; plain forwards,
    # decode rows (the native kernels) and gradients (oneDNN's linear has no derivative) do not.
    from llamaworks.inference import kernels

    g = torch.Generator().manual_seed(5)
    w = torch.randn(300, 96, generator=g)
    x = torch.randn(2, 40, 96, generator=g)
    layer = NativeLinear(96, 300, bias=False)
    layer.weight.data.copy_(w)
    models = {mode: quantize_model(torch.nn.Sequential(copy.deepcopy(layer)), mode, 32) for mode in ("int8", "int4")}
    # Three NativeLinear prompts and int4's two (its widened weight); int8's two only without bf16
    # hardware (AVX2-only CPUs: Int8Linear's prompts run as bf16 products where it has it).
    expected = 5 if models["int8"][0]._bf16_matmul else 7
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a[0].shape) or real(*a))
    try:
        want = {}
        with torch.no_grad():  # outside a pass over a KV cache: F.linear, whatever the choice
            kernels.set_prompt_gemm("onednn")
            assert torch.equal(layer(x), F.linear(x, w)) and calls == []
        for name in ("torch", "onednn"):
            assert kernels.set_prompt_gemm(name) == name
            with torch.no_grad(), kernels.cache_pass():
                for a in (x, x[0], x.transpose(0, 1)):
                    close(layer(a), F.linear(a, w))
                for mode, q in models.items():
                    want.setdefault(mode, q(x))
                    close(q(x), want[mode])
                layer(x[:, :1])  # decode rows: the native kernels
            assert len(calls) == (0 if name == "torch" else expected), calls
        with kernels.cache_pass():
            out = layer(x.clone().requires_grad_())  # autograd: F.linear, whatever the choice
        assert out.requires_grad and len(calls) == expected
    finally:
        kernels.set_prompt_gemm(None)


def test_a_compiled_pass_over_the_cache_does_not_guard_on_the_eager_passes_flag():
    # NativeTransformer.forward enters cache_pass whenever positions are given, compiled decode steps
    # included: tracing it must not guard on the thread's flag, which the engine's first eager
    # prefill sets (a guard on it recompiled the serving engine's decode step: a second graph).
    import torch._dynamo
    from torch._dynamo.utils import counters

    from llamaworks.inference import kernels

    def step(x):
        with kernels.cache_pass():
            return x * 2 + 1

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, backend="eager")
    x = torch.ones(3)
    assert torch.equal(compiled(x), x * 3)
    with kernels.cache_pass():  # an eager prefill between two steps
        pass
    assert torch.equal(compiled(x), x * 3)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
