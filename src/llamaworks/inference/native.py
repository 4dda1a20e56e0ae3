"""The native CPU kernels (csrc/): building, loading, the instruction-set choice, and the
operators' fake implementations for torch.compile.

One-row products at decode read each weight once per step, so they are bound by memory
bandwidth, but F.linear / torch.mv on one row read fp32 weights at 18-23 GB/s of the 51 GB/s a
2-core Zen 4 has. The kernels in csrc/ (llamaworks::gemv_f32, gemv_bf16, gemv_int8, gemv_int4)
read them once for up to 8 activation rows, threaded over output rows with at::parallel_for.
Each is compiled three times (AVX-512F, AVX2+FMA, portable) into one library, with bf16
dot-product versions of int4 and bf16 x bf16 for AVX512_BF16 CPUs, integer int8 x int8 ones
(activations quantised per block of 32, as llama.cpp's Q8_0) for AVX2 and AVX512_VNNI, and picked at run time from
what the CPU reports, so one build runs on AVX2-only, AVX-512 and AMX machines. Layers reach
them through kernels.NativeLinear (use_native_kernels at load time) and quant.py's layers; whole
transformer blocks and whole decode steps through block.py (llamaworks::decode_block, decode_step).

The library is built by an explicit step, never during a decode:
    python -m llamaworks.inference.native build     (./dev.sh setup runs it)
into a directory keyed by the sources, torch and Python versions (under the virtual
environment, or LLAMAWORKS_NATIVE_DIR), so a stale build is never loaded. Without it (no
compiler, not built) one line is logged and every layer keeps its PyTorch path.
LLAMAWORKS_NATIVE=0 turns the kernels off (for A/B runs); LLAMAWORKS_ISA=avx512vnni|avx512|
avx2|scalar caps the instruction set below the CPU's best.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

from llamaworks.tokenizer import native as text_native

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("ops.cpp", "parallel.cpp", "step.cpp", "block.cpp", "gemv_avx512bf16.cpp", "gemv_avx512vnni.cpp",
           "gemv_avx512.cpp", "gemv_avx2.cpp", "gemv_scalar.cpp", "int4_tiles.cpp", "prefill_attn.cpp")
HEADERS = ("gemv.h", "parallel.h", "gemv_body.h", "attn_body.h", "prefill_body.h")
NAME = "llamaworks_native"
# No -march: the instruction sets are chosen per file, at run time. -fopenmp: at::parallel_for is
# inline OpenMP code in the headers (torch's CPU backend), so without it the kernels ran on one
# thread whatever torch.set_num_threads said; the library then uses the libgomp torch loaded.
CFLAGS = ["-O3", "-fno-math-errno", "-fopenmp"]
LDFLAGS = ["-fopenmp"]

STALE_LOCK_S = 900  # a build takes about a minute on 2 busy cores

# Rows one call reads the weights once for (the kernels' MAX_ROWS): decode batches up to 8.
NATIVE_MAX_ROWS = 8

# Instruction sets, lowest first (the kernels' Level), and the CPU features each needs.
# avx512bf16 is avx512 with bf16 dot products for int4 weights (activations rounded to bf16, as
# torch's int4 kernel takes them) and for bf16 weights with bf16 activations (exact products).
# int8 weights from avx2 up take the activations quantised per block of 32 columns (Q8_0's
# rule: quantize_activations_q8) and multiply in integers: AVX2 maddubs (also on avx512, which
# has no byte sign op at 512 bits), AVX512_VNNI vpdpbusd from avx512vnni up; the float path
# (x as it is) on scalar and where in_features % 32 != 0. One path for every row count, so a
# row's result is the same alone or in a batch. int4 weights in groups of 128, 256, ... take the
# activations quantised per block of 128 and vpdpbusd from avx512vnni up; other groups the
# int8 activations and maddubs from avx2 up to avx512vnni, bf16 dot products on avx512bf16
# (int4_activations).
ISAS = ("scalar", "avx2", "avx512", "avx512vnni", "avx512bf16")
_AVX512 = frozenset({"avx512f", "avx2", "fma"})
_VNNI = _AVX512 | {"avx512bw", "avx512vnni"}
ISA_NEEDS = {"scalar": frozenset(), "avx2": frozenset({"avx2", "fma"}), "avx512": _AVX512,
             "avx512vnni": _VNNI, "avx512bf16": _VNNI | {"avx512bf16"}}
# Bits of lw_cpu_features() (ops.cpp's Feature).
FEATURE_BITS = {"avx2": 1, "fma": 2, "avx512f": 4, "avx512bw": 8, "avx512vl": 16, "avx512vnni": 32,
                "avx512bf16": 64}


def choose_isa(features: frozenset[str] | set[str], limit: str | None = None) -> str:
    """The best instruction set whose features are all in `features`, no higher than `limit`."""
    if limit is not None and limit not in ISAS:
        raise ValueError(f"unknown instruction set {limit!r}; set LLAMAWORKS_ISA to one of {', '.join(ISAS)}")
    allowed = ISAS[: ISAS.index(limit) + 1] if limit else ISAS
    return [isa for isa in allowed if ISA_NEEDS[isa] <= set(features)][-1]


def int8_quantises_activations(isa: str, in_features: int) -> bool:
    """Whether gemv_int8 under `isa` quantises the activations (quantize_activations_q8) for
    integer dot products, rather than multiplying them as they are (ops.cpp's choice)."""
    return ISAS.index(isa) >= ISAS.index("avx2") and in_features % 32 == 0


def int4_activations(isa: str, group_size: int) -> str:
    """How gemv_int4 under `isa` takes the activations (ops.cpp's choice): "q8_128" quantised per
    block of 128 columns for VNNI integer dot products (avx512vnni and up, groups of 128, 256, ...),
    "bf16" rounded for bf16 dot products (avx512bf16, other groups), "q8_32" quantised as for
    int8 for AVX2 maddubs (avx2 to avx512vnni), "fp32" as they are (scalar)."""
    level = ISAS.index(isa)
    if level >= ISAS.index("avx512vnni") and group_size % 128 == 0:
        return "q8_128"
    if isa == "avx512bf16":
        return "bf16"
    return "q8_32" if level >= ISAS.index("avx2") else "fp32"


def int4_activations_as_taken(x: torch.Tensor, isa: str, group_size: int) -> torch.Tensor:
    """x (..., K) as gemv_int4 under `isa` takes it (int4_activations), in fp32: the reference
    the kernel's result equals up to fp32 summation order."""
    how = int4_activations(isa, group_size)
    if how == "bf16":
        return x.bfloat16().float()
    if how == "fp32":
        return x.float()
    return quantize_activations_q8(x, 128 if how == "q8_128" else 32)


def quantize_activations_q8(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """x (..., K) as the int8 kernels take it, dequantised: per block of `block` columns (32;
    128 for int4_vnni), d = max|x| / 127 and q = round-half-even(x * (127 / max|x|)), in fp32
    as ops.cpp's quantize_rows computes them; returns q * d (the reference for the kernels' results)."""
    assert x.shape[-1] % block == 0, f"in_features {x.shape[-1]} is not a multiple of {block}"
    blocks = x.float().reshape(*x.shape[:-1], -1, block)  # (..., K/block, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    # torch.div of two tensors: `127.0 / amax` is reciprocal-then-multiply, another rounding
    inv = torch.where(amax > 0, torch.div(torch.full_like(amax, 127.0), amax), torch.zeros_like(amax))
    return (torch.round(blocks * inv) * (amax / 127.0)).reshape(x.shape)


def build_dir() -> Path:
    """Where the library for these sources, this torch and this Python lives."""
    h = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        h.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    h.update(f"{torch.__version__} {sys.version} {platform.machine()} {' '.join(CFLAGS + LDFLAGS)}".encode())
    return text_native.native_root() / h.hexdigest()[:16]


def library_path() -> Path:
    return build_dir() / f"{NAME}.so"


class _State:
    loaded: bool | None = None  # None: not tried yet
    lib: ctypes.CDLL | None = None
    why: str = ""
    fakes: bool = False


_state = _State()


def build(verbose: bool = False) -> Path:
    """Compile the library if this version of it is not built yet; returns its path. Raises
    (RuntimeError, OSError from the compiler) when it cannot be built."""
    path = library_path()
    if path.exists():
        return path
    from torch.utils import cpp_extension  # only the build step needs the compiler machinery

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / "lock"  # cpp_extension's; a build killed midway leaves it, and the next waits forever
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        lock.unlink(missing_ok=True)
    # copies of the flags: cpp_extension.load appends to the lists it is given
    cpp_extension.load(name=NAME, sources=[str(CSRC / s) for s in SOURCES], extra_cflags=list(CFLAGS),
                       extra_ldflags=list(LDFLAGS), extra_include_paths=[str(CSRC)],
                       build_directory=str(path.parent), is_python_module=False, verbose=verbose)
    assert path.exists(), f"the build finished without {path}"
    _state.loaded = None  # loaded by cpp_extension.load: let load() set up the rest
    return path


def load() -> bool:
    """Load the built library once per process (cheap: no compiling); False, with one log line,
    when it is turned off or not built."""
    if _state.loaded is not None:
        return _state.loaded
    _state.loaded = False
    if os.environ.get("LLAMAWORKS_NATIVE", "1") == "0":
        _state.why = "LLAMAWORKS_NATIVE=0"
        log.info("native CPU kernels off (LLAMAWORKS_NATIVE=0): PyTorch kernels")
        return False
    path = library_path()
    if not path.exists():
        _state.why = f"not built ({path} missing)"
        log.warning("native CPU kernels not built (run `python -m llamaworks.inference.native build`): "
                    "PyTorch kernels, slower decoding")
        return False
    if not hasattr(torch.ops.llamaworks, "gemv_f32"):  # not loaded yet by build() in this process
        torch.ops.load_library(str(path))
    _state.lib = ctypes.CDLL(str(path))  # the same loaded library: its lw_* C functions
    _register_fakes()
    _state.loaded = True
    configure(limit=os.environ.get("LLAMAWORKS_ISA") or None)
    return True


def available() -> bool:
    """Whether the native kernels run in this process (loading them on first use)."""
    return load()


def disable(why: str = "turned off") -> None:
    """Make available() False for the rest of the process (tests of the fallback path)."""
    _state.loaded, _state.why = False, why


def reset() -> None:
    """Forget the last load() decision (after disable(), or a change of LLAMAWORKS_NATIVE)."""
    _state.loaded = None if _state.lib is None else True


def cpu_features() -> frozenset[str]:
    """The features the CPU (and OS) report, among FEATURE_BITS; needs the library."""
    assert _state.lib is not None, "native kernels not loaded"
    bits = _state.lib.lw_cpu_features()
    return frozenset(name for name, bit in FEATURE_BITS.items() if bits & bit)


def configure(features: frozenset[str] | set[str] | None = None, limit: str | None = None) -> str:
    """Pick the kernels' instruction set from `features` (default: the CPU's; tests pass fewer
    to force a fallback); returns it. The library refuses one the CPU lacks."""
    assert _state.lib is not None, "native kernels not loaded"
    isa = choose_isa(cpu_features() if features is None else features, limit)
    got = _state.lib.lw_set_level(ISAS.index(isa))
    assert got == ISAS.index(isa), f"the CPU cannot run {isa} kernels (features {sorted(cpu_features())})"
    return isa


def current_isa() -> str:
    assert _state.lib is not None, "native kernels not loaded"
    return ISAS[_state.lib.lw_level()]


def team_sections() -> int:
    """How many parallel sections of decode steps ran on a team of threads (csrc/parallel.h) since the
    library loaded: a check that a step's products and attention took the team, not a region each."""
    assert _state.lib is not None, "native kernels not loaded"
    _state.lib.lw_team_sections.restype = ctypes.c_int64
    return _state.lib.lw_team_sections()


def _register_fakes() -> None:
    # Shapes for torch.compile's tracing: (rows, out_features) in x's dtype.
    def fake(x, weight, *_):
        return x.new_empty(x.shape[0], weight.shape[0])

    if _state.fakes:
        return
    for op in ("gemv_f32", "gemv_bf16", "gemv_int8", "gemv_int4"):
        torch.library.register_fake(f"llamaworks::{op}")(fake)
    # gemv_int4_tiles: x (..., in_features), the weight (out_features / 16, 8 * in_features)
    torch.library.register_fake("llamaworks::gemv_int4_tiles")(
        lambda x, w, *_: x.new_empty(*x.shape[:-1], w.shape[0] * 16))
    # dequant_int4: the weight widened, (out_features, in_features) fp32
    torch.library.register_fake("llamaworks::dequant_int4")(lambda w, *_: w.new_empty(w.shape[0], w.shape[1] * 2,
                                                                                     dtype=torch.float32))
    # decode_attention: q's shape (bsz, heads, seq, head_dim), contiguous
    torch.library.register_fake("llamaworks::decode_attention")(lambda q, k, v, mask: q.new_empty(q.shape))
    torch.library.register_fake("llamaworks::paged_attention")(lambda q, k, v, blocks, pos: q.new_empty(q.shape))
    torch.library.register_fake("llamaworks::prefill_attention")(lambda q, k, v, kp, vp: q.new_empty(q.shape))
    # decode_block: the block's output, x's shape (the caches are written in place)
    torch.library.register_fake("llamaworks::decode_block")(lambda x, *_: x.new_empty(x.shape))
    _state.fakes = True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in (["build"], ["build", "--verbose"], ["info"]):
        print("usage: python -m llamaworks.inference.native build [--verbose] | info", file=sys.stderr)
        return 2
    if argv[0] == "build":
        text_native.main(["build"])  # the data pipeline's text kernels too (a plain C library, no torch)
        try:
            path = build(verbose="--verbose" in argv)
        except (RuntimeError, OSError, ImportError) as e:  # no compiler, no ninja, a compile error
            print(f"native CPU kernels not built ({type(e).__name__}: {e}); PyTorch kernels will be used",
                  file=sys.stderr)
            return 1
        print(f"native CPU kernels: {path}")
    if not load():
        print(f"native CPU kernels unavailable: {_state.why}")
        return 1
    print(f"instruction set: {current_isa()} (CPU features: {' '.join(sorted(cpu_features()))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
