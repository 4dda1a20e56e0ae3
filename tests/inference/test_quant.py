from __future__ import annotations

import copy
import json
import os
from typing import get_args, get_type_hints

import pytest
import torch
import torch.nn.functional as F

from llamaworks.cli import main as cli_main
from llamaworks.inference import native
from llamaworks.inference.command import quantize_command
from llamaworks.inference.generate import generate_ids
from llamaworks.inference.kernels import GemvLinear, NativeLinear, use_gemv
from llamaworks.inference.load import load_model
from llamaworks.inference.perplexity import perplexity
from llamaworks.inference.quant import (
    MODE_REGISTRY,
    MODES,
    Int4Linear,
    Int8Linear,
    QuantizedLinear,
    QuantMode,
    check_mode,
    dequantize_int4,
    fold_factor,
    is_quantized,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_model,
    read_quantization,
    save_quantized,
    unpack_int4,
)
from llamaworks.model import ModelArgs, build_model
from llamaworks.modeldir import QUANT_FILE

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_int8_and_int4_round_trip_errors():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (64,)
    assert rel(q.float() * s[:, None], w) < 0.01  # 255 levels over +-3 sigma
    for g, bound in [(32, 0.09), (64, 0.1), (128, 0.11)]:  # 16 levels over a group's range
        packed, sc, z = quantize_int4(w, g)
        assert packed.dtype == torch.uint8 and packed.shape == (64, 128) and sc.shape == (64, 256 // g)
        assert rel(dequantize_int4(packed, sc, z, g), w) < bound
    q4 = torch.randint(0, 16, (8, 32), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q4)), q4)


@pytest.mark.parametrize("cls", ["int8", "int4"])
def test_kernel_and_dequantised_paths_agree(cls):
    lin = torch.nn.Linear(128, 64, bias=False)
    m = torch.nn.Sequential(lin)
    quantize_model(m, cls, 32)
    q = m[0]
    assert isinstance(q, Int8Linear if cls == "int8" else Int4Linear)
    x = torch.randn(3, 5, 128)
    ref = (torch.nn.functional.linear(x, q.weight.float()) * q.scales if cls == "int8" else
           torch.nn.functional.linear(x, dequantize_int4(q.weight, q.scales, q.zeros, 32)))
    fast = q(x)  # 15 rows: the CPU kernel, bf16 activations
    assert fast.dtype == x.dtype and fast.shape == (3, 5, 64)
    assert rel(fast, ref) < 0.01
    big = q(torch.cat([x] * 8, 1))  # 120 rows: dequantise and matmul (int8 with AMX or AVX512_BF16: in bf16)
    assert big.dtype == x.dtype
    assert rel(big[:, :5], ref) < (0.01 if cls == "int8" and q._bf16_matmul else 1e-5)


def test_fold_factor():
    assert fold_factor(5632, 2048) == 2 and fold_factor(2048, 2048) == 2  # 1.26B shapes: 4 KiB rows
    assert fold_factor(4096, 1024) == 4 and fold_factor(6144, 1536) == 4
    assert fold_factor(11008, 4096) == 1 and fold_factor(2048, 5632) == 1  # rows already >= 4 KiB
    assert fold_factor(1024, 2048) == 1  # 2 MiB: stays in cache, not folded
    assert fold_factor(32000, 512) == 1  # would need 8 rows
    assert fold_factor(4097 * 2, 1024) == 1  # rows not divisible by the fold


@pytest.mark.parametrize("shape", [(2048, 2048), (4096, 1024)])
def test_folded_int8_kernel_matches_the_plain_one(shape):
    out_f, in_f = shape
    torch.manual_seed(0)
    q = quantize_model(torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False)), "int8")[0]
    assert q.fold == fold_factor(out_f, in_f) > 1
    native.disable("the torch kernels are under test")  # else few rows take the native kernel
    try:
        _check_folded(q, in_f, out_f)
    finally:
        native.reset()


