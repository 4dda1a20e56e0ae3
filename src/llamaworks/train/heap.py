"""What glibc's malloc does with the memory a CPU training step frees: keep it for the next step
(speed) or give it back at once (memory).

A step on the CPU allocates its activations and gradients afresh and frees them by its end. glibc
serves every block above its mmap threshold (128 KiB, raised as large blocks are freed but never
above 32 MiB) with a fresh mmap and returns it with munmap when it is freed, and it gives the free
top of its heap back too (trim threshold). So each step faults those pages in again, 4 KiB at a
time, every page zeroed by the kernel first: at config B (1.26B, batch 4 x 512) most activations
are (2048, 2048) or (2048, 5632) fp32 tensors of 17 and 46 MB, gigabytes a step (docs/finetune.md
has the counts and times). And once the threshold has risen, blocks below it come from the heap,
where a free block between live ones stays resident: glibc's defaults are neither policy.

`keep_freed_memory(True)` (train.keep_freed_memory = true, the default but for QLoRA) sets
M_MMAP_MAX to 0 (every block from the heap, none mmapped on its own) and M_TRIM_THRESHOLD to -1
(the heap is never trimmed): the second step reuses the pages of the first. The process's resident
memory is then its heap's high-water mark, free blocks between live ones included.

`keep_freed_memory(False)` (train.keep_freed_memory = false, finetune's default for --method qlora,
whose point is memory) fixes M_MMAP_THRESHOLD at 128 KiB (RETURN_THRESHOLD, glibc's starting
value), which also stops glibc raising it: every block of 128 KiB and more is mapped on its own and
unmapped when freed, so the resident memory follows the live memory, at the price of faulting each
step's activations in afresh. The trainer makes this setting before the weights are filled in: made
after, the set-up's blocks already sit in the heap (under the threshold glibc had raised on its
own), and the steps' small blocks fault the holes between them in again (a QLoRA step at config B
grew the heap by ~18 MiB a block). QLoRA at config B: 2,492 MiB peak this way, 41% of fp32 LoRA's
with the same setting; 7.0 GiB at glibc's defaults, 7.4 GiB with the heap kept (docs/finetune.md).

Either does nothing (and says why) where the setting does not exist or is not ours to make: C
libraries other than glibc (macOS, musl, Windows), an environment that sets glibc's malloc itself
(MALLOC_MMAP_THRESHOLD_, MALLOC_MMAP_MAX_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_ or
glibc.malloc.* in GLIBC_TUNABLES: the user's choice wins) and LLAMAWORKS_KEEP_FREED_MEMORY=0 in the
environment (glibc's defaults: the test suite sets it, so one pytest process keeps its allocator
as it is). mallopt is process-wide and one-way here: the trainer applies it at `build` (keeping once
the weights are in place, returning before), on the CPU only (GPU tensors come from torch's caching
allocator), and both first give back what was freed so far (malloc_trim): a fine-tune reads its base
in fp32 and frees it as it quantises (QLoRA) or casts it, and a heap that is never trimmed would keep
those gigabytes resident for the whole run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable, Mapping

log = logging.getLogger("llamaworks")

OPT_OUT_ENV = "LLAMAWORKS_KEEP_FREED_MEMORY"
# glibc's own environment settings of what mallopt would change (mallopt after start-up overrides them).
GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
GLIBC_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.mmap_max", "glibc.malloc.trim_threshold",
                  "glibc.malloc.top_pad")
# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
KEEP_SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # no mmapped blocks; -1: never trim the heap
# Blocks from 128 KiB up mapped on their own and unmapped when freed: a step's activations and its
# mid-sized temporaries (LoRA's (tokens, r) products, gradients) go back; the heap keeps the small
# ones. As MALLOC_MMAP_THRESHOLD_=131072, which also fixes the threshold where glibc would raise it.
RETURN_THRESHOLD = 128 << 10
RETURN_SETTINGS = ((M_MMAP_THRESHOLD, RETURN_THRESHOLD),)


def libc_name() -> str:
    """'glibc 2.36' on glibc, '' elsewhere (musl has no CS_GNU_LIBC_VERSION; macOS, Windows)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        return ""


def skip_reason(environ: Mapping[str, str], libc: str) -> str | None:
    """Why neither setting (keep or return) is applied, or None to apply one: the opt-out first,
    then a C library without it, then an environment that configures glibc's malloc itself."""
    if environ.get(OPT_OUT_ENV, "1").strip() == "0":
        return f"{OPT_OUT_ENV}=0"
    if not libc.startswith("glibc"):
        return f"the C library is not glibc ({libc or 'unknown'})"
    named = [k for k in GLIBC_ENV if k in environ]
    named += [t for t in GLIBC_TUNABLES if t in environ.get("GLIBC_TUNABLES", "")]
    if named:
        return f"the environment sets glibc's malloc ({', '.join(named)})"
    return None


def _glibc_mallopt() -> Callable[[int, int], int]:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc.mallopt


def _glibc_malloc_trim() -> Callable[[int], int]:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    libc.malloc_trim.restype = ctypes.c_int
    return libc.malloc_trim


def keep_freed_memory(enabled: bool = True, environ: Mapping[str, str] | None = None, libc: str | None = None,
                      mallopt: Callable[[int, int], int] | None = None,
                      malloc_trim: Callable[[int], int] | None = None) -> bool:
    """Have glibc keep freed memory in the process for reuse (`enabled`) or return every block of
    RETURN_THRESHOLD and more when it is freed (module docstring), after giving back what was freed
    so far; True when the memory is kept. `environ`, `libc`, `mallopt` and `malloc_trim` default to
    the process's (tests pass their own)."""
    reason = skip_reason(os.environ if environ is None else environ, libc_name() if libc is None else libc)
    if reason is not None:
        log.info("glibc's malloc left as it is (freed memory neither kept nor returned at once): %s", reason)
        return False
    # What the set-up freed (float weights read, then quantised or cast) goes back first; from here
    # on the heap holds the steps' own blocks (and the long-lived small ones).
    (malloc_trim or _glibc_malloc_trim())(0)
    mallopt = mallopt or _glibc_mallopt()
    settings = KEEP_SETTINGS if enabled else RETURN_SETTINGS
    # mallopt returns 1 on success; a partial setting (heap blocks, still trimmed) would only move the cost.
    if not all(mallopt(param, value) == 1 for param, value in settings):
        log.warning("mallopt refused %s: glibc's malloc left as it is",
                    "M_MMAP_MAX=0 / M_TRIM_THRESHOLD=-1" if enabled else f"M_MMAP_THRESHOLD={RETURN_THRESHOLD}")
        return False
    if enabled:
        log.info("freed memory stays in the process for the next step (glibc M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1; "
                 "train.keep_freed_memory=false returns it, %s=0 leaves glibc's defaults)", OPT_OUT_ENV)
    else:
        log.info("freed memory goes back to the system as it is freed (glibc M_MMAP_THRESHOLD=%d: resident memory "
                 "follows live memory; train.keep_freed_memory=true keeps it for speed)", RETURN_THRESHOLD)
    return enabled
