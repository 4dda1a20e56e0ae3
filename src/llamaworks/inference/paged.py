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
- prefill (longer passes whose rows all hold the same positions start..start+seq-1: one prompt's
  chunk, on CPU): update() returns a PrefillRead, the chunk's own keys and values as computed and
  those of its earlier positions, and the attention (prefill_attention) runs SDPA causal over the
  chunk (the flash kernel skips the hidden half) and, after a cached prefix or an earlier chunk,
  unmasked over the prefix, the two merged by their log-sum-exp: no (seq, width*B) mask, no key
  past the chunk computed, and no gather at all for a prompt's first chunk;
- ragged (serve/engine.py's step, CPU: the engine sets BlockTable.ragged): one row of tokens
  (1, T) holding several sequences' runs of consecutive positions side by side (a token of each
  decoding sequence, a prompt's chunk, other prompts' rests), so that every product of the pass
  reads the weights once for all of them; update() writes each token where `Ragged.slots` says
  and returns a RaggedRead, and the attention (ragged_attention) runs per group of runs
  (ragged_groups): runs of up to PAGED_MAX_QUERIES tokens through the paged kernel, longer runs
  at the same positions through prefill_attention; a fused attention's RoPE and the write are
  one native call instead (rope_update);
- otherwise (batched prompt rests at different positions, other devices, gradients): the
  sequence's `width` blocks are gathered into contiguous keys (bsz, heads, width*B, head_dim) for
  one SDPA call, the torch path. The model's mask hides every key past the query's position, so
  table entries past a sequence's end may name any block.
All compute key position <= query position over the same keys. Block 0 is the null block:
padding and rows with no sequence point there, and what they write there is never read
unmasked. LLAMAWORKS_PAGED_ATTENTION=0 keeps the gather path for decode, LLAMAWORKS_PAGED_PREFILL=0
for prefill (for A/B runs).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from llamaworks.inference import native
from llamaworks.inference.hugepages import hugepage_zeros

NULL_BLOCK = 0
_ROW0 = torch.zeros(1, dtype=torch.long)  # rope_update's cache row of every token, expanded

# Query positions per sequence up to which a pass reads through the table (decode: 1; a
# speculative verify: draft tokens + 1). Longer passes (prefill chunks) are compute-bound
# matrix products over the keys, where one SDPA call over the gathered keys does better.
PAGED_MAX_QUERIES = 8


def kernel_dtypes(q_dtype: torch.dtype, kv_dtype: torch.dtype) -> bool:
    """Whether the native attention kernels take queries of q_dtype over keys and values of
    kv_dtype: both fp32 or both bf16, or an fp32 model over a bf16 cache (serve --kv-dtype)."""
    return (q_dtype == kv_dtype and q_dtype in (torch.float32, torch.bfloat16)) or (
        q_dtype == torch.float32 and kv_dtype == torch.bfloat16)


def prompt_start(input_pos: torch.Tensor) -> int | None:
    """The first position of a pass whose every row holds positions start..start+seq-1 of
    input_pos (bsz, seq) (a prompt, or a chunk of one after the cached part), or None where rows
    differ or skip. Reads a host value: meant for CPU tensors (no device sync) outside compiled graphs."""
    if input_pos.dim() != 2 or input_pos.shape[1] == 0:
        return None
    start = int(input_pos[0, 0])
    want = torch.arange(start, start + input_pos.shape[1], device=input_pos.device, dtype=input_pos.dtype)
    return start if bool((input_pos == want).all()) else None


class PagedRead(NamedTuple):
    """What PagedKVCache.update returns instead of keys or values when the pass reads through
    the block table: the layer's pool, the pass's table rows and its query positions."""

    pool: torch.Tensor  # (n_kv_heads, num_blocks, block_size, head_dim)
    blocks: torch.Tensor  # (bsz, width) physical block ids
    pos: torch.Tensor  # (bsz, seq): query s of sequence b sees keys 0..pos[b, s]


class PrefillRead(NamedTuple):
    """What PagedKVCache.update returns instead of keys or values for a prefill pass whose rows
    all hold positions start..start+seq-1 (prefill_attention reads it)."""

    prefix: torch.Tensor  # (bsz, n_kv_heads, start, head_dim): positions 0..start-1, from the blocks
    chunk: torch.Tensor  # (bsz, n_kv_heads, seq, head_dim): the pass's own, as written to the cache


