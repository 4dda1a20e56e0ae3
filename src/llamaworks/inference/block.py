"""Load-time swaps: each transformer block of a decode step, and each whole eager decode step, as one
native call (NativeBlock, NativeTransformer; use_native_blocks makes both).

A decode step at small sizes is bound by the cost of each operator call, not by the bytes it
reads: small's int4 weights (8 MB) are read in about 0.2 ms, while its step took about 1 ms on
a 2-core Zen 3, most of it Python dispatching some 25 calls per block (two norms, four
products, RoPE and the cache write, attention, silu, mul, two residual adds). NativeBlock
hands the whole block to llamaworks::decode_block (csrc/block.cpp), which runs the same
operators from C++ in TransformerBlock.forward's order, so its output and cache writes equal
the module path's bit for bit (tests/inference/test_block.py). NativeTransformer runs the whole
eager step (embedding, every block as decode_block does, final norm, output layer) as
llamaworks::decode_step over a plan of the model's tensors made once per KV cache, which also takes
away the per-block Python: small int4's step at position 128 on Zen 4 took 1.0 ms through the
modules, 0.50 ms with a call per block, 0.23-0.28 ms as one call.

It applies where every part of the block has its native kernel: q/k/v and w1/w3 fused
(fuse.py), native decode attention and norms and native projections (kernels.use_native_kernels;
int8 and int4 layers with their native layouts), a static KVCache in the activations' dtype, no
gradient, at most NATIVE_MAX_ROWS rows (batch-1 to batch-8 decode, short speculative
verifications), and no forward hooks on the block's modules. The serving engine's decode passes over
its paged pools (paged.Ragged: one token per sequence) run as llamaworks::decode_step_paged over the
same kind of plan, made over the pools. Anything else (prefill, training, a prompt's ragged pass,
LoRA-adapted or sharded projections) takes the modules' path, decided per call.
Compiled decode steps (generate --compile) call it too, as one extern kernel per block between
inductor's fused code (the embedding, mask, final norm, sampling): inductor writes the caches in
place (decode_block's schema marks them mutated; no copy, checked in tests/inference/test_block.py).
The state dict and module tree are TransformerBlock's: only the class changes.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules import module as nn_module

from llamaworks.inference import native
from llamaworks.inference.fuse import NO_ROWS, FusedAttention, FusedFeedForward
from llamaworks.inference.kernels import NativeAttention, NativeLinear, NativeRMSNorm, cache_pass
from llamaworks.inference.paged import BlockTable, PagedKVCache, kernel_dtypes
from llamaworks.inference.quant import Int4Linear, Int8Linear
from llamaworks.kvcache import KVCache
from llamaworks.model import Transformer, TransformerBlock

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


class BlockParts(NamedTuple):
    """What decode_block (and decode_plan, per block) takes of a NativeBlock."""

    attention_norm: torch.Tensor
    ffn_norm: torch.Tensor
    eps: float
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    kinds: list[int]  # wqkv, wo, w13, w2 (projection's kinds)
    tensors: list[torch.Tensor]  # their tensors in that order
    groups: list[int]
    heads: int
    kv_heads: int
    paged: bool  # k_cache and v_cache are a PagedKVCache's pools (the serving engine's), not a KVCache's


def _hooked(modules) -> bool:
    # A forward hook (activation capture, a probe) must see its module run: such blocks keep the modules' path.
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class NativeBlock(TransformerBlock):
    """TransformerBlock whose decode steps run as one llamaworks::decode_block call where
    every part has a native kernel (module docstring); otherwise TransformerBlock.forward."""

    def forward(self, x, freqs, input_pos=None, mask=None, rows=None):
        call = self._native_call(x, freqs, input_pos, mask, rows)
        if call is None:
            return super().forward(x, freqs, input_pos, mask, rows)
        return torch.ops.llamaworks.decode_block(*call)

    def _native_call(self, x, freqs, input_pos, mask, rows):
        """decode_block's arguments for this call, or None where a part has no native kernel."""
        if (input_pos is None or mask is None or mask.dtype != torch.bool
                or x.dim() != 3 or x.shape[0] * x.shape[1] > native.NATIVE_MAX_ROWS or freqs.dtype != torch.float32
                or x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu"
                or (torch.is_grad_enabled() and x.requires_grad) or input_pos.dtype != torch.long
                or not (rows is None or rows.dtype == torch.long)):
            return None
        p = self.native_parts(x.dtype)
        if p is None or p.paged:  # decode_block reads a static cache; a paged pass takes the whole step
            return None
        return (x, p.attention_norm, p.ffn_norm, p.eps, p.kinds, p.tensors, p.groups, freqs, input_pos,
                NO_ROWS if rows is None else rows, p.k_cache, p.v_cache, mask, p.heads, p.kv_heads)

    def native_parts(self, dtype: torch.dtype) -> BlockParts | None:
        """What decode_block (a static KVCache in `dtype`) or decode_step_paged (a PagedKVCache whose
        ragged passes run RoPE, the write and the reads in the native kernels, its pool in `dtype` or
        bf16 under fp32) takes of this block for activations of `dtype`, or None where a part has no
        native kernel or a module has a forward hook."""
        mods = self._modules
        att, ffn, norm1, norm2 = mods["attention"], mods["feed_forward"], mods["attention_norm"], mods["ffn_norm"]
        if not (isinstance(att, FusedAttention) and isinstance(att, NativeAttention) and type(ffn) is FusedFeedForward
                and type(norm1) is NativeRMSNorm and type(norm2) is NativeRMSNorm and norm1.eps == norm2.eps
                and ffn.sizes[0] == ffn.sizes[1] and att.head_dim % 16 == 0 and att.head_dim <= 256):
            return None
        w1, w2 = norm1._parameters["weight"], norm2._parameters["weight"]
        am, fm = att._modules, ffn._modules
        cache, projections = am.get("kv_cache"), (am["wqkv"], am["wo"], fm["w13"], fm["w2"])
        paged = type(cache) is PagedKVCache
        if paged:
            fits = cache.rope_in_one and cache.reads_table and kernel_dtypes(dtype, cache._buffers["k"].dtype)
        else:
            fits = type(cache) is KVCache and cache._buffers["k"].dtype == dtype
        if (w1.dtype != dtype or w2.dtype != dtype or not fits or not native.available()
                or _hooked((self, att, ffn, norm1, norm2, *projections))):
            return None
        parts = [projection(m) for m in projections]
        if None in parts:
            return None
        d = att.head_dim
        return BlockParts(w1, w2, norm1.eps, cache._buffers["k"], cache._buffers["v"], [p[0] for p in parts],
                          [t for p in parts for t in p[1]], [p[2] for p in parts], att.sizes[0] // d, att.sizes[1] // d,
                          paged)


