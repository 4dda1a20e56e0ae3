"""Weights in transparent huge pages (inference/hugepages.py): the arena's layout, the moved
weights (same values, same Parameter objects, ties and shared memory kept, aligned, advised as
huge pages), greedy tokens unchanged through fusion and the native kernels, bf16 and int8, a
second call moving nothing, load_model doing it, and nothing done where THP is off."""

from __future__ import annotations

import ctypes
import mmap
import re

import pytest
import torch
from peaked import sharpen

from llamaworks.inference import hugepages
from llamaworks.inference.fuse import fuse_projections
from llamaworks.inference.generate import generate_ids
from llamaworks.inference.hugepages import arena_layout, thp_mode, use_hugepages
from llamaworks.inference.kernels import KERNEL_ALIGN, use_native_kernels
from llamaworks.inference.load import load_model
from llamaworks.inference.quant import quantize_model
from llamaworks.model import ModelArgs, build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=128)
needs_thp = pytest.mark.skipif(not hugepages.hugepages_supported(), reason="no transparent huge pages (Linux only)")


def model(**over) -> torch.nn.Module:
    # Larger than init weights (tests/peaked.py): well-separated logits, greedy tokens compare the code.
    return sharpen(build_model(ModelArgs(**{**ARGS, **over}), seed=0), seed=1, std=0.15, norm_std=0.0)


def greedy(m, n=10):
    return torch.cat([t for t, _ in generate_ids(m, [[1, 17, 250, 3], [1, 5]], n, temperature=0.0)], 1).tolist()


def thp_eligible(addr: int) -> bool:
    """Whether the mapping holding `addr` may get huge pages (/proc/self/smaps: THPeligible)."""
    text = open("/proc/self/smaps").read()
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
        lo, hi = (int(v, 16) for v in block.split()[0].split("-"))
        if lo <= addr < hi:
            m = re.search(r"THPeligible:\s+(\d)", block)
            return m is not None and m.group(1) == "1"
    raise AssertionError(f"{addr:#x} is in no mapping")


def test_thp_mode_reads_the_marked_word():
    assert thp_mode("always [madvise] never") == "madvise"
    assert thp_mode("[always] madvise never") == "always"
    assert thp_mode("always madvise [never]\n") == "never"
    assert thp_mode("") == ""


def test_arena_layout_aligns_each_tensor_without_overlap():
    offsets, total = arena_layout([10, 64, 1, 200], align=64)
    assert offsets == [0, 64, 128, 192] and total == 392
    assert arena_layout([], align=64) == ([], 0)
    offsets, total = arena_layout([100, 100], align=4096)
    assert offsets == [0, 4096] and total == 4196


@needs_thp
def test_arena_is_aligned_and_advised_as_huge_pages():
    arena = hugepages.hugepage_arena(5 << 20)
    assert arena.numel() == 5 << 20 and arena.data_ptr() % hugepages.HUGE_PAGE == 0
    assert thp_eligible(arena.data_ptr())
    # The control is a fresh anonymous mapping, never advised (not torch.empty: glibc may hand back
    # heap memory that an earlier arena advised, and then it is eligible too, as CI once saw).
    plain = mmap.mmap(-1, 5 << 20)
    view = ctypes.c_char.from_buffer(plain)
    eligible = thp_eligible(ctypes.addressof(view))
    del view  # the buffer export must go before the mapping can close
    plain.close()
    assert not eligible or hugepages.thp_mode(hugepages.THP_SETTING.read_text()) == "always"


def resident_kib(addr: int) -> int:
    """Rss of the mapping that holds addr (/proc/self/smaps)."""
    text = open("/proc/self/smaps").read()
    frac = hugepages.smaps_huge_fraction(text, addr)  # None when nothing of it is resident
    if frac is None:
        return 0
    inside = False
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0] if line.strip() else ""
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1])
    return 0


@needs_thp
def test_arena_is_fresh_memory_after_heap_churn():
    # Freeing large blocks raises glibc's mmap threshold (up to 32 MiB), after which an 8 MiB torch.empty comes
    # from heap memory already faulted in as 4 KiB pages, which madvise cannot make huge. The arena must be
    # untouched memory of its own: nothing of its mapping resident before it is written, huge once written.
    for _ in range(3):
        big = torch.ones(24 << 20, dtype=torch.uint8)
        del big
        churn = [torch.ones(8 << 20, dtype=torch.uint8) for _ in range(3)]
        del churn
    arena = hugepages.hugepage_arena(8 << 20)
    assert resident_kib(arena.data_ptr()) == 0
    arena.fill_(1)
    assert int(arena[::4096].sum()) == (8 << 20) // 4096  # writable, and kept alive by the tensor alone


@needs_thp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_move_with_values_objects_and_ties_kept(dtype):
    m = model(tie_word_embeddings=True).to(dtype)
    m.init_rope()
    fuse_projections(m)
    use_native_kernels(m)
    want_tokens = greedy(m)
    before = {name: (p, p.detach().clone()) for name, p in m.named_parameters()}
    moved = use_hugepages(m, min_bytes=0)
    assert moved >= sum(p.numel() * p.element_size() for p, _ in before.values())
    for name, p in m.named_parameters():
        obj, value = before[name]
        assert p is obj, name  # the same Parameter: ties and outside references hold
        assert torch.equal(p, value) and p.dtype == dtype, name
        assert p.data_ptr() % KERNEL_ALIGN == 0, name
        assert p.untyped_storage().data_ptr() in hugepages._arenas, name
    assert m.output.weight is m.tok_embeddings.weight
    assert greedy(m) == want_tokens
    assert use_hugepages(m, min_bytes=0) == 0  # already there: nothing copied again


