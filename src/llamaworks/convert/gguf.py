"""GGUF for llama.cpp: export (architecture "llama", f32 or f16, tokenizer embedded) and import
(float or quantised tensors, the embedded tokenizer rebuilt as a SentencePiece model).

q/k rows: llama.cpp's "llama" architecture rotates adjacent pairs (Meta's interleaved
RoPE, LLAMA_ROPE_TYPE_NORM). Its convert_hf_to_gguf.py therefore applies `permute` to
HF's q_proj/k_proj, which undoes transformers' rotate-half permutation: a GGUF file
holds q/k in Meta's row order, so Meta/llamaworks weights are written unpermuted.
The parity test against llama.cpp checks this (a wrong order changes its tokens).

Memory: f32 tensors are handed to the writer as views of the (memory-mapped) weights;
f16 needs one converted copy (half the f32 model) until the file is written.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

from llamaworks.model import ModelArgs, ffn_params
from llamaworks.tokenizer import Tokenizer
from llamaworks.tokenizer.spm_proto import sentencepiece_model
from llamaworks.weights import model_from_state

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
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    layer = {v: k for k, v in LAYER_KEYS.items()}
    if m is None or m[2] not in layer:
        raise ValueError(f"GGUF tensor {name!r} is not part of a LLaMA model (architecture \"llama\")")
    return f"layers.{m[1]}.{layer[m[2]]}"


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise ValueError(f"GGUF metadata {key!r} is missing")
        return default
    if len(f.data) == 1 and f.types and f.types[0] != 8:  # a scalar (8: GGUFValueType.STRING)
        return f.parts[f.data[0]].tolist()[0]
    if f.types and f.types[0] == 8:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    raise ValueError(f"GGUF metadata {key!r} is not a scalar")


def _array(reader, key: str) -> list:
    f = reader.fields.get(key)
    if f is None:
        raise ValueError(f"GGUF metadata {key!r} is missing: the file embeds no LLaMA tokenizer")
    return [f.parts[i] for i in f.data]


def tokenizer_from_gguf(reader, path: Path):
    model = _field(reader, "tokenizer.ggml.model", "")
    if model != "llama":
        raise ValueError(f"{path}: tokenizer.ggml.model is {model!r}; only the SentencePiece (\"llama\") "
                         "tokenizer of LLaMA is supported")
    pieces = [bytes(p).decode("utf-8") for p in _array(reader, "tokenizer.ggml.tokens")]
    scores = [float(s[0]) for s in _array(reader, "tokenizer.ggml.scores")]
    types = [int(t[0]) for t in _array(reader, "tokenizer.ggml.token_type")]
    if not len(pieces) == len(scores) == len(types):
        raise ValueError(f"{path}: {len(pieces)} tokens but {len(scores)} scores and {len(types)} token types")
    ids = {name: int(_field(reader, f"tokenizer.ggml.{name}_token_id", default))
           for name, default in (("unknown", 0), ("bos", 1), ("eos", 2))}
    proto = sentencepiece_model(pieces, scores, types, ids["unknown"], ids["bos"], ids["eos"])
    return Tokenizer.from_proto(proto, path.with_name("tokenizer.model"))


def load_gguf(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a llama.cpp GGUF file of architecture "llama". Float tensors
    (f32, f16, bf16) are memory-mapped; quantised ones (Q8_0, Q4_0, Q4_K, ...) are dequantised
    to float32 (or `dtype`) with gguf-py's reference dequantisers."""
    import numpy as np


    gguf = _import_gguf()
    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = _field(reader, "general.architecture", "")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}; only \"llama\" GGUF files can be loaded")
    key = lambda k: f"llama.{k}"  # noqa: E731
    # Files of architecture "llama" that LLaMA's model cannot express: refused, not run wrongly.
    if int(_field(reader, key("expert_count"), 0)):
        raise ValueError(f"{path}: a mixture of experts ({_field(reader, key('expert_count'))} experts), not LLaMA")
    scaling = _field(reader, key("rope.scaling.type"), "none")
    if scaling != "none":
        raise ValueError(f"{path}: RoPE scaling {scaling!r} is not LLaMA's rotary embedding")
    dim, n_heads = int(_field(reader, key("embedding_length"))), int(_field(reader, key("attention.head_count")))
    if int(_field(reader, key("rope.dimension_count"), dim // n_heads)) != dim // n_heads:
        raise ValueError(f"{path}: partial rotary embeddings are not LLaMA's")
    multiple_of, mult = ffn_params(dim, int(_field(reader, key("feed_forward_length"))))
    tokenizer = tokenizer_from_gguf(reader, path)
    args = ModelArgs(dim=dim, n_layers=int(_field(reader, key("block_count"))), n_heads=n_heads,
                     n_kv_heads=int(_field(reader, key("attention.head_count_kv"), n_heads)),
                     vocab_size=tokenizer.vocab_size, multiple_of=multiple_of, ffn_dim_multiplier=mult,
                     # GGUF stores floats as float32: 1e-6 comes back as 9.99999997e-07.
                     norm_eps=float(f"{_field(reader, key('attention.layer_norm_rms_epsilon'), 1e-6):.7g}"),
                     max_seq_len=int(_field(reader, key("context_length"), 2048)),
                     rope_theta=float(f"{_field(reader, key('rope.freq_base'), 10000.0):.7g}"))
    Q = gguf.GGMLQuantizationType
    # One dtype for the model: `dtype`, else the token embedding's when it is stored as floats
    # (llama.cpp keeps norms in f32 inside f16/bf16 files), else float32. Each tensor is cast as
    # it is read, so a quantised 7B file never holds all of its float32 copy at once.
    floats = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    dtype = dtype or (floats.get(embd.tensor_type, torch.float32) if embd is not None else torch.float32)
    state = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dimensions innermost first
        if t.tensor_type in (Q.F32, Q.F16, Q.BF16):
            with warnings.catch_warnings():  # a read-only view of the mapped file, never written to
                warnings.simplefilter("ignore", UserWarning)
                raw = np.asarray(t.data)
                data = (torch.from_numpy(raw.view(np.int16).reshape(shape)).view(torch.bfloat16)
                        if t.tensor_type == Q.BF16 else torch.from_numpy(raw.reshape(shape)))
        else:
            try:
                data = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape))
            except NotImplementedError:
                raise ValueError(f"{path}: tensor {t.name} is {t.tensor_type.name}, which gguf-py cannot "
                                 "dequantise; re-export the model as f16 or Q8_0") from None
        state[meta_key(t.name)] = data.to(dtype)  # no copy when the stored dtype is the model's
    if "output.weight" not in state and "tok_embeddings.weight" in state:
        # Tied embeddings (later llama-architecture files): LLaMA's output layer is its own copy.
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    return model_from_state(args, state, path), tokenizer
