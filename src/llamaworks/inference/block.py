"""Load-time block swap: each transformer block of an eager decode step as one native call.

A decode step at small sizes is bound by the cost of each operator call, not by the bytes it
reads: small's int4 weights (8 MB) are read in about 0.2 ms, while its step took about 1 ms on
a 2-core Zen 3, most of it Python dispatching some 25 calls per block (two norms, four
products, RoPE and the cache write, attention, silu, mul, two residual adds). NativeBlock
hands the whole block to llamaworks::decode_block (csrc/block.cpp), which runs the same
operators from C++ in TransformerBlock.forward's order, so its output and cache writes equal
the module path's bit for bit (tests/inference/test_block.py).

It applies where every part of the block has its native kernel: q/k/v and w1/w3 fused
(fuse.py), native decode attention and norms and native projections (kernels.use_native_kernels;
int8 and int4 layers with their native layouts), a static KVCache in the activations' dtype,
eager, no gradient, at most NATIVE_MAX_ROWS rows (batch-1 to batch-8 decode, short speculative
verifications), and no forward hooks on the block's modules. Anything else (prefill, compiled
graphs, training, a paged cache, LoRA-adapted or sharded projections) takes the modules' path,
decided per call. The state dict and module tree are TransformerBlock's: only the class changes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as nn_module

from llamaworks.inference import native
from llamaworks.inference.fuse import FusedAttention, FusedFeedForward
from llamaworks.inference.kernels import NativeAttention, NativeLinear, NativeRMSNorm
from llamaworks.inference.quant import Int4Linear, Int8Linear
from llamaworks.kvcache import KVCache
from llamaworks.model import TransformerBlock

_NO_ROWS = torch.empty(0, dtype=torch.long)  # decode_block's "rows 0..bsz-1", as rope_cache's

# decode_block's projection kinds (csrc/block.cpp's Kind).
F32, BF16, INT8, INT4, INT4_TILES = range(5)


def projection(m: nn.Module) -> tuple[int, tuple[torch.Tensor, ...], int] | None:
    """How decode_block multiplies by `m` for decode rows, as m's own forward would: (kind,
    tensors, group size), or None where m has no native decode kernel (then the block takes the
    modules' path). Reads the modules' dicts directly: nn.Module.__getattr__ costs ~1.4 us a
    lookup (Zen 4), and a block has some 30 of them, more than the block's own kernels take."""
    t = type(m)
    if issubclass(t, NativeLinear):
        w = m._parameters["weight"]
        if m._parameters.get("bias") is not None or type(w) is not nn.Parameter or (
                w.requires_grad and torch.is_grad_enabled()):
            return None
        return (F32 if w.dtype == torch.float32 else BF16), (w,), 0
    if t is Int8Linear and m._native_scales is not None:
        return INT8, (m._buffers["weight"], m._native_scales), 0
    if t is Int4Linear and m._native is not None:
        return (INT4_TILES if m._tiled else INT4), m._native, m.group_size
    return None


def _hooked(modules) -> bool:
    # A forward hook (activation capture, a probe) must see its module run: such blocks keep the modules' path.
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class NativeBlock(TransformerBlock):
    """TransformerBlock whose eager decode steps run as one llamaworks::decode_block call where
    every part has a native kernel (module docstring); otherwise TransformerBlock.forward."""

    def forward(self, x, freqs, input_pos=None, mask=None, rows=None):
        call = self._native_call(x, freqs, input_pos, mask, rows)
        if call is None:
            return super().forward(x, freqs, input_pos, mask, rows)
        return torch.ops.llamaworks.decode_block(*call)

    def _native_call(self, x, freqs, input_pos, mask, rows):
        """decode_block's arguments for this call, or None where a part has no native kernel."""
        if (input_pos is None or mask is None or mask.dtype != torch.bool or torch.compiler.is_compiling()
                or x.dim() != 3 or x.shape[0] * x.shape[1] > native.NATIVE_MAX_ROWS or freqs.dtype != torch.float32
                or x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu"
                or (torch.is_grad_enabled() and x.requires_grad)):
            return None
        mods = self._modules
        att, ffn, norm1, norm2 = mods["attention"], mods["feed_forward"], mods["attention_norm"], mods["ffn_norm"]
        if not (isinstance(att, FusedAttention) and isinstance(att, NativeAttention) and type(ffn) is FusedFeedForward
                and type(norm1) is NativeRMSNorm and type(norm2) is NativeRMSNorm and norm1.eps == norm2.eps
                and ffn.sizes[0] == ffn.sizes[1] and att.head_dim % 16 == 0 and att.head_dim <= 256):
            return None
        w1, w2 = norm1._parameters["weight"], norm2._parameters["weight"]
        am, fm = att._modules, ffn._modules
        cache, projections = am.get("kv_cache"), (am["wqkv"], am["wo"], fm["w13"], fm["w2"])
        if (w1.dtype != x.dtype or w2.dtype != x.dtype or type(cache) is not KVCache
                or cache._buffers["k"].dtype != x.dtype or not native.available()
                or _hooked((self, att, ffn, norm1, norm2, *projections))):
            return None
        parts = [projection(m) for m in projections]
        if None in parts:
            return None
        d = att.head_dim
        return (x, w1, w2, norm1.eps, [p[0] for p in parts], [t for p in parts for t in p[1]], [p[2] for p in parts],
                freqs, input_pos, _NO_ROWS if rows is None else rows, cache._buffers["k"], cache._buffers["v"], mask,
                att.sizes[0] // d, att.sizes[1] // d)


def use_native_blocks(model: nn.Module) -> int:
    """Make every TransformerBlock of `model` a NativeBlock in place (the class changes, nothing
    else); returns how many. A no-op returning 0 without the native kernels. Meant for load time,
    after fusion and use_native_kernels; whether a block's call runs natively is decided per call,
    so later changes (unfuse, LoRA, a paged cache) only send it down the modules' path."""
    if not native.available():
        return 0
    n = 0
    for m in model.modules():
        if type(m) is TransformerBlock:
            m.__class__ = NativeBlock
            n += 1
    return n
