"""Issue 17: the fused quantised kernels read their buffers with aligned vector loads, and on
AVX-512 an int8 weight memory-mapped from safetensors at 40 mod 64 was a SIGSEGV in
`llamaworks generate`. Every buffer handed to a kernel is made 64-byte aligned at load.

llamaworks writes its safetensors with 64-byte aligned data (weights.save_safetensors), so
its own files map the weights in place; files from other writers (the reference safetensors
writer pads only to 8 bytes) map them misaligned, and those are copied once at load. The
alignment checks hold on any machine; what would crash runs in a subprocess, so a regression
fails the test instead of killing pytest.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llamaworks.inference.kernels import KERNEL_ALIGN, aligned, is_aligned, kernel_rows
from llamaworks.inference.load import load_model
from llamaworks.inference.quant import MODES, QuantizedLinear, quantize_model, save_quantized
from llamaworks.model import ModelArgs, build_model
from llamaworks.modeldir import WEIGHTS, save_model
from llamaworks.weights import read_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def misaligned(n: int, dtype: torch.dtype, offset: int) -> torch.Tensor:
    """n values of `dtype` starting `offset` bytes past a KERNEL_ALIGN boundary."""
    raw = torch.zeros(n * dtype.itemsize + 2 * KERNEL_ALIGN, dtype=torch.uint8)
    start = -raw.data_ptr() % KERNEL_ALIGN + offset
    return raw[start: start + n * dtype.itemsize].view(dtype)


def test_aligned_copies_only_what_it_must():
    ok = torch.randn(100)
    assert is_aligned(ok) and aligned(ok) is ok  # fresh CPU tensors are aligned: no copy
    bad = misaligned(64 * 32, torch.int8, 40).view(64, 32)
    bad.copy_(torch.randint(-127, 128, (64, 32), dtype=torch.int8))
    assert not is_aligned(bad)
    fixed = aligned(bad)
    assert is_aligned(fixed) and torch.equal(fixed, bad)
    assert not is_aligned(torch.randn(8, 8).t())  # not contiguous: the kernels read rows
    # activations: a bf16 view at an offset (a fp32 one is copied by the cast anyway)
    x = misaligned(3 * 64, torch.bfloat16, 16).view(3, 64)
    flat = kernel_rows(x, 64)
    assert is_aligned(flat) and torch.equal(flat, x)
    assert kernel_rows(torch.randn(2, 64).to(torch.bfloat16), 64).shape == (2, 64)


def kernel_fed(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            out.update({f"{name}: {k}": t for k, t in m.kernel_tensors().items()})
    return out


def rewrite_with_reference_writer(path):
    """Re-save a safetensors file with the reference writer, which aligns data to 8 bytes only."""
    from safetensors.torch import load_file, save_file

    save_file({k: v.clone() for k, v in load_file(path).items()}, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("writer", ["llamaworks", "reference"])
def test_kernel_buffers_are_aligned_after_loading(tiny_model, tiny_tokenizer, tmp_path, mode, dtype, writer):
    # bf16: the scales are stored in bf16, so the kernel's bf16 scales are the mapped ones
    src = quantize_model(copy.deepcopy(tiny_model).to(dtype), mode, group_size=32)
    save_quantized(src, tiny_tokenizer, tmp_path / "q", mode, group_size=32)
    weights = tmp_path / "q" / WEIGHTS
    if writer == "reference":
        rewrite_with_reference_writer(weights)
    stored = read_safetensors(weights)
    offsets = {t.data_ptr() % KERNEL_ALIGN for k, t in stored.items() if k.endswith(".weight")}
    if writer == "llamaworks":  # ours: every weight starts on a boundary, so it is used in place
        assert offsets == {0}, offsets
    elif mode == "int8":  # the kernel reads the stored weight itself, which this file maps misaligned
        assert offsets != {0}, "the reference writer aligned the int8 weights: this case no longer covers " \
            "misaligned ones"
    model, _ = load_model(tmp_path / "q", fuse=False)  # the 7 projections of each block apart
    n_linear = 7 * model.args.n_layers + 1
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == n_linear
    fed = kernel_fed(model)
    assert len({k.split(":")[0] for k in fed}) == n_linear  # on CPU every layer has its kernel
    bad = {k: t.data_ptr() % KERNEL_ALIGN for k, t in fed.items() if not is_aligned(t)}
    assert not bad, f"kernel buffers off a {KERNEL_ALIGN}-byte boundary (name: offset): {bad}"
    # running it neither rebuilds nor moves them; a cast rebuilds them aligned
    with torch.no_grad():
        model(torch.tensor([[1, 5, 9, 13, 7]]))
    assert {k: t.data_ptr() for k, t in kernel_fed(model).items()} == {k: t.data_ptr() for k, t in fed.items()}
    model.to(torch.bfloat16)
    assert all(is_aligned(t) for t in kernel_fed(model).values())


def test_int8_weight_loaded_misaligned_is_copied_once():
    q = quantize_model(torch.nn.Sequential(torch.nn.Linear(256, 64, bias=False)), "int8")[0]
    state = {"weight": misaligned(64 * 256, torch.int8, 40).view(64, 256), "scales": q.scales.clone()}
    state["weight"].copy_(q.weight)
    q.load_state_dict(state, assign=True)  # load_model's way: the mapped tensor itself
    assert is_aligned(q.weight) and torch.equal(q.weight, state["weight"])
    kept = q.weight
    q.load_state_dict({"weight": q.weight, "scales": q.scales}, assign=True)
    assert q.weight is kept  # already aligned: not copied again


def run_python(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def died(proc: subprocess.CompletedProcess) -> str:
    how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    return f"{how}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-4000:]}"


def test_fused_kernels_survive_misaligned_inputs():
    # The shapes and offsets that fault on AVX-512 when handed to the kernels as they are.
    proc = run_python("""
        import torch
        from llamaworks.inference.quant import Int4Linear, Int8Linear, quantize_model

        def misaligned(t, offset):
            raw = torch.zeros(t.numel() * t.element_size() + 128, dtype=torch.uint8)
            start = -raw.data_ptr() % 64 + offset
            out = raw[start: start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            return out.copy_(t)

        def rel(a, b):
            return float((a - b).norm() / b.norm())

        torch.manual_seed(0)
        for in_f, offset in [(128, 40), (72, 0)]:  # 72: rows of 72 bytes, misaligned from the second on
            q = quantize_model(torch.nn.Sequential(torch.nn.Linear(in_f, 64, bias=False)), "int8")[0]
            q.load_state_dict({"weight": misaligned(q.weight, offset), "scales": q.scales}, assign=True)
            ref = lambda x: torch.nn.functional.linear(x.float(), q.weight.float()) * q.scales
            for rows in (1, 4, 8):
                x = torch.randn(rows, in_f)
                assert rel(q(x), ref(x)) < 1e-2, (in_f, rows)
                xb = misaligned(x.to(torch.bfloat16), 16)  # bf16 activations are not copied by the cast
                assert rel(q(xb).float(), ref(xb)) < 1e-2, (in_f, rows, "bf16")
        q4 = quantize_model(torch.nn.Sequential(torch.nn.Linear(128, 64, bias=False)), "int4", 32)[0]
        x = torch.randn(4, 128)
        want = q4(x)
        assert rel(q4(misaligned(x.to(torch.bfloat16), 16)).float(), want) < 1e-2
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), died(proc)


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory, tiny_tokenizer):
    # The "tiny" preset's four layers: quantised to int8 and written by the reference safetensors
    # writer, its weights map at 40 mod 64, the offset of issue 17.
    args = ModelArgs.from_name("tiny", vocab_size=tiny_tokenizer.vocab_size)
    return save_model(build_model(args, seed=0).eval(), tiny_tokenizer, tmp_path_factory.mktemp("four") / "fp")


