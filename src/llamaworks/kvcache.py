"""The static key/value cache that decoding writes at explicit positions (Transformer.setup_caches
makes one per layer); a decode-time structure, not part of the model's weights or math."""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Static cache of keys and values, written at explicit per-sequence positions.

    Preallocated once, fixed shape: decoding never reallocates or changes shapes,
    which keeps the decode step compile- and CUDA-graph-friendly. Stored as attention
    reads it, (batch, heads, positions, head_dim): SDPA over a transposed view runs 1.7x
    slower at 2048 positions (it copies or strides through the whole cache every step).
    """

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def seq_len(self) -> int:
        # The seam the model's mask reads: the length of the keys update() returns (a paged
        # cache, inference/paged.py, returns as many as its block table spans).
        return self.k.shape[2]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None):
        # input_pos: (bsz, seq); k, v: (bsz, seq, n_kv_heads, head_dim); rows: (bsz,) cache rows
        # (default 0..bsz-1). Explicit rows let a server prefill or decode any subset of its
        # slots without touching the others (continuous batching). The two index tensors
        # broadcast to (bsz, seq) around the heads slice, so the indexed view is
        # (bsz, seq, n_kv_heads, head_dim), k's own layout.
        bsz = k.shape[0]
        idx = torch.arange(bsz, device=k.device) if rows is None else rows
        self.k[idx.unsqueeze(1), :, input_pos] = k.to(self.k.dtype)
        self.v[idx.unsqueeze(1), :, input_pos] = v.to(self.v.dtype)
        if rows is None:
            return self.k[:bsz], self.v[:bsz]
        return self.k[rows], self.v[rows]
