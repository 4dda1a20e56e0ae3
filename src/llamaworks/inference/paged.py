"""A paged key/value cache: fixed-size blocks in one pool per layer, a block table per sequence.

Behind the seam the attention already calls (`kv_cache.update(input_pos, k, v, rows)` and
`kv_cache.seq_len`, see kvcache.py), so model.py is the same for the static and the paged cache.
A sequence's logical block j (positions j*B .. j*B+B-1) lives in physical block table[j];
several sequences may name the same physical block (a shared prompt prefix, serve/kvpool.py).

The caller (serve/engine.py) sets `BlockTable.blocks`, (bsz, width) physical block ids, before
each forward pass; every layer's cache reads that one table. Two ways to read:
- decode (a few query positions per sequence, the native kernels built, CPU): update() returns
  a PagedRead, the pool with the table and the query positions, and the attention
  (PagedAttention, mixed in by setup_paged_caches) runs llamaworks::paged_attention, which
  reads each sequence's own blocks up to each query's position through the table: no copy,
  and a short sequence batched with a 2k-token one reads its own keys only;
- otherwise (prefill chunks, other devices, gradients): the sequence's `width` blocks are
  gathered into contiguous keys (bsz, heads, width*B, head_dim) for one SDPA call, the torch
  path. The model's mask hides every key past the query's position, so table entries past a
  sequence's end may name any block.
Both compute key position <= query position over the same keys. Block 0 is the null block:
padding and rows with no sequence point there, and what they write there is never read
unmasked. LLAMAWORKS_PAGED_ATTENTION=0 keeps the gather path everywhere (for A/B runs).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import nn

from llamaworks.inference import native

NULL_BLOCK = 0

# Query positions per sequence up to which a pass reads through the table (decode: 1; a
# speculative verify: draft tokens + 1). Longer passes (prefill chunks) are compute-bound
# matrix products over the keys, where one SDPA call over the gathered keys does better.
PAGED_MAX_QUERIES = 8


class PagedRead(NamedTuple):
    """What PagedKVCache.update returns instead of keys or values when the pass reads through
    the block table: the layer's pool, the pass's table rows and its query positions."""

    pool: torch.Tensor  # (n_kv_heads, num_blocks, block_size, head_dim)
    blocks: torch.Tensor  # (bsz, width) physical block ids
    pos: torch.Tensor  # (bsz, seq): query s of sequence b sees keys 0..pos[b, s]


def gather(pool: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The keys (or values) of each sequence's blocks, contiguous: pool (heads, num_blocks, B,
    head_dim), blocks (bsz, width) -> (bsz, heads, width*B, head_dim)."""
    heads, _, size, head_dim = pool.shape
    bsz, width = blocks.shape
    # (heads, bsz, width, B, head_dim) -> (heads, bsz, width*B, head_dim) -> (bsz, heads, width*B, head_dim)
    return pool[:, blocks].view(heads, bsz, width * size, head_dim).transpose(0, 1)


def paged_attention_reference(q: torch.Tensor, k: PagedRead, v: PagedRead) -> torch.Tensor:
    """The torch path of what llamaworks::paged_attention computes: gather, mask key position <=
    query position, SDPA (GQA). q (bsz, heads, seq, head_dim) -> (bsz, heads, seq, head_dim)."""
    keys, values = gather(k.pool, k.blocks), gather(v.pool, v.blocks)
    key_pos = torch.arange(keys.shape[2], device=q.device)
    mask = key_pos.view(1, 1, 1, -1) <= k.pos.unsqueeze(1).unsqueeze(-1)  # (bsz, 1, seq, width*B)
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                            enable_gqa=keys.shape[1] != q.shape[1])


