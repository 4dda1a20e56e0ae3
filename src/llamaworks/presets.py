"""The values a ModelArgs (model.py) holds: the released families' shapes as named presets, the
SwiGLU width rule and its inverse (for checkpoints that store the width), and the checks every
params.json, config.json or GGUF header goes through on its way in.

Pure data and functions; model.py imports them and re-exports the public names.
"""

from __future__ import annotations

import math
import numbers

from llamaworks.rope import LLAMA31_ROPE_SCALING, MAX_POSITIONS

# The later families, as Meta's params.json and HF's config.json give them.
_LLAMA2 = dict(norm_eps=1e-5, max_seq_len=4096, vocab_size=32000)  # Llama 2 paper: 4096-token context
_LLAMA3 = dict(norm_eps=1e-5, vocab_size=128256, rope_theta=500000.0, n_kv_heads=8, max_seq_len=8192)
_LLAMA31 = dict(_LLAMA3, max_seq_len=131072, use_scaled_rope=True)  # 128K context
_LLAMA32 = dict(_LLAMA31, rope_scaling_factor=32.0, tie_word_embeddings=True)

# Table 2 of the paper (context 2048) plus small sizes for CPU work. The CPU presets keep
# the paper's shape (multiple_of 256, head_dim 64) but shrink width, depth and vocabulary.
PRESETS: dict[str, dict] = {
    "7B": dict(dim=4096, n_layers=32, n_heads=32),
    "13B": dict(dim=5120, n_layers=40, n_heads=40),
    "33B": dict(dim=6656, n_layers=60, n_heads=52),
    "65B": dict(dim=8192, n_layers=80, n_heads=64),
    "llama2-7b": dict(_LLAMA2, dim=4096, n_layers=32, n_heads=32),
    "llama2-13b": dict(_LLAMA2, dim=5120, n_layers=40, n_heads=40),
    "llama2-70b": dict(_LLAMA2, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                       ffn_dim_multiplier=1.3),
    # Code Llama 7B: Llama 2 7B, 16 more tokens (infilling), theta 1e6 for 16K-token sequences.
    "codellama-7b": dict(_LLAMA2, dim=4096, n_layers=32, n_heads=32, vocab_size=32016, rope_theta=1e6,
                         max_seq_len=16384),
    "llama3-8b": dict(_LLAMA3, dim=4096, n_layers=32, n_heads=32, multiple_of=1024, ffn_dim_multiplier=1.3),
    "llama3-70b": dict(_LLAMA3, dim=8192, n_layers=80, n_heads=64, multiple_of=4096, ffn_dim_multiplier=1.3),
    "llama3.1-8b": dict(_LLAMA31, dim=4096, n_layers=32, n_heads=32, multiple_of=1024, ffn_dim_multiplier=1.3),
    "llama3.1-70b": dict(_LLAMA31, dim=8192, n_layers=80, n_heads=64, multiple_of=4096, ffn_dim_multiplier=1.3),
    "llama3.1-405b": dict(_LLAMA31, dim=16384, n_layers=126, n_heads=128, multiple_of=4096, ffn_dim_multiplier=1.2),
    # Llama 3.2 1B/3B: tied embeddings, and factor 32 in their config.json's rope_scaling.
    "llama3.2-1b": dict(_LLAMA32, dim=2048, n_layers=16, n_heads=32, multiple_of=256, ffn_dim_multiplier=1.5),
    "llama3.2-3b": dict(_LLAMA32, dim=3072, n_layers=28, n_heads=24, multiple_of=256, ffn_dim_multiplier=1.0),
    "tiny": dict(dim=128, n_layers=4, n_heads=4, vocab_size=512, max_seq_len=256),  # ~1.2M, for tests
    "small": dict(dim=384, n_layers=6, n_heads=6, vocab_size=4096, max_seq_len=512),  # ~13.8M
    "base": dict(dim=768, n_layers=12, n_heads=12, vocab_size=8192, max_seq_len=1024),  # ~97.5M
}


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """SwiGLU width: 2/3 * 4d (section 2.2) rounded up to multiple_of (11008 for d=4096)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# (dim, SwiGLU width) of released models -> their params.json (multiple_of, ffn_dim_multiplier):
# Llama 2 and 3 70B, Llama 3 8B, 3.1 405B, 3.2 1B and 3B. Other pairs give the same width too.
RELEASED_FFN = {(8192, 28672): (4096, 1.3), (4096, 14336): (1024, 1.3), (16384, 53248): (4096, 1.2),
                (2048, 8192): (256, 1.5), (3072, 8192): (256, 1.0)}


def ffn_params(dim: int, intermediate: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that give a SwiGLU width of `intermediate`: the
    inverse of ffn_hidden_dim, for checkpoints that store the width (HF, GGUF)."""
    if (dim, intermediate) in RELEASED_FFN:
        return RELEASED_FFN[dim, intermediate]
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


