"""Experiment tracking: what a team watches live while a run trains.

One interface (`Tracker`: the resolved config once, then scalars per step) with two backends,
TensorBoard event files (`log.tensorboard = true`, in OUT/tensorboard) and Weights & Biases
(`log.wandb = true`, offline unless WANDB_MODE says otherwise, its run folder under OUT/wandb).
metrics.jsonl and the loss-curve PNG are written as before; the trackers receive the same rows.
Only rank 0 tracks (the trainer builds no backend elsewhere). Both packages are optional extras
(`pip install llamaworks[tensorboard]`, `[wandb]`), imported only when asked for.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from pathlib import Path
from typing import Any, Protocol

import torch

log = logging.getLogger("llamaworks")


class Tracker(Protocol):
    def log_config(self, config: dict, text: str) -> None: ...

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def _missing(package: str, key: str, error: ImportError) -> ValueError:
    return ValueError(f"log.{key} = true needs the {package} package, which cannot be imported ({error}); "
                      f"install it with `pip install 'llamaworks[{key}]'` or set log.{key} = false")


class TensorBoardTracker:
    """Scalars and the config (as text) in TensorBoard event files under `log_dir`."""

    def __init__(self, log_dir: Path, resumed_at: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise _missing("tensorboard", "tensorboard", e) from None
        # A resumed run logs the steps after its checkpoint again: purge_step hides what an earlier
        # process logged from there on, as metrics.jsonl drops those lines.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resumed_at + 1 if resumed_at else None)
        self.log_dir = Path(log_dir)

    def log_config(self, config: dict, text: str) -> None:
        # Markdown: indenting by 4 spaces shows the TOML as a code block in TensorBoard's Text tab.
        self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), 0)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a killed run keeps what it logged, as metrics.jsonl does

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run. Mode: WANDB_MODE when set, else offline, so a run on a machine
    without network (or an account) still records everything (`wandb sync` uploads it later)."""

    def __init__(self, out: Path, project: str, name: str):
        try:
            import wandb
        except ImportError as e:
            raise _missing("wandb", "wandb", e) from None
        self.wandb = wandb
        self.mode = os.environ.get("WANDB_MODE") or "offline"
        out.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=name or None, dir=str(out), mode=self.mode,
                              settings=wandb.Settings(console="off", silent=True))

    def log_config(self, config: dict, text: str) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The configured backends behind one Tracker; no backend (other ranks, none asked): no-ops."""

    def __init__(self, backends: list[Tracker] | None = None):
        self.backends = backends or []

    def log_config(self, config: dict, text: str) -> None:
        for b in self.backends:
            b.log_config(config, text)

    def log_scalars(self, step: int, row: dict[str, Any]) -> None:
        scalars = tracked_scalars(row)
        if scalars:
            for b in self.backends:
                b.log_scalars(step, scalars)

    def close(self) -> None:
        for b in self.backends:
            b.close()


def tracked_scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row's numbers, the step excluded (it is the x axis): booleans, strings and
    missing values (None) are not scalars."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def check_backends(log_cfg) -> None:
    """Import the packages log.tensorboard / log.wandb need: a missing one is an error before the run
    starts, not after the model is built."""
    for key, module in (("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")):
        if getattr(log_cfg, key, False):
            try:
                __import__(module)
            except ImportError as e:
                raise _missing(key, key, e) from None


def build_trackers(log_cfg, out: Path, config: dict, config_text: str, is_main: bool,
                   resumed_at: int = 0) -> Trackers:
    """The backends log.tensorboard / log.wandb ask for, on rank 0, given the resolved config;
    resumed_at: the checkpoint's step when resuming."""
    backends: list[Tracker] = []
    if is_main:
        if getattr(log_cfg, "tensorboard", False):
            backends.append(TensorBoardTracker(out / "tensorboard", resumed_at))
        if getattr(log_cfg, "wandb", False):
            backends.append(WandbTracker(out, getattr(log_cfg, "wandb_project", "llamaworks"),
                                         getattr(log_cfg, "wandb_name", "") or out.name))
    trackers = Trackers(backends)
    trackers.log_config(config, config_text)
    return trackers


def peak_memory_gb(device: torch.device) -> float:
    """The peak memory this process has used: CUDA's allocated peak on a GPU, else the
    process's peak resident set (ru_maxrss: kilobytes on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1e9 if sys.platform == "darwin" else 1e6)
