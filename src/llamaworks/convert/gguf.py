"""GGUF for llama.cpp: export (architecture "llama", f32 or f16, tokenizer embedded) and import
(float or quantised tensors, the embedded tokenizer rebuilt as a SentencePiece model or, for
Llama 3, as byte-level BPE).

The later families, as llama.cpp's convert_hf_to_gguf.py writes them:
- Llama 3's tokenizer is `tokenizer.ggml.model = "gpt2"` with `tokenizer.ggml.pre = "llama-bpe"`
  (llama.cpp then splits text with Llama 3's regex and takes a word that is a token whole):
  byte-level token strings, NORMAL for ranks and CONTROL for special tokens, and the merges as
  "left right" strings. Read back, a vocabulary whose merges are its ranks' (what export writes
  and what transformers derives from Meta's tiktoken file) becomes those tiktoken ranks again;
  any other merge list is kept as a tokenizer.json with exactly those merges, so that llamaworks
  and llama.cpp tokenise alike either way.
- rope_theta is `llama.rope.freq_base`. Llama 3.1's scaling has no keys: the converter writes a
  float32 tensor `rope_freqs.weight` of head_dim/2 factors by which llama.cpp divides the base
  frequencies. Import reads that tensor and finds the Llama 3.1 parameters that give it (within
  float32 rounding), refusing one that no parameters give: the model computes its frequencies
  from ModelArgs, so the tensor is honoured only if the arguments reproduce it. Linear scaling
  is `llama.rope.scaling.type = "linear"` with `llama.rope.scaling.factor`.
- Tied embeddings (Llama 3.2 1B/3B) are a file without `output.weight`; llama.cpp then uses
  token_embd, and import sets tie_word_embeddings.
- The chat template, when the tokenizer carries one, is `tokenizer.chat_template`; named ones
  (tool_use, ...) are `tokenizer.chat_template.NAME`, listed in `tokenizer.chat_templates`.
- eos is `tokenizer.ggml.eos_token_id` (Llama 3 instruct: <|eot_id|>), with <|eot_id|> and
  <|eom_id|> also as `tokenizer.ggml.eot_token_id`/`eom_token_id`.
Files of architecture "llama" that the model cannot express (experts, sliding windows, ALiBi,
LayerNorm, other head sizes, YaRN) are refused by name rather than run wrongly.

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

import json
import math
import mmap
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llamaworks.model import ModelArgs, ffn_params, llama31_scaled_inv_freq, model_inv_freq, rope_inv_freq
from llamaworks.paths import require_file
from llamaworks.tokenizer import ByteLevelBPETokenizer, Tokenizer
from llamaworks.tokenizer.bpe import LLAMA3_PATTERN, byte_alphabet, bytes_to_piece, piece_to_bytes, ranks_to_merges
from llamaworks.tokenizer.chat import MAX_CHAT_TEMPLATES, ChatTemplate, attach_chat_templates, tokenizer_chat_templates
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
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's LLM_TENSOR_ROPE_FREQS: Llama 3.1's frequency factors
GGUF_DTYPES = {torch.float32: "f32", torch.float16: "f16"}
_BYTE = re.compile(r"^<0x[0-9A-F]{2}>$")
# tokenizer.ggml.pre values llama.cpp reads as Llama 3's pre-tokeniser (LLAMA_VOCAB_PRE_TYPE_LLAMA3
# with ignore_merges); the converter writes "llama-bpe", older files the other two.
LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")


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


def bpe_vocab_for_gguf(tokenizer: ByteLevelBPETokenizer) -> tuple[list[bytes], list[int], list[bytes]]:
    """(tokens, token types, merges) of a byte-level BPE tokenizer as llama.cpp's "gpt2"
    tokenizer with the "llama-bpe" pre-tokeniser reads them. ValueError for a tokenizer whose
    pre-tokenisation is not Llama 3's, which llama.cpp would not reproduce."""
    gguf = _import_gguf()
    T = gguf.TokenType
    data = json.loads(tokenizer.to_json())
    why = llama3_pretokenizer_mismatch(data)
    if why:
        raise ValueError(f"{tokenizer.path}: GGUF export writes byte-level BPE as llama.cpp's Llama 3 tokenizer "
                         f"(tokenizer.ggml.pre = \"llama-bpe\"), but {why}; llama.cpp would tokenise text otherwise")
    # A tokenizer.json's added tokens that are not special are matched in text, as llama.cpp
    # matches USER_DEFINED tokens; special ones are CONTROL (text spelling them stays text).
    user = {t["id"] for t in data.get("added_tokens") or [] if not t.get("special")}
    special = set(tokenizer.special_tokens.values())
    tokens, types = [], []
    for i in range(tokenizer.vocab_size):
        piece = tokenizer.id_to_piece(i)
        if not piece:
            raise ValueError(f"{tokenizer.path}: token id {i} has no token (a gap in the vocabulary); a GGUF "
                             "vocabulary lists every id")
        tokens.append(piece.encode("utf-8"))
        types.append(int(T.CONTROL if i in special else T.USER_DEFINED if i in user else T.NORMAL))
    merges = []
    for left, right in tokenizer.merges():
        if not left or not right or " " in left or " " in right:
            raise ValueError(f"{tokenizer.path}: merge {left!r} {right!r} is not a pair of byte-level tokens; "
                             "GGUF writes each merge as \"left right\"")
        merges.append(f"{left} {right}".encode())
    return tokens, types, merges