def check_args(args) -> None:
    """Check and normalise a ModelArgs in place (its __post_init__): n_kv_heads defaults to
    n_heads, Llama 3.1's scaling gets Meta's fixed values where absent, integers and floats
    become int and float.

    params.json, config.json and GGUF metadata arrive here: a value of the wrong type or range
    is refused by name rather than failing later inside torch (or, for norm_eps or rope_theta,
    silently computing something else).
    """
    if args.n_kv_heads is None:
        args.n_kv_heads = args.n_heads
    for name in ("use_scaled_rope", "tie_word_embeddings"):
        if not isinstance(getattr(args, name), bool):
            raise ValueError(f"{name} must be true or false, got {getattr(args, name)!r}")
    band = ("rope_low_freq_factor", "rope_high_freq_factor", "rope_old_context_len")
    if args.use_scaled_rope:
        for name, meta_value in zip(("rope_scaling_factor", *band), LLAMA31_ROPE_SCALING):
            setattr(args, name, meta_value if getattr(args, name) is None else getattr(args, name))
    elif given := [name for name in band if getattr(args, name) is not None]:
        raise ValueError(f"{given[0]} applies only to Llama 3.1's scaling; set use_scaled_rope or remove it")
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len",
                 "rope_old_context_len"):
        value = getattr(args, name)
        if value is None and name == "rope_old_context_len":
            continue
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}" + (
                f" (write {int(value)})" if isinstance(value, float) and value.is_integer() else ""))
        setattr(args, name, int(value))
        # vocab_size -1 is Meta's "take it from the tokenizer", resolved by the loaders.
        if value <= 0 and not (name == "vocab_size" and value == -1):
            raise ValueError(f"{name} must be positive, got {value}")
    if args.max_seq_len > MAX_POSITIONS:
        raise ValueError(f"max_seq_len={args.max_seq_len} exceeds {MAX_POSITIONS}: float32 positions are exact "
                         "only up to 2^24, beyond which rotary angles repeat; lower max_seq_len")
    for name in ("norm_eps", "rope_theta", "ffn_dim_multiplier", "rope_scaling_factor", "rope_low_freq_factor",
                 "rope_high_freq_factor"):
        value = getattr(args, name)
        if value is None and name not in ("norm_eps", "rope_theta"):
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        setattr(args, name, float(value))
    if args.use_scaled_rope and not args.rope_low_freq_factor < args.rope_high_freq_factor:
        raise ValueError(f"rope_low_freq_factor={args.rope_low_freq_factor} must be below rope_high_freq_factor="
                         f"{args.rope_high_freq_factor} (Llama 3.1: 1 and 4)")
    if args.dim % args.n_heads:
        raise ValueError(f"dim={args.dim} is not divisible by n_heads={args.n_heads}")
    if args.n_heads % args.n_kv_heads:
        raise ValueError(f"n_heads={args.n_heads} is not divisible by n_kv_heads={args.n_kv_heads}")
    if args.head_dim % 2:
        raise ValueError(f"head dimension dim/n_heads={args.head_dim} must be even for rotary embeddings")
