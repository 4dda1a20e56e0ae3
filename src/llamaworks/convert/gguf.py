"""GGUF for llama.cpp: export (architecture "llama", f32 or f16, tokenizer embedded) and import
(float or quantised tensors, the embedded tokenizer rebuilt as a SentencePiece model).

q/k rows: llama.cpp's "llama" architecture rotates adjacent pairs (Meta's interleaved
RoPE, LLAMA_ROPE_TYPE_NORM). Its convert_hf_to_gguf.py therefore applies `permute` to
HF's q_proj/k_proj, which undoes transformers' rotate-half permutation: a GGUF file
holds q/k in Meta's row order, so Meta/llamaworks weights are written unpermuted.
The parity test against llama.cpp checks this (a wrong order changes its tokens).

Memory: f32 tensors are handed to the writer as views of the (memory-mapped) weights;
f16 needs one converted copy (half the f32 model) until the file is written.

Reading: a GGUF file is untrusted input. read_gguf parses it with the rules of llama.cpp's own
reader (gguf.cpp: versions 2 and 3, no nested arrays, at most 4 dimensions, known tensor
types, each tensor starting where the previous one ends, aligned) and checks every count
against the bytes left before it keeps anything, so a header that declares ten million
layers or a billion tokens costs nothing. It holds the metadata as Python values and numpy
views of the mapped file: gguf-py's GGUFReader makes about 1.3 KB of objects per array
element (10 s and 635 MB for a 5 MB file of 500k strings), which is its own memory bomb.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llamaworks.model import ModelArgs, ffn_params
from llamaworks.paths import require_file
from llamaworks.tokenizer import Tokenizer
from llamaworks.tokenizer.spm_proto import sentencepiece_model
from llamaworks.weights import check_finite, check_state_dict, model_from_state

# Per-layer Meta suffix -> GGUF name (prefix layers.N. -> blk.N.), as llama.cpp's
# gguf-py tensor map (MODEL_TENSOR names for LLM_ARCH_LLAMA).
LAYER_KEYS: dict[str, str] = {
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
TOP_KEYS: dict[str, str] = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}
GGUF_DTYPES = {torch.float32: "f32", torch.float16: "f16"}
_BYTE = re.compile(r"^<0x[0-9A-F]{2}>$")


def gguf_name(key: str) -> str:
    if key in TOP_KEYS:
        return TOP_KEYS[key]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if m is None or m[2] not in LAYER_KEYS:
        raise ValueError(f"no GGUF name for tensor {key!r}; is this a LLaMA state dict?")
    return f"blk.{m[1]}.{LAYER_KEYS[m[2]]}"


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ValueError("GGUF export needs the `gguf` package: pip install 'llamaworks[gguf]' (or gguf)") from None
    return gguf


def vocab_for_gguf(tokenizer) -> tuple[list[bytes], list[float], list[int]]:
    """(pieces, scores, token types) as llama.cpp's SPM ("llama") tokenizer reads them."""
    gguf = _import_gguf()
    T = gguf.TokenType
    pieces, scores, types = [], [], []
    sp = getattr(tokenizer, "_sp", None)
    for i in range(tokenizer.vocab_size):
        piece = tokenizer.id_to_piece(i)
        if sp is not None:
            score = sp.get_score(i)
            kind = (T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else T.BYTE if sp.is_byte(i)
                    else T.UNUSED if sp.is_unused(i) else T.NORMAL)
        else:
            # A tokenizer.json has merges, not scores; llama.cpp's SPM tokenizer merges the
            # highest-scoring pair, and in SentencePiece BPE a later piece scores lower.
            score = -float(i)
            kind = (T.UNKNOWN if i == tokenizer.unk_id else T.CONTROL if i in (tokenizer.bos_id, tokenizer.eos_id)
                    else T.BYTE if _BYTE.match(piece) else T.NORMAL)
            if kind != T.NORMAL:
                score = 0.0
        pieces.append(piece.encode("utf-8"))
        scores.append(float(score))
        types.append(int(kind))
    return pieces, scores, types