class RaggedGroup(NamedTuple):
    """Runs of a ragged pass that attend in one call: `runs` runs of `length` tokens each, side by
    side from token `first` of the pass, the sequences of table rows row..row+runs-1; `start`
    their common first position (prefill_attention), or None: runs of at most PAGED_MAX_QUERIES
    tokens at any positions, each query over its own sequence's keys (the paged kernel)."""

    first: int
    row: int
    runs: int
    length: int
    start: int | None


class Ragged(NamedTuple):
    """The layout of a ragged pass, which BlockTable.ragged holds while it runs: `slots` (T,) int64,
    where each token's keys and values go in a layer's pool (physical block * block_size + offset,
    the pool seen as (heads, num_blocks * block_size, head_dim)), and the attention's groups in
    token order (ragged_groups). The table's rows are the runs' sequences, in the runs' order."""

    slots: torch.Tensor
    groups: tuple[RaggedGroup, ...]


class RaggedRead(NamedTuple):
    """What PagedKVCache.update returns in a ragged pass: the layer's pool, the table, each token's
    position (T,), the pass's own keys (or values) as written (T, n_kv_heads, head_dim), the groups.
    `new` None (PagedKVCache.rope_update, which writes the pool without returning the keys): the
    pass's own keys are read back from the pool at `slots` (T,), Ragged.slots, by the groups that
    need them (runs longer than PAGED_MAX_QUERIES)."""

    pool: torch.Tensor
    blocks: torch.Tensor
    pos: torch.Tensor
    new: torch.Tensor | None
    groups: tuple[RaggedGroup, ...]
    slots: torch.Tensor | None = None

    def run_keys(self, group: RaggedGroup, head_dim: int) -> torch.Tensor:
        """The pass's own keys (or values) of `group`'s runs, (runs, n_kv_heads, length, head_dim)."""
        a, b = group.first, group.first + group.runs * group.length
        if self.new is not None:
            return self.new[a:b].view(group.runs, group.length, self.new.shape[1], head_dim).transpose(1, 2)
        heads = self.pool.shape[0]
        # A copy of the group's tokens only (T x n_kv_heads x head_dim), beside attention over them.
        flat = self.pool.view(heads, -1, head_dim).index_select(1, self.slots[a:b])  # (n_kv_heads, b - a, hd)
        return flat.view(heads, group.runs, group.length, head_dim).transpose(0, 1)


def ragged_groups(runs: Sequence[tuple[int, int]]) -> tuple[list[int], list[RaggedGroup]]:
    """How a ragged pass lays out runs of (first position, tokens) and attends over them: the
    runs' order in the pass (indices into `runs`), and the groups of runs side by side that attend
    in one call, in that order. Runs of at most PAGED_MAX_QUERIES tokens (decoding rows, short
    rests) group by length (the paged kernel takes each query's own position); longer runs by
    first position and length (prefill_attention's rows share positions and the prefix's view).
    Groups keep the order of their first run."""
    keyed: dict[tuple, list[int]] = {}
    for i, (start, n) in enumerate(runs):
        assert n >= 1, runs
        key = ("paged", n) if n <= PAGED_MAX_QUERIES else ("prefill", start, n)
        keyed.setdefault(key, []).append(i)
    order, groups, first = [], [], 0
    for key, members in keyed.items():
        n = runs[members[0]][1]
        groups.append(RaggedGroup(first, len(order), len(members), n, None if key[0] == "paged" else key[1]))
        order += members
        first += n * len(members)
    return order, groups


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
    keys, values = gather(k.pool, k.blocks).to(q.dtype), gather(v.pool, v.blocks).to(q.dtype)  # a bf16 cache widened
    key_pos = torch.arange(keys.shape[2], device=q.device)
    mask = key_pos.view(1, 1, 1, -1) <= k.pos.unsqueeze(1).unsqueeze(-1)  # (bsz, 1, seq, width*B)
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                            enable_gqa=keys.shape[1] != q.shape[1])


