"""The LLaMA transformer (Touvron et al. 2023, section 2.2), single device.

Names follow Meta's release so that `consolidated.NN.pth` and `params.json` load
without a key map: ModelArgs fields are params.json keys, module attributes are
state-dict keys (tok_embeddings, layers.N.attention.wq, feed_forward.w1, ...).
Nothing here knows about training, distribution or files.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

# Re-exported: the presets, the SwiGLU width, the RoPE math and the decoding cache live in modules
# of their own, and callers have long imported them from here.
from llamaworks.kvcache import KVCache
from llamaworks.presets import PRESETS, RELEASED_FFN, check_args, ffn_hidden_dim, ffn_params
from llamaworks.rope import (
    LLAMA31_ROPE_SCALING,
    MAX_POSITIONS,
    apply_rotary_emb,
    document_positions,
    linear_scaled_inv_freq,
    llama31_scaled_inv_freq,
    model_inv_freq,
    precompute_freqs_cis,
    rope_inv_freq,
    rope_table,
)

__all__ = ["LLAMA31_ROPE_SCALING", "MAX_POSITIONS", "PRESETS", "RELEASED_FFN", "Attention", "FeedForward",
           "KVCache", "ModelArgs", "RMSNorm", "Transformer", "TransformerBlock", "apply_rotary_emb", "build_model",
           "count_parameters", "document_positions", "ffn_hidden_dim", "ffn_params", "linear_scaled_inv_freq",
           "llama31_scaled_inv_freq", "model_inv_freq", "precompute_freqs_cis", "rope_inv_freq", "rope_table"]


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
        check_args(self)  # presets.py: types, ranges, defaults filled in

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


# Rotary-table rows built up front; a longer context grows the table when first used
# (setup_caches, a longer forward pass), so a declared max_seq_len costs nothing by itself.
ROPE_PREBUILT = 4096
# The params.json keys of LLaMA 1, written even when unset (to_params).
LLAMA1_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "max_seq_len", "rope_theta")


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


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def project(self, x):
        """The input projections: (bsz, seq, dim) -> q, k, v (bsz, seq, heads, head_dim); the seam
        where inference/fuse.py runs the three as one product."""
        bsz, seqlen, _ = x.shape
        # -1, not n_heads: under tensor parallelism wq/wk/wv hold a slice of the heads.
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim)
        return q, k, v

    def forward(self, x, freqs, input_pos=None, mask=None, rows=None):
        bsz, seqlen, _ = x.shape
        q, k, v = self.project(x)
        q, k = apply_rotary_emb(q, freqs), apply_rotary_emb(k, freqs)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v, rows)  # (bsz, n_kv_heads, cache_len, head_dim)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (bsz, n_kv_heads, seq, head_dim)
        q = q.transpose(1, 2)  # (bsz, heads, seq, head_dim)
        out = self.attend(q, k, v, mask)
        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)  # (bsz, seq, dim)
        return self.wo(out)

    def attend(self, q, k, v, mask):
        """softmax(q k^T / sqrt(head_dim)) v: q (bsz, heads, seq, head_dim), k and v (bsz, n_kv_heads,
        keys, head_dim), mask (True: attend) or None (causal); the seam where inference/kernels.py
        puts a decode kernel."""
        if mask is None:
            # Memory-efficient causal attention (section 2.4): SDPA's fused kernels keep no
            # attention matrix, and the flash kernels skip the blocks the causal mask hides.
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)


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
        # A Linear of another class (inference's kernels) keeps the weight; a quantised layer holds its own.
        if self.args.tie_word_embeddings and isinstance(self.output, nn.Linear):
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
                rows: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """tokens: (bsz, seq) -> logits (bsz, seq, vocab).

        return_hidden: return the final normalised hidden states (bsz, seq, dim) instead, what
        the output layer reads: for a loss that fuses the output projection (train/loss.py).

        Without input_pos: a causal pass over positions 0..seq-1 (training, scoring).
        With input_pos (bsz, seq) or (seq,): the KV-cache path. Each sequence's tokens sit at
        their own positions, keys are written to the cache there, and a query at position p
        sees the cached keys at positions <= p of its own sequence.
        rows (bsz,): the cache rows the sequences live in (default 0..bsz-1); a server runs
        one new request, or its active slots, against a cache shared by all slots.
        doc_ids (bsz, seq), without input_pos: examples packed into rows (fine-tuning), a new one
        wherever the id changes along a row. A token attends causally within its own example
        only, at positions counted from the example's start: each is computed as it is alone.
        """
        bsz, seqlen = tokens.shape
        if input_pos is None:
            assert seqlen <= self.args.max_seq_len, (seqlen, self.args.max_seq_len)
            if seqlen > self.freqs_cis.shape[0]:  # shapes only: no host sync
                self.init_rope(self.freqs_cis.device, seqlen)
            freqs, mask = self.freqs_cis[:seqlen], None
            if doc_ids is not None:
                run, pos = document_positions(doc_ids)  # (bsz, seq) each
                freqs = self.freqs_cis[pos]  # (bsz, seq, head_dim/2, 2)
                causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=tokens.device).tril()
                mask = (causal & (run.unsqueeze(2) == run.unsqueeze(1))).unsqueeze(1)  # (bsz, 1, seq, seq)
        else:
            assert doc_ids is None, "doc_ids is for the training path (no input_pos)"
            assert self.layers[0].attention.kv_cache is not None, "call setup_caches() before decoding"
            input_pos = input_pos.expand(bsz, seqlen) if input_pos.dim() == 1 else input_pos
            # setup_caches grew the table to the cache's length, and positions lie inside the cache.
            freqs = self.freqs_cis[input_pos]  # (bsz, seq, head_dim/2, 2)
            cache_len = self.layers[0].attention.kv_cache.seq_len
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
