"""Weight-only quantisation by module swapping: int8 per output channel, int4 group-wise.

Every nn.Linear of the transformer blocks (wq, wk, wv, wo, w1, w2, w3) and the output
projection is replaced by a module holding integer weights and floating-point scales;
embeddings and norms stay in floating point. Activations are not quantised.

Decoding reads every weight once per step, so it is bound by memory bandwidth: int8
halves the bytes of bf16 (quarters fp32), int4 halves them again. On CPU, up to 8 rows
(decode) run in llamaworks' native kernels when they are built (native.py: fp32 or bf16
activations, dequantised in registers, each weight byte read once per call; int4 in a layout
repacked for them at load, also for up to 32 rows); otherwise the fused torch kernels
(_weight_int8pack_mm, _weight_int4pack_mm_for_cpu) dequantise in registers and take bf16
activations; everywhere else, and for many rows at once
(prefill), the weight is dequantised and multiplied by an ordinary matmul (int8 on a CPU
with AMX: in bf16, the kernel's precision, where the bf16 matmul is several times faster).
What those kernels are handed is kept 64-byte aligned (kernels.KERNEL_ALIGN): a weight
mapped from a file at another offset is copied once, when it is loaded.

A quantised model directory is a normal one (params.json stays Meta's) plus
quantization.json ({"mode", "group_size"}); its weights carry the Linear's name for
the integer tensor (`...wq.weight`) beside `...wq.scales` (and `...wq.zeros` for int4).

Adding a quantisation mode
--------------------------
A mode is one QuantMode subclass registered with @register_mode, next to Int8 and Int4
below. It names itself (`name`: the --mode value and quantization.json's "mode"; `help`: its
phrase in --mode's help), lists the keyword options its __init__ takes and checks
(`options`: int4 has "group_size"), and implements
  quantize(linear)            -> its module, from a float nn.Linear
  empty(in, out, dtype, dev)  -> its module with empty buffers (on the meta device, to load)
  check_layer(name, linear)   -> ValueError for a layer it cannot take (before any swap)
  settings()                  -> its options as quantization.json holds them
  describe()                  -> how the quantize command reports it.
Its module subclasses QuantizedLinear: buffers in the state dict under the Linear's name,
refresh() rebuilding what it derives from them (kernel layouts, aligned copies), and
kernel_tensors() naming every tensor it hands to a native kernel, which
tests/inference/test_quant_alignment.py checks, for every registered mode, after loading a
directory. MODES, the CLI's --mode choices and help, quantize_model, swap_empty,
read_quantization, save_quantized, check_mode and is_quantized follow the registry, and
options travel through them as keywords: only an option the CLI does not have yet (today
it has --group-size) needs a parameter of quantize_command and an entry in its `options`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from llamaworks.atomic import atomic_directory, atomic_write_json
from llamaworks.inference import native
from llamaworks.inference.kernels import (
    INT8_KERNEL_ROW_MULTIPLE,
    KERNEL_MAX_ROWS,
    aligned,
    bf16_matmul,
    cpu_kernel,
    has_amx,
    kernel_rows,
    native_rows,
    prompt_linear,
)
from llamaworks.modeldir import QUANT_FILE, write_model_files
from llamaworks.weights import read_json_file

GROUP_SIZES = (32, 64, 128, 256)

# With AMX tiles, bf16 matmuls are fast enough that dequantising an int8 weight to bf16 (exact:
# |q| <= 127) and multiplying beats the int8 kernel, whose time grows with the rows, from
# about this many rows on (16 rows: 0.31 vs 0.25 ms for a 1536x512 weight, 1 thread).
AMX_INT8_KERNEL_MAX_ROWS = 12


# The int8 kernel reads four weight rows at a time, each as one stream, prefetching a single
# cache line ahead; it streams from memory well only when a row spans a 4 KiB page (the
# hardware prefetcher stops at page ends). Cold (weights from DRAM, one row, 2 threads, 2-vCPU
# AVX-512 Xeon): rows of 1024-2048 bytes read at 9-11 GB/s, 4096 and more at 16-20 GB/s. So a
# one-row product against a weight with shorter rows folds r rows into one, W (N, K) ->
# W' (N/r, rK) (a view), multiplied by the block-diagonal activations kron(I_r, x) (r, rK):
# row i of the result holds the outputs i, r + i, 2r + i, ... The kernel then does r times the
# arithmetic on the same bytes, which is free at one row: 5632x2048 goes from 1.04 to 0.72 ms,
# 4096x1024 (r=4) from 8.9 to 12.8 GB/s. Weights under 4 MiB stay in cache across steps, where
# the extra arithmetic costs more than it saves (512x1536: 44 -> 85 us), so they are not folded.
FOLD_ROW_BYTES = 4096
FOLD_MIN_BYTES = 4 * 2**20
FOLD_MAX = 4


def fold_factor(out_features: int, in_features: int) -> int:
    """Rows of an int8 weight to fold into one for one-row products (1: none); see above."""
    if out_features * in_features < FOLD_MIN_BYTES or in_features >= FOLD_ROW_BYTES:
        return 1
    r = -(-FOLD_ROW_BYTES // in_features)
    r = 1 << (r - 1).bit_length()  # next power of two
    return r if r <= FOLD_MAX and out_features % r == 0 else 1


def _holds_data(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.numel() > 0  # not meta (loading), not empty


class QuantizedLinear(nn.Module):
    """What the quantised layers share: refresh() runs whenever their buffers are replaced
    (loaded, also by assignment, moved or cast), so tensors derived from them (kernel
    layouts, aligned copies) never go stale; kernel_tensors() names what native kernels read."""

    in_features: int
    out_features: int
    # Whether refresh() builds the few-row decode kernels' copies of the weight (int4's native and
    # torch layouts). False for a frozen base being fine-tuned (QLoRA, train/finetune.py), whose
    # many-row products dequantise the portable weight: the layouts would double its memory.
    decode_layouts: bool = True

    def refresh(self) -> None:
        raise NotImplementedError

    def kernel_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this layer hands to a native kernel (empty where none runs)."""
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.refresh()
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh()


