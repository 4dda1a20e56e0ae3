"""The LLaMA transformer (Touvron et al. 2023, section 2.2), single device.

Names follow Meta's release so that `consolidated.NN.pth` and `params.json` load
without a key map: ModelArgs fields are params.json keys, module attributes are
state-dict keys (tok_embeddings, layers.N.attention.wq, feed_forward.w1, ...).
Nothing here knows about training, distribution or files.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # Llama 2 key (grouped-query attention); None = n_heads as in LLaMA 1
    vocab_size: int = 32000  # Meta writes -1 ("set from the tokenizer"); loaders resolve it
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None  # Llama 2 key; None for LLaMA 1
    norm_eps: float = 1e-6
    max_seq_len: int = 2048  # Table 2: context length 2048 for all sizes
    rope_theta: float = 10000.0  # Code Llama paper: 1e6 (long context); Llama 3 paper: 500000
    # Llama 3.1's RoPE scaling (Meta's params.json key; apply_scaling in Meta's llama3 code):
    # frequencies slower than the original context are divided by rope_scaling_factor, fast
    # ones kept, a band between blended. Meta's reference hard-codes the parameters (8, 1, 4,
    # 8192), filled in here when absent; rope_scaling_factor and rope_high_freq_factor are
    # Meta's names for them (Llama 4's params.json), the other two follow Meta's variables
    # low_freq_factor and old_context_len. rope_scaling_factor alone is linear scaling.
    use_scaled_rope: bool = False
    rope_scaling_factor: float | None = None
    rope_low_freq_factor: float | None = None
    rope_high_freq_factor: float | None = None
    rope_old_context_len: int | None = None  # HF's original_max_position_embeddings
    # output.weight is tok_embeddings.weight, one tensor (Llama 3.2 1B/3B; HF's name, as Meta has none).
    tie_word_embeddings: bool = False

    def __post_init__(self):
        # params.json, config.json and GGUF metadata arrive here: a value of the wrong type or
        # range is refused by name rather than failing later inside torch (or, for norm_eps or
        # rope_theta, silently computing something else).
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("use_scaled_rope", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        band = ("rope_low_freq_factor", "rope_high_freq_factor", "rope_old_context_len")
        if self.use_scaled_rope:
            for name, meta_value in zip(("rope_scaling_factor", *band), LLAMA31_ROPE_SCALING):
                setattr(self, name, meta_value if getattr(self, name) is None else getattr(self, name))
        elif given := [name for name in band if getattr(self, name) is not None]:
            raise ValueError(f"{given[0]} applies only to Llama 3.1's scaling; set use_scaled_rope or remove it")
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len",
                     "rope_old_context_len"):
            value = getattr(self, name)
            if value is None and name == "rope_old_context_len":
                continue
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}" + (
                    f" (write {int(value)})" if isinstance(value, float) and value.is_integer() else ""))
            setattr(self, name, int(value))
            # vocab_size -1 is Meta's "take it from the tokenizer", resolved by the loaders.
            if value <= 0 and not (name == "vocab_size" and value == -1):
                raise ValueError(f"{name} must be positive, got {value}")
        if self.max_seq_len > MAX_POSITIONS:
            raise ValueError(f"max_seq_len={self.max_seq_len} exceeds {MAX_POSITIONS}: float32 positions are exact "
                             "only up to 2^24, beyond which rotary angles repeat; lower max_seq_len")
        for name in ("norm_eps", "rope_theta", "ffn_dim_multiplier", "rope_scaling_factor", "rope_low_freq_factor",
                     "rope_high_freq_factor"):
            value = getattr(self, name)
            if value is None and name not in ("norm_eps", "rope_theta"):
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
            setattr(self, name, float(value))
        if self.use_scaled_rope and not self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ValueError(f"rope_low_freq_factor={self.rope_low_freq_factor} must be below rope_high_freq_factor="
                             f"{self.rope_high_freq_factor} (Llama 3.1: 1 and 4)")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dimension dim/n_heads={self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelArgs:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_params(cls, params: dict, **overrides) -> ModelArgs:
        """Build from a Meta params.json dict; unknown keys are an error, not silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown params.json keys {unknown}; valid keys are {sorted(known)}")
        return cls(**{**params, **overrides})

    def to_params(self) -> dict:
        # The later families' keys only where set: older models' params.json read as before.
        return {k: v for k, v in asdict(self).items() if v not in (None, False) or k in LLAMA1_KEYS}


# Positions are float32 in the rotary table (as in Meta's code), exact up to 2^24.
MAX_POSITIONS = 1 << 24
# Rotary-table rows built up front; a longer context grows the table when first used
# (setup_caches, a longer forward pass), so a declared max_seq_len costs nothing by itself.
ROPE_PREBUILT = 4096


