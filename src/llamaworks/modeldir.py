"""The llamaworks model directory: params.json + model.safetensors + tokenizer.model.

params.json holds Meta's keys and the weights carry Meta's state-dict names, so a
directory reads like Meta's release with safetensors in place of pickles. Loading
maps the file into memory and hands those pages to the model (load_state_dict with
assign=True): no second copy of the weights is ever made on the CPU.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import torch

from llamaworks.atomic import atomic_directory, atomic_write_json
from llamaworks.model import ModelArgs, Transformer

PARAMS, WEIGHTS, TOKENIZER = "params.json", "model.safetensors", "tokenizer.model"

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(device: str = "auto", dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """'auto' picks cuda when present; the default dtype is fp32 on CPU (bf16 matmuls are
    slow on most CPUs) and bf16 on GPUs that support it."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    dt = parse_dtype(dtype)
    if dt is None:
        dt = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return dev, dt


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


def save_model(model: Transformer, tokenizer, path: str | os.PathLike, overwrite: bool = True,
               dtype: torch.dtype | None = None) -> Path:
    """Write a model directory atomically (a temporary folder renamed into place)."""
    path = Path(path)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        write_model_files(model, tokenizer, tmp, dtype)
    return path


def write_model_files(model: Transformer, tokenizer, folder: Path, dtype: torch.dtype | None = None) -> None:
    """The model directory's files, written into an existing (temporary) folder."""
    from safetensors.torch import save_file

    if tokenizer is not None and tokenizer.vocab_size != model.args.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is "
                         f"{model.args.vocab_size}; save the tokenizer the model was trained with")
    params = {k: v for k, v in model.args.to_params().items() if v is not None}
    atomic_write_json(folder / PARAMS, params)
    sd = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(folder / WEIGHTS), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(folder / TOKENIZER)


def read_params(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a JSON object of model arguments")
    return params


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
               tokenizer: bool = True):
    """(model, tokenizer) from a model directory (or a llama.cpp .gguf file); the model is in eval mode.

    Weights keep their stored dtype unless `dtype` is given (then converted one tensor at
    a time, so peak memory stays about one model plus one tensor).
    """
    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():  # a llama.cpp file, dequantised if quantised (convert/gguf.py)
        from llamaworks.convert.gguf import load_gguf

        model, tok = load_gguf(path, dtype=parse_dtype(dtype))
        return _ready(model.to(device)), (tok if tokenizer else None)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist (expected {PARAMS}, {WEIGHTS}, {TOKENIZER})")
    for name in (PARAMS, WEIGHTS) + ((TOKENIZER,) if tokenizer else ()):
        if not (path / name).is_file():
            hint = " (a training run folder keeps its final model in OUT/model)" if (path / "model").is_dir() else ""
            raise FileNotFoundError(f"{path / name} is missing: a model directory holds {PARAMS}, {WEIGHTS} and "
                                    f"{TOKENIZER}{hint}")
    dtype = parse_dtype(dtype)
    tok = None
    if tokenizer:
        from llamaworks.tokenizer import Tokenizer

        tok = Tokenizer(path / TOKENIZER)
    params = read_params(path / PARAMS)
    if params.get("vocab_size", -1) == -1 and tok is not None:
        params["vocab_size"] = tok.vocab_size  # Meta's convention: -1 means "from the tokenizer"
    try:
        args = ModelArgs.from_params(params)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path / PARAMS}: {e}") from None
    if tok is not None and tok.vocab_size != args.vocab_size:
        raise ValueError(f"vocabulary mismatch: {path / PARAMS} says vocab_size={args.vocab_size} but "
                         f"{path / TOKENIZER} has {tok.vocab_size} pieces; use the tokenizer the model was trained "
                         "with (or fix vocab_size in params.json)")
    state = read_safetensors(path / WEIGHTS)
    with torch.device("meta"):
        model = Transformer(args)
    if (path / "quantization.json").is_file():  # written by `llamaworks quantize`
        from llamaworks.quantize import read_quantization, swap_empty

        swap_empty(model, **read_quantization(path))
    check_state_dict(model, state, path / WEIGHTS)
    device = torch.device(device)
    for k, v in state.items():
        if dtype is not None and v.dtype != dtype and v.is_floating_point():  # int weights stay int
            v = v.to(dtype)
        state[k] = v.to(device)  # no-op on CPU: the mmap pages become the parameters
    model.load_state_dict(state, strict=True, assign=True)
    model.init_rope(device)
    return _ready(model), tok


def _ready(model):
    if model.output.weight.device.type == "cpu":
        from llamaworks.quantize import use_gemv

        use_gemv(model)  # bf16 weights: a faster one-row kernel for decoding (no-op otherwise)
    return model.eval()


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