def llama3_pretokenizer_mismatch(data: dict) -> str | None:
    """Why a byte-level tokenizer.json (parsed) does not split text as llama.cpp's "llama-bpe"
    does, or None when it does: no normaliser, Llama 3's regex then byte-level characters, and
    BPE that takes a word that is a token whole (ignore_merges)."""
    if data.get("normalizer"):
        return f"it has a normalizer ({data['normalizer'].get('type')})"
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    want = [("Split", LLAMA3_PATTERN), ("ByteLevel", False)]
    got = []
    for step in steps or []:
        if step.get("type") == "Split":
            got.append(("Split", (step.get("pattern") or {}).get("Regex")))
            if step.get("behavior") != "Isolated" or step.get("invert"):
                return "its pre-tokenizer splits with another behaviour than Llama 3's (Isolated)"
        elif step.get("type") == "ByteLevel":
            got.append(("ByteLevel", bool(step.get("use_regex", True)) or bool(step.get("add_prefix_space"))))
        else:
            got.append((step.get("type"), None))
    if got != want:
        return f"its pre-tokenizer is {[t for t, _ in got]} with another regex, not Llama 3's"
    if not (data.get("model") or {}).get("ignore_merges"):
        return "its BPE merges a word that is itself a token (ignore_merges is false), where Llama 3 takes it whole"
    return None