def decode_pass(table: BlockTable, tokens: torch.Tensor, input_pos: torch.Tensor) -> bool:
    """Whether a pass over a paged cache is a ragged decode pass that decode_step_paged takes: one
    row of n tokens, each a sequence of its own (paged.Ragged with one group of n one-token runs at
    their own positions), input_pos (1, n), the table one row per token."""
    ragged, n = table.ragged, tokens.shape[-1]
    if (ragged is None or tokens.shape[0] != 1 or input_pos.shape != tokens.shape or len(ragged.groups) != 1
            or table.blocks.shape[0] != n or ragged.slots.shape != (n,)):
        return False
    g = ragged.groups[0]
    return g.start is None and g.length == 1 and g.runs == n and g.first == 0 and g.row == 0


class DecodePlan:
    """A llamaworks::decode_plan (csrc/block.cpp): the whole model's decode-step tensors, held by the
    library under `handle` (None: the model has a part without a native kernel) for the caches `cache`
    (the first block's KVCache) and the RoPE table `freqs`; freed with this object."""

    def __init__(self, handle: int | None, cache: nn.Module | None, freqs: torch.Tensor):
        self.handle, self.cache, self.freqs = handle, cache, freqs
        if handle is not None:
            # Not at exit: the process's memory goes anyway, and torch may be torn down by then.
            weakref.finalize(self, torch.ops.llamaworks.decode_plan_free, handle).atexit = False

    def __reduce__(self):
        # A copied or pickled model plans itself again: the handle names the original's tensors.
        return DecodePlan, (None, None, None)


