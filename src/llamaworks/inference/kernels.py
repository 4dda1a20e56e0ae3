"""CPU kernels for one-row (decode) products: when the native kernels (native.py, csrc/) or
the fused torch quantised kernels apply, the alignment their buffers need, and the layers that
route float products to them (NativeLinear, GemvLinear)."""

from __future__ import annotations

import contextlib
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn

from llamaworks.inference import native
from llamaworks.model import Attention, RMSNorm

# Above this many rows (prefill, large batches) a dequantised weight and a plain matmul beat
# the fused kernels, which are written for a few rows (measured on a 2-core AVX-512 machine).
KERNEL_MAX_ROWS = 32

# The fused quantised kernels (aten._weight_int8pack_mm, _weight_int4pack_mm_for_cpu) read
# their operands with aligned vector loads on some CPU families, and an unaligned address
# there is a SIGSEGV, not an error. Measured on AVX-512 (torch 2.13): the int8 kernel faults
# on an activation that is not 32-byte aligned, and from 4 rows on a weight that is not
# 16-byte aligned; a weight memory-mapped from safetensors sits wherever the file puts it
# (40 mod 64 in issue 17). Every tensor handed to these kernels is therefore kept aligned to a
# cache line, which covers every vector width up to AVX-512.
KERNEL_ALIGN = 64

# Rows of the kernels' operands start at multiples of the row length, so a row must keep the
# alignment too: the int8 kernel also steps through a row 16 values at a time without a tail
# (a row of 88 gives garbage, 72 faults from 2 rows). 16 int8 / bf16 values: 16 / 32 bytes.
INT8_KERNEL_ROW_MULTIPLE = 16


def has_amx() -> bool:
    """Whether the CPU has AMX tiles (torch's probe; False where torch has none)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def bf16_matmul() -> bool:
    """Whether oneDNN multiplies bf16 in hardware here (AMX or AVX512_BF16 dot products), so that
    many-row bf16 products (prefill) are fast: Int8Linear's prompts then run as a bf16 matmul (Zen 4,
    128 x 768 x 4096, one thread: 5.1 ms of CPU against 11.1 for the int8 -> fp32 cast and fp32
    matmul). Without it (AVX2-only, AVX-512 before Cooper Lake) oneDNN emulates bf16 and a bf16
    F.linear is 5-8x an fp32 one (Zen 3, 128 x 384 x 1152: 8.6 against 1.1 ms), so bf16 weights
    take their prompts through fp32 (bf16_prompt_linear)."""
    if not _ONEDNN_ALLOWS_BF16:
        return False
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return has_amx() or bool(probe and probe())


# oneDNN's own cap on the instructions it uses (ONEDNN_MAX_CPU_ISA, read by oneDNN at its first
# call): the levels at or above which it multiplies bf16 in hardware. Below them it emulates bf16
# whatever the CPU has, so a run capped at AVX2 (to measure the AVX2 path on a newer CPU) must take
# the AVX2-only choices too.
_ONEDNN_BF16_ISAS = frozenset({"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX",
                               "AVX10_1_512_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16",
                               "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL", "DEFAULT"})


def onednn_isa_allows_bf16(cap: str) -> bool:
    """Whether oneDNN capped at ONEDNN_MAX_CPU_ISA=`cap` ("" = not capped) may use bf16 hardware."""
    cap = cap.strip().upper()
    return not cap or cap in _ONEDNN_BF16_ISAS


# Read once, as oneDNN does (and a plain bool for compiled graphs to guard on).
_ONEDNN_ALLOWS_BF16 = onednn_isa_allows_bf16(os.environ.get("ONEDNN_MAX_CPU_ISA", ""))


# Who multiplies fp32 products of many rows in passes over a KV cache (prefill, the serving engine's
# passes above the native kernels' rows): "onednn" (torch.ops.mkldnn._linear_pointwise, oneDNN's JIT
# GEMM, the library torch already calls for bf16) or "torch" (F.linear: MKL's sgemm in torch's x86
# wheels). MKL picks its code by CPU vendor and takes a generic path on AMD: there oneDNN is 1.2-1.6x
# faster at small's, A's and base's prompt shapes and 1.6-4.1x at B's and at 9-32 rows (2 threads, Zen 4,
# benchmarks/prompt_gemm.py), so a 128-token prefill of config B takes 1.6 s instead of 2.8 s. On Intel
# MKL is Intel's own tuned path (and what inductor picks for fp32 linears): kept.
# LLAMAWORKS_PROMPT_GEMM=onednn|torch overrides.
PROMPT_GEMMS = ("onednn", "torch")
_prompt_gemm: list[str] = []  # the decision, made once
# Whether this thread runs a pass over a KV cache (cache_pass): only those take the library above. A
# plain forward (scoring, a loaded model checked against the one saved) keeps F.linear's bits exactly.
_cache_pass = threading.local()


@contextlib.contextmanager
def cache_pass():
    """Mark the passes run inside as passes over a KV cache (a prompt's prefill, the serving engine's
    passes), whose fp32 products of many rows prompt_linear may run in oneDNN (NativeTransformer.forward
    enters it whenever input_pos is given). Nothing under torch.compile: compiled graphs keep F.linear,
    and a guard on the thread's flag would recompile the decode step after the first eager prefill."""
    if torch.compiler.is_compiling():
        yield
        return
    before = getattr(_cache_pass, "on", False)
    _cache_pass.on = True
    try:
        yield
    finally:
        _cache_pass.on = before


