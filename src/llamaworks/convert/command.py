"""`llamaworks convert`: between native, Meta, Hugging Face and GGUF checkpoints (GGUF in and out).

Every source is loaded memory-mapped into a Meta-keyed model (the hub format); every
destination is written into a temporary folder renamed into place at the end, so an
interrupted or failed conversion never leaves a half-written destination.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import torch

from llamaworks.args import Arg
from llamaworks.convert.formats import load_checkpoint, save_checkpoint
from llamaworks.device import parse_dtype

SRC_FORMATS = ("meta", "hf", "native", "gguf")
DST_FORMATS = ("native", "hf", "gguf", "meta")
# Above this many bytes of weights, conversions show a progress bar (on a terminal).
PROGRESS_BYTES = 256 << 20
VERIFY_TEXTS = ("The capital of France is", "def fibonacci(n):\n    ", " 1 + 1 = 2, 12 * 12 =", "Il était une fois")


def verification_prompts(model, tokenizer, n: int = 4) -> list[list[int]]:
    if tokenizer is not None:
        return [tokenizer.encode(t) for t in VERIFY_TEXTS[:n]]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, model.args.vocab_size, (12,), generator=g).tolist() for _ in range(n)]


@torch.no_grad()
def verify_conversion(src_model, fmt: str, dst: Path, tokenizer, n_new: int = 8) -> str:
    """Compare the source with the written result; raises ValueError on a mismatch."""
    prompts = verification_prompts(src_model, tokenizer)
    if fmt == "gguf":
        ours = [greedy(src_model, p, n_new) for p in prompts]
        theirs = llama_cpp_greedy(dst, prompts, n_new)
        if ours != theirs:
            raise ValueError(f"verification failed: llama.cpp's greedy tokens from {dst} differ from the source's "
                             f"({theirs[0]} vs {ours[0]})")
        return f"llama.cpp reproduces the greedy tokens of {len(prompts)} prompts"
    out, _ = load_checkpoint(fmt, dst)
    # Lower precision in the result is a rounding of every weight: compare loosely then.
    same = {t.dtype for t in src_model.state_dict().values()} == {t.dtype for t in out.state_dict().values()}
    worst, scale = 0.0, 1.0
    for p in prompts:
        x = torch.tensor([p])
        a, b = src_model.float()(x), out.float()(x)
        worst, scale = max(worst, (a - b).abs().max().item()), max(scale, a.abs().max().item())
    tol = (1e-4 if same else 2e-2) * scale
    if worst > tol:
        raise ValueError(f"verification failed: logits of {dst} differ from the source's by {worst:.3g} "
                         f"(tolerance {tol:.3g})")
    return f"logits agree on {len(prompts)} prompts (max difference {worst:.2g})"


def greedy(model, prompt: list[int], n_new: int) -> list[int]:
    seq = torch.tensor([prompt])
    for _ in range(n_new):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(prompt):].tolist()


def llama_cpp_generate(llm, prompts: list[list[int]], n_new: int) -> list[list[int]]:
    """n_new greedy tokens for each prompt from a loaded llama_cpp.Llama, one prompt at a time."""
    out = []
    for p in prompts:
        llm.reset()
        toks = []
        for t in llm.generate(p, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            toks.append(t)
            if len(toks) == n_new:
                break
        out.append(toks)
    return out


def llama_cpp_greedy(path: Path, prompts: list[list[int]], n_new: int) -> list[list[int]]:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise ValueError("--verify for GGUF runs llama.cpp: pip install llama-cpp-python") from None
    llm = Llama(model_path=str(path), n_ctx=128, n_threads=2, n_batch=128, verbose=False)
    try:
        return llama_cpp_generate(llm, prompts, n_new)
    finally:
        llm.close()


def convert_command(
    src_format: Annotated[Literal["meta", "hf", "native", "gguf"], Arg("source format (gguf: llama.cpp's "
                                                                         "f32/f16/bf16 or quantised, dequantised)",
                                                                         flag="--from")],
    dst_format: Annotated[Literal["native", "hf", "gguf", "meta"], Arg("destination format", flag="--to")],
    src: Annotated[str, Arg("source folder (for gguf: a .gguf file)", positional=True)],
    dst: Annotated[str, Arg("destination folder (for gguf: a .gguf file)", positional=True)],
    shards: Annotated[int | None, Arg("model-parallel shards for --to meta (1 for 7B ... 8 for 65B)")] = None,
    dtype: Annotated[str | None, Arg("convert weights to this dtype (float32, float16, bfloat16)")] = None,
    verify: Annotated[bool, Arg("compare logits (for gguf: llama.cpp's greedy tokens) of source and "
                                "result on a few prompts")] = False,
) -> None:
    """Convert a checkpoint between llamaworks (native), Meta, Hugging Face and GGUF formats."""
    dt = parse_dtype(dtype)
    if Path(dst).exists():
        raise ValueError(f"destination {dst} already exists; choose a new path (conversions never overwrite)")
    model, tok = load_checkpoint(src_format, src)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    out = save_checkpoint(dst_format, model, tok, dst, shards=shards, dtype=dt, progress=nbytes > PROGRESS_BYTES)
    print(f"wrote {out} ({dst_format}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    if verify:
        print("verify: " + verify_conversion(model, dst_format, out, tok))