def write_gguf(state: dict[str, torch.Tensor], args: ModelArgs, tokenizer, path: str | os.PathLike,
               dtype: torch.dtype | None = None, name: str = "llamaworks", progress: bool = False) -> None:
    """Write one .gguf file (the caller makes it atomic)."""
    gguf = _import_gguf()
    dtype = dtype or next(iter(state.values())).dtype
    if dtype == torch.bfloat16:
        dtype = torch.float16  # bf16 weights fit f16's range for LLaMA; llama.cpp's default too
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"--dtype {dtype}: GGUF export writes float32 or float16")
    if tokenizer is None:
        raise ValueError("GGUF export embeds the tokenizer: the source has no tokenizer.model/tokenizer.json")
    if tokenizer.vocab_size != args.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but vocab_size is {args.vocab_size}")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_rope_dimension_count(args.head_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_vocab_size(args.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == torch.float32 else gguf.LlamaFileType.MOSTLY_F16)
    pieces, scores, types = vocab_for_gguf(tokenizer)
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_unk_token_id(tokenizer.unk_id)
    w.add_add_bos_token(True)  # SentencePiece encode(add_bos=True), as LLaMA was trained
    w.add_add_eos_token(False)
    for k, t in state.items():
        t = t.detach()
        # 1-D norms stay f32 in every llama.cpp file type (its converter does the same).
        t = t.float() if t.dim() == 1 else t.to(dtype)
        w.add_tensor(gguf_name(k), t.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=progress)
    w.close()


def meta_key(name: str) -> str:
    inverse = {v: k for k, v in TOP_KEYS.items()}
    if name in inverse:
        return inverse[name]
    m = re.fullmatch(r"blk\.(0|[1-9][0-9]*)\.(.+)", name)
    layer = {v: k for k, v in LAYER_KEYS.items()}
    if m is None or m[2] not in layer:
        raise ValueError(f"GGUF tensor {name!r} is not part of a LLaMA model (architecture \"llama\")")
    return f"layers.{m[1]}.{layer[m[2]]}"


# --- reading -----------------------------------------------------------------------------------

GGUF_VERSIONS = (2, 3)  # what gguf.cpp and gguf-py read; version 1 had 32-bit counts
# GGUFValueType numbers -> struct formats; 8 and 9 are STRING and ARRAY.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# Larger than any tokenizer array (256k-token vocabularies, their merges): a longer one is not
# a LLaMA file, and refusing it bounds the Python objects a file can make us hold.
MAX_ARRAY = 1 << 21
MAX_TENSORS = 1 << 16  # a 70B model has 723; the tensor table is read into Python objects
MAX_KEY = 1 << 16  # bytes of a metadata key or tensor name
GGML_MAX_DIMS = 4
FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # GGMLQuantizationType F32, F16, BF16
OTHER_TYPES = {24, 25, 26, 27, 28}  # I8, I16, I32, I64, F64: no LLaMA weight is stored so


@dataclass
class GGUFArray:
    type: int  # GGUFValueType of the elements
    values: list | np.ndarray  # bytes for strings, else a numpy view of the file


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # outermost first (torch's order; GGUF lists dimensions innermost first)
    type: int  # GGMLQuantizationType
    offset: int  # from the start of the file
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, object]  # int / float / bool / bytes (strings) / GGUFArray
    tensors: list[GGUFTensor]
    buffer: mmap.mmap  # private copy-on-write map: tensors are views, the file is never written