def prefix_keys(pool: torch.Tensor, blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Positions 0..start-1 of each sequence's blocks, (bsz, heads, start, head_dim): a view of
    the pool when every sequence's prefix is in the same blocks (one sequence, or prompts after
    a shared cached system prompt) lying in order side by side (a fresh pool hands them out so),
    else a gather of the blocks that hold them."""
    heads, _, size, head_dim = pool.shape
    bsz, n = blocks.shape[0], -(-start // size)
    if n == 0:
        return pool.new_empty(bsz, heads, 0, head_dim)
    first = int(blocks[0, 0])
    if torch.equal(blocks[:, :n], torch.arange(first, first + n, device=blocks.device).expand(bsz, n)):
        one = pool[:, first:first + n].reshape(heads, n * size, head_dim)[:, :start]  # a view
        return one.unsqueeze(0).expand(bsz, heads, start, head_dim)
    return gather(pool, blocks[:, :n])[:, :, :start]


def merge_attention(out: torch.Tensor, lse: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Attention over the union of two sets of keys from its two parts: each part's output
    (bsz, heads, seq, head_dim) and log-sum-exp of its scaled scores (bsz, heads, seq), weighted
    by each part's share of the softmax's denominator, e^lse / (e^lse + e^lse2) = sigmoid(lse - lse2)
    for the first (computed in fp32). Three operators: on a busy 2-core machine each parallel
    operator of a prefill chunk may wait for a descheduled thread."""
    share = torch.sigmoid(lse - lse2).unsqueeze(-1)  # (bsz, heads, seq, 1)
    return torch.lerp(out2.float(), out.float(), share).to(out.dtype)


def prefill_attention(q: torch.Tensor, k: PrefillRead, v: PrefillRead) -> torch.Tensor:
    """Causal attention of a chunk of queries at positions start..start+seq-1 over the keys up to
    each one's position, q (bsz, heads, seq, head_dim) -> (bsz, heads, seq, head_dim): the native
    kernel where it applies (prefill_kernel_applies), else SDPA causal
    over the chunk's own keys (the flash kernel skips the blocks the causal mask hides) and, with
    a prefix, unmasked over its keys, merged by the two parts' log-sum-exp (merge_attention)."""
    if prefill_kernel_applies(q, k, v):
        return torch.ops.llamaworks.prefill_attention(q, k.chunk, v.chunk, k.prefix, v.prefix)
    if k.chunk.dtype != q.dtype:  # a bf16 cache under an fp32 model, where the kernel cannot run
        k, v = (PrefillRead(_widened(r.prefix, q.dtype), r.chunk.to(q.dtype)) for r in (k, v))
    gqa = k.chunk.shape[1] != q.shape[1]
    if k.prefix.shape[2] == 0:
        return F.scaled_dot_product_attention(q, k.chunk, v.chunk, is_causal=True, enable_gqa=gqa)
    keys, values = (k.prefix, k.chunk), (v.prefix, v.chunk)
    if gqa:  # the CPU flash operator with its log-sum-exp takes as many key heads as query heads
        group = q.shape[1] // k.chunk.shape[1]
        keys = tuple(t.repeat_interleave(group, dim=1) for t in keys)
        values = tuple(t.repeat_interleave(group, dim=1) for t in values)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out, lse = flash(q, keys[0], values[0])
    out2, lse2 = flash(q, keys[1], values[1], is_causal=True)
    return merge_attention(out, lse, out2, lse2)


def _widened(prefix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """prefix (bsz, heads, start, head_dim) in dtype; one copy when its rows are one view expanded."""
    if prefix.shape[0] > 1 and prefix.stride(0) == 0:
        return prefix[:1].to(dtype).expand_as(prefix)
    return prefix.to(dtype)


def prefill_kernel_applies(q: torch.Tensor, k: PrefillRead, v: PrefillRead) -> bool:
    """Whether llamaworks::prefill_attention (csrc/prefill_attn.cpp: the chunk's causal keys and the
    prefix in one pass, tiles of keys shared by many query rows) takes this prefill: on CPU, q and
    every key and value part of one dtype, q's (fp32 or bf16) or bf16 under an fp32 q, a head_dim the
    kernel has (a multiple of 16 up to 256), the library loaded, no gradient, and
    LLAMAWORKS_PREFILL_KERNEL not 0 (A/B runs)."""
    parts = (k.chunk, v.chunk, k.prefix, v.prefix)
    return (q.device.type == "cpu" and kernel_dtypes(q.dtype, k.chunk.dtype)
            and all(t.device.type == "cpu" and t.dtype == k.chunk.dtype for t in parts)
            and q.shape[-1] % 16 == 0 and q.shape[-1] <= 256
            and os.environ.get("LLAMAWORKS_PREFILL_KERNEL", "1") != "0" and native.available()
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, *parts))))