def rope_freq_factors(args: ModelArgs) -> torch.Tensor:
    """llama.cpp's `rope_freqs.weight` for `args`: per rotary frequency, the number the base
    frequency rope_theta^(-2i/d) is divided by to give the model's (all ones without scaling)."""
    return rope_inv_freq(args.head_dim, args.rope_theta) / model_inv_freq(args)


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
    if args.use_scaled_rope:
        # Llama 3.1's scaling has no llama.cpp keys: the factors travel as a tensor. The original
        # context is recorded for load_gguf (llama.cpp reads this key for YaRN only).
        w.add_rope_scaling_orig_ctx_len(args.rope_old_context_len)
        w.add_tensor(ROPE_FREQS, rope_freq_factors(args).contiguous().numpy())
    elif args.rope_scaling_factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(args.rope_scaling_factor)
    w.add_vocab_size(args.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == torch.float32 else gguf.LlamaFileType.MOSTLY_F16)
    if isinstance(tokenizer, ByteLevelBPETokenizer):
        tokens, types, merges = bpe_vocab_for_gguf(tokenizer)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("llama-bpe")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(tokenizer.bos_id)
        w.add_eos_token_id(tokenizer.eos_id)
        names = tokenizer.special_tokens
        for add, name in ((w.add_eot_token_id, "<|eot_id|>"), (w.add_eom_token_id, "<|eom_id|>")):
            if name in names:
                add(names[name])
        if tokenizer.pad_id >= 0:
            w.add_pad_token_id(tokenizer.pad_id)
    else:
        pieces, scores, types = vocab_for_gguf(tokenizer)
        w.add_tokenizer_model("llama")
        w.add_token_list(pieces)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(tokenizer.bos_id)
        w.add_eos_token_id(tokenizer.eos_id)
        w.add_unk_token_id(tokenizer.unk_id)
    w.add_add_bos_token(True)  # encode(bos=True), as LLaMA was trained
    w.add_add_eos_token(False)
    # The default template as tokenizer.chat_template, each named one as tokenizer.chat_template.NAME
    # (what llama.cpp's server looks up for "tool_use") listed in tokenizer.chat_templates, as
    # gguf-py's add_chat_template writes a list of them; here in name order, so files are reproducible.
    carried = tokenizer_chat_templates(tokenizer)
    templates = {gguf_template_name(name): t.source for name, t in carried.items()}
    if len(templates) < len(carried):
        raise ValueError(f"the chat template names {sorted(carried)} become the same GGUF "
                         "key once '-' and '.' are written as '_' (as llama.cpp's converter writes them); rename one "
                         "in tokenizer.chat_templates")
    named = sorted(set(templates) - {"default"})
    for name in named:
        w.add_string(gguf.Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=name), templates[name])
    if named:
        w.add_array(gguf.Keys.Tokenizer.CHAT_TEMPLATES, named)
    if "default" in templates:
        w.add_chat_template(templates["default"])
    if args.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "output.weight"}  # llama.cpp uses token_embd
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
    """The embedded tokenizer: SentencePiece ("llama") or Llama 3's byte-level BPE ("gpt2" with
    the "llama-bpe" pre-tokeniser), carrying `tokenizer.chat_template` as `chat_template` (a
    ChatTemplate, or None) and the named ones as `chat_templates`, as a model directory's tokenizer does."""
    model = _get(f, "tokenizer.ggml.model", str, "")
    if model == "llama":
        tok = _sentencepiece_from_gguf(f)
    elif model == "gpt2":
        tok = _bpe_from_gguf(f)
    else:
        raise ValueError(f"{f.path}: tokenizer.ggml.model is {model!r}; llamaworks reads SentencePiece (\"llama\", "
                         "LLaMA 1/2) and byte-level BPE (\"gpt2\" with tokenizer.ggml.pre \"llama-bpe\", Llama 3)")
    attach_chat_templates(tok, gguf_chat_templates(f, tok))
    return tok


def gguf_template_name(name: str) -> str:
    """A chat template's name as a GGUF key suffix: letters, digits and '_' (gguf-py's
    add_chat_template writes every other character as '_', and llama.cpp looks names up so)."""
    return "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in name)


def gguf_chat_templates(f: GGUFFile, tok) -> dict[str, ChatTemplate]:
    """name -> template of a file: "default" for tokenizer.chat_template, NAME for each
    tokenizer.chat_template.NAME; every name tokenizer.chat_templates lists must have its key."""
    prefix = "tokenizer.chat_template."
    keys = {"default": "tokenizer.chat_template"} if "tokenizer.chat_template" in f.metadata else {}
    for key in f.metadata:
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name is not None:
            if not name or gguf_template_name(name) != name or name == "default":
                raise ValueError(f"{f.path}: GGUF metadata {key!r} does not name a chat template (letters, digits "
                                 "and '_', not 'default'); the file is corrupt")
            keys[name] = key
    if len(keys) > MAX_CHAT_TEMPLATES + 1:
        raise ValueError(f"{f.path}: {len(keys)} chat templates, more than {MAX_CHAT_TEMPLATES}; the file is corrupt")
    if "tokenizer.chat_templates" in f.metadata:
        listed = _array(f, "tokenizer.chat_templates", (_STRING,))
        missing = [n for n in listed if n.decode("utf-8", "replace") not in keys]
        if missing:
            raise ValueError(f"{f.path}: tokenizer.chat_templates lists {missing[0]!r}, but the file has no "
                             f"{prefix}{missing[0].decode('utf-8', 'replace')}; the file is corrupt")

    def piece(i: int) -> str | None:
        return tok.id_to_piece(i) if i is not None and i >= 0 else None

    return {name: ChatTemplate.from_gguf_value(_get(f, key, str), bos_token=piece(tok.bos_id),
                                               eos_token=piece(tok.eos_id), source=f.path, key=key)
            for name, key in sorted(keys.items())}


