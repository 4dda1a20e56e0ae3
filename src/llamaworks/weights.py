"""Weights as tensors: safetensors files read memory-mapped and validated, state dicts checked
against ModelArgs, and a model built around a state dict without copying it.

The layer under every checkpoint format (model directory, Hugging Face, Meta, GGUF): each
reads its tensors into a state dict with Meta's names, then calls model_from_state.

Files are untrusted input (docs/threat-model.md, "Model files"): every size a header declares
is checked against the bytes really present before anything is allocated for it, and every
problem is a ValueError (FileNotFoundError when missing) that names the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from llamaworks.model import ModelArgs, Transformer
from llamaworks.paths import require_file

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# The safetensors format's own limit on the JSON header (the reference reader refuses more).
MAX_HEADER_BYTES = 100_000_000
# More dimensions than any checkpoint tensor has; also keeps torch's view() within its limits.
MAX_DIMS = 8
# The finiteness check reads the file through one buffer of this size: the process never holds
# more than this of it at once, and the file's pages stay out of the mapped weights' RSS.
CHECK_CHUNK_BYTES = 1 << 20
# Meta's per-layer state-dict names: layers.<i>.<suffix>, i written without leading zeros.
LAYER_KEY = re.compile(r"layers\.(0|[1-9][0-9]*)\.(.+)")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _json_type(x) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(x), "number")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    # json.loads keeps the last of two equal keys, another reader may keep the first: two
    # programs would then see different tensors in one file. The reference reader refuses them.
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {k!r} appears twice")
        out[k] = v
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # NaN / Infinity: Python's json extension, not the format


def parse_json(data: bytes, path: Path, label: str = "not valid JSON"):
    """JSON from a file's bytes; every failure (not UTF-8, malformed, a duplicate key, nested
    deeper than Python recurses) is a ValueError "PATH: LABEL (why)"."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: {label} (not UTF-8 text: byte {e.object[e.start]:#04x} at offset {e.start}); "
                         "the file is corrupt or not what its name says") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: {label} ({e})") from None


def read_json_file(path: str | os.PathLike, what: str, max_bytes: int = 1 << 20, hint: str = ""):
    """A small JSON file (params.json, config.json, an index), refused unread when over
    `max_bytes`: these files are a few KB, and a huge one would be held whole to parse it."""
    path = require_file(path, hint)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path}: {size} bytes, but {what} is a small JSON file (at most {max_bytes}); "
                         "is this the right file?")
    return parse_json(path.read_bytes(), path)


def _tensor_entries(header, path: Path, data_bytes: int) -> list[tuple[str, torch.dtype, list[int], int, int]]:
    """(name, dtype, shape, begin, end) for every tensor of a parsed header, checked as the
    reference reader checks them: known dtype, shape and byte span agreeing, the spans tiling
    the data section exactly (no gap, no overlap, nothing left over)."""
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is a JSON {_json_type(header)}, not an object of tensors; "
                         "the file is corrupt or not a safetensors file")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ValueError(f"{path}: __metadata__ must map strings to strings; the header is corrupt")
    entries = []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise ValueError(f"{where}: expected an object with dtype, shape and data_offsets, got a JSON "
                             f"{_json_type(info)}; the header is corrupt")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
        if missing:
            raise ValueError(f"{where} has no {' or '.join(missing)}; the header is corrupt")
        kind, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(kind, str) or kind not in _ST_DTYPES:
            raise ValueError(f"{where} has unsupported dtype {kind!r} (supported: {', '.join(_ST_DTYPES)}); "
                             "re-save the weights in one of these")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(_is_int(d) and d >= 0 for d in shape)
                or math.prod(max(d, 1) for d in shape) >= 1 << 62):
            raise ValueError(f"{where}: shape {shape!r} is not a list of at most {MAX_DIMS} non-negative "
                             "integers of a possible size; the header is corrupt")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end; "
                             "the header is corrupt")
        dtype = _ST_DTYPES[kind]
        nbytes = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise ValueError(f"{where}: shape {shape} of {kind} is {nbytes} bytes but data_offsets {offsets} "
                             f"span {offsets[1] - offsets[0]}; the header is corrupt")
        entries.append((name, dtype, shape, offsets[0], offsets[1]))
    end = 0
    for name, _, _, begin, stop in sorted(entries, key=lambda e: (e[3], e[4])):
        if begin != end:
            how = "overlaps the tensor before it" if begin < end else f"leaves {begin - end} unused bytes before it"
            raise ValueError(f"{path}: tensor {name!r} (data_offsets [{begin}, {stop}]) {how}; the header is corrupt")
        end = stop
    if end > data_bytes:
        raise ValueError(f"{path}: truncated: the header describes {end} bytes of tensors but the file holds "
                         f"{data_bytes}; re-copy or re-save the model")
    if end < data_bytes:
        raise ValueError(f"{path}: {data_bytes - end} bytes follow the last tensor, which the header does not "
                         "describe; the file is corrupt or not a safetensors file")
    return entries


