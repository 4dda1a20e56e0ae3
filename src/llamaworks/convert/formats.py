"""Every checkpoint format behind two functions: load_checkpoint(fmt, path) and
save_checkpoint(fmt, model, ...), plus load_any(path), which tells the format from the path.

Formats: `native` (a llamaworks model directory), `meta` (consolidated.NN.pth shards +
params.json), `hf` (a transformers folder: config.json + safetensors or .bin) and `gguf`
(a llama.cpp file). Each loader returns (model, tokenizer) with Meta's state-dict names.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from llamaworks import modeldir
from llamaworks.atomic import atomic_directory
from llamaworks.convert.gguf import load_gguf, write_gguf
from llamaworks.convert.hf import load_hf, write_hf_files
from llamaworks.convert.meta import SHARD, load_meta, write_meta_files
from llamaworks.device import parse_dtype
from llamaworks.paths import path_kind
from llamaworks.tokenizer.hf import HFTokenizer

SRC_FORMATS = ("meta", "hf", "native", "gguf")
DST_FORMATS = ("native", "hf", "gguf", "meta")


def detect_format(path: str | os.PathLike) -> str:
    """The format of a checkpoint path: a .gguf file, a Meta folder (consolidated.NN.pth), a
    Hugging Face folder (config.json) or a llamaworks model directory (the default)."""
    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():
        return "gguf"
    if path.is_dir():
        if any(SHARD.match(p.name) for p in path.iterdir()):
            return "meta"
        # An HF folder may also hold model.safetensors; only a model directory has params.json.
        if (path / "config.json").is_file() and not (path / modeldir.PARAMS).is_file():
            return "hf"
    return "native"  # its loader names what is missing


def load_any(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
             tokenizer: bool = True, prepare: Callable | None = None):
    """(model, tokenizer) from any checkpoint path, in eval mode on `device`. `prepare(model)`
    runs on the empty (meta-device) model of a model directory before its weights are
    assigned: quantised layers are swapped in there (inference/quant.py)."""
    fmt = detect_format(path)
    if fmt == "native":
        return modeldir.load_model(path, device=device, dtype=dtype, tokenizer=tokenizer, prepare=prepare)
    model, tok = load_checkpoint(fmt, path, dtype=parse_dtype(dtype))
    return model.to(device).eval(), (tok if tokenizer else None)


def load_checkpoint(fmt: str, src: str | os.PathLike, dtype: torch.dtype | None = None, progress: bool = False):
    """(model, tokenizer) from a checkpoint in `fmt`, memory-mapped where the format allows."""
    src = Path(src)
    if fmt not in SRC_FORMATS:
        raise ValueError(f"--from {fmt!r}: unknown source format; choose one of {', '.join(SRC_FORMATS)}")
    kind = path_kind(src)
    if kind == "missing":
        raise FileNotFoundError(f"source {src} does not exist")
    if kind not in ("file", "directory"):
        raise ValueError(f"source {src} is {kind}: a checkpoint is a folder or a .gguf file")
    if fmt == "gguf":
        if src.is_dir():
            found = sorted(src.glob("*.gguf"))
            if len(found) != 1:
                raise ValueError(f"source {src} is a folder with {len(found)} .gguf files; pass the .gguf file")
            src = found[0]
        return load_gguf(src, dtype=dtype)
    if not src.is_dir():
        raise ValueError(f"source {src} is a file; --from {fmt} reads a folder")
    if fmt == "native":
        return modeldir.load_model(src, dtype=dtype)
    if fmt == "meta":
        return load_meta(src, dtype=dtype, progress=progress)
    return load_hf(src, dtype=dtype)


def save_checkpoint(fmt: str, model, tokenizer, dst: str | os.PathLike, shards: int | None = None,
                    dtype: torch.dtype | None = None, progress: bool = False, overwrite: bool = False) -> Path:
    """Write `model` in `fmt` atomically; returns the path written (for GGUF, the .gguf file)."""
    dst = Path(dst)
    if fmt not in DST_FORMATS:
        raise ValueError(f"--to {fmt!r}: unknown destination format; choose one of {', '.join(DST_FORMATS)}")
    if shards is not None and fmt != "meta":
        raise ValueError(f"--shards applies to --to meta (model-parallel shards), not --to {fmt}")
    # SentencePiece and Llama 3's byte-level BPE save themselves as tokenizer.model; the
    # tokenizers-backed twin of a SentencePiece model has no .model to write.
    if fmt in ("native", "meta") and isinstance(tokenizer, HFTokenizer):
        raise ValueError(f"--to {fmt} needs a SentencePiece tokenizer.model, but the source has only "
                         f"{tokenizer.path.name}; add the original tokenizer.model to the source folder")
    state, args = model.state_dict(), model.args
    if fmt == "gguf":
        if dst.suffix != ".gguf":
            raise ValueError(f"destination {dst}: a GGUF file name ends in .gguf")
        if dst.exists() and not overwrite:
            raise ValueError(f"{dst} already exists; choose another destination")
        # A folder written atomically, then its one file renamed into place: both renames are atomic.
        with atomic_directory(dst.parent / f".{dst.name}.parts", overwrite=True) as tmp:
            write_gguf(state, args, tokenizer, tmp / dst.name, dtype=dtype, progress=progress)
        os.replace(dst.parent / f".{dst.name}.parts" / dst.name, dst)
        (dst.parent / f".{dst.name}.parts").rmdir()
        return dst
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        if fmt == "native":
            modeldir.write_model_files(model, tokenizer, tmp, dtype)
        elif fmt == "meta":
            write_meta_files(state, args, tokenizer, tmp, shards or 1, dtype, progress)
        else:
            write_hf_files(state, args, tokenizer, tmp, dtype, progress=progress)
    return dst
