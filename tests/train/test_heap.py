"""train/heap.py: glibc keeps freed memory for the next step or returns it as it is freed, where it is glibc and
nobody opted out."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest

import llamaworks.train.trainer
from llamaworks.train.heap import (
    M_MMAP_MAX,
    M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD,
    OPT_OUT_ENV,
    keep_freed_memory,
    libc_name,
    skip_reason,
)
from llamaworks.train.trainer import train

GLIBC = "glibc 2.36"


def test_applied_on_glibc_with_a_plain_environment():
    assert skip_reason({"PATH": "/usr/bin", "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}, GLIBC) is None


@pytest.mark.parametrize("environ, libc, why", [
    ({OPT_OUT_ENV: "0"}, GLIBC, f"{OPT_OUT_ENV}=0"),
    ({}, "", "not glibc (unknown)"),  # musl, macOS, Windows: no CS_GNU_LIBC_VERSION
    ({"MALLOC_MMAP_THRESHOLD_": "1048576"}, GLIBC, "MALLOC_MMAP_THRESHOLD_"),
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, GLIBC, "MALLOC_TRIM_THRESHOLD_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.cpu.x=1"}, GLIBC, "glibc.malloc.mmap_max"),
])
def test_skipped_where_not_ours_to_set(environ, libc, why):
    reason = skip_reason(environ, libc)
    assert reason is not None and why in reason


def test_an_opt_out_env_other_than_0_keeps_it_on():
    assert skip_reason({OPT_OUT_ENV: "1"}, GLIBC) is None


def test_gives_back_what_was_freed_then_sets_no_mmap_and_no_trim():
    calls = []
    assert keep_freed_memory(True, {}, GLIBC, lambda p, v: calls.append((p, v)) or 1,
                             lambda pad: calls.append(("trim", pad)) or 1)
    assert calls == [("trim", 0), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)]


def test_returning_gives_back_what_was_freed_then_fixes_the_mmap_threshold_at_128_kib():
    calls = []
    assert not keep_freed_memory(False, {}, GLIBC, lambda p, v: calls.append((p, v)) or 1,
                                 lambda pad: calls.append(("trim", pad)) or 1)
    assert calls == [("trim", 0), (M_MMAP_THRESHOLD, 128 << 10)]


def test_skipping_calls_nothing_and_says_why(caplog):
    calls = []
    with caplog.at_level(logging.INFO, logger="llamaworks"):
        assert not keep_freed_memory(True, {}, "musl", lambda p, v: calls.append((p, v)) or 1)
    assert calls == [] and "not glibc" in caplog.text


def test_a_refused_setting_is_reported(caplog):
    assert not keep_freed_memory(True, {}, GLIBC, lambda p, v: 0, lambda pad: 1)
    assert "mallopt refused" in caplog.text


def _plain_env() -> dict[str, str]:
    """This environment without the opt-out and glibc's malloc settings: a child where the setting applies."""
    env = {k: v for k, v in os.environ.items() if k != OPT_OUT_ENV and not k.startswith("MALLOC_")}
    env.pop("GLIBC_TUNABLES", None)
    return env


# A 64 MiB block freed and allocated again: without the setting glibc mmaps it afresh and every
# page faults again (16,384 of 4 KiB); with it the heap's pages are reused.
REFAULTS = textwrap.dedent("""
    import ctypes, resource, sys
    from llamaworks.train.heap import keep_freed_memory
    applied = keep_freed_memory(sys.argv[1] == "on") if sys.argv[1] != "glibc" else False
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)
    n = 64 << 20
    def touch():
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        return p
    libc.free(touch())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    libc.free(touch())
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(not libc_name().startswith("glibc"), reason="glibc's mallopt")
def test_a_freed_block_is_reused_without_faulting_again():
    env = _plain_env()

    def faults(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", REFAULTS, mode], env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0], int(out[1])

    applied, kept = faults("on")
    not_kept, returned = faults("off")
    _, default = faults("glibc")
    assert (applied, not_kept) == ("True", "False")
    assert returned > 10_000, returned  # each 4 KiB page of 64 MiB faulted in again
    assert default > 10_000, default  # glibc's own threshold never rises above 32 MiB: the same
    assert kept < 1_000, kept


# glibc's defaults after one 16 MiB block is freed: its mmap threshold rises to 16 MiB, so 48 blocks of
# 8 MiB come from the heap, and once they are freed under a small live block at the heap's top they
# stay resident (384 MiB). With the memory returned (M_MMAP_THRESHOLD fixed at 128 KiB) each is unmapped.
RESIDENT_AFTER_FREE = textwrap.dedent("""
    import ctypes, sys
    from llamaworks.train.heap import keep_freed_memory
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096
    if sys.argv[1] == "return":
        assert not keep_freed_memory(False)
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)
    def touched(n):
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        return p
    libc.free(touched(16 << 20))
    before = rss()
    blocks = [touched(8 << 20) for _ in range(48)]
    pin = touched(64 << 10)
    for p in blocks:
        libc.free(p)
    print(rss() - before)
""")


@pytest.mark.skipif(not libc_name().startswith("glibc"), reason="glibc's mallopt")
def test_returned_memory_leaves_the_resident_set_where_glibc_keeps_it():
    env = _plain_env()

    def resident(mode: str) -> int:
        return int(subprocess.run([sys.executable, "-c", RESIDENT_AFTER_FREE, mode], env=env, capture_output=True,
                                  text=True, check=True).stdout)

    assert resident("glibc") > 300 << 20  # the freed 384 MiB still resident
    assert resident("return") < 32 << 20


# The set-up's freed memory: 2,000 blocks of 96 KiB (under the mmap threshold, so from the heap),
# written and freed but for the last one, which pins the heap's top (the automatic trim cannot
# give back what lies below a live block). Applying the setting returns them (malloc_trim).
SETUP_FREED = textwrap.dedent("""
    import ctypes, sys
    from llamaworks.train.heap import keep_freed_memory
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)
    blocks = []
    for _ in range(2000):
        p = libc.malloc(96 << 10)
        ctypes.memset(p, 1, 96 << 10)
        blocks.append(p)
    for p in blocks[:-1]:
        libc.free(p)
    before = rss()
    applied = keep_freed_memory(True)
    print(applied, before - rss())
""")


@pytest.mark.skipif(not libc_name().startswith("glibc"), reason="glibc's malloc_trim")
def test_what_the_set_up_freed_goes_back_before_the_heap_is_kept():
    env = _plain_env()
    out = subprocess.run([sys.executable, "-c", SETUP_FREED], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "True"
    assert int(out[1]) > 150 << 20, out  # ~187 MiB freed by the set-up, resident until trimmed


@pytest.mark.parametrize("keep", [True, False])
def test_the_trainer_applies_train_keep_freed_memory(make_config, tmp_path, monkeypatch, keep):
    seen = []
    monkeypatch.setattr(llamaworks.train.trainer, "keep_freed_memory", seen.append)
    train(make_config(tmp_path / "run", train={"max_steps": 1, "keep_freed_memory": keep},
                      eval={"every": 0}, checkpoint={"every": 10}))
    assert seen == [keep]