def paged_kernel_applies(q: torch.Tensor, pool: torch.Tensor) -> bool:
    """Whether llamaworks::paged_attention takes this pass: on CPU, at most PAGED_MAX_QUERIES
    query positions, q and the pool both fp32 or both bf16 (or an fp32 q over a bf16 pool), a
    head_dim the kernel has (a multiple of 16 up to 256), the library loaded, no gradient to record."""
    return (q.device.type == "cpu" and pool.device.type == "cpu" and q.shape[2] <= PAGED_MAX_QUERIES
            and kernel_dtypes(q.dtype, pool.dtype)
            and q.shape[-1] % 16 == 0 and q.shape[-1] <= 256 and native.available()
            and not (torch.is_grad_enabled() and q.requires_grad))


def paged_read(q: torch.Tensor, k: PagedRead, v: PagedRead) -> torch.Tensor:
    """Attention through the block table: the native kernel, or the torch path where it cannot run."""
    if paged_kernel_applies(q, k.pool):
        return torch.ops.llamaworks.paged_attention(q, k.pool, v.pool, k.blocks, k.pos)
    return paged_attention_reference(q, k, v)


def ragged_attention(q: torch.Tensor, k: RaggedRead, v: RaggedRead) -> torch.Tensor:
    """The attention of a ragged pass, q (1, heads, T, head_dim) -> (1, heads, T, head_dim): per
    group of runs (ragged_groups), its queries as (runs, heads, length, head_dim), through the
    paged kernel (short runs, each query over its sequence's keys up to its position) or
    prefill_attention (runs at the same positions: causal over their own keys, then the prefix)."""
    heads, head_dim = q.shape[1], q.shape[3]
    if len(k.groups) == 1 and k.groups[0].start is None and k.groups[0].length == 1:
        # A decode pass (one token a row): the paged kernel's (T, heads, 1, hd) output is token-major
        # already; returned as its (1, heads, T, hd) view, without the buffer and copy below (each
        # small operator costs 15-40 us in a decode step whose weights just went through the caches).
        g = k.groups[0]
        o = paged_read(q[0].reshape(heads, g.runs, 1, head_dim).transpose(0, 1).contiguous(),
                       PagedRead(k.pool, k.blocks, k.pos.view(g.runs, 1)),
                       PagedRead(v.pool, v.blocks, v.pos.view(g.runs, 1)))  # (T, heads, 1, hd)
        return o.view(1, g.runs, heads, head_dim).transpose(1, 2)
    # Written token-major, (1, T, heads, hd), and returned as its (1, heads, T, hd) view: the
    # attention's caller transposes it back to token-major without a copy.
    out = q.new_empty(1, q.shape[2], heads, head_dim)
    for g in k.groups:
        a, b = g.first, g.first + g.runs * g.length
        qg = q[0, :, a:b].reshape(heads, g.runs, g.length, head_dim).transpose(0, 1)  # (runs, heads, length, hd)
        blocks = k.blocks[g.row:g.row + g.runs]
        if g.start is None:
            pos = k.pos[a:b].view(g.runs, g.length)
            o = paged_read(qg.contiguous(), PagedRead(k.pool, blocks, pos), PagedRead(v.pool, blocks, pos))
        else:
            ck, cv = k.run_keys(g, head_dim), v.run_keys(g, head_dim)  # (runs, kv_heads, length, hd)
            o = prefill_attention(qg, PrefillRead(prefix_keys(k.pool, blocks, g.start), ck),
                                  PrefillRead(prefix_keys(v.pool, blocks, g.start), cv))
        out[0, a:b] = o.transpose(1, 2).reshape(b - a, heads, head_dim)
    return out.transpose(1, 2)


class PagedAttention:
    """Mixed into an Attention class (setup_paged_caches): a PagedRead from the cache is read
    through the block table by the native kernel (the torch path where that cannot run), a
    PrefillRead by prefill_attention, a RaggedRead by ragged_attention; anything else goes to
    the class's own attend."""

    def attend(self, q, k, v, mask):
        if isinstance(k, PrefillRead):
            return prefill_attention(q, k, v)
        if isinstance(k, PagedRead):
            return paged_read(q, k, v)
        if isinstance(k, RaggedRead):
            return ragged_attention(q, k, v)
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
        self.ragged: Ragged | None = None  # the layout of a ragged pass, while one runs


