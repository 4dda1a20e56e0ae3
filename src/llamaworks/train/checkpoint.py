"""Training checkpoints: atomic, the last N kept, each also a loadable model directory.

    OUT/checkpoints/step_00001000/
        params.json model.safetensors tokenizer.model   # `llamaworks generate --checkpoint` loads this
        train_state.pt                                   # optimizer, loader, RNG, step, tokens, config

A checkpoint is written to a hidden temporary folder and renamed into place when
complete, so a run killed while saving leaves the previous checkpoints intact and
`--resume` never sees a partial one.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from llamaworks.atomic import atomic_directory
from llamaworks.modeldir import WEIGHTS, read_safetensors, write_model_files

log = logging.getLogger("llamaworks")
STATE = "train_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders start with '.' and are skipped)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE).is_file() and (p / WEIGHTS).is_file()]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(out_dir: str | Path, step: int, model, tokenizer, optimizer, loader, extra: dict,
                    keep_last: int) -> Path:
    root = Path(out_dir) / "checkpoints"
    path = root / f"step_{step:08d}"
    with atomic_directory(path, overwrite=True) as tmp:
        write_model_files(model, tokenizer, tmp)
        state = {"step": step, "optimizer": optimizer.state_dict(), "loader": loader.state_dict(),
                 "rng": rng_state(), **extra}
        torch.save(state, tmp / STATE)
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step_*"):  # temporary folders of a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    log.info("saved checkpoint %s", path)
    return path


def load_checkpoint(path: Path, model, optimizer, loader) -> dict:
    """Restore model weights, optimizer, loader and RNG in place; return the saved state."""
    weights = read_safetensors(path / WEIGHTS)
    with torch.no_grad():
        own = model.state_dict()
        missing = sorted(set(own) - set(weights))
        if missing:
            raise ValueError(f"{path / WEIGHTS}: checkpoint lacks {missing[:3]}; it belongs to a different "
                             "model")
        for k, v in own.items():
            if v.shape != weights[k].shape:
                raise ValueError(f"{path / WEIGHTS}: {k} has shape {tuple(weights[k].shape)}, the model "
                                 f"expects {tuple(v.shape)}; the run's model config changed since this "
                                 "checkpoint")
            v.copy_(weights[k])
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=False)
    except Exception as e:  # a corrupt pickle can raise almost anything
        raise ValueError(f"{path / STATE}: cannot read the training state ({e}); delete this checkpoint "
                         "folder to resume from the one before") from None
    optimizer.load_state_dict(state["optimizer"])
    loader.load_state_dict(state["loader"])
    set_rng_state(state["rng"])
    return state