def _token_strings(f: GGUFFile) -> list[str]:
    raw = _array(f, "tokenizer.ggml.tokens", (_STRING,))
    try:
        return [p.decode("utf-8") for p in raw]
    except UnicodeDecodeError:
        bad = next(i for i, p in enumerate(raw) if not _is_utf8(p))
        raise ValueError(f"{f.path}: token {bad} of tokenizer.ggml.tokens is not UTF-8 ({raw[bad][:40]!r}); "
                         "the file is corrupt") from None


def _sentencepiece_from_gguf(f: GGUFFile) -> Tokenizer:
    path = f.path
    pieces = _token_strings(f)
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


# llama.cpp's token types (gguf.TokenType): NORMAL tokens are byte-level strings merged by BPE;
# CONTROL, UNKNOWN and UNUSED ones are never matched in text (special tokens here), USER_DEFINED
# ones always are (added tokens that are not special); BYTE (<0xNN>) is SentencePiece's.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED = 1, 2, 3, 4, 5
# The ranks form costs a slice per split of every token (ranks_to_merges), quadratic in a token's
# length: a longer token sends the vocabulary to the merges form (the same tokens, linear cost).
MAX_RANKS_TOKEN = 1024


def _bpe_from_gguf(f: GGUFFile) -> ByteLevelBPETokenizer:
    path = f.path
    pre = _get(f, "tokenizer.ggml.pre", str, "")
    if pre not in LLAMA3_PRE:
        found = (f"is {pre!r}" if "tokenizer.ggml.pre" in f.metadata
                 else "is missing (llama.cpp then splits text GPT-2's way)")
        raise ValueError(f"{path}: tokenizer.ggml.pre {found}; llamaworks reads byte-level BPE with Llama 3's "
                         "pre-tokeniser (\"llama-bpe\") only, as another split of text into words tokenises "
                         "differently; convert the model again with a current llama.cpp")
    pieces = _token_strings(f)
    n = len(pieces)
    types = _array(f, "tokenizer.ggml.token_type", (4, 5), n).astype(np.int64)
    if n < 256:
        raise ValueError(f"{path}: tokenizer.ggml.tokens has {n} tokens; byte-level BPE has at least the 256 bytes")
    if not ((types >= _NORMAL) & (types <= _UNUSED)).all():
        raise ValueError(f"{path}: tokenizer.ggml.token_type holds values outside 1..5 (BYTE tokens, 6, are "
                         "SentencePiece's); not a byte-level BPE vocabulary, or the file is corrupt")
    seen: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        if piece in seen:
            raise ValueError(f"{path}: tokens {seen[piece]} and {i} of tokenizer.ggml.tokens are both {piece[:40]!r}; "
                             "the file is corrupt")
        seen[piece] = i
    alphabet = set(byte_alphabet())
    table: dict[bytes, int] = {}  # token bytes -> id, for the NORMAL tokens
    for i in np.flatnonzero(types == _NORMAL).tolist():
        piece = pieces[i]
        if not piece or not set(piece) <= alphabet:
            raise ValueError(f"{path}: token {i} of tokenizer.ggml.tokens, {piece[:40]!r}, is NORMAL but not a "
                             "byte-level token string; the file is corrupt")
        table[piece_to_bytes(piece)] = i  # one string per byte sequence: distinct pieces, distinct bytes
    missing = [b for b in range(256) if bytes([b]) not in table]
    if missing:
        raise ValueError(f"{path}: tokenizer.ggml.tokens lacks the single byte{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(f'0x{b:02X}' for b in missing[:8])}; byte-level BPE needs all 256")
    others = [i for i in range(n) if types[i] != _NORMAL]
    merges = _merges(f, table)
    special_ids = [i for i in others if types[i] != _USER_DEFINED]
    n_ranks = len(table)
    # The vocabulary as tiktoken ranks when it is one: ranks first, special tokens after them,
    # and the merges those ranks imply. Then the tokenizer is Meta's form again, byte for byte.
    if (special_ids == others == list(range(n_ranks, n)) and max(map(len, table)) <= MAX_RANKS_TOKEN
            and merges == ranks_to_merges(table)):
        tok = ByteLevelBPETokenizer.from_ranks(table, [pieces[i] for i in others], path.with_name("tokenizer.model"))
    else:
        tok = _bpe_from_merges(f, pieces, types, merges)
    # The ids the file names, where they are not the ones the token names give.
    for what in ("bos", "eos", "eot", "eom"):
        key = f"tokenizer.ggml.{what}_token_id"
        if key in f.metadata:
            i = _get(f, key, int, low=0, high=n - 1)
            if what == "bos":
                tok.bos_id = i
            elif what == "eos" and i != tok.eos_id:
                tok.eos_id = i  # Llama 3 instruct's <|eot_id|>; also a stop id
            elif what in ("eot", "eom"):
                tok.stop_ids = tok.stop_ids | {i}
    return tok