LLAMA1_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "max_seq_len", "rope_theta")
# Llama 3.1's scaling as Meta's reference code fixes it: factor, low_freq_factor,
# high_freq_factor, old_context_len (Llama 3's 8192-token context).
LLAMA31_ROPE_SCALING = (8.0, 1.0, 4.0, 8192)
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


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight

    def reset_parameters(self):
        nn.init.ones_(self.weight)


def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """The rotary frequencies theta^(-2i/d) for i < d/2 (Su et al. 2021), in radians per position."""
    # fp32 throughout, exactly as Meta's and transformers' code, so released weights see the
    # very angles they were trained with (fp64 would differ by ~1e-4 rad at position 2047).
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def linear_scaled_inv_freq(inv_freq: torch.Tensor, factor: float) -> torch.Tensor:
    """Linear RoPE scaling (position interpolation, Chen et al. 2023; HF's rope_type "linear"):
    position p turns as p / factor did, so a context `factor` times longer spans the trained angles."""
    return inv_freq / factor


def llama31_scaled_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float,
                            high_freq_factor: float, old_context_len: int) -> torch.Tensor:
    """Llama 3.1's RoPE scaling (Meta's params "use_scaled_rope", its llama3 code's apply_scaling;
    HF's rope_type "llama3").

    A frequency making at least high_freq_factor turns over the original context
    (old_context_len positions) carries local position and is kept; one making at most
    low_freq_factor turns is divided by `factor`, like linear scaling; between the two, the
    result moves linearly with the number of turns from the divided to the kept frequency.
    """
    turns = old_context_len / (2 * math.pi / inv_freq)  # old_context_len / wavelength
    kept = ((turns - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0.0, 1.0)
    return (1 - kept) * inv_freq / factor + kept * inv_freq


def model_inv_freq(args: ModelArgs) -> torch.Tensor:
    """The rotary frequencies of a model: rope_theta, then its scaling if any."""
    inv_freq = rope_inv_freq(args.head_dim, args.rope_theta)
    if args.use_scaled_rope:
        return llama31_scaled_inv_freq(inv_freq, args.rope_scaling_factor, args.rope_low_freq_factor,
                                       args.rope_high_freq_factor, args.rope_old_context_len)
    if args.rope_scaling_factor is not None:
        return linear_scaled_inv_freq(inv_freq, args.rope_scaling_factor)
    return inv_freq


def rope_table(inv_freq: torch.Tensor, end: int) -> torch.Tensor:
    """cos/sin of position * inv_freq for positions < end: shape (end, head_dim/2, 2).

    Stored as real (cos, sin) pairs rather than complex numbers so that torch.compile
    and every backend handle it; the math is Meta's complex rotation.
    """
    angles = torch.outer(torch.arange(end, dtype=torch.float32), inv_freq)  # (end, head_dim/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def precompute_freqs_cis(head_dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """The unscaled RoPE table, cos/sin of position * theta^(-2i/d): shape (end, head_dim/2, 2)."""
    return rope_table(rope_inv_freq(head_dim, theta), end)


def apply_rotary_emb(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by their angle: Meta's interleaved RoPE layout.

    x: (bsz, seq, heads, head_dim); freqs: (seq, head_dim/2, 2) or (bsz, seq, head_dim/2, 2).
    out[2i] = x[2i] cos - x[2i+1] sin and out[2i+1] = x[2i+1] cos + x[2i] sin, written as
    x * (c0 c0 c1 c1 ...) + (x1 x0 x3 x2 ...) * (-s0 s0 -s1 s1 ...): the same products and sums
    as the complex multiplication (bit for bit), in three full-size kernels instead of a
    stack of strided pieces, which matters in training where the backward mirrors each one.
    """
    if freqs.dim() == 3:
        freqs = freqs.unsqueeze(0)
    cos = freqs[..., 0].repeat_interleave(2, dim=-1).unsqueeze(2)  # (bsz|1, seq, 1, head_dim)
    sin = (freqs[..., 1:] * freqs.new_tensor([-1.0, 1.0])).flatten(-2).unsqueeze(2)
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    return (xf * cos + swapped * sin).type_as(x)


class KVCache(nn.Module):
    """Static cache of keys and values, written at explicit per-sequence positions.

    Preallocated once, fixed shape: decoding never reallocates or changes shapes,
    which keeps the decode step compile- and CUDA-graph-friendly. Stored as attention
    reads it, (batch, heads, positions, head_dim): SDPA over a transposed view runs 1.7x
    slower at 2048 positions (it copies or strides through the whole cache every step).
    """

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None):
        # input_pos: (bsz, seq); k, v: (bsz, seq, n_kv_heads, head_dim); rows: (bsz,) cache rows
        # (default 0..bsz-1). Explicit rows let a server prefill or decode any subset of its
        # slots without touching the others (continuous batching). The two index tensors
        # broadcast to (bsz, seq) around the heads slice, so the indexed view is
        # (bsz, seq, n_kv_heads, head_dim), k's own layout.
        bsz = k.shape[0]
        idx = torch.arange(bsz, device=k.device) if rows is None else rows
        self.k[idx.unsqueeze(1), :, input_pos] = k.to(self.k.dtype)
        self.v[idx.unsqueeze(1), :, input_pos] = v.to(self.v.dtype)
        if rows is None:
            return self.k[:bsz], self.v[:bsz]
        return self.k[rows], self.v[rows]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, freqs, input_pos=None, mask=None, rows=None):
        bsz, seqlen, _ = x.shape
        # -1, not n_heads: under tensor parallelism wq/wk/wv hold a slice of the heads.
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim)
        q, k = apply_rotary_emb(q, freqs), apply_rotary_emb(k, freqs)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v, rows)  # (bsz, n_kv_heads, cache_len, head_dim)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (bsz, n_kv_heads, seq, head_dim)
        q = q.transpose(1, 2)  # (bsz, heads, seq, head_dim)
        if mask is None:
            # Memory-efficient causal attention (section 2.4): SDPA's fused kernels keep no
            # attention matrix, and the flash kernels skip the blocks the causal mask hides.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)  # (bsz, seq, dim)
        return self.wo(out)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020, as in PaLM): w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, freqs, input_pos=None, mask=None, rows=None):
        # Pre-normalisation (GPT-3): normalise each sub-layer's input, residual untouched.
        h = x + self.attention(self.attention_norm(x), freqs, input_pos, mask, rows)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        # tie_word_embeddings: output.weight is the embedding's tensor, which the state dict
        # names once (tok_embeddings.weight), so files hold one copy; loading ties it again.
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_output()
        self.register_state_dict_post_hook(Transformer._state_dict_hook)
        self.register_load_state_dict_pre_hook(Transformer._load_pre_hook)
        self.register_load_state_dict_post_hook(Transformer._load_post_hook)
        rows = min(ROPE_PREBUILT, args.max_seq_len)  # grown by init_rope when more are used
        self.register_buffer("freqs_cis", rope_table(model_inv_freq(args), rows), persistent=False)

    def tie_output(self) -> None:
        # Not once the output layer is swapped (quantised: it holds its own weights then).
        if self.args.tie_word_embeddings and type(self.output) is nn.Linear:
            self.output.weight = self.tok_embeddings.weight

    def _state_dict_hook(self, state_dict, prefix, local_metadata) -> None:
        if getattr(self.output, "weight", None) is self.tok_embeddings.weight:
            state_dict.pop(prefix + "output.weight", None)

    def _load_pre_hook(self, state, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        self._load_prefix = prefix
        out, emb = state.get(prefix + "output.weight"), state.get(prefix + "tok_embeddings.weight")
        if getattr(self.output, "weight", None) is not self.tok_embeddings.weight or out is None:
            return
        # A state dict with both (another program's, Meta's shards) holds the embedding twice.
        if emb is not None and not (out.is_meta or emb.is_meta) and not torch.equal(out, emb):
            raise ValueError("output.weight differs from tok_embeddings.weight but tie_word_embeddings is set: "
                             "these weights have an output layer of their own; set tie_word_embeddings to false")
        del state[prefix + "output.weight"]

    def _load_post_hook(self, incompatible) -> None:
        if self.args.tie_word_embeddings and type(self.output) is nn.Linear:
            self.tie_output()  # load_state_dict(assign=True) gave tok_embeddings a new tensor
            if self._load_prefix + "output.weight" in incompatible.missing_keys:
                incompatible.missing_keys.remove(self._load_prefix + "output.weight")

    def _apply(self, fn, recurse: bool = True):
        # to_empty(), to("meta") and other conversions that make new tensors convert each
        # submodule on its own, which would give output a tensor of its own: tie again.
        super()._apply(fn, recurse)
        self.tie_output()
        return self

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, *,
                rows: torch.Tensor | None = None, return_hidden: bool = False) -> torch.Tensor:
        """tokens: (bsz, seq) -> logits (bsz, seq, vocab).

        return_hidden: return the final normalised hidden states (bsz, seq, dim) instead, what
        the output layer reads: for a loss that fuses the output projection (train/loss.py).

        Without input_pos: a causal pass over positions 0..seq-1 (training, scoring).
        With input_pos (bsz, seq) or (seq,): the KV-cache path. Each sequence's tokens sit at
        their own positions, keys are written to the cache there, and a query at position p
        sees the cached keys at positions <= p of its own sequence.
        rows (bsz,): the cache rows the sequences live in (default 0..bsz-1); a server runs
        one new request, or its active slots, against a cache shared by all slots.
        """
        bsz, seqlen = tokens.shape
        if input_pos is None:
            assert seqlen <= self.args.max_seq_len, (seqlen, self.args.max_seq_len)
            if seqlen > self.freqs_cis.shape[0]:  # shapes only: no host sync
                self.init_rope(self.freqs_cis.device, seqlen)
            freqs, mask = self.freqs_cis[:seqlen], None
        else:
            assert self.layers[0].attention.kv_cache is not None, "call setup_caches() before decoding"
            input_pos = input_pos.expand(bsz, seqlen) if input_pos.dim() == 1 else input_pos
            # setup_caches grew the table to the cache's length, and positions lie inside the cache.
            freqs = self.freqs_cis[input_pos]  # (bsz, seq, head_dim/2, 2)
            cache_len = self.layers[0].attention.kv_cache.k.shape[2]
            key_pos = torch.arange(cache_len, device=tokens.device)
            mask = (key_pos.view(1, 1, 1, -1) <= input_pos.unsqueeze(1).unsqueeze(-1))  # (bsz, 1, seq, cache_len)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, freqs, input_pos, mask, rows)
        h = self.norm(h)
        if return_hidden:
            return h
        return self.output(h).float()

    def setup_caches(self, max_batch_size: int, max_seq_len: int | None = None, dtype=None):
        max_seq_len = max_seq_len or self.args.max_seq_len
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"cache length {max_seq_len} exceeds the model's max_seq_len={self.args.max_seq_len}")
        dtype = dtype or self.tok_embeddings.weight.dtype  # never quantised, unlike output (quantize.py)
        device = self.output.weight.device
        if max_seq_len > self.freqs_cis.shape[0]:  # here, never in the decode loop: steps see one table
            self.init_rope(self.freqs_cis.device, max_seq_len)
        for layer in self.layers:
            att = layer.attention
            att.kv_cache = KVCache(max_batch_size, max_seq_len, att.n_kv_heads, att.head_dim, dtype, device)

    def clear_caches(self):
        for layer in self.layers:
            layer.attention.kv_cache = None

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None):
        """Fill every parameter and buffer; call after building on meta and `to_empty()`.

        The paper does not state its initialisation. We use the GPT-2 / Megatron scheme that
        LLaMA-style trainers use: N(0, 0.02) for embeddings and projections, with the two
        projections that write into the residual stream (wo, w2) scaled by 1/sqrt(2 n_layers)
        so the residual variance stays O(1) with depth; norm weights are 1. This is separate
        from nn.Module's reset_parameters (Kaiming-uniform), which suits neither layer.
        """
        for name, p in self.named_parameters():
            self.init_parameter(name, p)
        self.init_rope(buffer_device)

    @torch.no_grad()
    def init_parameter(self, name: str, p: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Fill `p`, the parameter called `name` (or a full-size tensor standing in for it),
        with init_weights' scheme: the hook for callers that initialise one parameter at a
        time from their own generator (train/init.py: sharded initialisation)."""
        std = 0.02
        if name.endswith("norm.weight"):
            nn.init.ones_(p)
        elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.args.n_layers), generator=generator)
        else:
            nn.init.normal_(p, mean=0.0, std=std, generator=generator)

    def init_rope(self, device: torch.device | None = None, positions: int = 0):
        """(Re)compute the RoPE table in fp32: after to_empty(), after casting the model to a
        low-precision dtype (which would otherwise round the angles too), and to cover more
        positions. Rows come in powers of two from ROPE_PREBUILT up to max_seq_len: a declared
        context costs nothing until it is used, and a growing one rebuilds the table rarely
        (its rows are the same values whatever its length)."""
        rows = max(positions, self.freqs_cis.shape[0], ROPE_PREBUILT)
        rows = min(1 << (rows - 1).bit_length(), self.args.max_seq_len)
        freqs = rope_table(model_inv_freq(self.args), rows)
        self.freqs_cis = freqs.to(device or self.output.weight.device)


def count_parameters(args: ModelArgs) -> int:
    """Exact parameter count, computed on the meta device (no memory allocated)."""
    with torch.device("meta"):
        model = Transformer(args)
    return sum(p.numel() for p in model.parameters())


def build_model(args: ModelArgs, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = None) -> Transformer:
    """Build on the meta device, materialise on `device`, then init_weights()."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device)
    if seed is not None:
        torch.manual_seed(seed)
    model.init_weights(buffer_device=torch.device(device))
    if dtype != torch.float32:
        model.to(dtype=dtype).init_rope()
    return model
