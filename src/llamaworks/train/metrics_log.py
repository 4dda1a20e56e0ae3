"""What a run reports: throughput, MFU against a measured peak, metrics.jsonl, the loss curve."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger("llamaworks")


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Dense matmul FLOP/s this device reaches: the denominator of MFU when none is given.

    A square matmul large enough to saturate the device (2048 on CPU, 8192 on GPU),
    best of a few timed runs after a warm-up (a peak: noise only ever slows a run down).
    """
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:  # skip warm-up iterations
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)


class MetricsLog:
    """Append-only metrics.jsonl, one JSON object per line, flushed at each write so a
    killed run keeps every line it logged."""

    def __init__(self, path: Path, truncate_after_step: int | None = None):
        self.path = Path(path)
        if truncate_after_step is not None and self.path.exists():
            # On resume, drop lines past the checkpoint: they will be logged again.
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= truncate_after_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        self._f = open(self.path, "a")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for ln in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:
            # A run killed in the middle of a write leaves its last line torn; every
            # complete line before it is still good, and resuming rewrites the rest.
            continue
    return rows


def plot_loss_curve(metrics_path: Path, out_png: Path, title: str = "") -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no loss curve (pip install 'llamaworks[plot]')")
        return None
    rows = read_metrics(metrics_path)
    train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", ms=4)
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