def paged_kernel_applies(q: torch.Tensor, pool: torch.Tensor) -> bool:
    """Whether llamaworks::paged_attention takes this pass: on CPU, at most PAGED_MAX_QUERIES
    query positions, q and the pool both fp32 or both bf16, a head_dim the kernel has (a
    multiple of 16 up to 256), the library loaded, no gradient to record."""
    return (q.device.type == "cpu" and pool.device.type == "cpu" and q.shape[2] <= PAGED_MAX_QUERIES
            and q.dtype == pool.dtype and q.dtype in (torch.float32, torch.bfloat16)
            and q.shape[-1] % 16 == 0 and q.shape[-1] <= 256 and native.available()
            and not (torch.is_grad_enabled() and q.requires_grad))


class PagedAttention:
    """Mixed into an Attention class (setup_paged_caches): a PagedRead from the cache is read
    through the block table by the native kernel (the torch path where that cannot run);
    anything else goes to the class's own attend."""

    def attend(self, q, k, v, mask):
        if isinstance(k, PagedRead):
            if paged_kernel_applies(q, k.pool):
                return torch.ops.llamaworks.paged_attention(q, k.pool, v.pool, k.blocks, k.pos)
            return paged_attention_reference(q, k, v)
        return super().attend(q, k, v, mask)


_paged_attention_classes: dict[type, type] = {}


def paged_attention_class(cls: type) -> type:
    """`cls` (Attention or a subclass: fused, native) with PagedAttention's attend first; one
    class per base, made once."""
    if issubclass(cls, PagedAttention):
        return cls
    if cls not in _paged_attention_classes:
        _paged_attention_classes[cls] = type(f"Paged{cls.__name__}", (PagedAttention, cls),
                                             {"__module__": __name__, "__qualname__": f"Paged{cls.__name__}"})
    return _paged_attention_classes[cls]


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
        # Whether decode passes read through the table (PagedRead): set by setup_paged_caches,
        # where the attention module reads PagedReads; False keeps the gather path.
        self.reads_table = False

    @property
    def seq_len(self) -> int:
        return self.table.blocks.shape[1] * self.table.block_size

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None):
        # input_pos: (bsz, seq); k, v: (bsz, seq, n_kv_heads, head_dim); rows: (bsz,) rows of the
        # block table (default: all of them, one per sequence).
        blocks = self.table.blocks if rows is None else self.table.blocks[rows]  # (bsz, width)
        assert blocks.shape[0] == k.shape[0], (blocks.shape, k.shape)
        size = self.table.block_size
        phys = blocks.gather(1, input_pos // size)  # (bsz, seq) physical block of each token
        off = input_pos % size
        # The two index tensors select (bsz, seq) around the leading heads slice: the indexed view
        # is (heads, bsz, seq, head_dim).
        self.k[:, phys, off] = k.permute(2, 0, 1, 3).to(self.k.dtype)
        self.v[:, phys, off] = v.permute(2, 0, 1, 3).to(self.v.dtype)
        if (self.reads_table and k.shape[1] <= PAGED_MAX_QUERIES and k.dtype == self.k.dtype
                and k.device.type == "cpu" and not (torch.is_grad_enabled() and k.requires_grad)):
            return PagedRead(self.k, blocks, input_pos), PagedRead(self.v, blocks, input_pos)
        return gather(self.k, blocks), gather(self.v, blocks)


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
    reads_table = reads_through_table(device, dtype, model.layers[0].attention.head_dim) if model.layers else False
    for layer in model.layers:
        att = layer.attention
        att.kv_cache = PagedKVCache(table, num_blocks, att.n_kv_heads, att.head_dim, dtype, device)
        if reads_table:
            att.__class__ = paged_attention_class(type(att))
            att.kv_cache.reads_table = True
    return table


def reads_through_table(device, dtype, head_dim: int) -> bool:
    """Whether decode passes over a paged cache on `device` in `dtype` read through the block
    table (llamaworks::paged_attention): the native kernels built, a CPU, fp32 or bf16, a
    head_dim the kernel has, and LLAMAWORKS_PAGED_ATTENTION not 0."""
    return (os.environ.get("LLAMAWORKS_PAGED_ATTENTION", "1") != "0" and torch.device(device).type == "cpu"
            and dtype in (torch.float32, torch.bfloat16) and head_dim % 16 == 0 and head_dim <= 256
            and native.available())