def _merges(f: GGUFFile, table: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """tokenizer.ggml.merges as byte pairs, each side a token and their concatenation a token."""
    raw = _array(f, "tokenizer.ggml.merges", (_STRING,))
    out = []
    for k, m in enumerate(raw):
        try:
            left, right = m.decode("utf-8").split(" ")
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"{f.path}: merge {k} of tokenizer.ggml.merges, {m[:40]!r}, is not two tokens separated "
                             "by a space; the file is corrupt") from None
        a, b = piece_to_bytes(left), piece_to_bytes(right)
        if a not in table or b not in table or a + b not in table:
            raise ValueError(f"{f.path}: merge {k} of tokenizer.ggml.merges, {m[:40]!r}, names a token, or joins two "
                             "into one, that tokenizer.ggml.tokens does not hold; the file is corrupt")
        out.append((a, b))
    return out


def _bpe_from_merges(f: GGUFFile, pieces: list[str], types: np.ndarray,
                     merges: list[tuple[bytes, bytes]]) -> ByteLevelBPETokenizer:
    # A tokenizer.json with the file's vocabulary and merges, split and merged as llama.cpp's
    # "llama-bpe" does: Llama 3's regex, byte-level characters, a word that is a token taken whole.
    added = [{"id": i, "content": pieces[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": bool(types[i] != _USER_DEFINED)}
             for i in range(len(pieces)) if types[i] != _NORMAL]
    key = "tokenizer.ggml.bos_token_id"
    bos = _get(f, key, int, low=0, high=len(pieces) - 1) if key in f.metadata else -1
    post = None  # <|begin_of_text|> added as Hugging Face's Llama 3 tokenizer.json adds it
    if bos >= 0 and types[bos] in (_CONTROL, _UNKNOWN, _UNUSED):
        name = pieces[bos]
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": name, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {name: {"id": name, "ids": [bos], "tokens": [name]}}}
    data = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {p: i for i, p in enumerate(pieces)},
                  "merges": [f"{bytes_to_piece(a)} {bytes_to_piece(b)}" for a, b in merges]},
    }
    name = f.path.with_name("tokenizer.json")  # what the rebuilt tokenizer is known by; no such file is read
    try:
        return ByteLevelBPETokenizer.from_json(data, name)
    except ValueError as e:
        raise ValueError(f"{f.path}: its byte-level vocabulary does not make a tokenizer "
                         f"({str(e).removeprefix(str(name)).strip(': ')}); the file is corrupt") from None


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


