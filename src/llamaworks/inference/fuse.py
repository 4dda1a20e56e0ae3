"""Load-time fusion: each block's q, k and v projections as one product (wqkv), and the SwiGLU
gate and up projections as one (w13), by module swapping; model.py keeps Meta's three and two.

A decode step is bound by memory bandwidth and, at small sizes, by the cost of each operator
call: one product over the concatenated weight reads the same bytes as three, with one call
(and one pass of the native kernels' threads) instead of three. The weights are concatenated
along the output dimension once, when the model is loaded: float weights, and int8/int4
quantised ones (per output row scales, group scales and zeros concatenate the same way; the
layer's kernel layouts are rebuilt for the fused weight), with grouped-query attention's
narrower k and v. The state dict keeps Meta's names and values: a hook splits the fused
tensors back into views named layers.N.attention.wq.weight, ... (and loading a state dict
concatenates them again), so saving a fused model writes the same file as an unfused one.

A projection that is not a plain or quantised linear layer (a LoRA-adapted one, a DTensor
shard under tensor parallelism) keeps its module unfused. `unfuse` restores Meta's modules:
call it before anything that finds projections by name (apply_lora, quantize_model, TP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamaworks.inference import native
from llamaworks.inference.kernels import (
    GemvLinear,
    NativeAttention,
    NativeLinear,
    eager_native_step,
    native_attention_class,
)
from llamaworks.inference.paged import PagedKVCache, PrefillRead, kernel_dtypes, prefill_attention, prompt_start
from llamaworks.inference.quant import Int4Linear, Int8Linear
from llamaworks.kvcache import KVCache
from llamaworks.model import Attention, FeedForward

NO_ROWS = torch.empty(0, dtype=torch.long)  # rope_cache's (and block.py's operators') "rows 0..bsz-1"

FLOAT_LINEARS = (nn.Linear, GemvLinear, NativeLinear)


def _plain_tensor(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter)  # not a DTensor shard


def fusible(layers: list[nn.Module]) -> bool:
    """Whether these projections can run as one product: the same class (a float linear without
    bias, or int8/int4 with the same group size), in_features, dtypes and device."""
    first = layers[0]
    if any(type(m) is not type(first) for m in layers) or type(first) not in (*FLOAT_LINEARS, Int8Linear, Int4Linear):
        return False
    tensors = [list(m.state_dict(keep_vars=True).items()) for m in layers]
    names = [[k for k, _ in ts] for ts in tensors]
    if any(n != names[0] for n in names) or "bias" in names[0] or getattr(first, "bias", None) is not None:
        return False
    for i, (_, t) in enumerate(tensors[0]):
        others = [ts[i][1] for ts in tensors]
        if not all(_plain_tensor(o) and o.dtype == t.dtype and o.device == t.device and o.shape[1:] == t.shape[1:]
                   for o in others):
            return False
    return (all(m.in_features == first.in_features for m in layers)
            and all(getattr(m, "group_size", None) == getattr(first, "group_size", None) for m in layers))


@torch.no_grad()
def fuse_linears(layers: list[nn.Module]) -> nn.Module:
    """One layer whose output is the layers' outputs side by side (their tensors concatenated
    along the output dimension): of the layers' class, float or quantised."""
    assert fusible(layers), [type(m).__name__ for m in layers]
    first, out = layers[0], sum(m.out_features for m in layers)
    if isinstance(first, nn.Linear):
        w = first.weight
        fused = nn.Linear(first.in_features, out, bias=False, device="meta", dtype=w.dtype)
        fused.__class__ = type(first)  # GemvLinear / NativeLinear keep their one-row kernels
        fused.weight = nn.Parameter(torch.cat([m.weight for m in layers]), requires_grad=w.requires_grad)
        return fused
    if isinstance(first, Int8Linear):
        fused = Int8Linear(first.in_features, out, dtype=first.scales.dtype, device="meta")
    else:
        fused = Int4Linear(first.in_features, out, first.group_size, dtype=first.scales.dtype, device="meta")
    for name, _ in first.named_buffers(recurse=False):
        if name not in first._non_persistent_buffers_set:
            setattr(fused, name, torch.cat([getattr(m, name) for m in layers]))
    fused.refresh()  # the kernels' layouts and aligned copies, for the fused weight
    return fused