class PagedKVCache(nn.Module):
    """One layer's pool of blocks, (n_kv_heads, num_blocks, block_size, head_dim) for keys and
    values: heads first, so that a gather of a sequence's blocks is (heads, bsz, width*B, head_dim)
    with each (positions, head_dim) matrix contiguous, as SDPA reads it best (kvcache.py)."""

    def __init__(self, table: BlockTable, num_blocks: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        assert num_blocks >= 2, num_blocks  # the null block and at least one for a sequence
        self.table = table
        shape = (n_kv_heads, num_blocks, table.block_size, head_dim)
        for name in ("k", "v"):  # on CPU in huge pages: decode streams the pool block by block
            pool = (hugepage_zeros(shape, dtype) if torch.device(device or "cpu").type == "cpu"
                    else torch.zeros(shape, dtype=dtype, device=device))
            self.register_buffer(name, pool, persistent=False)
        # Whether decode passes read through the table (PagedRead), and prefill passes split their
        # attention (PrefillRead): set by setup_paged_caches, where the attention module reads
        # them; False keeps the gather path. rope_in_one: ragged passes of a fused attention
        # take rope_update (LLAMAWORKS_RAGGED_ROPE=0 turns it off, for A/B runs).
        self.reads_table = False
        self.splits_prefill = False
        self.rope_in_one = False

    @property
    def seq_len(self) -> int:
        # A ragged pass reads no mask: a length of 1 keeps the model from building a (T, keys) one.
        return 1 if self.table.ragged is not None else self.table.blocks.shape[1] * self.table.block_size

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None):
        # input_pos: (bsz, seq); k, v: (bsz, seq, n_kv_heads, head_dim); rows: (bsz,) rows of the
        # block table (default: all of them, one per sequence).
        ragged = self.table.ragged
        if ragged is not None:  # (1, T): each token to its slot
            new_k, new_v = k[0].to(self.k.dtype), v[0].to(self.v.dtype)  # (T, n_kv_heads, head_dim)
            self.write(ragged.slots, new_k, new_v)
            pos = input_pos[0]
            return (RaggedRead(self.k, self.table.blocks, pos, new_k, ragged.groups),
                    RaggedRead(self.v, self.table.blocks, pos, new_v, ragged.groups))
        blocks = self.table.blocks if rows is None else self.table.blocks[rows]  # (bsz, width)
        assert blocks.shape[0] == k.shape[0], (blocks.shape, k.shape)
        size = self.table.block_size
        slots = blocks.gather(1, input_pos // size) * size + input_pos % size  # (bsz, seq): block * B + offset
        self.write(slots.reshape(-1), k.flatten(0, 1), v.flatten(0, 1))
        grad = torch.is_grad_enabled() and k.requires_grad
        if (self.reads_table and k.shape[1] <= PAGED_MAX_QUERIES and kernel_dtypes(k.dtype, self.k.dtype)
                and k.device.type == "cpu" and not grad):
            return PagedRead(self.k, blocks, input_pos), PagedRead(self.v, blocks, input_pos)
        start = self.prefill_start(input_pos) if self.splits_prefill and not grad else None
        if start is not None:
            # The chunk's own keys as the cache now holds them (its dtype), heads first.
            chunk_k = k.to(self.k.dtype).transpose(1, 2)
            chunk_v = v.to(self.v.dtype).transpose(1, 2)
            return (PrefillRead(prefix_keys(self.k, blocks, start), chunk_k),
                    PrefillRead(prefix_keys(self.v, blocks, start), chunk_v))
        # A bf16 cache under an fp32 model is read widened (the torch path's SDPA takes one dtype).
        return gather(self.k, blocks).to(k.dtype), gather(self.v, blocks).to(v.dtype)

    def rope_update(self, qkv: torch.Tensor, freqs: torch.Tensor, input_pos: torch.Tensor, n_heads: int,
                    n_kv_heads: int) -> tuple[torch.Tensor, RaggedRead, RaggedRead]:
        """A ragged pass's RoPE of q and k and its cache write as one native call per layer
        (llamaworks::rope_cache, csrc/step.cpp), for fuse.py's FusedAttention, instead of
        apply_rotary_emb twice and update's write: some 30 operators per layer, a few us each,
        which on a small model were a large part of a decode step. qkv (1, T, (H + 2 Hkv) * hd)
        is the fused projection's output, freqs (1, T, hd/2, 2) its rows' angles. rope_cache's
        cache is (rows, Hkv, L, hd) at (row, position): the pool seen as one row (Hkv,
        num_blocks * B, hd) with each token at its slot (Ragged.slots) is that, and each token
        a sequence of its own (T, 1, ...) gives q token-major, (T, H, 1, hd). q is returned as
        the (1, H, T, hd) view the attention takes, in which a group of one-token runs is that
        contiguous (T, H, 1, hd) again, as the paged kernel takes it, with no copy. Keys and
        values written as update writes them, rotated bit for bit as apply_rotary_emb does;
        the RaggedReads carry no `new`: runs that need their own keys read them at their slots."""
        ragged = self.table.ragged
        heads, num_blocks, size, head_dim = self.k.shape
        tokens = qkv.shape[1]
        q = torch.ops.llamaworks.rope_cache(
            qkv.view(tokens, 1, -1), freqs.view(tokens, 1, head_dim // 2, 2), ragged.slots.view(tokens, 1),
            _ROW0.expand(tokens), self.k.view(1, heads, num_blocks * size, head_dim),
            self.v.view(1, heads, num_blocks * size, head_dim), n_heads, n_kv_heads)  # (T, H, 1, hd)
        q = q.view(tokens, n_heads, head_dim).transpose(0, 1).unsqueeze(0)  # (1, H, T, hd), a view
        pos = input_pos[0]
        return (q, RaggedRead(self.k, self.table.blocks, pos, None, ragged.groups, ragged.slots),
                RaggedRead(self.v, self.table.blocks, pos, None, ragged.groups, ragged.slots))

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write keys and values (tokens, n_kv_heads, head_dim) at `slots` (tokens,) of the pools
        seen as (heads, num_blocks * block_size, head_dim): one index_copy_ along the slots each.
        The same write as an index_put around the heads slice (pool[:, block, offset] = ...) took
        1-12 ms per call for 8 tokens on a 2-core Zen 4 (torch 2.13), index_copy_ 5 us: the
        index_put was most of a small model's decode step."""
        heads, num_blocks, size, head_dim = self.k.shape
        self.k.view(heads, num_blocks * size, head_dim).index_copy_(1, slots, k.transpose(0, 1).to(self.k.dtype))
        self.v.view(heads, num_blocks * size, head_dim).index_copy_(1, slots, v.transpose(0, 1).to(self.v.dtype))

    def prefill_start(self, input_pos: torch.Tensor) -> int | None:
        """The first position of a pass whose rows all hold positions start..start+seq-1 and that
        does not read through the table (longer than PAGED_MAX_QUERIES, or no native kernels), on
        CPU; None for any other pass (rows at different positions: the gather path)."""
        seq = input_pos.shape[1]
        # Compiled graphs (the decode step) keep the gather path: the start is a host value.
        if (self.k.device.type != "cpu" or (self.reads_table and seq <= PAGED_MAX_QUERIES)
                or torch.compiler.is_compiling()):
            return None
        return prompt_start(input_pos)


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
    splits = splits_prefill(device)
    for layer in model.layers:
        att = layer.attention
        att.kv_cache = PagedKVCache(table, num_blocks, att.n_kv_heads, att.head_dim, dtype, device)
        if reads_table or splits:
            att.__class__ = paged_attention_class(type(att))
            att.kv_cache.reads_table, att.kv_cache.splits_prefill = reads_table, splits
        att.kv_cache.rope_in_one = os.environ.get("LLAMAWORKS_RAGGED_ROPE", "1") != "0"
    return table


def splits_prefill(device) -> bool:
    """Whether prefill passes over a paged cache on `device` attend through prefill_attention:
    on CPU (its log-sum-exp comes from the CPU flash operator), unless LLAMAWORKS_PAGED_PREFILL is 0."""
    return os.environ.get("LLAMAWORKS_PAGED_PREFILL", "1") != "0" and torch.device(device).type == "cpu"


def reads_through_table(device, dtype, head_dim: int) -> bool:
    """Whether decode passes over a paged cache on `device` in `dtype` read through the block
    table (llamaworks::paged_attention): the native kernels built, a CPU, fp32 or bf16, a
    head_dim the kernel has, and LLAMAWORKS_PAGED_ATTENTION not 0."""
    return (os.environ.get("LLAMAWORKS_PAGED_ATTENTION", "1") != "0" and torch.device(device).type == "cpu"
            and dtype in (torch.float32, torch.bfloat16) and head_dim % 16 == 0 and head_dim <= 256
            and native.available())