# llama.* keys of files whose model LLaMA's cannot express, and what each one makes it. A key
# is refused when `differs(value)` holds; the others are harmless where present.
_OTHER_ARCHITECTURES: dict[str, tuple[str, Callable[[object, int, int], bool]]] = {
    "expert_count": ("a mixture of experts ({} experts)", lambda v, hd, ctx: v != 0),
    "expert_used_count": ("a mixture of experts ({} experts per token)", lambda v, hd, ctx: v != 0),
    "interleave_moe_layer_step": ("a mixture of experts (every {} layers)", lambda v, hd, ctx: v != 0),
    "attention.sliding_window": ("sliding-window attention (a window of {} positions)",
                                 lambda v, hd, ctx: 0 < v < ctx),  # a window as long as the context is none
    "attention.sliding_window_pattern": ("sliding-window attention (pattern {})", lambda v, hd, ctx: True),
    "attention.key_length": ("attention with keys of {} dimensions per head", lambda v, hd, ctx: v != hd),
    "attention.value_length": ("attention with values of {} dimensions per head", lambda v, hd, ctx: v != hd),
    "attention.layer_norm_epsilon": ("LayerNorm (epsilon {}) in place of RMSNorm", lambda v, hd, ctx: True),
    "attention.clamp_kqv": ("attention with q/k/v clamped to {}", lambda v, hd, ctx: True),
    "attention.max_alibi_bias": ("ALiBi attention (max bias {})", lambda v, hd, ctx: v != 0),
    "attention.causal": ("attention that is not causal", lambda v, hd, ctx: not v),
    "attention.scale": ("attention scaled by {} in place of 1/sqrt(head_dim)", lambda v, hd, ctx: True),
    "attention.temperature_scale": ("attention temperature tuning ({})", lambda v, hd, ctx: v != 0),
    "rope.scaling.attn_factor": ("rotary embeddings scaled by {} (YaRN's attention factor)",
                                 lambda v, hd, ctx: v != 1),
    "use_parallel_residual": ("parallel residual blocks", lambda v, hd, ctx: bool(v)),
    "logit_scale": ("logits scaled by {}", lambda v, hd, ctx: v != 1),
    "embedding_scale": ("embeddings scaled by {}", lambda v, hd, ctx: v != 1),
    "residual_scale": ("residuals scaled by {}", lambda v, hd, ctx: v != 1),
    "attn_logit_softcapping": ("attention logits soft-capped at {}", lambda v, hd, ctx: v != 0),
    "final_logit_softcapping": ("logits soft-capped at {}", lambda v, hd, ctx: v != 0),
}


def _refuse_other_architectures(f: GGUFFile, head_dim: int, context: int) -> None:
    for name, (what, differs) in _OTHER_ARCHITECTURES.items():
        key = f"llama.{name}"
        if key not in f.metadata:
            continue
        v = f.metadata[key]
        shown = _describe(v) if isinstance(v, (bytes, GGUFArray)) else v
        try:
            refused = isinstance(v, (bytes, GGUFArray)) or differs(v, head_dim, context)
        except TypeError:
            refused = True
        if refused:
            raise ValueError(f"{f.path}: GGUF metadata {key!r} makes this " + what.format(shown) + ", which LLaMA's "
                             "model does not compute; llamaworks runs dense causal RMSNorm transformers only")


def llama31_scaling_from_factors(factors: torch.Tensor, head_dim: int, theta: float,
                                 old_context_lens: list[int], rtol: float = 1e-5) -> tuple | None:
    """(factor, low_freq_factor, high_freq_factor, old_context_len) of the Llama 3.1 scaling
    whose rope_freqs factors (base frequency / scaled frequency, as llama.cpp's converter
    writes them) equal `factors` within `rtol`; None when none does.

    Tried: Meta's low/high 1 and 4, then low/high fitted to the factors between the two
    plateaus; scaling factors 8 (Llama 3.1) and 32 (3.2), then the largest factor in the tensor
    (the plateau of slow frequencies); each context length in `old_context_lens`."""
    base = rope_inv_freq(head_dim, theta).double()
    got = factors.double()
    top = float(f"{float(got.max()):.7g}")
    turns_per_freq = base / (2 * math.pi)
    for ctx in dict.fromkeys(old_context_lens):
        for factor in dict.fromkeys([8.0, 32.0, top]):
            if factor <= 1:
                continue
            bands = [(1.0, 4.0)]
            # Between the plateaus 1/f moves linearly with the turns over the old context:
            # 1/f = 1/F + (1 - 1/F) (turns - low) / (high - low); two such points fix low and high.
            inside = (got > 1 + 1e-4) & (got < factor * (1 - 1e-4))
            if int(inside.sum()) >= 2:
                s = ((1 / got - 1 / factor) / (1 - 1 / factor))[inside].numpy()
                turns = (ctx * turns_per_freq)[inside].numpy()
                slope, intercept = np.polyfit(turns, s, 1)
                if slope > 0 and -intercept / slope > 0:
                    low = -intercept / slope
                    bands.append((float(f"{low:.5g}"), float(f"{low + 1 / slope:.5g}")))
            for low, high in bands:
                if not 0 < low < high:
                    continue
                want = base / llama31_scaled_inv_freq(base, factor, low, high, ctx)
                if torch.allclose(got, want, rtol=rtol, atol=0):
                    return factor, low, high, ctx
    return None