@needs_thp
def test_quantised_buffers_move_and_tokens_stay():
    m = quantize_model(model(), "int8")
    fuse_projections(m)
    use_native_kernels(m)
    want = greedy(m)
    w = m.layers[0].attention.wqkv.weight
    value = w.clone()
    assert use_hugepages(m, min_bytes=0) > 0
    w2 = m.layers[0].attention.wqkv.weight
    assert w2.data_ptr() != w.data_ptr() and torch.equal(w2, value)
    assert greedy(m) == want


@needs_thp
def test_shared_memory_is_copied_once():
    m = model()
    m.layers[1].feed_forward.w2.weight = m.layers[0].feed_forward.w2.weight  # one tensor, two modules
    use_hugepages(m, min_bytes=0)
    assert m.layers[1].feed_forward.w2.weight.data_ptr() == m.layers[0].feed_forward.w2.weight.data_ptr()


@needs_thp
def test_small_models_and_kv_caches_stay():
    m = model()
    assert use_hugepages(m) == 0  # under one huge page: cache-resident anyway
    m.setup_caches(1, 32)
    cache = m.layers[0].attention.kv_cache.k
    use_hugepages(m, min_bytes=0)
    assert m.layers[0].attention.kv_cache.k is cache


def test_nothing_moves_without_thp(monkeypatch):
    monkeypatch.setattr(hugepages, "hugepages_supported", lambda: False)
    m = model()
    ptrs = [p.data_ptr() for p in m.parameters()]
    assert use_hugepages(m, min_bytes=0) == 0
    assert [p.data_ptr() for p in m.parameters()] == ptrs


@needs_thp
def test_load_model_moves_the_weights(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(hugepages, "HUGE_PAGE", 4096)  # the tiny model counts as large enough
    loaded, _ = load_model(tiny_model_dir)
    assert all(p.untyped_storage().data_ptr() in hugepages._arenas for p in loaded.parameters())
    monkeypatch.setattr(hugepages, "hugepages_supported", lambda: False)
    plain, _ = load_model(tiny_model_dir)
    assert not any(p.untyped_storage().data_ptr() in hugepages._arenas for p in plain.parameters())
    assert greedy(loaded) == greedy(plain)


SMAPS = """55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                 100 kB
AnonHugePages:         0 kB
VmFlags: rd wr mr mw me ac sd
7f0000000000-7f0000600000 rw-p 00000000 00:00 0
Size:               6144 kB
Rss:                6144 kB
AnonHugePages:      4096 kB
VmFlags: rd wr mr mw me ac sd hg
7f0000600000-7f0000700000 r--p 00000000 fd:01 42                         /usr/lib/libc.so.6
Size:               1024 kB
Rss:                   0 kB
AnonHugePages:         0 kB
"""


def test_smaps_huge_fraction_reads_the_mapping_that_holds_the_address():
    assert hugepages.smaps_huge_fraction(SMAPS, 0x7F0000000000 + 123) == pytest.approx(4096 / 6144)
    assert hugepages.smaps_huge_fraction(SMAPS, 0x55D0C0000010) == 0.0
    assert hugepages.smaps_huge_fraction(SMAPS, 0x7F0000650000) is None  # nothing resident
    assert hugepages.smaps_huge_fraction(SMAPS, 0x1000) is None  # no mapping holds it


@needs_thp
def test_huge_page_fraction_of_moved_weights():
    # Whether the kernel grants huge pages depends on the machine's free memory: only the range is certain,
    # and a fraction is reported for the arena (the address is found in this process's mappings).
    m = model(dim=512, vocab_size=4096)
    assert use_hugepages(m) > 0
    frac = hugepages.huge_page_fraction(m.output.weight)
    assert frac is not None and 0.0 <= frac <= 1.0


@needs_thp
def test_paged_kv_pool_is_zeroed_resident_and_advised_as_huge_pages():
    from llamaworks.inference.paged import BlockTable, PagedKVCache

    cache = PagedKVCache(BlockTable(16), num_blocks=160, n_kv_heads=4, head_dim=64, dtype=torch.float32)
    for pool in (cache.k, cache.v):  # 2.5 MiB each (heads, blocks, block size, head_dim): a huge page fits
        assert pool.shape == (4, 160, 16, 64) and pool.dtype == torch.float32 and not pool.any()
        assert pool.data_ptr() % hugepages.HUGE_PAGE == 0 and thp_eligible(pool.data_ptr())
        assert resident_kib(pool.data_ptr()) >= pool.numel() * 4 // 1024  # faulted in at set-up, not by requests


def test_paged_kv_pool_is_plain_zeros_without_thp(monkeypatch):
    from llamaworks.inference.paged import BlockTable, PagedKVCache

    monkeypatch.setattr(hugepages, "hugepages_supported", lambda: False)
    cache = PagedKVCache(BlockTable(16), num_blocks=4, n_kv_heads=2, head_dim=16, dtype=torch.bfloat16)
    assert cache.k.shape == (2, 4, 16, 16) and cache.v.dtype == torch.bfloat16 and not cache.v.any()
