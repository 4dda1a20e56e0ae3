"""A paged key/value cache: fixed-size blocks in one pool per layer, a block table per sequence.

Behind the seam the attention already calls (`kv_cache.update(input_pos, k, v, rows)` and
`kv_cache.seq_len`, see kvcache.py), so model.py is the same for the static and the paged cache.
A sequence's logical block j (positions j*B .. j*B+B-1) lives in physical block table[j];
several sequences may name the same physical block (a shared prompt prefix, serve/kvpool.py).

The caller (serve/engine.py) sets `BlockTable.blocks`, (bsz, width) physical block ids, before
each forward pass; every layer's cache reads that one table. A read gathers the sequence's
`width` blocks into contiguous keys (bsz, heads, width*B, head_dim) for one SDPA call; the
model's mask hides every key past the query's position, so table entries past a sequence's
end may name any block. Block 0 is the null block: padding and rows with no sequence point
there, and what they write there is never read unmasked.
"""

from __future__ import annotations

import torch
from torch import nn

NULL_BLOCK = 0


class BlockTable:
    """The block table of the sequences in the next forward pass, shared by every layer."""

    def __init__(self, block_size: int, device=None):
        assert block_size >= 1, block_size
        self.block_size = block_size
        self.blocks = torch.zeros(1, 1, dtype=torch.long, device=device)  # (bsz, width) physical ids


class PagedKVCache(nn.Module):
    """One layer's pool of blocks, (n_kv_heads, num_blocks, block_size, head_dim) for keys and
    values: heads first, so that a gather of a sequence's blocks is (heads, bsz, width*B, head_dim)
    with each (positions, head_dim) matrix contiguous, as SDPA reads it best (kvcache.py)."""

    def __init__(self, table: BlockTable, num_blocks: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        assert num_blocks >= 2, num_blocks  # the null block and at least one for a sequence
        self.table = table
        shape = (n_kv_heads, num_blocks, table.block_size, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def seq_len(self) -> int:
        return self.table.blocks.shape[1] * self.table.block_size

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None):
        # input_pos: (bsz, seq); k, v: (bsz, seq, n_kv_heads, head_dim); rows: (bsz,) rows of the
        # block table (default: all of them, one per sequence).
        blocks = self.table.blocks if rows is None else self.table.blocks[rows]  # (bsz, width)
        bsz, width = blocks.shape
        assert bsz == k.shape[0], (blocks.shape, k.shape)
        size = self.table.block_size
        phys = blocks.gather(1, input_pos // size)  # (bsz, seq) physical block of each token
        off = input_pos % size
        # The two index tensors select (bsz, seq) around the leading heads slice: the indexed view
        # is (heads, bsz, seq, head_dim).
        self.k[:, phys, off] = k.permute(2, 0, 1, 3).to(self.k.dtype)
        self.v[:, phys, off] = v.permute(2, 0, 1, 3).to(self.v.dtype)
        heads, head_dim = self.k.shape[0], self.k.shape[3]
        # (heads, bsz, width, B, head_dim) -> (heads, bsz, width*B, head_dim) -> (bsz, heads, width*B, head_dim)
        keys = self.k[:, blocks].view(heads, bsz, width * size, head_dim).transpose(0, 1)
        values = self.v[:, blocks].view(heads, bsz, width * size, head_dim).transpose(0, 1)
        return keys, values


def block_bytes(model, block_size: int, dtype: torch.dtype | None = None) -> int:
    """Bytes one block takes over all layers, keys and values."""
    dtype = dtype or model.tok_embeddings.weight.dtype
    elem = torch.empty((), dtype=dtype).element_size()
    return sum(2 * block_size * layer.attention.n_kv_heads * layer.attention.head_dim * elem for layer in model.layers)


def setup_paged_caches(model, num_blocks: int, block_size: int, max_seq_len: int, dtype=None) -> BlockTable:
    """Give every attention layer of `model` a paged cache of `num_blocks` blocks (block 0 the
    null block) reading one shared table, which it returns; the RoPE table is grown to
    max_seq_len here, never in a step."""
    if max_seq_len > model.args.max_seq_len:
        raise ValueError(f"cache length {max_seq_len} exceeds the model's max_seq_len={model.args.max_seq_len}")
    dtype = dtype or model.tok_embeddings.weight.dtype  # never quantised, unlike output
    device = model.output.weight.device
    if max_seq_len > model.freqs_cis.shape[0]:
        model.init_rope(model.freqs_cis.device, max_seq_len)
    table = BlockTable(block_size, device)
    for layer in model.layers:
        att = layer.attention
        att.kv_cache = PagedKVCache(table, num_blocks, att.n_kv_heads, att.head_dim, dtype, device)
    return table