def cpu_vendor() -> str:
    """The CPU vendor the kernel reports ("GenuineIntel", "AuthenticAMD", ...); "" where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def choose_prompt_gemm(setting: str | None, vendor: str, onednn: bool) -> str:
    """The library for fp32 prompt products (PROMPT_GEMMS): `setting` (LLAMAWORKS_PROMPT_GEMM) if
    given, else oneDNN where torch has it and the CPU is not Intel's (see PROMPT_GEMMS)."""
    if setting:
        if setting not in PROMPT_GEMMS:
            raise ValueError(f"LLAMAWORKS_PROMPT_GEMM={setting!r} is not one of {', '.join(PROMPT_GEMMS)}; "
                             "unset it for the default")
        if setting == "onednn" and not onednn:
            raise ValueError("LLAMAWORKS_PROMPT_GEMM=onednn but this torch has no oneDNN (mkldnn) linear; "
                             "unset it or set it to torch")
        return setting
    return "onednn" if onednn and vendor not in ("GenuineIntel", "") else "torch"


def set_prompt_gemm(name: str | None = None) -> str:
    """Use `name` (one of PROMPT_GEMMS) for fp32 prompt products from now on, or decide from the
    machine and LLAMAWORKS_PROMPT_GEMM (None, what the first prompt_gemm() call does); returns the
    choice. Named, for A/B runs and tests."""
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    choice = choose_prompt_gemm(name or os.environ.get("LLAMAWORKS_PROMPT_GEMM") or None, cpu_vendor(), onednn)
    _prompt_gemm[:] = [choice]
    return choice


def prompt_gemm() -> str:
    """The library fp32 prompt products use in this process (set_prompt_gemm), decided once."""
    return _prompt_gemm[0] if _prompt_gemm else set_prompt_gemm()