# --- int8, one scale per output channel (row) -------------------------------------------------

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric: w ~= q * scale[:, None], q in [-127, 127]."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(QuantizedLinear):
    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self._amx = has_amx()  # a plain bool: compiled graphs guard on it as a constant
        self._bf16_matmul = bf16_matmul()
        self.kernel = in_features % INT8_KERNEL_ROW_MULTIPLE == 0  # else rows break the kernel's alignment
        self.fold = fold_factor(out_features, in_features) if self.kernel else 1
        self.refresh()

    def refresh(self) -> None:
        # The weight as mapped from a file may sit at any offset, and the kernel faults on some
        # (kernels.KERNEL_ALIGN): copied once here if so, never per call.
        if _holds_data(self.weight):
            self.weight = aligned(self.weight)
        # The kernel's bf16 copy of the scales, kept rather than cast on every call: one small
        # op (~2 us) less per layer and step, and inductor cannot lower the kernel with a
        # computed scales argument. Not in the state dict. Aligned too: bf16 scales loaded
        # from a file cast to themselves.
        self._kernel_scales = self.scales.to(torch.bfloat16)
        if _holds_data(self._kernel_scales):
            self._kernel_scales = aligned(self._kernel_scales)
        if self.fold > 1:
            # Folded rows carry different scales: the kernel runs with unit scales and the
            # per-channel ones are applied to its output, as (N/r, r) to match the fold.
            dev = self.scales.device
            self._fold_ones = torch.ones(self.out_features // self.fold, dtype=torch.bfloat16, device=dev)
            self._fold_eye = torch.eye(self.fold, dtype=torch.bfloat16, device=dev)
            self._fold_scales = self.scales.view(-1, self.fold)
        # The native kernel's fp32 scales (the weight it reads as it is). Built only where it runs.
        self._native_scales = None
        if _holds_data(self.scales) and native.available():
            self._native_scales = aligned(self.scales.to(torch.float32, memory_format=torch.contiguous_format))

    def _folded_weight(self) -> torch.Tensor:
        # A view: the same (aligned) first byte, rows of fold * in_features (a multiple of 16).
        return self.weight.view(self.out_features // self.fold, self.fold * self.in_features)

    def kernel_tensors(self) -> dict[str, torch.Tensor]:
        native_in = {} if self._native_scales is None else {"weight": self.weight, "native scales": self._native_scales}
        if not self.kernel:
            return native_in
        out = {**native_in, "weight": self.weight, "kernel scales": self._kernel_scales}
        if self.fold > 1:
            out.update({"folded weight": self._folded_weight(), "fold ones": self._fold_ones})
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._native_scales is not None and native_rows(x, self.in_features):
            out = torch.ops.llamaworks.gemv_int8(x.reshape(-1, self.in_features), self.weight, self._native_scales)
            return out.view(*x.shape[:-1], self.out_features)
        if self.kernel and cpu_kernel(x, AMX_INT8_KERNEL_MAX_ROWS if self._amx else KERNEL_MAX_ROWS):
            # The fused kernel wants bf16 activations and scales (fp32 ones run ~6x slower);
            # bf16 rounding of x (2^-9) is below the int8 rounding of the weight (2^-8).
            flat = kernel_rows(x, self.in_features)
            r, m = self.fold, flat.shape[0]
            if r > 1 and m * r <= FOLD_MAX:
                n = self.out_features // r
                xr = torch.kron(self._fold_eye, flat)  # (r*m, r*in): x on the block diagonal
                out = torch.ops.aten._weight_int8pack_mm(xr, self._folded_weight(), self._fold_ones)
                out = out.view(r, m, n).permute(1, 2, 0) * self._fold_scales  # (m, n, r): output n*r + i
                return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self._kernel_scales)
            return out.view(*x.shape[:-1], self.out_features).to(x.dtype)
        if self._bf16_matmul and x.device.type == "cpu":
            # Many rows (prefill, big batches): the same bf16 activations as the kernel, the
            # integer weight cast to bf16 exactly, in bf16 hardware (AMX, AVX512_BF16): 2.2x the
            # fp32 cast and matmul on Zen 4 (bf16_matmul).
            out = F.linear(x.to(torch.bfloat16), self.weight.to(torch.bfloat16))
            return out.to(x.dtype) * self.scales.to(x.dtype)
        return prompt_linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


# --- int4, asymmetric, one scale and zero point per group of input columns -------------------

def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w ~= (q - 8) * scale + zero per group, q in [0, 15] (the tinygemm convention, so the
    kernel takes scales and zeros as stored). Returns q packed two per byte (out, in/2) with
    the even column in the low nibble, scales and zeros (out, in/group_size)."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scales = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo) / scales).clamp(0, 15).to(torch.uint8).reshape(out_f, in_f)
    zeros = lo + 8 * scales
    return pack_int4(q), scales.squeeze(-1), zeros.squeeze(-1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    return q[:, ::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def native_int4_layout(packed: torch.Tensor) -> torch.Tensor:
    """Int4Linear's packed weight (out, in/2) in the native kernel's layout (csrc/gemv_body.h):
    per 32 columns, 16 bytes whose byte j holds column j (low nibble) and column 16 + j (high),
    so that a vector of bytes widens to consecutive columns without shuffles."""
    q = unpack_int4(packed)
    out_f, in_f = q.shape
    q = q.view(out_f, in_f // 32, 2, 16)  # (out, blocks, low/high half, 16)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(out_f, in_f // 2)


# The 16-row tiles of llamaworks::gemv_int4_tiles (csrc/int4_tiles.cpp): Int4Linear's decode
# layout where the kernel takes it fast (AVX512_VNNI's vpdpbusd; AVX2's maddubs from avx2 up, 8
# rows a vector; the scalar level runs it portably), for groups of 128, 256, ... and out_features
# a multiple of 16; other layers keep native_int4_layout.
INT4_TILE = 16
INT4_TILED_ISAS = ("avx2", "avx512", "avx512vnni", "avx512bf16")


# Rows the tiled kernel takes in one call: every prefill too. It multiplies 8 rows at a time over
# cache-sized slices of the weight in integers (vpdpbusd), where the other path dequantises the
# whole weight to fp32 on every call (several passes over 4x its bytes) before an fp32 matmul.
INT4_TILES_MAX_ROWS = 1 << 20


def int4_tiles_apply(isa: str, out_features: int, group_size: int) -> bool:
    """Whether Int4Linear builds the tiled layout (int4_tiles) under the kernels' `isa`."""
    return isa in INT4_TILED_ISAS and out_features % INT4_TILE == 0 and group_size % 128 == 0


def int4_tiles(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Int4Linear's weight (out, in/2), scales and zeros (out, in/group) as gemv_int4_tiles takes
    them: the weight (out/16, 8 * in) uint8, per tile of 16 rows and chunk of 8 columns 64 bytes,
    row r's 4 at 4r, byte i holding column i (low nibble) and column 4 + i (high); scales and
    offsets (zero - 8 * scale) as fp32 (out/16, in/group, 16): one vector per tile and group."""
    q = unpack_int4(packed)
    out_f, in_f = q.shape
    q = q.view(out_f // INT4_TILE, INT4_TILE, in_f // 8, 2, 4)  # (tile, row, chunk, low/high, byte)
    w = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).transpose(1, 2).reshape(out_f // INT4_TILE, 8 * in_f)
    s = scales.float()

    def tiled(t: torch.Tensor) -> torch.Tensor:
        return t.view(out_f // INT4_TILE, INT4_TILE, -1).transpose(1, 2).contiguous()

    return w.contiguous(), tiled(s), tiled(zeros.float() - 8 * s)


def dequantize_int4(packed, scales, zeros, group_size: int, dtype=torch.float32) -> torch.Tensor:
    w = unpack_int4(packed).to(dtype)  # (out, in): the one float tensor made; the rest is done in it
    out_f, in_f = w.shape
    # (q - 8) * scale + zero, in place: the same two roundings as out of place, without three more
    # (out, in) temporaries (QLoRA dequantises every projection in each forward, recompute and backward).
    g = w.view(out_f, in_f // group_size, group_size)
    g.sub_(8).mul_(scales.to(dtype).unsqueeze(-1)).add_(zeros.to(dtype).unsqueeze(-1))
    return w


class Int4Linear(QuantizedLinear):
    # The kernel layouts decode reads, moved by hugepages.use_hugepages with the buffers.
    hugepage_attrs = ("_native", "_packed", "_scales_zeros")

    def __init__(self, in_features: int, out_features: int, group_size: int, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        check_group_size(in_features, group_size, "in_features")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_groups = in_features // group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, n_groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.empty(out_features, n_groups, dtype=dtype, device=device))
        # The CPU kernel's own tiled layout, built from the portable one above (which is what
        # is saved); it is not part of the state dict.
        self._packed: torch.Tensor | None = None
        self._scales_zeros: torch.Tensor | None = None
        self.kernel = out_features % 16 == 0  # the CPU kernel's only shape limit beyond the group size
        # The native kernel's layout and its fp32 scales and offsets (zero - 8 * scale), built
        # instead of the torch kernel's when the native kernels are available: gemv_int4_tiles'
        # 16-row tiles where int4_tiles_apply (self._tiled), else gemv_int4's layout.
        self._native: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._tiled = False

    def refresh(self) -> None:
        # Built when the weights arrive (loaded or quantised), not on the first call: a model
        # compiled before it ever ran would otherwise trace the repacking into its graph.
        self._packed = self._scales_zeros = self._native = None
        self._tiled = False
        if not _holds_data(self.weight) or not self.decode_layouts:
            return
        if native.available():  # group sizes are multiples of 32, the layout's block
            # The instruction set at load time picks the layout; gemv_int4_tiles still runs
            # (portably) if a test lowers it later.
            if int4_tiles_apply(native.current_isa(), self.out_features, self.group_size):
                self._native = tuple(aligned(t) for t in int4_tiles(self.weight, self.scales, self.zeros))
                self._tiled = True
            else:
                s, z = self.scales.float(), self.zeros.float()
                self._native = (aligned(native_int4_layout(self.weight)), aligned(s.contiguous()),
                                aligned((z - 8 * s).contiguous()))
        elif self.kernel:
            self._prepare()

    def _prepare(self):
        q = unpack_int4(self.weight).to(torch.int32)
        # Both are new tensors, so aligned as allocated; aligned() keeps that a checked fact.
        self._packed = aligned(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8))
        self._scales_zeros = aligned(torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1).contiguous().to(
            torch.bfloat16))  # (groups, out, 2)

    def kernel_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        if self._native is not None:
            out.update(zip(("native weight", "native scales", "native offsets"), self._native))
        if self.kernel and self._packed is not None:
            out.update({"packed weight": self._packed, "scales and zeros": self._scales_zeros})
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._native is not None and native_rows(x, self.in_features,
                                                    INT4_TILES_MAX_ROWS if self._tiled else KERNEL_MAX_ROWS):
            # Up to 8 rows in one pass over the weight, more in chunks of 8 over cache-sized slices.
            if self._tiled:  # takes x (..., in) as it is: one operator call, nothing around it
                return torch.ops.llamaworks.gemv_int4_tiles(x, *self._native, self.group_size)
            w, s, o = self._native
            out = torch.ops.llamaworks.gemv_int4(x.reshape(-1, self.in_features), w, s, o, self.group_size)
            return out.view(*x.shape[:-1], self.out_features)
        if self.kernel and self.decode_layouts and cpu_kernel(x):
            if self._packed is None:  # a module filled in place (copy_) without refresh()
                self._prepare()
            flat = kernel_rows(x, self.in_features)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self._packed, self.group_size, self._scales_zeros)
            return out.view(*x.shape[:-1], self.out_features).to(x.dtype)
        if self._native is not None and not self._tiled and x.device.type == "cpu":
            # Many rows (prefill) without the tiles: the weight widened in one native pass (dequant_int4:
            # small's 128-token prefill 54.6 -> 33.4 ms on Zen 3), then one matmul.
            return prompt_linear(x, torch.ops.llamaworks.dequant_int4(*self._native, self.group_size).to(x.dtype))
        return prompt_linear(x, dequantize_int4(self.weight, self.scales, self.zeros, self.group_size, x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


# --- the registry of modes -------------------------------------------------------------------

class QuantMode:
    """One quantisation mode with its options set (gpt-fast's handler idea): everything the
    functions below need to know about it. Subclasses are registered with register_mode."""

    name: ClassVar[str]  # the --mode value and quantization.json's "mode"
    help: ClassVar[str]  # a phrase for --mode's help
    options: ClassVar[tuple[str, ...]] = ()  # the keyword options its __init__ takes (and checks)

    def quantize(self, linear: nn.Linear) -> QuantizedLinear:
        """The quantised replacement of a float Linear, on its device."""
        raise NotImplementedError

    def empty(self, in_features: int, out_features: int, dtype: torch.dtype, device) -> QuantizedLinear:
        """The module with empty buffers of the right shapes, for load_state_dict(assign=True)."""
        raise NotImplementedError

    def check_layer(self, name: str, linear: nn.Linear) -> None:
        """Raise ValueError if `linear` cannot be quantised so (checked for all layers first)."""

    def settings(self) -> dict:
        """quantization.json beside "mode"; "group_size" is always written (null if unused)."""
        return {"group_size": None}

    def describe(self) -> str:
        return self.name


MODE_REGISTRY: dict[str, type[QuantMode]] = {}  # by name, in registration order (the CLI's)


def _float_dtype(w: torch.Tensor) -> torch.dtype:
    return w.dtype if w.is_floating_point() else torch.float32


def register_mode(cls: type[QuantMode]) -> type[QuantMode]:
    if cls.name in MODE_REGISTRY:
        raise ValueError(f"quantisation mode {cls.name!r} is registered twice")
    MODE_REGISTRY[cls.name] = cls
    return cls


@register_mode
class Int8(QuantMode):
    name = "int8"
    help = "int8 per output channel"

    def quantize(self, linear: nn.Linear) -> Int8Linear:
        w = linear.weight
        new = self.empty(linear.in_features, linear.out_features, _float_dtype(w), w.device)
        q, s = quantize_int8(w)
        new.weight.copy_(q)
        new.scales.copy_(s)
        new.refresh()
        return new

    def empty(self, in_features, out_features, dtype, device) -> Int8Linear:
        return Int8Linear(in_features, out_features, dtype, device)


@register_mode
class Int4(QuantMode):
    name = "int4"
    help = "int4 in groups of --group-size"
    options = ("group_size",)

    def __init__(self, group_size: int | None = None):
        if group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}; "
                             "set --group-size")
        self.group_size = group_size

    def check_layer(self, name: str, linear: nn.Linear) -> None:
        check_group_size(linear.in_features, self.group_size, f"input dimension of {name}")

    def quantize(self, linear: nn.Linear) -> Int4Linear:
        w = linear.weight
        new = self.empty(linear.in_features, linear.out_features, _float_dtype(w), w.device)
        packed, s, z = quantize_int4(w, self.group_size)
        new.weight.copy_(packed)
        new.scales.copy_(s)
        new.zeros.copy_(z)
        new.refresh()
        return new

    def empty(self, in_features, out_features, dtype, device) -> Int4Linear:
        return Int4Linear(in_features, out_features, self.group_size, dtype, device)

    def settings(self) -> dict:
        return {"group_size": self.group_size}

    def describe(self) -> str:
        return f"int4 (group size {self.group_size})"


MODES = tuple(MODE_REGISTRY)
MODES_HELP = ", or ".join(cls.help for cls in MODE_REGISTRY.values())

def get_mode(mode: str, **options) -> QuantMode:
    """The registered mode `mode` set up with the options it takes (others are ignored: int8
    has no group size); ValueError naming the fix for an unknown mode or a bad option."""
    cls = MODE_REGISTRY.get(mode) if isinstance(mode, str) else None
    if cls is None:
        raise ValueError(f"unknown quantisation mode {mode!r}; use --mode {' or --mode '.join(MODE_REGISTRY)}")
    return cls(**{k: v for k, v in options.items() if k in cls.options})


# --- swapping --------------------------------------------------------------------------------

def check_mode(mode: str, group_size: int | None = None, **options) -> None:
    get_mode(mode, group_size=group_size, **options)


def check_group_size(dim: int, group_size: int, name: str = "dimension") -> None:
    if dim % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide the {name} {dim}; choose a --group-size "
                         f"that divides it ({', '.join(str(g) for g in GROUP_SIZES if dim % g == 0) or 'none fits'})")


def quantizable(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linear layers that are quantised: all of them (block projections and output)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of `model` is a quantised one, of any registered mode."""
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, group_size: int = 128, **options) -> nn.Module:
    """Replace the Linear layers of `model` in place by quantised ones; returns the model.
    Every layer is checked before any is replaced, so an error leaves the model as it was."""
    spec = get_mode(mode, group_size=group_size, **options)
    layers = quantizable(model)
    for name, lin in layers:
        spec.check_layer(name, lin)
    for name, lin in layers:
        _set(model, name, spec.quantize(lin))
    return model


def swap_empty(model: nn.Module, mode: str, group_size: int | None = None, dtype: torch.dtype = torch.float32,
               **options) -> nn.Module:
    """Replace the Linear layers by empty quantised ones of the right shapes (on the model's
    device, typically meta), ready for load_state_dict(assign=True)."""
    spec = get_mode(mode, group_size=group_size, **options)
    for name, lin in quantizable(model):
        _set(model, name, spec.empty(lin.in_features, lin.out_features, dtype, lin.weight.device))
    return model


def read_quantization(path: str | os.PathLike) -> dict | None:
    """The quantization.json of a model directory, checked, as keyword arguments of
    swap_empty ({"mode", "group_size"} and the mode's other options); None for an
    unquantised directory."""
    file = Path(path) / QUANT_FILE
    if not file.exists() and not file.is_symlink():
        return None
    q = read_json_file(file, "quantization.json", max_bytes=64 << 10)  # a FIFO, bad UTF-8, 1 GB: named errors
    mode = q.get("mode") if isinstance(q, dict) else None
    cls = MODE_REGISTRY.get(mode) if isinstance(mode, str) else None
    known = {"mode", "group_size", *(cls.options if cls else ())}  # group_size: null where unused
    if not isinstance(q, dict) or set(q) - known or not isinstance(mode, str):
        raise ValueError(f"{file}: expected {{\"mode\": {'|'.join(map(json.dumps, MODES))}, \"group_size\": N}}, "
                         f"got {q!r}")
    try:
        spec = get_mode(**q)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    return {"mode": spec.name, **spec.settings()}


def save_quantized(model, tokenizer, path: str | os.PathLike, mode: str, group_size: int | None = None,
                   **options) -> Path:
    """A quantised model directory: the model files and quantization.json ({"mode", **settings})."""
    spec = get_mode(mode, group_size=group_size, **options)
    path = Path(path)
    with atomic_directory(path, overwrite=True) as tmp:
        write_model_files(model, tokenizer, tmp)
        atomic_write_json(tmp / QUANT_FILE, {"mode": spec.name, **spec.settings()})
    return path