class NativeTransformer(Transformer):
    """Transformer whose eager decode steps (input_pos given, at most NATIVE_MAX_ROWS tokens, logits
    out, no gradient) run as one llamaworks::decode_step call: the embedding, every block as
    decode_block runs it, the final norm and the output layer, over a plan of the model's tensors
    made once per KV cache (setup_caches makes new caches for each generate call, so a changed model
    is planned again, as after load_state_dict or a conversion such as to()). The logits equal
    Transformer.forward's bit for bit. Checked when the plan is made: every block native
    (NativeBlock.native_parts), no forward hook on any module; per call: no global forward hooks,
    gradients off, the same caches and RoPE table. So a change of the model's modules between two
    steps over the same caches (fuse.unfuse, LoRA, a hook) takes effect at the next setup_caches.
    Over a paged cache (the serving engine's, inference/paged.py) the plan holds the pools and a ragged
    decode pass (decode_pass) runs as llamaworks::decode_step_paged, returning the logits or, for the
    engine's picks, the normed hidden state (return_hidden). Anything else, and compiled graphs (which
    call the blocks one by one), take Transformer.forward."""

    def forward(self, tokens, input_pos=None, *, rows=None, doc_ids=None, return_hidden=False):
        if (input_pos is not None and doc_ids is None and not torch.is_grad_enabled()
                and tokens.dim() == 2 and tokens.numel() <= native.NATIVE_MAX_ROWS and tokens.device.type == "cpu"
                # the operators take int64 ids and positions; others (int32) take the modules, which cast them
                and tokens.dtype == input_pos.dtype == torch.long and (rows is None or rows.dtype == torch.long)
                and not torch.compiler.is_compiling()
                and not (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)):
            handle = self._decode_plan()
            if handle is not None:
                cache = self.__dict__["_plan"].cache
                if type(cache) is PagedKVCache:
                    table = cache.table
                    if rows is None and decode_pass(table, tokens, input_pos):
                        return torch.ops.llamaworks.decode_step_paged(handle, tokens, input_pos, table.ragged.slots,
                                                                      table.blocks, return_hidden)
                elif not return_hidden:
                    rows = NO_ROWS if rows is None else rows
                    return torch.ops.llamaworks.decode_step(handle, tokens, input_pos, rows)
        if input_pos is None:
            return super().forward(tokens, input_pos, rows=rows, doc_ids=doc_ids, return_hidden=return_hidden)
        with cache_pass():  # a prompt over the cache: its fp32 products may take oneDNN (kernels.prompt_linear)
            return super().forward(tokens, input_pos, rows=rows, doc_ids=doc_ids, return_hidden=return_hidden)

    def setup_caches(self, *args, **kwargs):
        self.__dict__.pop("_plan", None)  # the plan holds the old caches: freed with them, not at the next step
        return super().setup_caches(*args, **kwargs)

    def clear_caches(self):
        self.__dict__.pop("_plan", None)
        return super().clear_caches()

    # New weights from a state dict or a conversion (to(), a dtype cast) may be new tensors, and
    # quantised layers rebuild their kernel layouts then (QuantizedLinear.refresh): planned again.
    def load_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_plan", None)
        return super().load_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse: bool = True):
        self.__dict__.pop("_plan", None)
        return super()._apply(fn, recurse)

    def _decode_plan(self) -> int | None:
        layers = self._modules["layers"]._modules
        cache = layers["0"]._modules["attention"]._modules.get("kv_cache") if layers else None
        freqs = self._buffers["freqs_cis"]
        plan = self.__dict__.get("_plan")
        if plan is None or plan.cache is not cache or plan.freqs is not freqs:
            plan = self._plan = DecodePlan(self._make_plan(), cache, freqs)
        return plan.handle

    def _make_plan(self) -> int | None:
        mods = self._modules
        emb, norm, out = mods["tok_embeddings"], mods["norm"], mods["output"]
        w = emb._parameters["weight"]
        blocks = list(mods["layers"])
        if (not blocks or type(emb) is not nn.Embedding or type(norm) is not NativeRMSNorm
                or norm._parameters["weight"].dtype != w.dtype or w.device.type != "cpu"
                or any(type(b) is not NativeBlock for b in blocks) or _hooked((self, emb, norm, out, *mods["layers"]))):
            return None
        parts = [b.native_parts(w.dtype) for b in blocks]
        output = projection(out)
        if None in parts or output is None:
            return None
        if {(p.eps, p.heads, p.kv_heads, p.paged) for p in parts} != {(norm.eps, parts[0].heads, parts[0].kv_heads,
                                                                         parts[0].paged)}:
            return None  # the plan keeps one eps, one head layout and one kind of cache for the whole model
        tensors = [w, norm._parameters["weight"], self._buffers["freqs_cis"]]
        tensors += [t for p in parts for t in (p.attention_norm, p.ffn_norm, p.k_cache, p.v_cache)]
        tensors += [t for p in parts for t in p.tensors] + list(output[1])
        kinds = [k for p in parts for k in p.kinds] + [output[0]]
        groups = [g for p in parts for g in p.groups] + [output[2]]
        meta = [len(blocks), parts[0].heads, parts[0].kv_heads, int(parts[0].paged), *kinds, *groups]
        return torch.ops.llamaworks.decode_plan(tensors, meta, norm.eps)


def use_native_blocks(model: nn.Module) -> int:
    """Make every TransformerBlock of `model` a NativeBlock and a Transformer a NativeTransformer in
    place (the class changes, nothing else); returns how many blocks. A no-op returning 0 without
    the native kernels. Meant for load time, after fusion and use_native_kernels; whether a call runs
    natively is decided per call (per cache for the whole step), so later changes (unfuse, LoRA) only
    send it down the modules' path."""
    if not native.available():
        return 0
    n = 0
    for m in model.modules():
        if type(m) is TransformerBlock:
            m.__class__ = NativeBlock
            n += 1
        elif type(m) is Transformer:
            m.__class__ = NativeTransformer
    return n
