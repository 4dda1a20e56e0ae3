"""Weights as tensors: safetensors files read memory-mapped and validated, state dicts checked
against ModelArgs, and a model built around a state dict without copying it.

The layer under every checkpoint format (model directory, Hugging Face, Meta, GGUF): each
reads its tensors into a state dict with Meta's names, then calls model_from_state.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import torch

from llamaworks.model import ModelArgs, Transformer

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file as views of a private memory map (copy-on-write, the
    file itself is never modified). Validates the header against the file size, so a
    truncated or corrupt file is an error naming it rather than garbage weights."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise ValueError(f"{path}: corrupt or not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        end = max((info["data_offsets"][1] for info in header.values()), default=0)
        if 8 + n + end > size:
            raise ValueError(f"{path}: truncated: the header describes {8 + n + end} bytes but the file has {size}; "
                             "re-copy or re-save the model")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        dtype = _ST_DTYPES[info["dtype"]]
        begin, stop = info["data_offsets"]
        count = (stop - begin) // dtype.itemsize
        if count == 0:
            tensors[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        t = torch.frombuffer(mm, dtype=dtype, count=count, offset=8 + n + begin)
        tensors[name] = t.view(info["shape"])
    return tensors


def model_from_state(args: ModelArgs, state: dict[str, torch.Tensor], source, dtype: torch.dtype | None = None):
    """A CPU model in eval mode whose parameters are the tensors of `state` (no copy unless
    `dtype` converts them), after check_state_dict against `args`."""
    with torch.device("meta"):
        model = Transformer(args)
    check_state_dict(model, state, source)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.init_rope(torch.device("cpu"))
    return model.eval()


def check_state_dict(model: Transformer, state: dict[str, torch.Tensor], source) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match params.json: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}; is this a llamaworks/Meta-format checkpoint? "
                         "(convert others with `llamaworks convert`)")
    bad = [(k, tuple(state[k].shape), s) for k, s in expected.items() if tuple(state[k].shape) != s]
    if bad:
        k, got, want = bad[0]
        raise ValueError(f"{source}: tensor {k} has shape {got} but params.json implies {want} "
                         f"({len(bad)} tensors differ); params.json and the weights disagree")
    floats = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(floats) > 1:
        raise ValueError(f"{source}: mixed dtypes {sorted(map(str, floats))}; re-save with one dtype")