@torch.no_grad()
def split_linear(fused: nn.Module, sizes: list[int]) -> list[nn.Module]:
    """The inverse of fuse_linears: layers of `sizes` output features (copies of the slices)."""
    parts = []
    start = 0
    for n in sizes:
        if isinstance(fused, nn.Linear):
            m = nn.Linear(fused.in_features, n, bias=False, device="meta", dtype=fused.weight.dtype)
            m.__class__ = type(fused)
            m.weight = nn.Parameter(fused.weight[start: start + n].clone(), requires_grad=fused.weight.requires_grad)
        else:
            if isinstance(fused, Int8Linear):
                m = Int8Linear(fused.in_features, n, dtype=fused.scales.dtype, device="meta")
            else:
                m = Int4Linear(fused.in_features, n, fused.group_size, dtype=fused.scales.dtype, device="meta")
            for name, t in fused.state_dict().items():
                setattr(m, name, t[start: start + n].clone())
            m.refresh()
        parts.append(m)
        start += n
    return parts


class FusedProjections:
    """What the fused modules share: the fused layer under `fused_name` stands for `parts`
    (Meta's names) of `sizes` output features in the state dict, in Meta's key order."""

    fused_name: str
    parts: tuple[str, ...]
    order: tuple[str, ...]  # the module's children as Meta's model has them
    sizes: list[int]

    def _install_hooks(self) -> None:
        self.register_state_dict_post_hook(FusedProjections._split_state)
        self.register_load_state_dict_pre_hook(FusedProjections._join_state)

    def _split_state(self, state, prefix, local_metadata) -> None:
        mine = [k for k in state if k.startswith(prefix)]
        entries = {k[len(prefix):]: state.pop(k) for k in mine}
        split = {}
        for key, t in entries.items():
            child, _, leaf = key.partition(".")
            if child != self.fused_name:
                split[key] = t
                continue
            start = 0
            for part, n in zip(self.parts, self.sizes):
                split[f"{part}.{leaf}"] = t.narrow(0, start, n)  # views: no copy, disjoint rows
                start += n
        for key in sorted(split, key=lambda k: (self.order.index(k.partition(".")[0]), list(split).index(k))):
            state[prefix + key] = split[key]

    def _join_state(self, state, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        leaves = {k[len(prefix) + len(self.parts[0]) + 1:] for k in state if k.startswith(f"{prefix}{self.parts[0]}.")}
        for leaf in leaves:
            keys = [f"{prefix}{part}.{leaf}" for part in self.parts]
            if all(k in state for k in keys):
                state[f"{prefix}{self.fused_name}.{leaf}"] = torch.cat([state.pop(k) for k in keys])


class FusedAttention(FusedProjections, Attention):
    """Attention with wq, wk and wv as one product, wqkv (n_heads + 2 n_kv_heads head_dims wide).

    In eager decoding with the native kernels, the RoPE of q and k and the cache write are one
    call (llamaworks::rope_cache, csrc/step.cpp) instead of some 40 small operators per layer
    (apply_rotary_emb twice, KVCache.update), with the same results bit for bit; so too in the
    serving engine's ragged passes over a paged cache (PagedKVCache.rope_update). Compiled
    graphs, training and other paged passes take Attention.forward."""

    fused_name, parts, order = "wqkv", ("wq", "wk", "wv"), ("wq", "wk", "wv", "wo")

    def forward(self, x, freqs, input_pos=None, mask=None, rows=None):
        cache = self.kv_cache
        ragged = type(cache) is PagedKVCache and cache.table.ragged is not None and cache.rope_in_one
        # The cache in x's dtype, or bf16 under fp32 (serve --kv-dtype): rope_cache rounds k and v to it.
        # rope_cache takes int64 positions and rows; int32 ones take Attention.forward (its indexing casts them)
        if (input_pos is None or input_pos.dtype != torch.long or not (rows is None or rows.dtype == torch.long)
                or not (type(cache) is KVCache or ragged) or freqs.dtype != torch.float32
                or not eager_native_step(x) or not eager_native_step(cache.k, cache.v)
                or not kernel_dtypes(x.dtype, cache.k.dtype)):
            return super().forward(x, freqs, input_pos, mask, rows)
        bsz, seqlen, _ = x.shape
        qkv = self.wqkv(x)  # (bsz, seq, (heads + 2 kv_heads) * head_dim)
        if not kernel_dtypes(qkv.dtype, cache.k.dtype):
            return super().forward(x, freqs, input_pos, mask, rows)
        heads, kv_heads = self.sizes[0] // self.head_dim, self.sizes[1] // self.head_dim
        if ragged:
            q, k, v = cache.rope_update(qkv, freqs, input_pos, heads, kv_heads)  # q (1, heads, T, head_dim)
        else:
            q = torch.ops.llamaworks.rope_cache(qkv, freqs, input_pos, NO_ROWS if rows is None else rows,
                                                cache.k, cache.v, heads, kv_heads)  # (bsz, heads, seq, head_dim)
            start = (prompt_start(input_pos) if rows is None and seqlen > native.NATIVE_MAX_ROWS
                     and input_pos.device.type == "cpu" else None)
            if start is not None:
                # A prompt at positions start..start+seq-1 of every row (prefill): the native prefill
                # kernel over the cache's earlier keys and the prompt's own (causal), not SDPA under
                # the mask over the whole cache (small, 128 tokens, 6 heads: 0.13 against 0.61 ms a layer).
                k, v = (PrefillRead(t[:bsz, :, :start], t[:bsz, :, start:start + seqlen]) for t in (cache.k, cache.v))
                out = prefill_attention(q, k, v)
                return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))
            k, v = (cache.k[:bsz], cache.v[:bsz]) if rows is None else (cache.k[rows], cache.v[rows])
        out = self.attend(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))

    def project(self, x):
        bsz, seqlen, _ = x.shape
        q, k, v = self.wqkv(x).split(self.sizes, dim=-1)  # (bsz, seq, heads * head_dim), (.., kv_heads * head_dim) x2
        return (q.view(bsz, seqlen, -1, self.head_dim), k.view(bsz, seqlen, -1, self.head_dim),
                v.view(bsz, seqlen, -1, self.head_dim))  # (bsz, seq, heads or kv_heads, head_dim)


