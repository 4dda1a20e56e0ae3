"""Weights in transparent huge pages, for decoding on CPU: a load-time transform.

A decode step streams every weight once, so each 4 KiB page of a weight costs a TLB miss, and in
a virtual machine each miss is a two-level page walk (the guest's tables, then the host's). With
the weights in 2 MiB pages the misses all but vanish: on the 2-vCPU Zen 4 VM (Firecracker) a
one-row fp32 product over 32000 x 512 read 16 GB per CPU-second from 4 KiB pages and 30 from
huge pages (bf16 17 -> 27, 3072 x 512 fp32 14 -> 29; 1 thread, contended, weights cycled
through 256 MB so they come from memory). llama.cpp gets this for free where its memory-mapped
file lands in large page-cache folios; torch's allocator asks for huge pages only when
THP_MEM_ALLOC_ENABLE=1 is set before its first allocation.

use_hugepages copies a model's weights (parameters and buffers, each once however often it is
shared or tied) into one arena, 2 MiB aligned and madvise(MADV_HUGEPAGE)d before it is first
written, so the kernel backs it with huge pages as the copy faults it in (Linux, THP "always"
or "madvise"; elsewhere it does nothing). The tensors keep their shapes, dtypes and values, and
the Parameter objects stay (ties hold); each lands at a KERNEL_ALIGN boundary. KV caches are
left alone (setup_caches makes new ones per call). Weights memory-mapped from a file become
anonymous memory: the process's resident size grows by the model, once, at load.
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import sys
from pathlib import Path

import torch
from torch import nn

from llamaworks.inference.kernels import KERNEL_ALIGN
from llamaworks.kvcache import KVCache

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20  # x86-64 and aarch64 (4 KiB base pages) transparent huge page size
MADV_HUGEPAGE = 14  # <linux/mman.h>
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# Storage addresses of the arenas made here: a tensor already in one is not copied again.
_arenas: set[int] = set()


def thp_mode(setting: str) -> str:
    """The selected mode of a transparent_hugepage/enabled file ("always [madvise] never" ->
    "madvise"); "" when none is marked."""
    for word in setting.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return ""


def hugepages_supported() -> bool:
    """Whether madvise(MADV_HUGEPAGE) can give this process huge pages: Linux with THP in
    "always" or "madvise" mode."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return thp_mode(THP_SETTING.read_text()) in ("always", "madvise")
    except OSError:
        return False


def smaps_huge_fraction(smaps: str, address: int) -> float | None:
    """From the text of /proc/PID/smaps: the fraction of the resident memory of the mapping that
    holds `address` which is in anonymous huge pages (AnonHugePages / Rss); None when no mapping
    holds it or none of it is resident."""
    inside, rss, huge = False, 0, 0
    for line in smaps.splitlines():
        head = line.split(maxsplit=1)[0] if line.strip() else ""
        if "-" in head and ":" not in head:  # a mapping's first line: "start-end perms offset dev inode [path]"
            if inside:
                break
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside:
            key, _, value = line.partition(":")
            if key == "Rss":
                rss = int(value.split()[0])
            elif key == "AnonHugePages":
                huge = int(value.split()[0])
    return huge / rss if inside and rss else None


def huge_page_fraction(t: torch.Tensor) -> float | None:
    """How much of the memory mapping that holds `t` is in huge pages (smaps_huge_fraction of this
    process): whether use_hugepages got them, which the kernel may refuse when memory is
    fragmented (the copy then falls back to 4 KiB pages without an error). None off Linux."""
    try:
        smaps = Path("/proc/self/smaps").read_text()
    except OSError:
        return None
    return smaps_huge_fraction(smaps, t.data_ptr())


