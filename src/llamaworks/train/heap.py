"""Keep the memory a training step frees for the next step (glibc's malloc, CPU training).

A step on the CPU allocates its activations and gradients afresh and frees them by its end. glibc
serves every block above its mmap threshold (128 KiB, raised as large blocks are freed but never
above 32 MiB) with a fresh mmap and returns it with munmap when it is freed, and it gives the free
top of its heap back too (trim threshold). So each step faults those pages in again, 4 KiB at a
time, every page zeroed by the kernel first: at config B (1.26B, batch 4 x 512) most activations
are (2048, 2048) or (2048, 5632) fp32 tensors of 17 and 46 MB, gigabytes a step (docs/finetune.md
has the counts and times).

`keep_freed_memory` sets M_MMAP_MAX to 0 (every block from the heap, none mmapped on its own)
and M_TRIM_THRESHOLD to -1 (the heap is never trimmed): the second step reuses the pages of the
first. The process's resident memory is then its heap's high-water mark, free blocks between live
ones included, instead of the live memory: what docs/finetune.md's peak figures are measured with.

It does nothing (and says why) where the setting does not exist or is not ours to make: C
libraries other than glibc (macOS, musl, Windows), an environment that sets glibc's malloc itself
(MALLOC_MMAP_THRESHOLD_, MALLOC_MMAP_MAX_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_ or
glibc.malloc.* in GLIBC_TUNABLES: the user's choice wins), LLAMAWORKS_KEEP_FREED_MEMORY=0 in the
environment (the test suite sets it, so one pytest process does not keep every test's peak), and
train.keep_freed_memory = false in the job config. mallopt is process-wide and one-way here: the
trainer applies it at `build` once the weights are in place, on the CPU only (GPU tensors come from
torch's caching allocator), and first gives back what the set-up freed (malloc_trim): a fine-tune
reads its base in fp32 and frees it as it quantises (QLoRA) or casts it, and a heap that is never
trimmed would keep those gigabytes resident for the whole run (QLoRA at config B: 7.1 GiB instead
of 2.5).
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
M_MMAP_MAX = -4
SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # no mmapped blocks; -1: never trim the heap


def libc_name() -> str:
    """'glibc 2.36' on glibc, '' elsewhere (musl has no CS_GNU_LIBC_VERSION; macOS, Windows)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        return ""


def skip_reason(enabled: bool, environ: Mapping[str, str], libc: str) -> str | None:
    """Why the setting is not applied, or None to apply it: the opt-outs first, then a C library
    without it, then an environment that configures glibc's malloc itself."""
    if not enabled:
        return "train.keep_freed_memory is false"
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
    """Have glibc keep freed memory in the process for reuse (module docstring), after giving back
    what was freed so far; True when applied. `environ`, `libc`, `mallopt` and `malloc_trim`
    default to the process's (tests pass their own)."""
    reason = skip_reason(enabled, os.environ if environ is None else environ,
                         libc_name() if libc is None else libc)
    if reason is not None:
        log.info("freed memory goes back to the system after each step: %s", reason)
        return False
    # What the set-up freed (float weights read, then quantised or cast) goes back before the heap
    # stops being trimmed; from here on it holds the steps' own blocks only.
    (malloc_trim or _glibc_malloc_trim())(0)
    mallopt = mallopt or _glibc_mallopt()
    # mallopt returns 1 on success; a partial setting (heap blocks, still trimmed) would only move the cost.
    if not all(mallopt(param, value) == 1 for param, value in SETTINGS):
        log.warning("mallopt refused M_MMAP_MAX=0 / M_TRIM_THRESHOLD=-1: freed memory goes back to the system")
        return False
    log.info("freed memory stays in the process for the next step (glibc M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1; "
             "train.keep_freed_memory=false or %s=0 to return it)", OPT_OUT_ENV)
    return True