def _rope_freqs_tolerance(t: GGUFTensor) -> float:
    # f32 (what llama.cpp's converter writes): the factors differ from ours by float32 rounding.
    return {0: 1e-5, 1: 2.0 ** -10, 30: 2.0 ** -7}.get(t.type, 1e-5)


def _rope_args(f: GGUFFile, head_dim: int, theta: float, context: int, gguf) -> dict:
    """The ModelArgs fields of the file's RoPE scaling: linear from its keys, Llama 3.1's from
    the factors in rope_freqs.weight (matched, see llama31_scaling_from_factors)."""
    path = f.path
    # llama.cpp: the type defaults to "linear", the factor (or the older rope.scale_linear) to none;
    # type "none" never scales.
    kind = _get(f, "llama.rope.scaling.type", str, "linear")
    if kind not in ("none", "linear"):
        raise ValueError(f"{path}: RoPE scaling {kind!r} (llama.rope.scaling.type) is not LLaMA's rotary embedding; "
                         "llamaworks computes no RoPE scaling but linear and Llama 3.1's")
    factor_key = "llama.rope.scaling.factor" if "llama.rope.scaling.factor" in f.metadata else "llama.rope.scale_linear"
    factor = float(f"{_get(f, factor_key, float, 0.0, low=0):.7g}")
    linear = kind == "linear" and factor not in (0.0, 1.0)
    t = next((t for t in f.tensors if t.name == ROPE_FREQS), None)
    if t is not None:
        if t.shape != (head_dim // 2,) or t.type not in FLOAT_TYPES:
            raise ValueError(f"{path}: tensor {ROPE_FREQS} is {gguf.GGMLQuantizationType(t.type).name} of shape "
                             f"{t.shape}; llama.cpp reads float factors of shape ({head_dim // 2},) (head_dim/2)")
        factors = _tensor_data(f, t, gguf).float()
        rtol = _rope_freqs_tolerance(t)
        if not (torch.isfinite(factors).all() and (factors > 0).all()):
            raise ValueError(f"{path}: tensor {ROPE_FREQS} holds factors that are not positive finite numbers; "
                             "the file is corrupt")
        if not torch.allclose(factors, torch.ones_like(factors), rtol=0, atol=rtol):
            if linear:
                raise ValueError(f"{path}: tensor {ROPE_FREQS} and linear RoPE scaling ({factor_key} = {factor}) "
                                 "together are not a scaling llamaworks computes")
            ctx_key = "llama.rope.scaling.original_context_length"
            contexts = [_get(f, ctx_key, int, low=1)] if ctx_key in f.metadata else []
            found = llama31_scaling_from_factors(factors, head_dim, theta, contexts + [8192, context], rtol)
            if found is None:
                raise ValueError(
                    f"{path}: tensor {ROPE_FREQS} holds RoPE frequency factors (from {float(factors.min()):.4g} to "
                    f"{float(factors.max()):.4g}) that no Llama 3.1 scaling gives (tried low/high frequency factors "
                    f"1/4 and fitted ones, factors 8, 32 and the largest, original context "
                    f"{', '.join(map(str, dict.fromkeys(contexts + [8192, context])))}); llamaworks computes RoPE "
                    "frequencies from Llama 3.1's parameters and would run this model wrongly")
            factor, low, high, ctx = found
            return dict(use_scaled_rope=True, rope_scaling_factor=factor, rope_low_freq_factor=low,
                        rope_high_freq_factor=high, rope_old_context_len=ctx)
    return dict(rope_scaling_factor=factor) if linear else {}


def load_gguf(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a llama.cpp GGUF file of architecture "llama". Float tensors
    (f32, f16, bf16) are memory-mapped; quantised ones (Q8_0, Q4_0, Q4_K, ...) are dequantised
    to float32 (or `dtype`) with gguf-py's reference dequantisers. A file without output.weight
    has tied embeddings; rope_freqs.weight is read as Llama 3.1's RoPE scaling (module docstring)."""
    gguf = _import_gguf()
    path = require_file(path, "expected a .gguf file")
    f = read_gguf(path, gguf)
    arch = _get(f, "general.architecture", str, "")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}; only \"llama\" GGUF files can be loaded")
    key = lambda k: f"llama.{k}"  # noqa: E731
    dim = _get(f, key("embedding_length"), int, low=1)
    n_heads = _get(f, key("attention.head_count"), int, low=1, high=dim)
    if _get(f, key("rope.dimension_count"), int, dim // n_heads) != dim // n_heads:
        raise ValueError(f"{path}: partial rotary embeddings are not LLaMA's")
    context = _get(f, key("context_length"), int, 2048, low=1)
    # Files of architecture "llama" that LLaMA's model cannot express: refused, not run wrongly.
    _refuse_other_architectures(f, dim // n_heads, context)
    # Sizes are checked against the tensors before anything is built from them.
    n_layers = _get(f, key("block_count"), int, low=1)
    if n_layers > len(f.tensors):
        raise ValueError(f"{path}: GGUF metadata 'llama.block_count' is {n_layers}, but the file holds only "
                         f"{len(f.tensors)} tensors (a block has 9); the file is corrupt")
    n_vocab = len(_array(f, "tokenizer.ggml.tokens", (_STRING,)))
    theta = float(f"{_get(f, key('rope.freq_base'), float, 10000.0):.7g}")
    try:
        multiple_of, mult = ffn_params(dim, _get(f, key("feed_forward_length"), int, low=1))
        args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads,
                         n_kv_heads=_get(f, key("attention.head_count_kv"), int, n_heads, low=1),
                         vocab_size=n_vocab, multiple_of=multiple_of, ffn_dim_multiplier=mult,
                         # GGUF stores floats as float32: 1e-6 comes back as 9.99999997e-07.
                         norm_eps=float(f"{_get(f, key('attention.layer_norm_rms_epsilon'), float, 1e-6):.7g}"),
                         max_seq_len=context, rope_theta=theta,
                         # llama.cpp uses token_embd for the output when the file has no output.weight.
                         tie_word_embeddings=not any(t.name == "output.weight" for t in f.tensors),
                         **_rope_args(f, dim // n_heads, theta, context, gguf))
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: its llama.* metadata makes no LLaMA model: {e}") from None
    if args.use_scaled_rope:  # the frequencies the model computes are the file's: read, not recomputed
        t = next(t for t in f.tensors if t.name == ROPE_FREQS)
        if not torch.allclose(rope_freq_factors(args), _tensor_data(f, t, gguf).float(), rtol=_rope_freqs_tolerance(t),
                              atol=0):
            raise ValueError(f"{path}: tensor {ROPE_FREQS} differs from the factors of {args}")
    names = {}
    for t in f.tensors:
        if t.name == ROPE_FREQS:
            continue  # read above, as the arguments' RoPE scaling
        if t.type in OTHER_TYPES:
            raise ValueError(f"{path}: tensor {t.name} is stored as {gguf.GGMLQuantizationType(t.type).name}; "
                             "LLaMA weights are float or quantised")
        try:
            names[meta_key(t.name)] = t
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    shapes = {k: torch.empty(t.shape, device="meta") for k, t in names.items()}
    check_state_dict(args, shapes, path, config="its llama.* metadata")  # before any data is read
    tokenizer = tokenizer_from_gguf(f)
    # One dtype for the model: `dtype`, else the token embedding's when it is stored as floats
    # (llama.cpp keeps norms in f32 inside f16/bf16 files), else float32. Each tensor is cast as
    # it is read, so a quantised 7B file never holds all of its float32 copy at once.
    embd = names.get("tok_embeddings.weight")
    dtype = dtype or FLOAT_TYPES.get(embd.type, torch.float32)
    state = {k: _tensor_data(f, t, gguf).to(dtype) for k, t in names.items()}  # no copy when already `dtype`
    check_finite(state, path)
    return model_from_state(args, state, path, config="its llama.* metadata"), tokenizer