def arena_layout(nbytes: list[int], align: int = KERNEL_ALIGN) -> tuple[list[int], int]:
    """Offsets of tensors of `nbytes` bytes packed in order, each at a multiple of `align`, and
    the bytes the arena needs."""
    offsets, end = [], 0
    for n in nbytes:
        start = -(-end // align) * align
        offsets.append(start)
        end = start + n
    return offsets, end


def _madvise_hugepage(addr: int, length: int) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc.madvise(addr, length, MADV_HUGEPAGE) == 0


def hugepage_arena(nbytes: int) -> torch.Tensor:
    """A zeroed uint8 tensor of `nbytes` at a HUGE_PAGE boundary, in an anonymous
    mapping of its own whose pages are advised as huge before anything touches them. Not
    torch.empty: below 32 MiB glibc may serve it from heap memory already faulted in as 4 KiB pages
    (its mmap threshold rises to the size of each large block freed, as building and quantising a
    model free many), which madvise no longer turns into huge pages: `small`'s int8 and int4 weights
    (14 and 8 MB) got 0% and 9% huge pages in a process that had built other copies first, 90-94% in
    a fresh one (benchmarks/decode.py, session 12)."""
    # Private: an anonymous shared mapping is shmem, which madvise cannot give huge pages. The tensor
    # holds the mapping (torch.frombuffer keeps the buffer's owner) for as long as it lives.
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(region, dtype=torch.uint8)
    skip = -raw.data_ptr() % HUGE_PAGE
    arena = raw[skip: skip + nbytes]
    length = -(-nbytes // 4096) * 4096  # madvise takes whole base pages; the slack is inside raw
    if not _madvise_hugepage(arena.data_ptr(), length):
        log.info("madvise(MADV_HUGEPAGE) failed (errno %d): weights stay in base pages", ctypes.get_errno())
    return arena


def hugepage_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor in a huge-page arena of its own, every page faulted in now: for a
    serving KV pool (paged.PagedKVCache), which a decode step streams like the weights, a
    block of 4 KiB or so at a time, each block anywhere in the pool. In 4 KiB pages each block is
    a TLB miss (a two-level walk in a VM) and the paged attention of `small` at batch 8 ran 12%
    slower (benchmarks/serve_split.py, Sapphire Rapids, session 14). Touched here so that no
    request pays the faults (torch.zeros touches its pages too). Plain torch.zeros where huge
    pages are not available."""
    if not hugepages_supported():
        return torch.zeros(shape, dtype=dtype)
    t = hugepage_arena(math.prod(shape) * torch.empty((), dtype=dtype).element_size()).view(dtype).view(shape)
    return t.zero_()


def _movable(t) -> bool:
    return (isinstance(t, torch.Tensor) and type(t.data) is torch.Tensor and t.device.type == "cpu"
            and t.is_contiguous() and t.numel() > 0)


def _slots(model: nn.Module):
    """(module, kind, name, tensor) for every CPU weight tensor of `model` (not the KV caches):
    parameters, buffers, and the plain attributes a module names in `hugepage_attrs` (derived
    kernel layouts such as Int4Linear's, which decode reads instead of its buffers): a tensor, or
    a tuple of tensors (name then (attribute, index))."""
    for m in model.modules():
        if isinstance(m, KVCache):
            continue
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(m, kind).items():
                if t is not None and _movable(t):
                    yield m, kind, name, t
        for attr in getattr(m, "hugepage_attrs", ()):
            value = getattr(m, attr, None)
            if isinstance(value, tuple):
                yield from ((m, "attr", (attr, i), t) for i, t in enumerate(value) if _movable(t))
            elif _movable(value):
                yield m, "attr", attr, value


@torch.no_grad()
def use_hugepages(model: nn.Module, min_bytes: int | None = None) -> int:
    """Move `model`'s CPU weights into one huge-page arena in place (see the module docstring);
    returns the bytes moved: 0 where huge pages are not available or the weights are under
    `min_bytes` (default one huge page: nothing to gain below). Meant for load time, after the other
    transforms (fusion, quantisation) and before torch.compile. Tensors that share memory (a
    tied output, a kernel's view of its weight) are copied once and share it again."""
    if not hugepages_supported():
        return 0
    slots, unique = [], {}
    for m, kind, name, t in _slots(model):
        if t.untyped_storage().data_ptr() in _arenas:
            continue
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        unique.setdefault(key, t)
        slots.append((m, kind, name, t, key))
    keys = list(unique)
    sizes = [unique[k].numel() * unique[k].element_size() for k in keys]
    offsets, total = arena_layout(sizes)
    if total < (HUGE_PAGE if min_bytes is None else min_bytes):
        return 0
    arena = hugepage_arena(total)
    _arenas.add(arena.untyped_storage().data_ptr())
    moved = {}
    for key, off, n in zip(keys, offsets, sizes):
        t = unique[key]
        moved[key] = arena[off: off + n].view(t.dtype).view(t.shape).copy_(t)
    for m, kind, name, t, key in slots:
        if kind == "_parameters":
            t.data = moved[key]  # the Parameter object stays: ties and optimiser references hold
        elif kind == "_buffers":
            m._buffers[name] = moved[key]
        elif isinstance(name, tuple):
            attr, i = name
            value = getattr(m, attr)
            setattr(m, attr, (*value[:i], moved[key], *value[i + 1:]))
        else:
            setattr(m, name, moved[key])
    return total
