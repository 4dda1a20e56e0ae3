"""llamaworks::paged_attention (csrc/attn_body.h, inference/paged.py): decode attention read
through a block table equals the torch path (gather, mask, SDPA) on every instruction set, in
fp32 and bf16, with GQA, several query positions, rows of very different lengths, blocks shared
between rows, null-block rows and table entries past a row's end that name no real block; the
paged cache hands decode passes to it and prefill passes to the gather; the operator traces."""

from __future__ import annotations

import pytest
import torch

from llamaworks.inference import native
from llamaworks.inference.paged import (
    NULL_BLOCK,
    PagedAttention,
    PagedRead,
    PrefillRead,
    paged_attention_reference,
    setup_paged_caches,
)
from llamaworks.model import ModelArgs, build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ops = torch.ops.llamaworks


def paged_case(g, dtype, bsz, heads, kv_heads, seq, head_dim, size, lengths, num_blocks=64, width=None):
    """Pools of random keys and values, a table whose rows hold `lengths` tokens in scattered
    blocks (rows 0 and 1 share their first block when both have one), entries past a row's end
    out of the pool (never read), and queries at the last `seq` positions of each row."""
    k, v = (torch.randn(kv_heads, num_blocks, size, head_dim, generator=g).to(dtype) for _ in range(2))
    need = [-(-n // size) for n in lengths]
    width = width or max(need)
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # never the null block
    blocks = torch.full((bsz, width), 10**9, dtype=torch.long)
    for b, n in enumerate(need):
        blocks[b, :n] = torch.tensor([perm.pop() for _ in range(n)], dtype=torch.long)
    if bsz > 1 and need[0] and need[1]:
        blocks[1, 0] = blocks[0, 0]  # a shared prefix block
    pos = torch.stack([torch.arange(max(n - seq, 0), max(n - seq, 0) + seq) for n in lengths])  # (bsz, seq)
    for b, n in enumerate(lengths):
        if n == 0:  # a free row: one token at position 0 in the null block
            blocks[b, 0], pos[b] = NULL_BLOCK, 0
    q = torch.randn(bsz, seq, heads, head_dim, generator=g).to(dtype).transpose(1, 2)  # the model's strides
    return q, PagedRead(k, blocks, pos), PagedRead(v, blocks, pos)


def reference(q, k, v):
    # In fp32 on the blocks the rows read (the rest of the table replaced by the null block).
    n = (k.pos.amax(1) + 1).clamp(min=1)
    size = k.pool.shape[2]
    cols = torch.arange(k.blocks.shape[1])
    blocks = torch.where(cols.view(1, -1) * size < n.view(-1, 1), k.blocks, NULL_BLOCK)
    return paged_attention_reference(q.float(), PagedRead(k.pool.float(), blocks, k.pos),
                                     PagedRead(v.pool.float(), blocks, v.pos))


CASES = [  # (bsz, heads, kv heads, query positions, head_dim, block size, row lengths)
    (8, 6, 6, 1, 64, 16, [2048, 5, 130, 17, 1, 64, 0, 300]),  # one long row among short ones, a free row
    (3, 8, 2, 5, 32, 4, [9, 40, 5]),  # GQA, a speculative verify's 5 positions
    (2, 4, 4, 2, 128, 16, [16, 33]),
    (2, 2, 1, 1, 16, 1, [3, 7]),
]


@pytest.mark.parametrize("isa", native.ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_equals_the_gather_path(isa, dtype):
    g = torch.Generator().manual_seed(0)
    for bsz, heads, kv_heads, seq, head_dim, size, lengths in CASES:
        q, k, v = paged_case(g, dtype, bsz, heads, kv_heads, seq, head_dim, size, lengths, num_blocks=200)
        got = ops.paged_attention(q, k.pool, v.pool, k.blocks, k.pos)
        want = reference(q, k, v)
        assert got.dtype == dtype and got.shape == (bsz, heads, seq, head_dim)
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:  # fp32 inside, the output rounded to bf16 once
            torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
        # The native path of PagedAttention.attend is the operator.
        att = PagedAttention()
        torch.testing.assert_close(att.attend(q, k, v, None), got, rtol=0, atol=0)


def test_paged_attention_equals_decode_attention_on_the_gathered_keys(native_lib):
    # The decode kernel the gather path takes (kernels.NativeAttention), on the same keys.
    g = torch.Generator().manual_seed(1)
    q, k, v = paged_case(g, torch.float32, 4, 4, 2, 1, 64, 16, [700, 3, 45, 16])
    keys = k.pool[:, k.blocks.clamp(max=k.pool.shape[1] - 1)].flatten(2, 3).transpose(0, 1)
    values = v.pool[:, v.blocks.clamp(max=v.pool.shape[1] - 1)].flatten(2, 3).transpose(0, 1)
    mask = torch.arange(keys.shape[2]).view(1, 1, 1, -1) <= k.pos.unsqueeze(1).unsqueeze(-1)
    torch.testing.assert_close(ops.paged_attention(q, k.pool, v.pool, k.blocks, k.pos),
                               ops.decode_attention(q, keys, values, mask), rtol=1e-5, atol=1e-6)


def test_threads_split_the_rows_without_changing_results(native_lib):
    g = torch.Generator().manual_seed(2)
    q, k, v = paged_case(g, torch.float32, 8, 6, 6, 1, 64, 16, [1500, 5, 130, 17, 1, 64, 900, 300], num_blocks=300)
    one = ops.paged_attention(q, k.pool, v.pool, k.blocks, k.pos)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(ops.paged_attention(q, k.pool, v.pool, k.blocks, k.pos), one)
    finally:
        torch.set_num_threads(n)


def test_paged_attention_checks_its_operands_and_traces(native_lib):
    g = torch.Generator().manual_seed(3)
    q, k, v = paged_case(g, torch.float32, 2, 4, 2, 1, 16, 4, [6, 3], num_blocks=8)
    bad = k.blocks.clone()
    bad[0, 1] = 8  # read by row 0 (6 tokens: blocks 0 and 1), outside the pool
    with pytest.raises(RuntimeError, match="outside the pool"):
        ops.paged_attention(q, k.pool, v.pool, bad, k.pos)
    with pytest.raises(RuntimeError, match="float32 or all bfloat16"):
        ops.paged_attention(q, k.pool.bfloat16(), v.pool, k.blocks, k.pos)
    with pytest.raises(RuntimeError, match="int64"):
        ops.paged_attention(q, k.pool, v.pool, k.blocks.int(), k.pos)
    with pytest.raises(RuntimeError, match="head_dim"):
        ops.paged_attention(q[..., :8], k.pool[..., :8].contiguous(), v.pool[..., :8].contiguous(), k.blocks, k.pos)
    blocks = k.blocks.clamp(max=7)
    torch.library.opcheck(ops.paged_attention, (q, k.pool, v.pool, blocks, k.pos),
                          test_utils=("test_schema", "test_faketensor"))


def _model_and_table(reads_table: bool, monkeypatch):
    monkeypatch.setenv("LLAMAWORKS_PAGED_ATTENTION", "1" if reads_table else "0")
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=16, max_seq_len=64)
    model = build_model(args, seed=0).eval()
    return model, setup_paged_caches(model, 40, 4, 64)


@pytest.mark.parametrize("split_prefill", [True, False])
def test_the_cache_reads_decode_through_the_table_and_prefill_by_parts_or_gathered(native_lib, monkeypatch,
                                                                                   split_prefill):
    monkeypatch.setenv("LLAMAWORKS_PAGED_PREFILL", "1" if split_prefill else "0")
    model, table = _model_and_table(True, monkeypatch)
    cache = model.layers[0].attention.kv_cache
    assert cache.reads_table and isinstance(model.layers[0].attention, PagedAttention)
    assert cache.splits_prefill == split_prefill
    table.blocks = torch.tensor([[5, 9, 2, 31, 7]])
    kv = torch.zeros(1, 9, 2, 16)
    with torch.no_grad():
        k, _ = cache.update(torch.arange(9).view(1, 9), kv, kv)  # a 9-token prefill
        if split_prefill:  # its own keys and an empty prefix (prefill_attention)
            assert isinstance(k, PrefillRead) and k.prefix.shape == (1, 2, 0, 16) and k.chunk.shape == (1, 2, 9, 16)
        else:  # gathered over the row's blocks
            assert isinstance(k, torch.Tensor) and k.shape == (1, 2, 20, 16)
        k, _ = cache.update(torch.tensor([[9]]), kv[:, :1], kv[:, :1])  # decode: through the table
        assert isinstance(k, PagedRead) and k.pool is cache.k
    off, _ = _model_and_table(False, monkeypatch)
    assert not off.layers[0].attention.kv_cache.reads_table


def test_greedy_tokens_through_the_table_are_the_gathers_and_the_static_caches(native_lib, monkeypatch):
    # Two rows of very different lengths in scattered blocks sharing the first, beside a free row.
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 96, (2, 40), generator=gen)
    lengths = (40, 4)  # row 1: the first block of row 0 (shared, full), then its own
    blocks = [[7, 3, 30, 12, 5, 22, 9, 17, 1, 33, 2, 25, 14, 15], [7, 8, 39, 4, 26, 16, 6, 34, 13, 20, 19, 38, 11, 10]]
    outs = []
    for reads_table in (True, False):
        model, table = _model_and_table(reads_table, monkeypatch)
        with torch.no_grad():
            toks = []
            for b, n in enumerate(lengths):  # each row prefilled alone (the shared block written twice, alike)
                table.blocks = torch.tensor([blocks[b]])
                logits = model(prompts[b: b + 1, :n] if b == 0 else prompts[:1, :n], torch.arange(n),
                               rows=torch.tensor([0]))
                toks.append(int(logits[0, -1].argmax()))
            table.blocks = torch.tensor([blocks[0], blocks[1], [NULL_BLOCK] * 14])
            pos = list(lengths)
            seqs = [[t] for t in toks]
            for _ in range(14):
                logits = model(torch.tensor([[seqs[0][-1]], [seqs[1][-1]], [0]]),
                               torch.tensor([[pos[0]], [pos[1]], [0]]))
                for b in range(2):
                    seqs[b].append(int(logits[b, -1].argmax()))
                    pos[b] += 1
        outs.append(seqs)
        # the static cache, each row alone
        static = build_model(model.args, seed=0).eval()
        static.setup_caches(1, 64)
        with torch.no_grad():
            for b, n in enumerate(lengths):
                ids = prompts[b: b + 1, :n] if b == 0 else prompts[:1, :n]
                tok = int(static(ids, torch.arange(n))[0, -1].argmax())
                want = [tok]
                for p in range(n, n + 14):
                    tok = int(static(torch.tensor([[tok]]), torch.tensor([p]))[0, -1].argmax())
                    want.append(tok)
                assert seqs[b] == want, (reads_table, b)
    assert outs[0] == outs[1]