def _check_folded(q, in_f: int, out_f: int):
    ref_fn = lambda x: torch.nn.functional.linear(x, q.weight.float()) * q.scales  # noqa: E731
    for shape_x in ((1, 1, in_f), (in_f,), (2, 1, in_f), (3, in_f)):  # folded up to fold * rows <= 4
        x = torch.randn(shape_x)
        got, ref = q(x), ref_fn(x)
        assert got.shape == ref.shape and got.dtype == x.dtype
        assert rel(got, ref) < 4e-3  # bf16 activations and output, as the unfolded kernel
    # every output channel lands in its own place: a one-hot weight row per channel
    q.weight.zero_()
    q.weight[torch.arange(out_f), torch.arange(out_f) % in_f] = 1
    x = torch.arange(in_f, dtype=torch.float32).unsqueeze(0) / in_f
    want = x[0, torch.arange(out_f) % in_f] * q.scales
    torch.testing.assert_close(q(x)[0], want, rtol=1e-2, atol=0)


@pytest.fixture(scope="module")
def fp_model(tiny_model):
    return tiny_model


@pytest.mark.parametrize("mode,group,bound", [("int8", None, 0.05), ("int4", 32, 0.4), ("int4", 128, 0.45)])
def test_quantised_logits_close_to_fp32(fp_model, mode, group, bound):
    # Random N(0, 0.02) weights are the hard case (no outliers to spend levels on, no
    # structure); the bounds are about 2x what is measured, and a trained model does better.
    x = torch.randint(3, fp_model.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = fp_model(x)
        q = quantize_model(copy.deepcopy(fp_model), mode, group or 128)
        out = q(x)
        q.setup_caches(2, 64)
        cached = q(x[:, :12], torch.arange(12))
    assert q.layers[0].attention.kv_cache.k.dtype == torch.float32  # not the int weights' dtype
    assert rel(out, ref) < bound
    assert rel(cached, ref[:, :12]) < bound
    chunks = list(generate_ids(q, x[:, :5].tolist(), 6, temperature=0.0))
    assert torch.cat([c[0] for c in chunks], 1).shape == (2, 6)


def test_quantised_directory_round_trip(tiny_model_dir, tmp_path):
    model, _ = load_model(tiny_model_dir)
    x = torch.randint(3, model.args.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    for mode, g in [("int8", 128), ("int4", 64)]:
        out = tmp_path / mode
        assert quantize_command(str(tiny_model_dir), str(out), mode, g) == 0
        assert json.loads((out / QUANT_FILE).read_text()) == {"mode": mode, "group_size": g if mode == "int4" else None}
        assert json.loads((out / "params.json").read_text()) == json.loads((tiny_model_dir / "params.json").read_text())
        assert (out / "model.safetensors").stat().st_size < (tiny_model_dir / "model.safetensors").stat().st_size / 2.5
        loaded, tok = load_model(out)
        assert tok is not None and isinstance(loaded.output, Int8Linear if mode == "int8" else Int4Linear)
        want = quantize_model(copy.deepcopy(model), mode, g)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), want(x), atol=0, rtol=0)
        bf, _ = load_model(out, dtype="bfloat16", fuse=False)  # integer weights are never cast
        assert bf.layers[0].attention.wq.weight.dtype in (torch.int8, torch.uint8)
        assert bf.layers[0].attention.wq.scales.dtype == torch.bfloat16
        assert bf.tok_embeddings.weight.dtype == torch.bfloat16