def test_quantize_then_generate_int8_exits_0(four_layer_dir, tmp_path):
    out = tmp_path / "int8"
    proc = run_python(f"""
        import sys
        from llamaworks.cli import main
        assert main(["quantize", "--checkpoint", {str(four_layer_dir)!r}, "--output", {str(out)!r},
                     "--mode", "int8"]) == 0
        # as another writer (the reference one) lays it out: int8 weights at 40 mod 64
        from safetensors.torch import load_file, save_file
        weights = {str(out / WEIGHTS)!r}
        save_file({{k: v.clone() for k, v in load_file(weights).items()}}, weights, metadata={{"format": "pt"}})
        # prompts of several tokens and a batch of four: the kernel's multi-row path
        prompts = ["the king and the queen", "good night, sweet lady", "a", "my lord, the day"]
        sys.exit(main(["generate", "--checkpoint", {str(out)!r}, "--max-new-tokens", "6", "--temperature", "0",
                       "--device", "cpu", "--prompt", *prompts]))
    """)
    assert proc.returncode == 0, died(proc)
    assert "decode:" in proc.stderr
    offsets = {t.data_ptr() % KERNEL_ALIGN for t in read_safetensors(out / WEIGHTS).values() if t.dtype == torch.int8}
    assert any(o % 16 for o in offsets), f"int8 weights now map at {offsets} mod 64, where AVX-512 did not fault: " \
        "this test no longer reproduces issue 17; change the model's layer count"

