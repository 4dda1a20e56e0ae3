"""GGUF export for llama.cpp (architecture "llama", f32 or f16, tokenizer embedded).

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
from pathlib import Path

import torch

from llamaworks.model import ModelArgs

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


def gguf_path(dst: Path) -> Path:
    return dst if dst.suffix == ".gguf" else dst / "model.gguf"
