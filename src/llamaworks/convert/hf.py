"""Meta/llamaworks <-> Hugging Face `LlamaForCausalLM`: key map, q/k permutation, config.

Meta's RoPE rotates interleaved pairs (rows 2i, 2i+1 of each head); transformers'
`rotate_half` rotates rows i and i + head_dim/2. The same model therefore needs the
wq/wk rows reordered within each head when crossing over; everything else is renamed.
"""

from __future__ import annotations

import math

import torch

from llamaworks.model import ModelArgs, ffn_hidden_dim

# Per-layer suffixes, Meta -> HF (prefix layers.N. -> model.layers.N.).
LAYER_KEYS: dict[str, str] = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
TOP_KEYS: dict[str, str] = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def key_map(n_layers: int) -> dict[str, str]:
    """Every Meta state-dict key of an n_layers model -> its HF name."""
    out = dict(TOP_KEYS)
    for i in range(n_layers):
        out.update({f"layers.{i}.{m}": f"model.layers.{i}.{h}" for m, h in LAYER_KEYS.items()})
    return out


def _pair_view(w: torch.Tensor, n_heads: int) -> tuple[int, int]:
    if w.dim() != 2 or w.shape[0] % (2 * n_heads):
        raise ValueError(f"cannot split a {tuple(w.shape)} projection into {n_heads} heads of even size")
    return w.shape[0] // n_heads // 2, w.shape[1]


def permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta interleaved rows (2i, 2i+1) of each head -> HF rows (i, i + head_dim/2)."""
    half, cols = _pair_view(w, n_heads)
    return w.reshape(n_heads, half, 2, cols).transpose(1, 2).reshape(w.shape)


def unpermute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of permute_for_hf."""
    half, cols = _pair_view(w, n_heads)
    return w.reshape(n_heads, 2, half, cols).transpose(1, 2).reshape(w.shape)


def _check_keys(got, expected, what: str):
    unknown, missing = sorted(set(got) - set(expected)), sorted(set(expected) - set(got))
    if unknown or missing:
        raise ValueError(
            f"{what} state dict does not match the model: unknown keys {unknown}, missing keys {missing}"
        )


def to_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Meta-keyed tensors -> LlamaForCausalLM-keyed tensors (q/k permuted; others shared, not copied)."""
    names = key_map(args.n_layers)
    _check_keys(sd, names, "Meta")
    out = {}
    for k, t in sd.items():
        if k.endswith("attention.wq.weight"):
            t = permute_for_hf(t, args.n_heads)
        elif k.endswith("attention.wk.weight"):
            t = permute_for_hf(t, args.n_kv_heads)
        out[names[k]] = t
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM-keyed tensors -> Meta-keyed tensors; HF's rotary inv_freq buffers are dropped."""
    names = {h: m for m, h in key_map(args.n_layers).items()}
    # Older transformers saved the (recomputable) RoPE frequencies as a persistent buffer.
    sd = {k: t for k, t in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    _check_keys(sd, names, "Hugging Face")
    out = {}
    for k, t in sd.items():
        if k.endswith("self_attn.q_proj.weight"):
            t = unpermute_from_hf(t, args.n_heads)
        elif k.endswith("self_attn.k_proj.weight"):
            t = unpermute_from_hf(t, args.n_kv_heads)
        out[names[k]] = t
    return out


def hf_config_dict(args: ModelArgs, dtype: torch.dtype | str = torch.float32) -> dict:
    """A LlamaConfig/config.json dict for `args`.

    Both spellings of RoPE theta and dtype are written: transformers 5 reads
    `rope_parameters`/`dtype`, transformers 4 and most other readers (llama.cpp's
    converter, vLLM) read `rope_theta`/`torch_dtype`.
    """
    if args.vocab_size <= 0:
        raise ValueError(f"vocab_size={args.vocab_size} is unresolved; set it from the tokenizer first")
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "max_position_embeddings": args.max_seq_len,
        "vocab_size": args.vocab_size,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


def _ffn_params(dim: int, intermediate: int) -> tuple[int, float | None]:
    for m in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if ffn_hidden_dim(dim, m) == intermediate:
            return m, None
    # Not 2/3*4d rounded up: express the width through Llama 2's ffn_dim_multiplier. The
    # largest power-of-two multiple_of that divides the width keeps the multiplier's
    # float rounding harmless; nextafter covers a product landing one ulp short.
    m = math.gcd(intermediate, 256)
    mult = intermediate / int(2 * (4 * dim) / 3)
    for cand in (mult, math.nextafter(mult, math.inf)):
        if ffn_hidden_dim(dim, m, cand) == intermediate:
            return m, cand
    raise ValueError(f"cannot express intermediate_size={intermediate} for hidden_size={dim}")


def args_from_hf_config(cfg: dict) -> ModelArgs:
    """ModelArgs from a config.json / LlamaConfig.to_dict() dict; rejects what the model cannot express."""

    def bad(why):
        return ValueError(f"unsupported Hugging Face config: {why}")

    if cfg.get("model_type", "llama") != "llama":
        raise bad(f"model_type={cfg['model_type']!r}")
    for flag in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if cfg.get(flag, False):
            raise bad(f"{flag}=True")
    if cfg.get("hidden_act", "silu") != "silu":
        raise bad(f"hidden_act={cfg['hidden_act']!r}")
    rope = dict(cfg.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    if rope.pop("rope_type", "default") != "default" or rope or cfg.get("rope_scaling"):
        raise bad(f"rope scaling {cfg.get('rope_parameters') or cfg.get('rope_scaling')}")
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, dim // n_heads):
        raise bad(f"head_dim={cfg['head_dim']} differs from hidden_size/num_attention_heads")
    multiple_of, mult = _ffn_params(dim, cfg["intermediate_size"])
    return ModelArgs(
        dim=dim,
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        vocab_size=cfg["vocab_size"],
        multiple_of=multiple_of,
        ffn_dim_multiplier=mult,
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        rope_theta=float(theta),
    )