class FusedFeedForward(FusedProjections, FeedForward):
    """SwiGLU with the gate (w1) and up (w3) projections as one product, w13: w2(silu(a) * b)."""

    fused_name, parts, order = "w13", ("w1", "w3"), ("w1", "w2", "w3")

    def forward(self, x):
        a, b = self.w13(x).split(self.sizes, dim=-1)  # (bsz, seq, hidden) each
        return self.w2(F.silu(a) * b)


def _fuse_module(m: nn.Module, cls: type) -> bool:
    layers = [getattr(m, name) for name in cls.parts]
    if not fusible(layers):
        return False
    fused = fuse_linears(layers)
    children = dict(m._modules)
    for name in cls.parts:
        del children[name]
    # Meta's order with the fused layer where its first part was: named_modules reads like the model.
    m._modules.clear()
    for name in cls.order:
        if name == cls.parts[0]:
            m._modules[cls.fused_name] = fused
        elif name in children:
            m._modules[name] = children.pop(name)
    m._modules.update(children)
    m.sizes = [layer.out_features for layer in layers]
    m.__class__ = cls
    m._install_hooks()
    return True


def fuse_projections(model: nn.Module, attention: bool = True, feed_forward: bool = True) -> int:
    """Fuse every block's q/k/v (attention) and w1/w3 (feed_forward) projections in place;
    returns how many modules were fused. A module whose projections differ in kind (a LoRA
    layer among them, DTensor shards, a bias) is left as it is. Run it after quantising and
    after adapters are applied, and before torch.compile."""
    n = 0
    for m in list(model.modules()):
        if attention and type(m) in (Attention, native_attention_class(Attention)):
            # the native decode attention (kernels.use_native_attention) stays on
            native = isinstance(m, NativeAttention)
            n += _fuse_module(m, native_attention_class(FusedAttention) if native else FusedAttention)
        elif feed_forward and type(m) is FeedForward:
            n += _fuse_module(m, FusedFeedForward)
    return n


def unfuse(model: nn.Module) -> int:
    """Undo fuse_projections in place: Meta's wq/wk/wv and w1/w3 modules again (copies of the
    fused tensors' slices, then the fused layer is dropped); returns how many modules."""
    n = 0
    for m in list(model.modules()):
        if not isinstance(m, FusedProjections):
            continue
        fused, native = m._modules[m.fused_name], isinstance(m, NativeAttention)
        parts = dict(zip(m.parts, split_linear(fused, m.sizes)))
        children = {k: v for k, v in m._modules.items() if k != m.fused_name}
        m._modules.clear()
        for name in m.order:
            m._modules[name] = parts[name] if name in parts else children.pop(name)
        m._modules.update(children)
        m._state_dict_hooks.clear()
        m._state_dict_pre_hooks.clear()
        m._load_state_dict_pre_hooks.clear()
        m.__class__ = Attention if isinstance(m, FusedAttention) else FeedForward
        if isinstance(m, Attention) and native:
            m.__class__ = native_attention_class(Attention)
        del m.sizes
        n += 1
    return n


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, FusedProjections) for m in model.modules())
