"""Training checkpoints: atomic, the last N kept, each also a loadable model directory.

    OUT/checkpoints/step_00001000/
        params.json model.safetensors tokenizer.model   # `llamaworks generate --checkpoint` loads this
        train_state.pt                                   # optimizer, loader, RNG, step, tokens, config

A checkpoint is written to a hidden temporary folder and renamed into place when
complete, so a run killed while saving leaves the previous checkpoints intact and
`--resume` never sees a partial one.

A run of several processes (torchrun) writes a distributed checkpoint instead, with
torch.distributed.checkpoint (DCP): every rank writes its own shards of the model and
optimizer in parallel, and the metadata records each tensor's global shape, so any
other world size or parallelism (1 process included) loads it, resharding on read:

    OUT/checkpoints/step_00001000/
        params.json tokenizer.model                      # no model.safetensors
        dcp/.metadata dcp/__0_0.distcp ...               # model + optimizer, sharded
        train_state.pt                                   # loader, RNG, step, tokens, config

`load_checkpoint` reads either format into either kind of run; `dcp_to_model_dir` turns
a distributed checkpoint into a model directory for `llamaworks generate`. All ranks
must see the same out_dir (a shared file system across nodes).

A model with frozen parameters (LoRA/QLoRA fine-tuning: adapters on a frozen base) stores only
what training changes: the trainable tensors (trainable.safetensors, or the DCP folder without the
frozen ones), the optimizer (which holds state for those alone), loader and RNG, beside a record
of the base (`base`, train/finetune.py's fingerprint). The run rebuilds the frozen base from where
it started, and resume refuses a checkpoint whose base record is not the run's:

    OUT/checkpoints/step_00001000/
        params.json tokenizer.model trainable.safetensors train_state.pt

With checkpoint.async_mode = "async" (`Checkpointer`) training goes on while a checkpoint is
written: the save copies what it writes (a snapshot, on CPU), starts the write in a background
thread and returns; the write still goes to the hidden temporary folder, which is renamed into
place only once it is whole, so a run killed mid-write resumes from the checkpoint before. At
most one save is in flight: the next save, and the end of the run, first wait for it. Several
processes write through DCP's async_save; one process writes the same model directory as the
blocking save, from its snapshot, in the background thread.
"""

from __future__ import annotations

import copy
import logging
import random
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from llamaworks.atomic import atomic_directory, atomic_write_json
from llamaworks.model import ModelArgs, Transformer
from llamaworks.modeldir import (
    PARAMS,
    TOKENIZER,
    WEIGHTS,
    read_params,
    read_tokenizer,
    save_model,
    write_tokenizer_files,
)
from llamaworks.parallel.distributed import is_distributed, is_main
from llamaworks.weights import read_safetensors, save_safetensors

log = logging.getLogger("llamaworks")
STATE = "train_state.pt"
TRAINABLE = "trainable.safetensors"  # a checkpoint of a partly frozen model: its trainable tensors
DCP_DIR = "dcp"  # the distributed checkpoint's folder inside a step folder
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
    return [p for _, p in sorted(found)
            if (p / STATE).is_file() and ((p / WEIGHTS).is_file() or (p / TRAINABLE).is_file()
                                          or is_dcp_checkpoint(p))]


def is_dcp_checkpoint(path: Path) -> bool:
    return (Path(path) / DCP_DIR / ".metadata").is_file()