def test_quantize_cli_and_errors(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "q4"
    assert cli_main(["quantize", "--checkpoint", str(tiny_model_dir), "--output", str(out), "--mode", "int4",
                     "--group-size", "32"]) == 0
    assert "int4 (group size 32)" in capsys.readouterr().err
    assert cli_main(["generate", "--checkpoint", str(out), "--prompt", "the", "--max-new-tokens", "4",
                     "--temperature", "0"]) == 0
    # quantising a quantised directory, or over the original
    assert cli_main(["quantize", "--checkpoint", str(out), "--output", str(tmp_path / "x"), "--mode", "int8"]) == 2
    assert "already quantised" in capsys.readouterr().err
    assert cli_main(["quantize", "--checkpoint", str(tiny_model_dir), "--output", str(tiny_model_dir),
                     "--mode", "int8"]) == 2
    with pytest.raises(SystemExit):  # argparse: invalid choice
        cli_main(["quantize", "--checkpoint", str(tiny_model_dir), "--output", str(tmp_path / "y"), "--mode", "int3"])
    # tiny's dim is 128: a group of 256 does not divide it
    assert cli_main(["quantize", "--checkpoint", str(tiny_model_dir), "--output", str(tmp_path / "z"),
                     "--mode", "int4", "--group-size", "256"]) == 2
    assert "does not divide" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
    m = torch.nn.Sequential(torch.nn.Linear(96, 32))
    with pytest.raises(ValueError, match="unknown quantisation mode"):
        quantize_model(m, "int3")
    with pytest.raises(ValueError, match="group size must be one of"):
        quantize_model(m, "int4", 48)
    with pytest.raises(ValueError, match="does not divide"):
        quantize_model(m, "int4", 64)
    (out / QUANT_FILE).write_text('{"mode": "int2"}')
    with pytest.raises(ValueError, match="unknown quantisation mode"):
        load_model(out)


def test_modes_and_cli_choices_come_from_the_registry(tiny_model_dir, tmp_path):
    assert MODES == tuple(MODE_REGISTRY) == ("int8", "int4")
    hint = get_type_hints(quantize_command, include_extras=True)["mode"]  # Annotated[Literal[...], Arg]
    assert get_args(get_args(hint)[0]) == MODES
    (tmp_path / QUANT_FILE).write_text('{"mode": "int8"}')  # group_size may be left out where unused
    assert read_quantization(tmp_path) == {"mode": "int8", "group_size": None}
    (tmp_path / QUANT_FILE).write_text('{"mode": "int4", "group_size": 64, "bits": 4}')
    with pytest.raises(ValueError, match="expected"):
        read_quantization(tmp_path)
    (tmp_path / QUANT_FILE).write_text('{"mode": ["int4"]}')
    with pytest.raises(ValueError, match="expected"):
        read_quantization(tmp_path)
    assert read_quantization(tiny_model_dir) is None


class ClipLinear(QuantizedLinear):
    """A toy mode's layer: float weights clipped to +-clip. No native kernel."""

    def __init__(self, in_features, out_features, dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=dtype, device=device))

    def refresh(self):
        pass

    def kernel_tensors(self):
        return {}

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


class Clip(QuantMode):
    name, help, options = "clip", "weights clipped to +-clip", ("clip",)

    def __init__(self, clip: float = 1.0):
        if not clip > 0:
            raise ValueError(f"clip must be positive, got {clip}")
        self.clip = clip

    def quantize(self, linear):
        new = self.empty(linear.in_features, linear.out_features, linear.weight.dtype, linear.weight.device)
        new.weight.copy_(linear.weight.clamp(-self.clip, self.clip))
        return new

    def empty(self, in_features, out_features, dtype, device):
        return ClipLinear(in_features, out_features, dtype, device)

    def settings(self):
        return {"group_size": None, "clip": self.clip}


def test_a_new_mode_is_one_registry_entry(tiny_model, tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    # Registered, a mode quantises, saves, reads back and loads through the same functions as
    # int8 and int4, its own option included; nothing else knows about it.
    monkeypatch.setitem(MODE_REGISTRY, "clip", Clip)
    check_mode("clip", group_size=128, clip=0.5)  # group_size is not one of its options: ignored
    with pytest.raises(ValueError, match="clip must be positive"):
        check_mode("clip", clip=0)
    m = quantize_model(copy.deepcopy(tiny_model), "clip", clip=0.05)
    assert is_quantized(m) and not is_quantized(tiny_model)
    assert isinstance(m.output, ClipLinear) and float(m.output.weight.abs().max()) == pytest.approx(0.05)
    save_quantized(m, tiny_tokenizer, tmp_path / "c", "clip", clip=0.05)
    want = {"mode": "clip", "group_size": None, "clip": 0.05}
    assert json.loads((tmp_path / "c" / QUANT_FILE).read_text()) == want
    assert read_quantization(tmp_path / "c") == want
    loaded, _ = load_model(tmp_path / "c")
    assert isinstance(loaded.layers[0].attention.wq, ClipLinear)
    x = torch.randint(3, m.args.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), atol=0, rtol=0)
    assert quantize_command(str(tiny_model_dir), str(tmp_path / "d"), "clip") == 0  # its default clip
    assert read_quantization(tmp_path / "d")["clip"] == 1.0