def prompt_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T without bias at inference, through the library prompt_gemm() picks where x and w are
    fp32 CPU tensors, in a pass over a KV cache (cache_pass), eager and with no gradient to record
    (oneDNN's linear has no derivative; compiled graphs keep F.linear for inductor); F.linear
    otherwise. The same product to fp32 rounding (another summation order)."""
    if (x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu" and w.device.type == "cpu"
            and x.dim() >= 2 and not torch.compiler.is_compiling() and getattr(_cache_pass, "on", False)
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) and prompt_gemm() == "onednn"):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return F.linear(x, w)


# The fp32 copy of a bf16 weight that bf16_prompt_linear makes at a time: a block of output rows.
UPCAST_BLOCK_BYTES = 32 << 20


def bf16_prompt_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for a bf16 weight and many rows where bf16 is not multiplied in hardware
    (bf16_matmul() False): the weight widened to fp32 a block of output rows at a time (at most
    UPCAST_BLOCK_BYTES), x in fp32, fp32 GEMMs, the result in x's dtype. Exact widening and fp32
    accumulation, as oneDNN's bf16 matmul accumulates; 1.1-1.6x an fp32 F.linear where the
    emulated bf16 one is 5-8x (Zen 3, 128 rows of small's products)."""
    x32 = x.float()
    rows = max(1, UPCAST_BLOCK_BYTES // (4 * w.shape[1]))
    parts = [prompt_linear(x32, w[n: n + rows].float()) for n in range(0, w.shape[0], rows)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return out.to(x.dtype)


def upcasts_bf16_prompt(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x @ w.T goes through bf16_prompt_linear: a bf16 CPU weight, more rows than the
    native kernels take, no hardware bf16 matmul, eager or compiled alike, and no gradient to
    record (training keeps autograd's F.linear)."""
    return (w.dtype == torch.bfloat16 and w.device.type == "cpu" and x.numel() > native.NATIVE_MAX_ROWS * w.shape[1]
            and not bf16_matmul() and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))


def cpu_kernel(x: torch.Tensor, max_rows: int = KERNEL_MAX_ROWS) -> bool:
    return x.device.type == "cpu" and x.numel() // x.shape[-1] <= max_rows


def native_rows(x: torch.Tensor, in_features: int, max_rows: int = native.NATIVE_MAX_ROWS) -> bool:
    """Whether the native kernels take `x` (..., in_features): on CPU, fp32 or bf16, at most
    max_rows rows, the library loaded, and no gradient to record (the kernels have no
    derivative; QLoRA's hook in lora.py supplies one for the quantised layers)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and x.numel() // in_features <= max_rows and native.available()
            and not (torch.is_grad_enabled() and x.requires_grad))


def is_aligned(t: torch.Tensor) -> bool:
    """Whether `t` may be handed to a fused kernel: contiguous, data at a KERNEL_ALIGN boundary."""
    return t.is_contiguous() and t.data_ptr() % KERNEL_ALIGN == 0


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when is_aligned, else a contiguous copy at a KERNEL_ALIGN boundary. Meant for
    load time (weights mapped from a file), so that no call pays for a copy."""
    if is_aligned(t):
        return t
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    if out.data_ptr() % KERNEL_ALIGN:
        # c10's CPU allocator aligns to 64 bytes; this is for one that does not (a custom or
        # future allocator): place the tensor inside a larger byte buffer.
        nbytes = t.numel() * t.element_size()
        raw = torch.empty(nbytes + KERNEL_ALIGN, dtype=torch.uint8, device=t.device)
        skip = -raw.data_ptr() % KERNEL_ALIGN
        out = raw[skip: skip + nbytes].view(t.dtype).view(t.shape)
    return out.copy_(t)


def kernel_rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """The activations as the fused kernels take them: (rows, in_features) in bf16, aligned.
    Another dtype is cast into a new tensor, aligned by the allocator. A bf16 input is not
    copied by the cast, so a view into a larger tensor (a slice, a narrowed batch) would
    reach the kernel at its own offset: that is copied here, in eager mode. Compiled graphs
    skip the check (no addresses while tracing); the layers' inputs there are buffers that
    inductor allocates, aligned by the same allocator."""
    flat = x.reshape(-1, in_features)
    if flat.dtype != torch.bfloat16:
        return flat.to(torch.bfloat16, memory_format=torch.contiguous_format)
    if not torch.compiler.is_compiling() and not is_aligned(flat):
        flat = aligned(flat)
    return flat


class GemvLinear(nn.Linear):
    """nn.Linear whose one-row product (batch-1 decode) is torch.mv. With bf16 weights on CPU,
    F.linear of one row reads the weight at 20-22 GB/s where mv reads it at 25-27 GB/s
    (2-core AVX-512/AMX Xeon, weights 2048..32000 x 2048; fp32 and fp16 gain nothing: 29 vs 29,
    and 10.6 vs 8.7 GB/s), which is 1.2x more decode tokens/s for a 1.26B model in bf16.
    Same parameters and state-dict keys as nn.Linear; more rows take F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features and self.bias is None:
            return torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], self.out_features)
        if self.bias is None and upcasts_bf16_prompt(x, self.weight):
            return bf16_prompt_linear(x, self.weight)
        return F.linear(x, self.weight, self.bias)


class NativeLinear(nn.Linear):
    """nn.Linear whose products of up to NATIVE_MAX_ROWS rows (decode, batches up to 8) run in
    the native kernels, which read an fp32 or bf16 weight once per call at close to memory
    bandwidth (F.linear and torch.mv read one fp32 row's weights at 18-23 GB/s of 51 on a 2-core
    Zen 4). fp32 or bf16 activations, accumulated in fp32; the output in the input's dtype.
    Same parameters and state-dict keys as nn.Linear; more rows (prefill), a bias, gradients
    or the library missing take F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.bias is None and native_rows(x, self.in_features) and not (torch.is_grad_enabled() and w.requires_grad):
            op = torch.ops.llamaworks.gemv_f32 if w.dtype == torch.float32 else torch.ops.llamaworks.gemv_bf16
            out = op(x.reshape(-1, self.in_features), w)  # (rows, out_features)
            return out.view(*x.shape[:-1], self.out_features)
        if self.bias is None and upcasts_bf16_prompt(x, w):
            return bf16_prompt_linear(x, w)
        if self.bias is None:
            return prompt_linear(x, w)
        return F.linear(x, w, self.bias)


class Bf16PrefillLinear(NativeLinear):
    """NativeLinear of an fp32 weight whose many-row products (prefill) run in bf16: a bf16 copy
    of the weight (`prefill_weight`, not in the state dict) times the activations rounded to
    bf16, accumulated in fp32 by oneDNN, the output back in fp32. On CPUs that multiply bf16 in
    hardware (AVX512_BF16, AMX) 2.2x the fp32 matmul (Zen 4, one thread, 2049 x 384 x 1152: 8.4
    against 18.6 ms). Opt-in (use_bf16_prefill, `serve --prefill-bf16`): rounding the
    activations and weights changes the prompt's keys and values, so greedy answers may differ
    from fp32's at near-ties. Decode rows keep the fp32 native kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w16 = getattr(self, "prefill_weight", None)
        if (w16 is not None and w16.dtype == torch.bfloat16 and x.dtype == torch.float32 and self.bias is None
                and x.numel() > native.NATIVE_MAX_ROWS * self.in_features
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return F.linear(x.to(torch.bfloat16), w16).to(torch.float32)
        return super().forward(x)


def use_bf16_prefill(model: nn.Module) -> int:
    """Give every fp32 NativeLinear of `model` (use_native_kernels made them) a bf16 copy of its
    weight for prefill products (Bf16PrefillLinear), in place; returns how many. Half the fp32
    weights' memory again. Meant for load time, after fusion and use_native_kernels."""
    n = 0
    for m in model.modules():
        if type(m) is NativeLinear and m.weight.dtype == torch.float32 and m.bias is None:
            m.__class__ = Bf16PrefillLinear
            m.register_buffer("prefill_weight", m.weight.detach().to(torch.bfloat16), persistent=False)
            n += 1
    return n


def native_attention_applies(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether llamaworks::decode_attention takes this attention: a masked one (the KV-cache
    path) of at most NATIVE_MAX_ROWS query rows per head, on CPU, fp32 or bf16 throughout, a
    head_dim the kernel has (a multiple of 16 up to 256), no gradient to record."""
    return (mask is not None and mask.dtype == torch.bool and q.device.type == "cpu"
            and q.dtype in (torch.float32, torch.bfloat16) and k.dtype == q.dtype
            and q.shape[2] <= native.NATIVE_MAX_ROWS and q.shape[-1] % 16 == 0 and q.shape[-1] <= 256
            and native.available() and not (torch.is_grad_enabled() and q.requires_grad))


class NativeAttention:
    """Mixed into an Attention class (native_attention_class): decode attention in the native
    kernel, which reads only the cached keys each query may see (SDPA on CPU computes the whole
    static cache under the mask, and bf16 5x slower than fp32: 230 vs 18 us per layer at 8
    heads x 256 positions on Zen 4). Everything else (prefill, training) stays SDPA."""

    def attend(self, q, k, v, mask):
        if native_attention_applies(q, k, mask):
            return torch.ops.llamaworks.decode_attention(q, k, v, mask)
        return super().attend(q, k, v, mask)


def eager_native_step(x: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether csrc/step.cpp's eager-step operators (rms_norm, rope_cache) take these tensors:
    eager (a compiled graph keeps the PyTorch code, which inductor fuses by itself), on CPU, all
    of x's dtype (fp32 or bf16), the library loaded, no gradient to record (no derivative)."""
    return (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and all(t.device.type == "cpu" and t.dtype == x.dtype for t in tensors) and native.available()
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *tensors))))


class NativeRMSNorm(RMSNorm):
    """RMSNorm as one native call in eager decoding (llamaworks::rms_norm) instead of seven
    operators (x.float(), pow, mean, add, rsqrt, mul, type_as, mul): 18 -> 4 us per call on
    Zen 4, twice per block and step. Compiled graphs, training and other dtypes keep RMSNorm's
    code, and so do more than NATIVE_MAX_ROWS rows (prefill: its vectorised kernels are ahead
    there, 0.05 against 0.11 ms at 128 x 768). Same parameter and state-dict key."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= native.NATIVE_MAX_ROWS * x.shape[-1] and eager_native_step(x, self.weight):
            return torch.ops.llamaworks.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


_native_attention_classes: dict[type, type] = {}


def native_attention_class(cls: type) -> type:
    """`cls` (Attention or a subclass, such as fuse.py's FusedAttention) with NativeAttention's
    attend: one class per base, made once."""
    if issubclass(cls, NativeAttention):
        return cls
    if cls not in _native_attention_classes:
        _native_attention_classes[cls] = type(f"Native{cls.__name__}", (NativeAttention, cls),
                                              {"__module__": __name__, "__qualname__": f"Native{cls.__name__}"})
    return _native_attention_classes[cls]


def use_native_attention(model: nn.Module) -> int:
    """Give every Attention module of `model` the native decode attention (NativeAttention) in
    place; returns how many. A no-op returning 0 without the native kernels. Run it after
    fuse.fuse_projections (which fuses plain Attention modules only)."""
    if not native.available():
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, Attention) and not isinstance(m, NativeAttention):
            m.__class__ = native_attention_class(type(m))
            n += 1
    return n


def use_native_kernels(model: nn.Module) -> int:
    """Turn the fp32 and bf16 CPU nn.Linear (and GemvLinear) layers of `model` into NativeLinear
    in place (the class changes, the parameters stay); returns how many. A no-op returning 0
    when the native kernels are not available (one log line says why). Quantised layers
    (quant.py) use the kernels by themselves. DTensor (sharded) weights, biases and other
    dtypes are left alone. Attention modules take the native decode attention
    (use_native_attention), RMSNorm modules NativeRMSNorm, both counted too. Meant for load
    time, after fusion, before any torch.compile."""
    if not native.available():
        return 0
    n = use_native_attention(model)
    for m in model.modules():
        if type(m) is RMSNorm:
            m.__class__ = NativeRMSNorm  # eager decode only (NativeRMSNorm)
            n += 1
        w = getattr(m, "weight", None)
        if (type(m) in (nn.Linear, GemvLinear) and type(w) is nn.Parameter and w.device.type == "cpu"
                and w.dtype in (torch.float32, torch.bfloat16) and w.is_contiguous() and m.bias is None):
            m.__class__ = NativeLinear
            n += 1
    return n


def use_fp32_activations(model: nn.Module) -> int:
    """On a CPU without hardware bf16 (bf16_matmul() False: AVX2-only, AVX-512 before Cooper Lake), a
    bf16 model whose every linear layer is a NativeLinear computes in fp32, as llama.cpp's f16 models
    compute in f32: the projections keep their bf16 weights (the bytes a decode step streams; gemv_bf16
    takes fp32 activations), the embedding table and the norms' weights are widened, so the activations,
    the KV cache (setup_caches and the engine follow tok_embeddings' dtype) and every elementwise
    operator run in fp32, which such CPUs compute natively where bf16 is converted operator by operator.
    Returns how many tensors were widened: 0 (nothing done) with hardware bf16, without the native
    kernels, for another dtype, or with other linear layers (quantised, LoRA, sharded) or a tied output.
    Meant for load time, after use_native_kernels."""
    emb = getattr(model, "tok_embeddings", None)
    if (emb is None or emb.weight.dtype != torch.bfloat16 or emb.weight.device.type != "cpu" or bf16_matmul()
            or not native.available() or model.output.weight is emb.weight):
        return 0
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears or any(type(m) is not NativeLinear for m in linears):
        return 0
    projections = {id(m.weight) for m in linears}
    widened = [p for p in model.parameters() if p.dtype == torch.bfloat16 and id(p) not in projections]
    for p in widened:
        p.data = p.data.float()
    return len(widened)


def use_gemv(model: nn.Module) -> int:
    """Turn the bf16 CPU nn.Linear layers of `model` into GemvLinear in place (no copy: the
    class changes, the parameters stay); returns how many. DTensor (sharded) weights and
    other dtypes are left alone."""
    n = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if type(m) is nn.Linear and type(w) is nn.Parameter and w.device.type == "cpu" and w.dtype == torch.bfloat16:
            m.__class__ = GemvLinear
            n += 1
    return n