def trainable_names(model) -> set[str] | None:
    """The names of the parameters training changes when some are frozen (LoRA on a frozen base),
    which is all a checkpoint stores of the model then; None when every parameter trains."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return names if len(names) < len(list(model.parameters())) else None


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(out_dir: str | Path, step: int, model, tokenizer, optimizer, loader, extra: dict,
                    keep_last: int) -> Path:
    """Write the checkpoint of `step` and return its path, blocking until it is complete."""
    return Checkpointer(out_dir, keep_last).save(step, model, tokenizer, optimizer, loader, extra)


ASYNC_MODES = ("disabled", "async")


class Checkpointer:
    """A run's checkpoint writer: blocking (async_mode "disabled"), or writing in the background
    ("async") with at most one save in flight. Every rank of a distributed run makes its own and
    calls save and wait at the same steps (both are collective then)."""

    def __init__(self, out_dir: str | Path, keep_last: int, async_mode: str = "disabled"):
        assert async_mode in ASYNC_MODES, async_mode
        self.out_dir, self.keep_last, self.async_mode = Path(out_dir), keep_last, async_mode
        self._pending: Future | None = None  # the write in flight: its commit (rename, pruning) included
        self._executor: ThreadPoolExecutor | None = None
        self._group = None  # the gloo group DCP's background thread talks over

    def save(self, step: int, model, tokenizer, optimizer, loader, extra: dict) -> Path:
        """Start (async) or write (disabled) the checkpoint of `step`; the path it has once complete."""
        self.wait()  # never two in flight: the snapshot memory of one is freed before the next
        path = self.out_dir / "checkpoints" / f"step_{step:08d}"
        if is_distributed():
            write = self._start_dcp(path, step, model, tokenizer, optimizer, loader, extra)
        else:
            write = self._start_plain(path, step, model, tokenizer, optimizer, loader, extra)
        if self.async_mode == "disabled":
            write()
            self._finished(path)
        else:
            if self._executor is None:
                # a non-daemon thread: a process that ends (or fails) with a write in flight finishes it first
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamaworks-checkpoint")
            self._pending = self._executor.submit(write)
            log.info("writing checkpoint %s in the background", path)
        return path

    def wait(self) -> None:
        """Block until the checkpoint in flight (if any) is complete and visible; its error, if it failed."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        path = pending.result()
        self._finished(path)

    def close(self) -> None:
        """wait, then end the background thread."""
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _finished(self, path: Path) -> None:
        if is_distributed():
            dist.barrier()  # no rank goes on (or lists checkpoints) before the rename and pruning
        log.info("saved %scheckpoint %s", "distributed " if is_distributed() else "", path)

    def _start_plain(self, path: Path, step: int, model, tokenizer, optimizer, loader,
                     extra: dict) -> Callable[[], Path]:
        """Write the small files into the temporary folder now; return the write of the tensors and
        the training state and the rename, reading a snapshot when the write runs in the background."""
        snapshot = self.async_mode != "disabled"  # training would change the tensors under the write
        trainable = trainable_names(model)
        stack = ExitStack()
        tmp = stack.enter_context(atomic_directory(path, overwrite=True))
        try:
            assert tokenizer is None or tokenizer.vocab_size == model.args.vocab_size, (
                tokenizer.vocab_size, model.args.vocab_size)
            atomic_write_json(tmp / PARAMS, {k: v for k, v in model.args.to_params().items() if v is not None})
            if tokenizer is not None:
                write_tokenizer_files(tokenizer, tmp)
            # The frozen base of a partly frozen model is the run's starting point, not the checkpoint's to keep.
            weights = {k: _cpu(v, snapshot).contiguous() for k, v in model.state_dict().items()
                       if trainable is None or k in trainable}
            assert trainable is None or weights.keys() == trainable, sorted(trainable ^ weights.keys())[:5]
            state = {"step": step, "optimizer": optimizer.state_dict(), "loader": loader.state_dict(),
                     "rng": rng_state(), **extra}
            if snapshot:
                state = _cpu_copy(state)
        except BaseException:
            stack.__exit__(*sys.exc_info())
            raise

        def write() -> Path:
            with stack:  # the rename into place on success; the temporary folder removed on an error
                save_safetensors(weights, tmp / (WEIGHTS if trainable is None else TRAINABLE),
                                 metadata={"format": "pt"})
                torch.save(state, tmp / STATE)
            _prune(self.out_dir, path.parent, self.keep_last)
            return path

        return write

    def _start_dcp(self, path: Path, step: int, model, tokenizer, optimizer, loader,
                   extra: dict) -> Callable[[], Path]:
        """All ranks write their shards into rank 0's temporary folder, which rank 0 renames into
        place once DCP has written the metadata: dcp.save, or async_save's future, completes on rank
        0 only after every rank's shards are written (the coordinator gathers their results first)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer, options=_dcp_options(model))
        model_sd = _trainable_only(model, model_sd)
        stack = ExitStack()
        try:
            tmp = stack.enter_context(atomic_directory(path, overwrite=True)) if is_main() else None
            shared = [str(tmp) if is_main() else None]
            dist.broadcast_object_list(shared, src=0)
            tmp = Path(shared[0])
            if is_main():
                # The loader state is global (every rank's position in the one global stream is
                # the same), so rank 0's stands for all; so does its RNG (training draws none).
                state = {"step": step, "loader": loader.state_dict(), "rng": rng_state(), **extra}
                torch.save(state, tmp / STATE)
                atomic_write_json(tmp / PARAMS, {k: v for k, v in model.args.to_params().items() if v is not None})
                if tokenizer is not None:
                    write_tokenizer_files(tokenizer, tmp)
            sd = {"model": model_sd, "optim": optim_sd}
            if self.async_mode == "disabled":
                dcp.save(sd, checkpoint_id=tmp / DCP_DIR)
                future = None
            else:
                if self._group is None:
                    # DCP's background thread runs collectives (plan, gather of the write results);
                    # on the training's own group they would interleave with FSDP's and TP's.
                    self._group = dist.new_group(backend="gloo")
                # async_save copies the state dict to CPU (its default stager) before it returns,
                # so the optimizer steps that follow do not reach the checkpoint.
                future = dcp.async_save(sd, checkpoint_id=tmp / DCP_DIR, process_group=self._group)
        except BaseException:
            stack.__exit__(*sys.exc_info())
            raise

        def write() -> Path:
            with stack:
                if future is not None:
                    future.result()
            if is_main():
                _prune(self.out_dir, path.parent, self.keep_last)
            return path

        return write


def _cpu(t: torch.Tensor, copy: bool) -> torch.Tensor:
    return t.detach().to("cpu", copy=copy)


def _cpu_copy(obj):
    """A copy of a (nested) state dict whose tensors are CPU copies: what training does next
    does not change it."""
    if isinstance(obj, torch.Tensor):
        return _cpu(obj, copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def _prune(out_dir, root: Path, keep_last: int) -> None:
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step_*"):  # temporary folders of a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer, loader, base: dict | None = None) -> dict:
    """Restore model weights, optimizer, loader and RNG in place; return the saved state.

    Either format into either kind of run: a distributed checkpoint is resharded by DCP to
    whatever this run's parallelism is; a single-process checkpoint loaded by a run of
    several processes is read whole by every rank and each keeps its shards. A checkpoint of
    a partly frozen model restores the trainable tensors over the run's own frozen ones, once
    `base` (what the run's frozen weights are, see check_base) is the one it was saved with.
    """
    path = Path(path)
    state = _read_state(path)
    check_base(path, state.get("base"), base)
    if is_dcp_checkpoint(path):
        return _load_dcp_checkpoint(path, model, optimizer, loader, state)
    if is_distributed():
        return _load_plain_checkpoint_distributed(path, model, optimizer, loader, state)
    partial = (path / TRAINABLE).is_file()
    file = path / (TRAINABLE if partial else WEIGHTS)
    weights = read_safetensors(file)
    with torch.no_grad():
        own = model.state_dict()
        if partial:
            trainable = trainable_names(model) or set(own)
            if trainable != set(weights):
                raise ValueError(f"{file}: holds the trainable tensors {sorted(weights)[:3]}..., this run trains "
                                 f"{sorted(trainable)[:3]}...: it belongs to a run of another method or adapter "
                                 "configuration (finetune.method, finetune.lora_*)")
            own = {k: own[k] for k in trainable}
        missing = sorted(set(own) - set(weights))
        if missing:
            raise ValueError(f"{file}: checkpoint lacks {missing[:3]}; it belongs to a different model")
        for k, v in own.items():
            if v.shape != weights[k].shape:
                raise ValueError(f"{file}: {k} has shape {tuple(weights[k].shape)}, the model "
                                 f"expects {tuple(v.shape)}; the run's model config changed since this "
                                 "checkpoint")
            v.copy_(weights[k])
    optimizer.load_state_dict(state["optimizer"])
    loader.load_state_dict(state["loader"])
    set_rng_state(state["rng"])
    return state


def check_base(path: Path, saved: dict | None, base: dict | None) -> None:
    """A checkpoint over a frozen base resumes only over that base: `saved` (the checkpoint's record)
    and `base` (this run's) must agree on the model's parameters and weights; the path may differ
    (the same files moved). A checkpoint without a record (pretraining, full fine-tuning, or one
    that stores its base) has nothing to check."""
    if saved is None or base is None:
        return
    differs = [k for k in ("params", "digest") if saved.get(k) != base.get(k)]
    if differs:
        what = "its parameters (params.json)" if "params" in differs else "its weights"
        raise ValueError(f"{path}: this checkpoint was trained over the base model {saved.get('path')}, but this "
                         f"run's base {base.get('path')} differs in {what}: the trained tensors would be resumed "
                         f"over other frozen weights; resume with finetune.checkpoint = {saved.get('path')!r} (the "
                         "base the run started from), or start a new run in another run.out_dir")


def _read_state(path: Path) -> dict:
    try:
        return torch.load(path / STATE, map_location="cpu", weights_only=False)
    except Exception as e:  # a corrupt pickle can raise almost anything
        raise ValueError(f"{path / STATE}: cannot read the training state ({e}); delete this checkpoint "
                         "folder to resume from the one before") from None


def _dcp_options(model):
    """DCP state-dict options: a partly frozen model's checkpoint leaves the frozen parameters out
    (saving) and does not ask for them (loading: the run built them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    partial = trainable_names(model) is not None
    return StateDictOptions(ignore_frozen_params=partial, strict=not partial)


def _trainable_only(model, model_sd: dict) -> dict:
    """A partly frozen model's state dict without its frozen tensors: ignore_frozen_params drops
    frozen parameters, not buffers, which is what a quantised frozen base (QLoRA) holds."""
    trainable = trainable_names(model)
    return model_sd if trainable is None else {k: v for k, v in model_sd.items() if k in trainable}


def _load_dcp_checkpoint(path: Path, model, optimizer, loader, state: dict) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # get_state_dict gives this run's layout (plain tensors, or DTensor shards keyed by the
    # same names); DCP fills it from whatever layout was saved, then set_state_dict puts it
    # back into the (possibly sharded) parameters and optimizer.
    options = _dcp_options(model)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    model_sd = _trainable_only(model, model_sd)
    try:
        _dcp_load({"model": model_sd, "optim": optim_sd}, path / DCP_DIR)
    except Exception as e:
        raise ValueError(f"{path / DCP_DIR}: cannot load the distributed checkpoint into this model ({e}); it "
                         "belongs to a different model or the run's model config changed") from e
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)
    loader.load_state_dict(state["loader"])
    set_rng_state(state["rng"])
    return state


def _dcp_load(state: dict, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        # One process without a process group is a supported way to read: DCP says so loudly.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=folder)


def _load_plain_checkpoint_distributed(path: Path, model, optimizer, loader, state: dict) -> dict:
    """A single-process checkpoint into a sharded run: full tensors in, each rank keeps its part."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    partial = (path / TRAINABLE).is_file()
    weights = read_safetensors(path / (TRAINABLE if partial else WEIGHTS))
    # optimizer.state_dict() numbers parameters in param_groups order; the sharded run built
    # its optimizer the same way, so the numbers map to the same names (which DSD wants).
    name_of = {id(p): n for n, p in model.named_parameters()}
    fqns = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved = state["optimizer"]
    optim_sd = {"state": {fqns[i]: v for i, v in saved["state"].items()},
                "param_groups": [{**g, "params": [fqns[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True, strict=not partial))
    loader.load_state_dict(state["loader"])
    set_rng_state(state["rng"])
    return state


def full_model_state_dict(model) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on CPU: gathered onto rank 0 (None elsewhere) when sharded."""
    if not is_distributed():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if is_main() else None


def save_model_dir(model, tokenizer, path: Path) -> Path:
    """`modeldir.save_model` for a model that may be sharded: every rank must call it."""
    if not is_distributed():
        return save_model(model, tokenizer, path)
    sd = full_model_state_dict(model)
    if is_main():
        save_model(_plain_model(model.args, sd), tokenizer, path)
    dist.barrier()
    return path


def _plain_model(args, state: dict[str, torch.Tensor]):
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state, strict=True, assign=True)
    model.init_rope(torch.device("cpu"))
    return model


def dcp_to_model_dir(checkpoint: str | Path, out: str | Path) -> Path:
    """Convert a distributed checkpoint (a step folder) to a single-file model directory
    (params.json, model.safetensors, tokenizer.model) that `llamaworks generate` loads.
    Runs in one process, no process group needed: DCP assembles the shards."""

    checkpoint = Path(checkpoint)
    if not is_dcp_checkpoint(checkpoint):
        raise ValueError(f"{checkpoint} is not a distributed checkpoint (no {DCP_DIR}/.metadata); a "
                         "single-process checkpoint is already a model directory")
    base = _read_state(checkpoint).get("base")
    if base is not None:
        raise ValueError(f"{checkpoint} holds only the trainable tensors (LoRA adapters) of a fine-tuning run over "
                         f"{base.get('path')}, not a whole model; the run's adapter/ folder is its result "
                         "(llamaworks merge --checkpoint BASE --adapter DIR --out DIR writes a model directory)")
    args = ModelArgs.from_params(read_params(checkpoint / PARAMS))
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    _dcp_load(state, checkpoint / DCP_DIR)  # fills the tensors in place
    model.init_rope(torch.device("cpu"))
    tok = read_tokenizer(checkpoint) if (checkpoint / TOKENIZER).is_file() else None
    return save_model(model.eval(), tok, out)
