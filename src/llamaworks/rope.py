"""Rotary position embeddings (RoPE, Su et al. 2021; LLaMA section 2.2) as pure functions:
the frequencies (rope_theta, Llama 3.1's and linear scaling), the cos/sin table, the rotation,
and the positions of the examples packed into one row.

model.py builds its table with these; the converters (convert/gguf.py: rope_freqs) and the
tests call them directly.
"""

from __future__ import annotations

import math

import torch

# Positions are float32 in the rotary table (as in Meta's code), exact up to 2^24.
MAX_POSITIONS = 1 << 24
# Llama 3.1's scaling as Meta's reference code fixes it: factor, low_freq_factor,
# high_freq_factor, old_context_len (Llama 3's 8192-token context).
LLAMA31_ROPE_SCALING = (8.0, 1.0, 4.0, 8192)


def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """The rotary frequencies theta^(-2i/d) for i < d/2 (Su et al. 2021), in radians per position."""
    # fp32 throughout, exactly as Meta's and transformers' code, so released weights see the
    # very angles they were trained with (fp64 would differ by ~1e-4 rad at position 2047).
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def linear_scaled_inv_freq(inv_freq: torch.Tensor, factor: float) -> torch.Tensor:
    """Linear RoPE scaling (position interpolation, Chen et al. 2023; HF's rope_type "linear"):
    position p turns as p / factor did, so a context `factor` times longer spans the trained angles."""
    return inv_freq / factor


def llama31_scaled_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float,
                            high_freq_factor: float, old_context_len: int) -> torch.Tensor:
    """Llama 3.1's RoPE scaling (Meta's params "use_scaled_rope", its llama3 code's apply_scaling;
    HF's rope_type "llama3").

    A frequency making at least high_freq_factor turns over the original context
    (old_context_len positions) carries local position and is kept; one making at most
    low_freq_factor turns is divided by `factor`, like linear scaling; between the two, the
    result moves linearly with the number of turns from the divided to the kept frequency.
    """
    turns = old_context_len / (2 * math.pi / inv_freq)  # old_context_len / wavelength
    kept = ((turns - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0.0, 1.0)
    return (1 - kept) * inv_freq / factor + kept * inv_freq


def model_inv_freq(args) -> torch.Tensor:
    """The rotary frequencies of a model (args: a model.ModelArgs): rope_theta, then its scaling if any."""
    inv_freq = rope_inv_freq(args.head_dim, args.rope_theta)
    if args.use_scaled_rope:
        return llama31_scaled_inv_freq(inv_freq, args.rope_scaling_factor, args.rope_low_freq_factor,
                                       args.rope_high_freq_factor, args.rope_old_context_len)
    if args.rope_scaling_factor is not None:
        return linear_scaled_inv_freq(inv_freq, args.rope_scaling_factor)
    return inv_freq


def rope_table(inv_freq: torch.Tensor, end: int) -> torch.Tensor:
    """cos/sin of position * inv_freq for positions < end: shape (end, head_dim/2, 2).

    Stored as real (cos, sin) pairs rather than complex numbers so that torch.compile
    and every backend handle it; the math is Meta's complex rotation.
    """
    angles = torch.outer(torch.arange(end, dtype=torch.float32), inv_freq)  # (end, head_dim/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def precompute_freqs_cis(head_dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """The unscaled RoPE table, cos/sin of position * theta^(-2i/d): shape (end, head_dim/2, 2)."""
    return rope_table(rope_inv_freq(head_dim, theta), end)


def apply_rotary_emb(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by their angle: Meta's interleaved RoPE layout.

    x: (bsz, seq, heads, head_dim); freqs: (seq, head_dim/2, 2) or (bsz, seq, head_dim/2, 2).
    out[2i] = x[2i] cos - x[2i+1] sin and out[2i+1] = x[2i+1] cos + x[2i] sin, written as
    x * (c0 c0 c1 c1 ...) + (x1 x0 x3 x2 ...) * (-s0 s0 -s1 s1 ...): the same products and sums
    as the complex multiplication (bit for bit), in three full-size kernels instead of a
    stack of strided pieces, which matters in training where the backward mirrors each one.
    """
    if freqs.dim() == 3:
        freqs = freqs.unsqueeze(0)
    cos = freqs[..., 0].repeat_interleave(2, dim=-1).unsqueeze(2)  # (bsz|1, seq, 1, head_dim)
    sin = (freqs[..., 1:] * freqs.new_tensor([-1.0, 1.0])).flatten(-2).unsqueeze(2)
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    return (xf * cos + swapped * sin).type_as(x)


def document_positions(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(run, pos) of examples packed into rows: doc_ids (bsz, seq) -> two (bsz, seq) int64 tensors.

    A new document starts wherever doc_ids changes along a row (so ids may repeat in other rows
    or further along), run numbers the documents of a row 0, 1, 2, ..., and pos counts each
    token's place inside its document from 0: a packed example gets the rotary angles it gets
    alone. Shapes only, no host sync.
    """
    bsz, seq = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    index = torch.arange(seq, device=doc_ids.device).expand(bsz, seq)
    first = torch.where(starts, index, 0).cummax(dim=1).values  # (bsz, seq): where each token's document starts
    return starts.long().cumsum(dim=1) - 1, index - first
