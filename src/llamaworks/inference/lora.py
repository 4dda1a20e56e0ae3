"""LoRA (Hu et al. 2021) by module swapping, over a float or quantised frozen model (QLoRA,
Dettmers et al. 2023), with adapters in PEFT's file layout.

A LoRA layer keeps the pretrained projection W frozen and learns a low-rank update:
y = W x + (alpha / r) B A dropout(x), with A (r, in) and B (out, r). B starts at zero, so
the model is unchanged until training moves it (Hu et al. 2021, section 4.1); A starts
Kaiming-uniform with a = sqrt(5), nn.Linear's own initialisation and PEFT's default. After
training, W + (alpha / r) B A is an ordinary weight (`merge`): no cost at inference.

Like quantisation (inference/quant.py) this is module swapping: `apply_lora` replaces the
targeted projections of a Transformer by `LoRALinear`s wrapping them; model.py knows nothing
of it. The wrapped base may be nn.Linear in fp32, bf16 or fp16 (kernels.GemvLinear included)
or a quantised layer (Int8Linear, Int4Linear: `quantize_model` first, then `apply_lora`),
which is QLoRA: the adapters stay in fp32 while the base is int8 or int4.

Files: an adapter directory is PEFT's: adapter_config.json (peft_type "LORA", r,
lora_alpha, ...) and adapter_model.safetensors with Hugging Face module names
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so `peft` loads ours onto
transformers' LlamaForCausalLM and we load adapters that PEFT saved. transformers orders the
rows of q_proj and k_proj for its rotate-half RoPE (convert/hf.py): B's rows are output
features, so lora_B of wq/wk is permuted on the way out and back on the way in; A reads the
input, whose order is the same in both.

A model whose projections were fused at load (inference/fuse.py: wqkv, w13) is unfused first
by apply_lora and load_adapter, so adapters keep those names; load_model loads an adapter
before fusing, and fusion leaves adapted projections apart (the unadapted ones still fuse).

Only the attention and MLP projections take adapters (wq, wk, wv, wo, w1, w2, w3): the
output layer is read directly by the fused loss (train/loss.py) and by `.weight` elsewhere,
and embeddings need a different layer.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llamaworks.atomic import atomic_directory, atomic_write_json
from llamaworks.convert.hf import LAYER_KEYS, key_map, permute_for_hf, unpermute_from_hf
from llamaworks.inference.fuse import unfuse
from llamaworks.inference.quant import Int4Linear, Int8Linear, QuantizedLinear, dequantize_int4
from llamaworks.model import ModelArgs, Transformer
from llamaworks.paths import require_dir
from llamaworks.weights import read_json_file, read_safetensors, save_safetensors

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's file names
# PeftModel wraps the model (base_model) around the LoraModel's model (model); its
# save_pretrained writes the keys under this prefix, without the adapter's name.
PEFT_PREFIX = "base_model.model."

# The projections that can take an adapter, Meta's name -> transformers' (from convert/hf.py).
HF_TARGETS: dict[str, str] = {m.split(".")[1]: h.split(".")[1] for m, h in LAYER_KEYS.items()
                              if m.split(".")[0] in ("attention", "feed_forward")}
# All attention and MLP projections. Hu et al. adapt wq and wv only (section 7.1); QLoRA
# (Dettmers et al. 2023, section 4) finds adapting every projection is what matches full
# fine-tuning, which is also what most recipes for LLaMA do.
DEFAULT_TARGETS: tuple[str, ...] = tuple(HF_TARGETS)

# adapter_config.json keys that do not change what the tensors compute: what the adapter was
# trained on, which modules were targeted (the tensors say which are), how it was initialised
# (before training; checked separately), bookkeeping. Any other key that is set (not
# null, false, 0 or empty) asks for something beyond plain LoRA and is refused by name.
INFORMATIONAL_KEYS = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "fan_in_fan_out",  # for nn.Linear PEFT ignores it: lora_A/lora_B are stored as Linear weights either way
    "init_lora_weights", "eva_config", "corda_config", "lora_ga_config", "loftq_config",
    "megatron_core", "qalora_group_size", "ensure_weight_tying",
    "r", "lora_alpha", "lora_dropout", "use_rslora", "bias", "rank_pattern", "alpha_pattern",
})
# init_lora_weights values that only chose A and B's starting values. The others (PiSSA,
# OLoRA, CorDA, LoftQ, LoRA-GA) also rewrite the base weights, so the adapter is relative
# to a base this model is not, and MiCA trains a different layer.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """alpha / r (Hu et al. 2021, section 4.1: tuning alpha is then like tuning the learning
    rate, and a new r needs no retuning); rsLoRA (Kalajdzievski 2023) uses alpha / sqrt(r)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _check_rank(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _check_alpha(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value == 0:
        raise ValueError(f"{what} must be a finite non-zero number, got {value!r}")
    return value


def _check_dropout(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"{what} must be a probability in [0, 1), got {value!r}")
    return float(value)


@dataclass
class LoraConfig:
    """What `apply_lora` builds. The defaults are PEFT's LoraConfig defaults (peft 0.21: r=8,
    lora_alpha=8, lora_dropout=0.0), so alpha / r = 1; target_modules defaults to every
    attention and MLP projection (DEFAULT_TARGETS), where PEFT has no default for LLaMA.

    target_modules takes Meta's names (wq, wk, wv, wo, w1, w2, w3) or transformers' (q_proj,
    k_proj, v_proj, o_proj, gate_proj, down_proj, up_proj) and keeps Meta's."""

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    use_rslora: bool = False

    def __post_init__(self):
        self.r = _check_rank(self.r, "LoRA r (rank)")
        self.alpha = _check_alpha(self.alpha, "LoRA alpha")
        self.dropout = _check_dropout(self.dropout, "LoRA dropout")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora must be true or false, got {self.use_rslora!r}")
        if isinstance(self.target_modules, str) or not isinstance(self.target_modules, (list, tuple)):
            raise ValueError(f"target_modules must be a list of projection names (e.g. {list(DEFAULT_TARGETS)}), "
                             f"got {self.target_modules!r}")
        from_hf = {h: m for m, h in HF_TARGETS.items()}
        names = []
        for name in self.target_modules:
            meta = from_hf.get(name, name)
            if meta not in HF_TARGETS:
                raise ValueError(f"target_modules: {name!r} is not a projection LoRA applies to; choose from "
                                 f"{', '.join(HF_TARGETS)} (or transformers' {', '.join(HF_TARGETS.values())})")
            if meta in names:
                raise ValueError(f"target_modules names {meta!r} twice")
            names.append(meta)
        if not names:
            raise ValueError(f"target_modules is empty; name at least one of {', '.join(HF_TARGETS)}")
        self.target_modules = tuple(names)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.use_rslora)


# --- the layer -------------------------------------------------------------------------------

def dense_weight(layer: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out, in) float weight a frozen base layer multiplies by: its own for nn.Linear,
    dequantised for a quantised layer (a layer with a `dequantize(dtype)` method, or int8 /
    int4 as quant.py stores them)."""
    if isinstance(layer, nn.Linear):
        return layer.weight.to(dtype)
    if callable(getattr(layer, "dequantize", None)):
        return layer.dequantize(dtype)
    if isinstance(layer, Int8Linear):
        return layer.weight.to(dtype) * layer.scales.to(dtype).unsqueeze(1)
    if isinstance(layer, Int4Linear):
        return dequantize_int4(layer.weight, layer.scales, layer.zeros, layer.group_size, dtype)
    raise ValueError(f"cannot read the weight of a {type(layer).__name__}: give the quantisation mode's layer a "
                     "dequantize(dtype) method returning its (out, in) float weight")


def float_dtype(layer: nn.Module) -> torch.dtype:
    """The floating-point dtype a base layer works in: its weight's, or a quantised layer's scales'."""
    if isinstance(layer, nn.Linear):
        return layer.weight.dtype
    scales = getattr(layer, "scales", None)
    return scales.dtype if isinstance(scales, torch.Tensor) and scales.is_floating_point() else torch.float32


def dense_linear(layer: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain nn.Linear computing what `layer` computes (dequantised if quantised), frozen."""
    w = dense_weight(layer, dtype or float_dtype(layer))
    return _linear_of(w, getattr(layer, "bias", None))


def _linear_of(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    with torch.device("meta"):  # no initialisation of weights about to be replaced
        out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    out.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)
    return out


class _QuantizedInputGrad(torch.autograd.Function):
    """The input's gradient of a frozen quantised layer: grad @ W, W dequantised on the spot.
    The layer's own forward output passes through unchanged."""

    @staticmethod
    def forward(ctx, x, out, layer):
        ctx.layer = layer
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad @ dense_weight(ctx.layer, grad.dtype), None, None


def _input_grad_hook(layer, args, out):
    x = args[0]
    if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad:
        # The output computed by the layer's own path is kept; the graph autograd recorded
        # for it (a kernel without derivative, or a dequantised copy) is dropped here.
        return _QuantizedInputGrad.apply(x, out.detach(), layer)
    return None


def pass_gradients_through_quantized(model: nn.Module) -> int:
    """Let gradients flow through every quantised layer of `model` to its input (in place;
    returns how many layers it set up). QLoRA's recipe (Dettmers et al. 2023, section 3):
    the frozen 4-bit base is dequantised to the compute dtype for the forward and backward
    passes, and only the adapters get weight gradients. Needed because the fused CPU kernels
    have no derivative, and autograd through the dequantise-and-matmul path would keep a float
    copy of every weight alive until the backward pass, what quantising was to avoid. A
    forward hook, so the layers, their state-dict keys and their inference path are unchanged.
    apply_lora and load_adapter call it; adapters further down need it on the output layer too."""
    n = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear) and not getattr(m, "lora_input_grad", False):
            m.register_forward_hook(_input_grad_hook)
            m.lora_input_grad = True  # once per layer (a deep copy keeps the hook and the flag)
            n += 1
    return n


def dropout_keep_mask(shape: tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """A bool mask of `shape`, each entry True (kept) with probability 1 - p, independently: what
    nn.Dropout draws. On CPU from 16-bit random integers against a threshold, so p is rounded to a
    multiple of 2^-16 (within 7.7e-6 of it: 0.05 becomes 0.0500031), a difference no training run
    can see. torch.randint over the full int64 range gives four 16-bit integers per 64-bit draw:
    half the generator's work of 32-bit integers, and bernoulli_ costs as much as those (a
    2048 x 5632 mask, config B's w2 input: 25 ms of CPU against 55 and 58 ms, 2 threads). LoRA
    dropout cost more than the adapters' matmuls on CPU (7 masks per block, each as large as the
    projection's input), and drawing the masks was the larger part of it."""
    assert 0 < p < 1, p
    if device.type != "cpu":
        return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1 - p)
    n = math.prod(shape)
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    # int16 quarters uniform on [-2^15, 2^15): below the threshold with probability p (rounded).
    return (bits.view(torch.int16)[:n] >= round(p * 2**16) - 2**15).view(shape)


def _dropped(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    # torch.where, not x * keep: a product with a bool tensor first writes a float copy of the
    # mask (type promotion), which made dropout cost more than the adapters' matmuls on CPU.
    return x if keep is None else torch.where(keep, x, 0.0)


class _LoRAFunction(torch.autograd.Function):
    """LoRALinear's training forward and backward, y = base(x) + s * B A dropout(x), as one node:

    - the base product and the low-rank one are one addmm, y = (s u) B^T + x W^T with u = A x (the
      (tokens, r) product), where autograd would write three (tokens, out) tensors (x W^T, the
      update, their sum) and a fourth for the scaling;
    - the frozen base records no graph: its backward is the input's gradient alone, summed into
      the adapter's in place (one addmm again);
    - dropout keeps its bool mask (a quarter of an fp32 input) and recomputes the dropped input
      in backward, where autograd keeps the dropped copy; the mask comes from dropout_keep_mask;
    - under autocast, the input is saved as given (q, k, v share one tensor, as w1 and w3 do), not
      as one cast copy per projection, and the frozen weight's cast copy is made again in backward
      instead of being held from forward to backward: W's copies are not all alive at once.

    Dtypes as the module-level path computes them: under autocast everything in the autocast
    dtype; otherwise the adapters in their own dtype (fp32) and the base in its own, summed and
    cast to the base's output dtype. A base that is not an nn.Linear (int8, int4: QLoRA) runs its
    own forward; its input gradient is grad @ W with W dequantised on the spot, as
    pass_gradients_through_quantized does it."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, layer: LoRALinear, p: float):
        base, s = layer.base_layer, layer.scaling
        device = x.device.type
        amp = torch.is_autocast_enabled(device)
        ld = torch.get_autocast_dtype(device) if amp else lora_A.dtype  # the adapters' compute dtype
        x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
        dense = isinstance(base, nn.Linear)
        with torch.autocast(device, enabled=False) if amp else contextlib.nullcontext():
            xl = x2.to(ld)
            mask = dropout_keep_mask(xl.shape, p, x.device) if p > 0 else None
            # (tokens, r), scaled; dropout's 1/(1-p) is applied to this small product, not to x.
            u = torch.mm(_dropped(xl, mask), lora_A.to(ld).t()) * (s / (1 - p))
            bias = getattr(base, "bias", None)
            if dense and (ld if amp else base.weight.dtype) == ld:
                # One addmm: (tokens, out) = low-rank update + x W^T (+ bias).
                low = torch.mm(u, lora_B.to(ld).t()) if bias is None else torch.addmm(bias.to(ld), u, lora_B.to(ld).t())
                y = torch.addmm(low, xl, base.weight.to(ld).t())
                fused = True
            else:
                low, fused = torch.mm(u, lora_B.to(ld).t()), False
        if not fused:  # a quantised base or another dtype: its own forward, then the sum as the module path
            y = base(x).reshape(-1, layer.out_features)
            y = (y + low).to(y.dtype)
        ctx.save_for_backward(x, lora_A, lora_B, u, mask)
        ctx.layer, ctx.p, ctx.ld, ctx.fused = layer, p, ld, fused
        return y.view(*x.shape[:-1], layer.out_features)

    @staticmethod
    def backward(ctx, grad):
        x, lora_A, lora_B, u, mask = ctx.saved_tensors
        layer, p, ld = ctx.layer, ctx.p, ctx.ld
        base, s = layer.base_layer, layer.scaling
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        g = grad.reshape(-1, layer.out_features)  # (tokens, out)
        gl = g.to(ld)
        keep = 1 / (1 - p) if mask is not None else 1.0
        grad_b = (gl.t() @ u).to(lora_B.dtype) if need_b else None  # (out, r); u is already scaled
        gu = (gl @ lora_B.to(ld)) * (s * keep)  # (tokens, r): the gradient of A dropout(x), dropout's 1/(1-p) in
        grad_a = grad_x = None
        if need_a:
            xl = x.reshape(-1, x.shape[-1]).to(ld)
            grad_a = (gu.t() @ _dropped(xl, mask)).to(lora_A.dtype)  # (r, in)
            del xl
        if need_x:
            gx = gu @ lora_A.to(ld)  # (tokens, in): the adapter's share
            if mask is not None:
                gx = torch.where(mask, gx, 0.0)  # one pass (masked_fill_ of ~mask is two)
            if ctx.fused:
                gx.addmm_(gl, base.weight.to(ld))  # + the base's share, g W, in place
            else:
                gx = gx.to(g.dtype) + g @ dense_weight(base, g.dtype)
            grad_x = gx.to(x.dtype).view(x.shape)
        return grad_x, grad_a, grad_b, None, None


class LoRALinear(nn.Module):
    """A frozen base projection plus a trainable low-rank update (Hu et al. 2021, eq. 3):
    y = base(x) + scaling * B A dropout(x), scaling = alpha / r.

    lora_A (r, in) and lora_B (out, r) are parameters in `dtype` (fp32 by default, whatever
    the base holds: the update is small beside W, and bf16 would round it away); the input
    is cast to it for the adapter's product and the sum cast back to the base's output
    dtype, as PEFT does. A and B are plain parameters, not nn.Linear modules, so that
    quantize_model or use_gemv applied later never mistake them for a projection."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 8, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(base, (nn.Linear, QuantizedLinear)):
            raise ValueError(f"LoRA wraps a linear projection (nn.Linear or a quantised one), not a "
                             f"{type(base).__name__}")
        self.r, self.alpha = _check_rank(r, "LoRA r (rank)"), _check_alpha(alpha, "LoRA alpha")
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(self.r, self.alpha, self.use_rslora)
        self.in_features, self.out_features = base.in_features, base.out_features
        base.requires_grad_(False)
        pass_gradients_through_quantized(base)
        self.base_layer = base
        p = _check_dropout(dropout, "LoRA dropout")
        # Dropout on the adapter's input only (Hu et al.'s experiments; PEFT's lora_dropout).
        self.lora_dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        device = next(itertools.chain(base.parameters(), base.buffers())).device
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, dtype=dtype, device=device))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # B = 0: the adapted model starts as the pretrained one (Hu et al. 2021, section 4.1).
        # A: nn.Linear's Kaiming-uniform (a = sqrt(5), bound 1/sqrt(in)), as PEFT draws it,
        # where Hu et al. draw a Gaussian; either works, since B = 0 makes BA zero at first.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.lora_A.requires_grad or self.lora_B.requires_grad):
            # Training: the whole layer as one autograd node (_LoRAFunction), what it saves and
            # recomputes chosen by hand.
            p = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) and self.lora_dropout.training else 0.0
            return _LoRAFunction.apply(x, self.lora_A, self.lora_B, self, p)
        base_in = x
        if isinstance(self.base_layer, nn.Linear) and not torch.is_autocast_enabled(x.device.type):
            base_in = x.to(self.base_layer.weight.dtype)  # a base stored in the compute dtype (cast_frozen_base)
        result = self.base_layer(base_in)  # a quantised base passes gradients on (pass_gradients_through_quantized)
        h = self.lora_dropout(x.to(self.lora_A.dtype))
        delta = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling
        return (result + delta).to(result.dtype)

    @torch.no_grad()
    def merge(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """W + scaling * B A as a plain, frozen nn.Linear: computed in fp32 (a quantised base is
        dequantised first), stored in `dtype` (default: the base's float dtype)."""
        w = dense_weight(self.base_layer, torch.float32) + (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        return _linear_of(w.to(dtype or float_dtype(self.base_layer)), getattr(self.base_layer, "bias", None))

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


# --- the model -------------------------------------------------------------------------------

def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """The LoRA layers of `model`, by module name (layers.0.attention.wq, ...)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def _targets(model: nn.Module, leaves) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if name.startswith("layers.") and name.rpartition(".")[2] in leaves]


def _no_adapters_yet(model: nn.Module) -> None:
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters; merge them first (merge_adapter) or start from the "
                         "base model")


def apply_lora(model: Transformer, config: LoraConfig | None = None, dtype: torch.dtype = torch.float32) -> Transformer:
    """Wrap the projections named by config.target_modules in every block by LoRALinear
    (in place) and freeze everything else: afterwards only the adapters require gradients.
    Quantise first (quantize_model) for QLoRA. Returns the model."""
    config = config or LoraConfig()
    _no_adapters_yet(model)
    # Adapters are per projection under Meta's (and PEFT's) names: a fused wqkv / w13 (load-time
    # fusion, fuse.py) is split back first, else the targets would be missed without a word.
    unfuse(model)
    targets = _targets(model, config.target_modules)
    if not targets:
        raise ValueError(f"no module named {', '.join(config.target_modules)} in the model's blocks")
    for name, m in targets:
        if not isinstance(m, (nn.Linear, QuantizedLinear)):
            raise ValueError(f"{name} is a {type(m).__name__}; LoRA wraps linear projections only")
    model.requires_grad_(False)
    pass_gradients_through_quantized(model)
    for name, m in targets:
        model.set_submodule(name, LoRALinear(m, config.r, config.alpha, config.dropout, config.use_rslora, dtype))
    return model


@torch.no_grad()
def cast_frozen_base(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen float projections under the adapters in `dtype` (bf16 for training under
    bf16 autocast), in place; returns how many. Autocast casts them to that dtype at every product
    anyway (the same values, rounded the same way): stored so once, the casts are not redone in
    every forward and backward and their fp32 copies are not kept (half the frozen projections'
    memory). The adapters stay fp32; norms, embedding and output layer stay as they are (plain
    modules, which may also run without autocast). Without autocast, LoRALinear gives such a base
    its input in `dtype`."""
    n = 0
    for layer in (m.base_layer for _, m in lora_layers(model)):
        if type(layer) is nn.Linear and layer.weight.is_floating_point() and layer.weight.dtype != dtype:
            layer.weight = nn.Parameter(layer.weight.to(dtype), requires_grad=False)
            n += 1
    return n


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (what the optimizer trains), in module order, A before B."""
    return [p for _, m in lora_layers(model) for p in (m.lora_A, m.lora_B)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors under the model's own names ('layers.0.attention.wq.lora_A', ...),
    detached: a training checkpoint's share of a LoRA model."""
    return {f"{name}.{part}": getattr(m, part).detach() for name, m in lora_layers(model)
            for part in ("lora_A", "lora_B")}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy lora_state_dict's tensors into a model with the same adapters (resuming training)."""
    want = lora_state_dict(model)
    unknown, missing = sorted(set(state) - set(want)), sorted(set(want) - set(state))
    if unknown or missing:
        raise ValueError(f"LoRA state does not match the model's adapters: unknown keys {unknown[:5]}, "
                         f"missing keys {missing[:5]}; apply_lora with the configuration it was trained with")
    for k, t in state.items():
        if t.shape != want[k].shape:
            raise ValueError(f"LoRA state {k}: shape {tuple(t.shape)}, the model's adapter has {tuple(want[k].shape)}")
    for k, t in state.items():
        want[k].copy_(t)


@torch.no_grad()
def merge_adapter(model: Transformer) -> Transformer:
    """Fold every adapter into its projection (LoRALinear.merge), in place, and dequantise any
    quantised layer left: the result is a plain float model, as a model directory holds one.
    A tied output layer (tie_word_embeddings) is tied to the embedding again. Returns the model."""
    for name, m in lora_layers(model):
        model.set_submodule(name, m.merge())
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantizedLinear):
            model.set_submodule(name, dense_linear(m))
    if isinstance(model, Transformer):
        model.tie_output()
    return model


# --- adapter files (PEFT's layout) -----------------------------------------------------------

def hf_module_names(args: ModelArgs) -> dict[str, str]:
    """Our name of every projection that can take an adapter -> transformers' module name
    ('layers.0.attention.wq' -> 'model.layers.0.self_attn.q_proj'), from convert/hf's key map."""
    out = {}
    for meta, hf in key_map(args.n_layers, args.tie_word_embeddings).items():
        module = meta.removesuffix(".weight")
        if module.startswith("layers.") and module.rpartition(".")[2] in HF_TARGETS:
            out[module] = hf.removesuffix(".weight")
    return out


def _row_permutation(name: str, args: ModelArgs):
    """(permute, n_heads) for lora_B of wq / wk: their rows are rotary pairs (convert/hf.py)."""
    leaf = name.rpartition(".")[2]
    return {"wq": args.n_heads, "wk": args.n_kv_heads}.get(leaf)


def pattern_key(patterns, module: str) -> str | None:
    """The rank_pattern / alpha_pattern key that applies to `module` (a transformers module
    name), as PEFT matches them: the first key that matches the end of the name at a dot."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def save_adapter(model: Transformer, config: LoraConfig | None, path: str | os.PathLike, *,
                 base_model: str | None = None) -> Path:
    """Write the model's adapters as a PEFT adapter directory (atomically): adapter_config.json
    and adapter_model.safetensors under transformers' module names. `config` gives r, alpha,
    dropout and rsLoRA as written (None: read from the layers); a layer whose rank or alpha
    differs is written into rank_pattern / alpha_pattern under its own name. `base_model` is
    written as base_model_name_or_path (informational: whoever loads chooses the base)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to save; apply_lora or load_adapter first")
    first = layers[0][1]
    if config is None:
        leaves = tuple(dict.fromkeys(name.rpartition(".")[2] for name, _ in layers))
        p = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
        config = LoraConfig(first.r, first.alpha, p, leaves, first.use_rslora)
    args = model.args
    names = hf_module_names(args)
    if stray := [name for name, _ in layers if name not in names]:
        raise ValueError(f"adapter layer {stray[0]!r} is not a projection of the Transformer's blocks; pass "
                         "save_adapter the Transformer itself (not a compiled or distributed wrapper)")
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for name, m in layers:
        hf = names[name]
        if m.use_rslora != config.use_rslora:
            raise ValueError(f"{name} has use_rslora={m.use_rslora} but the config says {config.use_rslora}; "
                             "PEFT's adapter_config.json has one setting for all layers")
        b = m.lora_B.detach()
        if (heads := _row_permutation(name, args)) is not None:
            b = permute_for_hf(b, heads)
        tensors[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = m.lora_A.detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = b.cpu().contiguous()
        if m.r != config.r:
            rank_pattern[hf] = m.r
        if m.alpha != config.alpha:
            alpha_pattern[hf] = m.alpha
    wrapped = {names[name] for name, _ in layers}
    leaves = sorted({hf.rpartition(".")[2] for hf in wrapped})
    # Projection names (q_proj, ...) when every block has them, as PEFT writes target_modules;
    # full module names when only some blocks do, so that PEFT wraps just those.
    every = {hf for hf in names.values() if hf.rpartition(".")[2] in leaves}
    targets = leaves if every == wrapped else sorted(wrapped)
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None if base_model is None else str(base_model),
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "bias": "none",
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }
    path = Path(path)
    with atomic_directory(path, overwrite=True) as tmp:
        save_safetensors(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        atomic_write_json(tmp / ADAPTER_CONFIG, cfg)
    return path


def check_adapter_config(cfg, file) -> dict:
    """adapter_config.json checked as plain LoRA that llamaworks computes exactly as PEFT does;
    returns it with PEFT's defaults filled in. ValueError naming the file and the key otherwise."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{file}: expected a JSON object (PEFT's adapter_config.json), got {type(cfg).__name__}")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type is {cfg.get('peft_type')!r}; llamaworks reads LoRA adapters "
                         "(peft_type \"LORA\")")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"{file}: task_type is {cfg['task_type']!r}; a language-model adapter has \"CAUSAL_LM\"")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{file}: bias is {cfg['bias']!r}; the model's projections have no biases to train, "
                         "so only bias \"none\" applies")
    init = cfg.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        raise ValueError(f"{file}: init_lora_weights is {init!r}, which changes the base weights or the layer "
                         "(PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, MiCA); save it as plain LoRA with PEFT "
                         "(save_pretrained(path_initial_model_for_weight_conversion=...)) or merge it with PEFT")
    for key, value in cfg.items():
        if key not in INFORMATIONAL_KEYS and value not in (None, False, 0, "", [], {}):
            raise ValueError(f"{file}: {key} is {value!r}; llamaworks applies plain LoRA only (no DoRA, LoRA "
                             "biases, extra trainable modules or tokens, or LoRA variants); merge this adapter "
                             "with PEFT, or save it without that option")
    out = dict(cfg)
    out["r"] = _check_rank(cfg.get("r", 8), f"{file}: r")
    out["lora_alpha"] = _check_alpha(cfg.get("lora_alpha", 8), f"{file}: lora_alpha")
    out["lora_dropout"] = _check_dropout(cfg.get("lora_dropout", 0.0), f"{file}: lora_dropout")
    out["use_rslora"] = cfg.get("use_rslora", False)
    if not isinstance(out["use_rslora"], bool):
        raise ValueError(f"{file}: use_rslora must be true or false, got {out['use_rslora']!r}")
    for key, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
        patterns = cfg.get(key) or {}
        if not isinstance(patterns, dict):
            raise ValueError(f"{file}: {key} must be an object of module pattern -> value, got {patterns!r}")
        for k, v in patterns.items():
            check(v, f"{file}: {key}[{k!r}]")
            try:
                re.compile(k)
            except re.error as e:
                raise ValueError(f"{file}: {key} key {k!r} is not a regular expression ({e})") from None
        out[key] = patterns
    return out


def _adapter_tensors(state: dict[str, torch.Tensor], cfg: dict, args: ModelArgs, modules: dict[str, nn.Module],
                     file: Path) -> dict:
    """{our module name: (A, B, r, alpha)} from PEFT-named tensors, checked against the model."""
    names = hf_module_names(args)
    from_hf = {hf: ours for ours, hf in names.items()}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        rest = key.removeprefix(PEFT_PREFIX)
        part = next((p for p in ("lora_A", "lora_B") if rest.endswith(f".{p}.weight")), None)
        module = rest[: -len(f".{part}.weight")] if part else None
        if not key.startswith(PEFT_PREFIX) or part is None:
            what = ("an embedding adapter (LoRA on embeddings is not supported)" if "lora_embedding" in key else
                    "a DoRA magnitude (DoRA is not supported)" if "lora_magnitude" in key else
                    "not a LoRA factor of PEFT's layout (base_model.model.<module>.lora_A.weight / lora_B.weight)")
            raise ValueError(f"{file}: tensor {key!r} is {what}")
        if module not in from_hf or from_hf[module] not in modules:
            raise ValueError(f"{file}: tensor {key!r} adapts {module!r}, which is not an attention or MLP projection "
                             f"of this model ({args.n_layers} layers; LoRA applies to "
                             f"{', '.join(HF_TARGETS.values())}); is this the adapter of another base model?")
        if t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{file}: tensor {key!r} should be a 2-D float matrix, got {t.dtype} {tuple(t.shape)}")
        pairs.setdefault(from_hf[module], {})[part] = t
    if not pairs:
        raise ValueError(f"{file}: holds no LoRA tensors")
    out = {}
    for name, ab in pairs.items():
        hf = names[name]
        if set(ab) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(ab)).pop()
            raise ValueError(f"{file}: {PEFT_PREFIX}{hf}.{missing}.weight is missing (LoRA needs both A and B)")
        a, b = ab["lora_A"], ab["lora_B"]
        out_f, in_f = modules[name].out_features, modules[name].in_features
        r = a.shape[0]
        if a.shape != (r, in_f) or b.shape != (out_f, r):
            raise ValueError(f"{file}: {hf} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but this model's "
                             f"projection is {out_f} x {in_f} (expected ({r}, {in_f}) and ({out_f}, {r})); is this the "
                             "adapter of another base model?")
        key = pattern_key(cfg["rank_pattern"], hf)
        want = cfg["rank_pattern"][key] if key is not None else cfg["r"]
        if r != want:
            raise ValueError(f"{file}: {hf} has rank {r} but adapter_config.json says "
                             f"{'rank_pattern[' + repr(key) + ']' if key is not None else 'r'} = {want}")
        key = pattern_key(cfg["alpha_pattern"], hf)
        alpha = cfg["alpha_pattern"][key] if key is not None else cfg["lora_alpha"]
        out[name] = (a, b, r, alpha)
    return out


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The checked adapter_config.json of an adapter directory (PEFT's keys, defaults filled in)."""
    path = require_dir(path, f"an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (PEFT's layout)")
    file = path / ADAPTER_CONFIG
    return check_adapter_config(read_json_file(file, ADAPTER_CONFIG, max_bytes=1 << 20,
                                               hint=f"an adapter directory holds {ADAPTER_CONFIG} and "
                                                    f"{ADAPTER_WEIGHTS} (PEFT's layout)"), file)


@torch.no_grad()
def load_adapter(model: Transformer, path: str | os.PathLike, dtype: torch.dtype | None = None) -> LoraConfig:
    """Wrap the model's projections with the adapters of a PEFT adapter directory (ours or
    PEFT's) and freeze the rest, as apply_lora does; returns its configuration. Everything is
    checked before any adapter is applied (a fused model is unfused first, which computes the
    same). The adapters keep the file's dtype unless `dtype`."""
    _no_adapters_yet(model)
    cfg = read_adapter_config(path)
    file = Path(path) / ADAPTER_WEIGHTS
    state = read_safetensors(file)
    args = model.args
    unfuse(model)  # the adapters name wq, wk, ... (as apply_lora; load_model fuses what stays unadapted)
    modules = {name: m for name, m in _targets(model, HF_TARGETS) if isinstance(m, (nn.Linear, QuantizedLinear))}
    adapters = _adapter_tensors(state, cfg, args, modules, file)
    model.requires_grad_(False)
    pass_gradients_through_quantized(model)
    for name, (a, b, r, alpha) in adapters.items():
        layer = LoRALinear(modules[name], r, alpha, cfg["lora_dropout"], cfg["use_rslora"], dtype or a.dtype)
        if (heads := _row_permutation(name, args)) is not None:
            b = unpermute_from_hf(b, heads)
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
        model.set_submodule(name, layer)
    leaves = tuple(leaf for leaf in HF_TARGETS if any(n.rpartition(".")[2] == leaf for n in adapters))
    return LoraConfig(cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], leaves, cfg["use_rslora"])