class _Cursor:
    """Reads little-endian values from the mapped file, refusing to run past its end."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def error(self, why: str) -> ValueError:
        return ValueError(f"{self.path}: not a readable GGUF file ({why} at byte {self.pos}); the file is "
                          "truncated or corrupt")

    def need(self, n: int, what: str) -> None:
        if n > len(self.buf) - self.pos:
            raise self.error(f"{what} needs {n} bytes but {len(self.buf) - self.pos} are left")

    def take(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return v

    def bytes(self, what: str, limit: int | None = None) -> bytes:
        n = self.take("Q", what)
        if limit is not None and n > limit:
            raise self.error(f"{what} of {n} bytes (at most {limit})")
        self.need(n, what)
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def text(self, what: str) -> str:
        raw = self.bytes(what, MAX_KEY)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} {raw[:40]!r} is not UTF-8") from None


def _read_value(c: _Cursor, kind: int, key: str):
    if kind in _SCALARS:
        return c.take(_SCALARS[kind], f"the value of {key!r}")
    if kind == _STRING:
        return c.bytes(f"the string {key!r}")
    if kind != _ARRAY:
        raise c.error(f"metadata {key!r} has unknown type {kind}")
    etype, n = c.take("I", f"the array {key!r}"), c.take("Q", f"the array {key!r}")
    if n > MAX_ARRAY:
        raise c.error(f"array {key!r} declares {n} elements (at most {MAX_ARRAY} are read)")
    if etype == _STRING:
        c.need(8 * n, f"the {n} strings of {key!r}")  # each has at least its length: checked before the loop
        return GGUFArray(etype, [c.bytes(f"a string of {key!r}") for _ in range(n)])
    if etype not in _SCALARS:
        # llama.cpp refuses arrays of arrays too
        raise c.error(f"array {key!r} has elements of type {etype}, which GGUF readers do not take")
    dt = np.dtype("<" + _SCALARS[etype])
    c.need(n * dt.itemsize, f"the array {key!r}")
    values = np.frombuffer(c.buf, dtype=dt, count=n, offset=c.pos)
    c.pos += n * dt.itemsize
    return GGUFArray(etype, values)


def read_gguf(path: Path, gguf) -> GGUFFile:
    """The metadata and tensor table of a GGUF file, checked as llama.cpp checks them (see the
    module docstring); tensor data stays in the file's map until read."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ValueError(f"{path}: not a GGUF file ({size} bytes, too short for a header)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    c = _Cursor(buf, path)
    if buf[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    c.pos = 4
    version = c.take("I", "the version")
    if version not in GGUF_VERSIONS:
        big = version & 0xFFFF == 0 and version >> 24 in GGUF_VERSIONS
        raise ValueError(f"{path}: GGUF version {version if not big else 'of a big-endian file'}; llamaworks reads "
                         "little-endian versions 2 and 3 (re-export the model with a current llama.cpp)")
    n_tensors, n_kv = c.take("Q", "the tensor count"), c.take("Q", "the metadata count")
    # Each metadata entry takes at least 13 bytes and each tensor 32: counts beyond what the
    # file can hold are refused before any loop runs.
    if n_kv * 13 > size - c.pos or n_tensors > MAX_TENSORS or n_tensors * 32 > size - c.pos:
        raise c.error(f"{n_kv} metadata entries and {n_tensors} tensors declared (at most {MAX_TENSORS} tensors)")
    metadata: dict[str, object] = {}
    for _ in range(n_kv):
        key = c.text("a metadata key")
        if key in metadata:
            raise c.error(f"metadata {key!r} appears twice")
        metadata[key] = _read_value(c, c.take("I", f"the type of {key!r}"), key)
    alignment = metadata.get("general.alignment", 32)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"{path}: general.alignment is {_describe(alignment)}; it must be a power of two (default 32)")
    sizes = gguf.GGML_QUANT_SIZES
    infos = []
    for _ in range(n_tensors):
        name = c.text("a tensor name")
        n_dims = c.take("I", f"the rank of {name!r}")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise c.error(f"tensor {name!r} has {n_dims} dimensions (GGUF allows 1 to {GGML_MAX_DIMS})")
        dims = [c.take("Q", f"the shape of {name!r}") for _ in range(n_dims)]
        kind, offset = c.take("I", f"the type of {name!r}"), c.take("Q", f"the offset of {name!r}")
        if kind not in sizes:
            raise c.error(f"tensor {name!r} has unknown type {kind}")
        block, type_size = sizes[kind]
        if math.prod(max(d, 1) for d in dims) >= 1 << 62:  # past what torch (int64 sizes) can describe
            raise c.error(f"tensor {name!r} has shape {dims}, more elements than a tensor can have")
        if dims[0] % block:
            raise c.error(f"tensor {name!r}: rows of {dims[0]} values do not fill blocks of {block}")
        infos.append((name, tuple(reversed(dims)), kind, offset, math.prod(dims) // block * type_size))
    start = -(-c.pos // alignment) * alignment
    # llama.cpp's reader: the tensors follow one another in the table's order, each padded to
    # the alignment. A tensor whose declared type is not its data's (f32 bytes labelled Q8_0)
    # has the wrong size, so the next tensor, or the end of the file, is not where it should be.
    names, end = set(), 0
    tensors = []
    for name, shape, kind, offset, nbytes in infos:
        if name in names:
            raise c.error(f"tensor {name!r} appears twice")
        names.add(name)
        if offset != end:
            before = (f" ({tensors[-1].name!r}, {gguf.GGMLQuantizationType(tensors[-1].type).name} of shape "
                      f"{tensors[-1].shape}, is {tensors[-1].nbytes} bytes)") if tensors else ""
            raise ValueError(f"{path}: tensor {name!r} starts at data offset {offset}, but the tensors before it"
                             f"{before} end at {end}: a tensor's type or shape does not match its data; the file is "
                             "corrupt")
        tensors.append(GGUFTensor(name, shape, kind, start + offset, nbytes))
        end = -(-(offset + nbytes) // alignment) * alignment
    last = tensors[-1].offset + tensors[-1].nbytes if tensors else start
    if last > size:
        raise ValueError(f"{path}: truncated: its tensors need {last} bytes but the file has {size}; re-copy it")
    if size > max(start + end, c.pos):
        raise ValueError(f"{path}: {size - max(start + end, c.pos)} bytes follow the last tensor: a tensor's type or "
                         "shape does not match its data; the file is corrupt")
    return GGUFFile(path, metadata, tensors, buf)


def _describe(v) -> str:
    if isinstance(v, GGUFArray):
        return f"an array of {len(v.values)}"
    if isinstance(v, bytes):
        return f"the string {v[:40]!r}"
    return f"{v!r}"


def _get(f: GGUFFile, key: str, kind: type, default=None, low=None, high=None):
    """Metadata `key` as `kind` (int, float, str) within [low, high]; ValueError naming the file
    and the key otherwise. A missing key gives `default`, or is an error when that is None."""
    if key not in f.metadata:
        if default is None:
            raise ValueError(f"{f.path}: GGUF metadata {key!r} is missing; is this a LLaMA model file?")
        return default
    v = f.metadata[key]
    if kind is str and isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            pass
    elif kind is int and isinstance(v, int) and not isinstance(v, bool) or (
            kind is float and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
        if (low is None or v >= low) and (high is None or v <= high):
            return kind(v)
        bounds = f"at least {low}" if high is None else f"from {low} to {high}"
        raise ValueError(f"{f.path}: GGUF metadata {key!r} is {v}, but must be {bounds}; the file is corrupt")
    want = {int: "an integer", float: "a finite number", str: "a UTF-8 string"}[kind]
    raise ValueError(f"{f.path}: GGUF metadata {key!r} is {_describe(v)}, but must be {want}; the file is corrupt")


def _array(f: GGUFFile, key: str, types: tuple[int, ...], n: int | None = None) -> list | np.ndarray:
    v = f.metadata.get(key)
    if v is None:
        raise ValueError(f"{f.path}: GGUF metadata {key!r} is missing: the file embeds no LLaMA tokenizer")
    if not isinstance(v, GGUFArray) or v.type not in types:
        what = f"an array of type {v.type}" if isinstance(v, GGUFArray) else _describe(v)
        raise ValueError(f"{f.path}: GGUF metadata {key!r} is {what}, but must be an array of type "
                         f"{' or '.join(map(str, types))} (GGUFValueType); the file is corrupt")
    if n is not None and len(v.values) != n:
        raise ValueError(f"{f.path}: GGUF metadata {key!r} has {len(v.values)} entries for {n} tokens; "
                         "the file is corrupt")
    return v.values


def tokenizer_from_gguf(f: GGUFFile):
    path = f.path
    model = _get(f, "tokenizer.ggml.model", str, "")
    if model != "llama":
        raise ValueError(f"{path}: tokenizer.ggml.model is {model!r}; only the SentencePiece (\"llama\") "
                         "tokenizer of LLaMA is supported")
    raw = _array(f, "tokenizer.ggml.tokens", (_STRING,))
    try:
        pieces = [p.decode("utf-8") for p in raw]
    except UnicodeDecodeError:
        bad = next(i for i, p in enumerate(raw) if not _is_utf8(p))
        raise ValueError(f"{path}: token {bad} of tokenizer.ggml.tokens is not UTF-8 ({raw[bad][:40]!r}); "
                         "the file is corrupt") from None
    scores = _array(f, "tokenizer.ggml.scores", (6,), len(pieces)).astype(np.float64)
    types = _array(f, "tokenizer.ggml.token_type", (4, 5), len(pieces)).astype(np.int64)
    if not np.isfinite(scores).all():
        raise ValueError(f"{path}: tokenizer.ggml.scores holds NaN or infinite values; the file is corrupt")
    if len(types) and not ((types >= 1) & (types <= 6)).all():
        raise ValueError(f"{path}: tokenizer.ggml.token_type holds values outside 1..6 (SentencePiece's piece "
                         "types); the file is corrupt")
    ids = {name: _get(f, f"tokenizer.ggml.{name}_token_id", int, default, 0, len(pieces) - 1)
           for name, default in (("unknown", 0), ("bos", 1), ("eos", 2))}
    if len(pieces) < 3:
        raise ValueError(f"{path}: tokenizer.ggml.tokens has {len(pieces)} pieces; a LLaMA vocabulary has thousands")
    proto = sentencepiece_model(pieces, scores.tolist(), types.tolist(), ids["unknown"], ids["bos"], ids["eos"])
    name = path.with_name("tokenizer.model")  # what the rebuilt model is known by; no such file is read
    try:
        return Tokenizer.from_proto(proto, name)
    except ValueError as e:
        why = str(e).removeprefix(f"{name} is not a SentencePiece model ")  # SentencePiece's own reason
        raise ValueError(f"{path}: its vocabulary does not make a SentencePiece model {why}; the file is "
                         "corrupt") from None


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _tensor_data(f: GGUFFile, t: GGUFTensor, gguf) -> torch.Tensor:
    """A float tensor as a view of the mapped file; a quantised one dequantised to float32."""
    if t.type in FLOAT_TYPES:
        dt = FLOAT_TYPES[t.type]
        flat = torch.frombuffer(f.buffer, dtype=dt, count=t.nbytes // dt.itemsize, offset=t.offset)
        return flat.view(t.shape)
    raw = np.frombuffer(f.buffer, dtype=np.uint8, count=t.nbytes, offset=t.offset)
    qtype = gguf.GGMLQuantizationType(t.type)
    try:
        out = gguf.quants.dequantize(raw.reshape(gguf.quants.quant_shape_to_byte_shape(t.shape, qtype)), qtype)
    except NotImplementedError:
        raise ValueError(f"{f.path}: tensor {t.name} is {qtype.name}, which gguf-py cannot "
                         "dequantise; re-export the model as f16 or Q8_0") from None
    return torch.from_numpy(out.reshape(t.shape))


def load_gguf(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a llama.cpp GGUF file of architecture "llama". Float tensors
    (f32, f16, bf16) are memory-mapped; quantised ones (Q8_0, Q4_0, Q4_K, ...) are dequantised
    to float32 (or `dtype`) with gguf-py's reference dequantisers."""
    gguf = _import_gguf()
    path = require_file(path, "expected a .gguf file")
    f = read_gguf(path, gguf)
    arch = _get(f, "general.architecture", str, "")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}; only \"llama\" GGUF files can be loaded")
    key = lambda k: f"llama.{k}"  # noqa: E731
    # Files of architecture "llama" that LLaMA's model cannot express: refused, not run wrongly.
    if experts := _get(f, key("expert_count"), int, 0):
        raise ValueError(f"{path}: a mixture of experts ({experts} experts), not LLaMA")
    scaling = _get(f, key("rope.scaling.type"), str, "none")
    if scaling != "none":
        raise ValueError(f"{path}: RoPE scaling {scaling!r} is not LLaMA's rotary embedding")
    dim = _get(f, key("embedding_length"), int, low=1)
    n_heads = _get(f, key("attention.head_count"), int, low=1, high=dim)
    if _get(f, key("rope.dimension_count"), int, dim // n_heads) != dim // n_heads:
        raise ValueError(f"{path}: partial rotary embeddings are not LLaMA's")
    # Sizes are checked against the tensors before anything is built from them.
    n_layers = _get(f, key("block_count"), int, low=1)
    if n_layers > len(f.tensors):
        raise ValueError(f"{path}: GGUF metadata 'llama.block_count' is {n_layers}, but the file holds only "
                         f"{len(f.tensors)} tensors (a block has 9); the file is corrupt")
    n_vocab = len(_array(f, "tokenizer.ggml.tokens", (_STRING,)))
    try:
        multiple_of, mult = ffn_params(dim, _get(f, key("feed_forward_length"), int, low=1))
        args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads,
                         n_kv_heads=_get(f, key("attention.head_count_kv"), int, n_heads, low=1),
                         vocab_size=n_vocab, multiple_of=multiple_of, ffn_dim_multiplier=mult,
                         # GGUF stores floats as float32: 1e-6 comes back as 9.99999997e-07.
                         norm_eps=float(f"{_get(f, key('attention.layer_norm_rms_epsilon'), float, 1e-6):.7g}"),
                         max_seq_len=_get(f, key("context_length"), int, 2048, low=1),
                         rope_theta=float(f"{_get(f, key('rope.freq_base'), float, 10000.0):.7g}"))
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: its llama.* metadata makes no LLaMA model: {e}") from None
    names = {}
    for t in f.tensors:
        if t.type in OTHER_TYPES:
            raise ValueError(f"{path}: tensor {t.name} is stored as {gguf.GGMLQuantizationType(t.type).name}; "
                             "LLaMA weights are float or quantised")
        try:
            names[meta_key(t.name)] = t
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    shapes = {k: torch.empty(t.shape, device="meta") for k, t in names.items()}
    if "output.weight" not in shapes and "tok_embeddings.weight" in shapes:
        shapes["output.weight"] = shapes["tok_embeddings.weight"]  # tied: copied below
    check_state_dict(args, shapes, path, config="its llama.* metadata")  # before any data is read
    tokenizer = tokenizer_from_gguf(f)
    # One dtype for the model: `dtype`, else the token embedding's when it is stored as floats
    # (llama.cpp keeps norms in f32 inside f16/bf16 files), else float32. Each tensor is cast as
    # it is read, so a quantised 7B file never holds all of its float32 copy at once.
    embd = names.get("tok_embeddings.weight")
    dtype = dtype or FLOAT_TYPES.get(embd.type, torch.float32)
    state = {k: _tensor_data(f, t, gguf).to(dtype) for k, t in names.items()}  # no copy when already `dtype`
    check_finite(state, path)
    if "output.weight" not in state:
        # Tied embeddings (later llama-architecture files): LLaMA's output layer is its own copy.
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    return model_from_state(args, state, path, config="its llama.* metadata"), tokenizer
