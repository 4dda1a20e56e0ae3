"""The machine a benchmark ran on: one record for every script in benchmarks/ (issue 16).

    from machine import add_label_argument, machine_record, measure_bandwidth   # benchmarks/ is on sys.path

`machine_record(label)` returns the CPU model, the CPU flags the kernels depend on (AVX2,
AVX-512 and its VNNI/BF16 parts, AMX), logical CPUs, the threads torch uses, the measured read
bandwidth (x.sum() over 1 GiB, the best of 5), the versions of torch, transformers and
llama-cpp-python (and of any other library named), the load average, the date (UTC) and a
label: "contended" or "quiet machine". The label is what `--label` said (add_label_argument),
else it is derived from the load average when the record is taken and says so, because
figures taken on a shared machine must never pass for quiet ones.

`python benchmarks/machine.py` prints the record as JSON: a script that must not grow its own
memory (the bandwidth probe allocates 1 GiB, which Linux's ru_maxrss passes on to every child
forked afterwards) takes it from there (`record_in_child`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import time
from pathlib import Path

# The flags the kernels (ours, torch's, llama.cpp's) choose code paths by; every amx_* flag too.
KERNEL_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
                "avx512_vnni", "avx512_bf16", "avx512_fp16")
# Libraries whose version every record carries (distribution names, read without importing them).
LIBRARIES = ("torch", "transformers", "llama-cpp-python")
# Above this 1-minute load average per logical CPU an unlabelled run is recorded as contended.
CONTENDED_LOAD_PER_CPU = 0.5


def cpu_model_and_flags(text: str | None = None) -> tuple[str, list[str]]:
    """The CPU's model name and its kernel-relevant flags, from /proc/cpuinfo (`text` for tests)."""
    model, flags = platform.processor() or platform.machine(), []
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: the model name from platform only
            text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key == "flags":
            have = set(value.split())
            flags = [f for f in KERNEL_FLAGS if f in have] + sorted(f for f in have if f.startswith("amx"))
            break  # every CPU lists the same flags; the model name comes before them
    return model, flags


def measure_bandwidth(gb: float = 1.0, device: str = "cpu") -> float:
    """Read bandwidth in bytes/s: the best of 5 x.sum() over `gb` GiB of fp32 (after one untimed)."""
    import torch

    x = torch.ones(int(gb * 2**30) // 4, device=device)
    cuda = torch.device(device).type == "cuda"
    x.sum()
    best = float("inf")
    for _ in range(5):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x.sum()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def versions(names: tuple[str, ...] | list[str] = LIBRARIES) -> dict[str, str | None]:
    """Installed versions (None: not installed), from the package metadata: nothing is imported."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def auto_label(load: list[float] | None, cpus: int) -> str:
    """'contended' or 'quiet machine' from the 1-minute load average (unknown load: contended)."""
    if load is None or load[0] > CONTENDED_LOAD_PER_CPU * cpus:
        return "contended"
    return "quiet machine"


def add_label_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--label", default=None,
                    help='recorded with the machine, e.g. "contended" or "quiet machine" (default: derived from '
                         "the load average when the run starts, and marked as derived)")


def machine_record(label: str | None = None, bandwidth: float | bool = True, threads: int | None = None,
                   libraries: tuple[str, ...] = (), device: str = "cpu", **extra) -> dict:
    """The machine as one JSON-able dict. bandwidth: True measures it now, a number is one measured
    already (bytes/s), False records None. threads: what the run uses (default torch's count)."""
    import torch

    cpu, flags = cpu_model_and_flags()
    cpus = os.cpu_count() or 1
    load = loadavg()
    if isinstance(bandwidth, bool):
        bandwidth = measure_bandwidth(device=device) if bandwidth else None
    record = {
        "label": label or auto_label(load, cpus),
        "label_source": "given" if label else f"derived from the load average {load} on {cpus} CPUs",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu, "cpu_flags": flags, "logical_cpus": cpus,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "read_bandwidth": bandwidth, "read_bandwidth_probe": "x.sum() over 1 GiB fp32, best of 5",
        "loadavg": load, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        **versions(tuple(dict.fromkeys(LIBRARIES + tuple(libraries)))),
    }
    if torch.device(device).type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    record.update(extra)
    return record


def record_in_child(label: str | None = None, threads: int | None = None, libraries: tuple[str, ...] = ()) -> dict:
    """machine_record taken in a child process: this one's memory peak stays its own."""
    import subprocess
    import sys

    cmd = [sys.executable, __file__, "--libraries", *libraries] + (["--label", label] if label else [])
    cmd += ["--threads", str(threads)] if threads is not None else []
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_label_argument(ap)
    ap.add_argument("--threads", type=int, default=None, help="the threads the run uses (default torch's)")
    ap.add_argument("--libraries", nargs="*", default=[], help="more distributions whose versions to record")
    a = ap.parse_args()
    print(json.dumps(machine_record(a.label, threads=a.threads, libraries=tuple(a.libraries)), indent=2))


def write_result(path: str | Path, result: dict) -> Path:
    """Write a benchmark's JSON (with its machine record) atomically: a run cut short leaves the
    previous file whole, not half of a new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path