def has_nonfinite(chunks: Iterable[torch.Tensor]) -> bool:
    """Whether any of the float tensors in `chunks` holds a NaN or an infinity.

    A sum is one pass without a temporary: a NaN or infinity makes it non-finite. It can also
    overflow with finite values only (|sum| > 3e38 in fp32), so a non-finite sum is confirmed
    element by element before the tensor is blamed."""
    for c in chunks:
        s = c.sum(dtype=torch.float64 if c.dtype == torch.float64 else torch.float32)
        if not bool(torch.isfinite(s)) and not bool(torch.isfinite(c).all()):
            return True
    return False


def tensor_chunks(t: torch.Tensor, elements: int = CHECK_CHUNK_BYTES // 4) -> Iterable[torch.Tensor]:
    """`t` as flat pieces of at most `elements` (each converted one at a time by the sum)."""
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), elements):
        yield flat[i:i + elements]


def check_finite(state: dict[str, torch.Tensor], source) -> None:
    """ValueError naming `source` and the tensor when a float tensor holds NaN or infinity.
    Reads every weight once (about 0.1 s per GB from the page cache)."""
    for name, t in state.items():
        if t.is_floating_point() and has_nonfinite(tensor_chunks(t)):
            raise nonfinite_error(source, name)


def nonfinite_error(source, name: str) -> ValueError:
    return ValueError(f"{source}: tensor {name!r} holds NaN or infinite values; the weights are corrupt (re-copy "
                      "the file, or save the model again from a run that had not diverged)")


def _file_chunks(f, begin: int, nbytes: int, dtype: torch.dtype, view: memoryview, path: Path):
    f.seek(begin)
    while nbytes:
        want = min(nbytes, len(view))
        if f.readinto(view[:want]) != want:
            raise ValueError(f"{path}: the file shrank while it was read; do not modify it while loading")
        nbytes -= want
        yield torch.frombuffer(view[:want], dtype=dtype)


def _check_file_finite(f, base: int, entries, path: Path) -> None:
    # Streamed through one reused buffer rather than through the memory map: the check then
    # leaves the mapping untouched (loading stays "map, do not read"; the pages are in the
    # page cache for the first forward pass) and holds at most CHECK_CHUNK_BYTES.
    view = memoryview(bytearray(CHECK_CHUNK_BYTES))
    for name, dtype, _, begin, stop in sorted(entries, key=lambda e: e[3]):
        if dtype.is_floating_point and has_nonfinite(_file_chunks(f, base + begin, stop - begin, dtype, view, path)):
            raise nonfinite_error(path, name)


# Data offsets of written tensors are multiples of this: fused CPU kernels read their weights
# with aligned vector loads (the int8 one crashes on AVX-512 when a weight is not 16-byte
# aligned), so a memory-mapped weight must start on such a boundary to be used in place.
WRITE_ALIGN = 64
_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}


def save_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None,
                     align: int = WRITE_ALIGN) -> None:
    """Write a safetensors file in which every tensor whose byte size is a multiple of `align`
    starts at a multiple of `align` in the file (and so in a memory map of it).

    The format allows no gaps between tensors, so alignment comes from the order: the header
    is padded with spaces (JSON whitespace, as the reference writer pads it) to a multiple of
    `align`, then tensors whose size is a multiple of `align` come first, the others (norm
    gains of odd widths, small vectors) last. Any safetensors reader reads the result.
    """
    items = sorted(state.items(), key=lambda kv: (kv[1].numel() * kv[1].element_size() % align != 0, kv[0]))
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in items:
        if t.dtype not in _ST_NAMES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-(8 + len(head)) % align)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for _, t in items:
            if t.numel():
                # Raw bytes in place: a 1-D byte view of the (contiguous, CPU) tensor, no copy.
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())