def test_int8_kernel_scales_follow_the_module():
    q = quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False)), "int8")[0]
    x = torch.randn(2, 64)
    first = q(x)
    assert q._kernel_scales.dtype == torch.bfloat16
    # New scales through the state dict (what loading a directory does) must be used at once,
    # also when loaded by assignment into an empty module (load_model's way).
    q.load_state_dict({"weight": q.weight, "scales": q.scales * 2})
    assert rel(q(x), 2 * first) < 1e-2
    q.load_state_dict({"weight": q.weight, "scales": q.scales * 2}, assign=True)
    assert rel(q(x), 4 * first) < 1e-2
    q.to(torch.float16)  # cast: the kernel's copy stays bf16
    assert q._kernel_scales.dtype == torch.bfloat16 and q.scales.dtype == torch.float16


def test_perplexity():
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=64, max_seq_len=32)
    m = build_model(args, seed=0).eval()
    ids = torch.randint(0, 64, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    ppl = perplexity(m, ids, seq_len=32)
    assert 40 < ppl < 90  # near-uniform predictions of 64 symbols
    with pytest.raises(ValueError, match="more than 32 tokens"):
        perplexity(m, ids[:20])


def test_gemv_linear_is_linear_with_one_row_through_mv(monkeypatch, tiny_model_dir):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    ref = copy.deepcopy(lin)
    assert use_gemv(torch.nn.Sequential(lin)) == 1 and type(lin) is GemvLinear
    for shape in ((1, 1, 64), (64,), (3, 1, 64), (2, 5, 64)):  # one row goes through mv, more through F.linear
        x = torch.randn(shape).to(torch.bfloat16)
        got, want = lin(x), ref(x)
        assert got.shape == want.shape
        # mv and the matmul accumulate in a different order; both round to bf16 at the end
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    fp32 = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))
    assert use_gemv(fp32) == 0 and type(fp32[0]) is torch.nn.Linear  # fp32: F.linear is as fast
    # load_model swaps the bf16 layers on CPU (for the native kernels where they are built, else
    # GemvLinear); the state dict and greedy tokens are unchanged. Activations stay bf16 for the comparison
    # (CPUs without hardware bf16 compute them in fp32: kernels.use_fp32_activations, tested in test_kernels)
    from llamaworks.inference import kernels

    monkeypatch.setattr(kernels, "bf16_matmul", lambda: True)
    model, _ = load_model(tiny_model_dir, dtype="bfloat16")
    assert all(type(m) in (GemvLinear, NativeLinear) for m in model.modules() if isinstance(m, torch.nn.Linear))
    plain, _ = load_model(tiny_model_dir, dtype="bfloat16")
    for m in plain.modules():
        if type(m) in (GemvLinear, NativeLinear):
            m.__class__ = torch.nn.Linear
    assert model.state_dict().keys() == plain.state_dict().keys()
    prompt = [[1, 5, 9, 13, 7]]
    with torch.inference_mode():
        a = torch.cat([c[0] for c in generate_ids(model, prompt, 8, temperature=0.0)], dim=1)
        b = torch.cat([c[0] for c in generate_ids(plain, prompt, 8, temperature=0.0)], dim=1)
    assert (a == b).float().mean() >= 0.75  # bf16 rounding may flip a near-tie late in the sequence


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"[1, 2]", b"{\"mode\": 3}"])
def test_a_broken_quantization_json_is_an_error_naming_it(tmp_path, content):
    (tmp_path / "quantization.json").write_bytes(content)
    with pytest.raises(ValueError, match="quantization.json"):
        read_quantization(tmp_path)


def test_a_quantization_json_that_is_a_fifo_is_named_not_read(tmp_path):
    os.mkfifo(tmp_path / "quantization.json")
    with pytest.raises(ValueError, match="FIFO"):
        read_quantization(tmp_path)