def read_safetensors(path: str | os.PathLike, check_values: bool = True) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file as views of a private memory map (copy-on-write, the
    file itself is never modified). The header is validated against the file size before any
    tensor exists, so a truncated or corrupt file is an error naming it rather than garbage
    weights; with `check_values`, float tensors holding NaN or infinity are refused too (one
    streamed read of the file, see _check_file_finite)."""
    path = require_file(path, "expected a .safetensors weights file")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"{path}: corrupt or not a safetensors file (header length {n}, file size {size})")
        header = parse_json(f.read(n), path, "corrupt safetensors header")
        entries = _tensor_entries(header, path, size - 8 - n)
        if check_values:
            _check_file_finite(f, 8 + n, entries, path)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    tensors = {}
    for name, dtype, shape, begin, stop in entries:
        if begin == stop:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(mm, dtype=dtype, count=(stop - begin) // dtype.itemsize, offset=8 + n + begin)
        tensors[name] = t.view(shape)
    return tensors


def model_from_state(args: ModelArgs, state: dict[str, torch.Tensor], source, dtype: torch.dtype | None = None,
                     config: str = "params.json"):
    """A CPU model in eval mode whose parameters are the tensors of `state` (no copy unless
    `dtype` converts them), after check_state_dict against `args` (read from `config`)."""
    check_state_dict(args, state, source, config=config)
    with torch.device("meta"):
        model = Transformer(args)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.init_rope(torch.device("cpu"))
    return model.eval()


class StateLayout:
    """The tensors of a model of `args` (after `prepare`, which swaps layers as in
    modeldir.load_model): names, shapes and dtypes, known from a one-layer model on the meta
    device. Building even an empty model costs time and memory per layer, so a header that
    declares ten million layers is checked against the tensors actually present with this,
    before the real model exists."""

    def __init__(self, args: ModelArgs, prepare: Callable[[Transformer], object] | None = None, source=None,
                 config: str = "params.json"):
        self.n_layers = args.n_layers
        try:
            with torch.device("meta"):
                template = Transformer(dataclasses.replace(args, n_layers=1))
        except (RuntimeError, OverflowError, TypeError):  # sizes past int64 (torch) or float (SwiGLU width)
            raise ValueError(f"{source}: the sizes in {config} (dim={args.dim}, vocab_size={args.vocab_size}, "
                             f"multiple_of={args.multiple_of}, ...) make tensors larger than any that torch can "
                             f"hold; {config} is corrupt") from None
        if prepare is not None:
            prepare(template)
        self.top, self.per_layer = {}, {}
        for k, v in template.state_dict().items():
            m = LAYER_KEY.fullmatch(k)
            if m:
                self.per_layer[m[2]] = v
            else:
                self.top[k] = v

    def expected(self, key: str) -> torch.Tensor | None:
        """The meta tensor the model holds under `key`, None if it holds none."""
        m = LAYER_KEY.fullmatch(key)
        if m is None:
            return self.top.get(key)
        return self.per_layer.get(m[2]) if int(m[1]) < self.n_layers else None

    def mismatch(self, keys) -> tuple[list[str], list[str]]:
        """(missing, unexpected) names, each cut at 6: a missing layer stops the search, so
        this takes steps for the layers present, never for all the layers declared."""
        keys = set(keys)
        unexpected = sorted(k for k in keys if self.expected(k) is None)[:6]
        missing = [k for k in self.top if k not in keys]
        i = 0
        while i < self.n_layers and len(missing) < 6:
            missing += [f"layers.{i}.{s}" for s in self.per_layer if f"layers.{i}.{s}" not in keys]
            i += 1
        return missing[:6], unexpected

    def order(self, key: str):
        """Sort key: top-level tensors in the model's order, then layer by layer."""
        m = LAYER_KEY.fullmatch(key)
        return (0, list(self.top).index(key), "") if m is None else (1, int(m[1]), m[2])


def _listed(names: list[str]) -> str:
    return f"{names[:5]}{'...' if len(names) > 5 else ''}"


def check_state_dict(args: ModelArgs, state: dict[str, torch.Tensor], source,
                     prepare: Callable[[Transformer], object] | None = None, config: str = "params.json") -> None:
    """ValueError naming `source` unless `state` holds exactly the tensors of a model of `args`
    (after `prepare`), with their shapes and kinds; see StateLayout. `config`: where `args`
    came from, for the messages."""
    layout = StateLayout(args, prepare, source, config)
    missing, unexpected = layout.mismatch(state)
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match {config}: missing {_listed(missing)}, unexpected "
                         f"{_listed(unexpected)}; is this a llamaworks/Meta-format checkpoint? "
                         "(convert others with `llamaworks convert`)")
    bad = [(k, tuple(state[k].shape), tuple(layout.expected(k).shape)) for k in sorted(state, key=layout.order)
           if tuple(state[k].shape) != tuple(layout.expected(k).shape)]
    if bad:
        k, got, want = bad[0]
        raise ValueError(f"{source}: tensor {k} has shape {got} but {config} implies {want} "
                         f"({len(bad)} tensors differ); {config} and the weights disagree")
    for k, t in state.items():
        want = layout.expected(k)
        if want.is_floating_point() and not t.is_floating_point():
            raise ValueError(f"{source}: tensor {k} is {t.dtype}, but the model's weights are floating point; "
                             "the file is corrupt or holds another kind of checkpoint")
        if not want.is_floating_point() and t.dtype != want.dtype:
            raise ValueError(f"{source}: tensor {k} is {t.dtype}, but the model expects {want.dtype} there")
    floats = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(floats) > 1:
        raise ValueError(f"{source}: mixed dtypes {sorted(map(str, floats))}; re-save with one dtype")
