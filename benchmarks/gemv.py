"""Decode products (1 and 8 rows against one weight): the native kernels (inference/native.py)
beside torch's own paths and an inductor-compiled reduction, in GB/s of weights read.

    .venv/bin/python -m llamaworks.inference.native build       # once (./dev.sh setup does it)
    .venv/bin/python benchmarks/gemv.py                          # all shapes, rows 1 and 8, 2 threads
    .venv/bin/python benchmarks/gemv.py --quick                  # 512x512 and 4096x4096, no compile, no JSON

Per precision (weights fp32, bf16, int8 per output channel, int4 in groups of --group-size):
  native     llamaworks::gemv_* (fp32 activations; bf16 ones for bf16 weights, as a bf16 model has;
             int8 quantises the activations per block of 32 for integer dot products, as Q8_0)
  tiles      int4 only, AVX512_VNNI, groups of 128+: llamaworks::gemv_int4_tiles, the 16-row tiles
             Int4Linear uses there (csrc/int4_tiles.cpp); "native" is then gemv_int4's row layout
  torch      what llamaworks ran before: F.linear (fp32, bf16; torch.mv for one bf16 row, GemvLinear),
             aten._weight_int8pack_mm and aten._weight_int4pack_mm_for_cpu with bf16 activations
  compiled   torch.compile of the product written as multiply-and-sum (fp32, bf16, int8 dequantised
             in the graph); inductor fuses it into one vectorised reduction
GB/s = bytes of the weight as that precision stores it for the native kernel (integers plus fp32
scales / offsets) / time. Weights are cycled through copies totalling at least --cold-mb so
that every call reads them from memory as a decode step does (a model is larger than the
caches); --warm reuses one copy (cache-resident for the small shapes). Each figure is the
median of --repeats timings of a loop of at least --min-s seconds, the implementations taken in
turn; beside wall-clock GB/s, "GB/s per CPU-second" divides by the process's CPU time (all
threads), which time slices lost to other jobs on a busy machine do not inflate. The machine (CPU model,
flags, measured read bandwidth as x.sum() over 1 GiB, threads, torch version, the kernels'
instruction set) is recorded in the JSON beside the figures.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from machine import add_label_argument, machine_record, measure_bandwidth, write_result  # benchmarks/ is on sys.path

from llamaworks.inference import native
from llamaworks.inference.quant import (
    int4_tiles,
    int4_tiles_apply,
    native_int4_layout,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

SHAPES = ("512x512", "1536x512", "32000x512", "4096x4096", "128256x2048")  # out x in
KINDS = ("fp32", "bf16", "int8", "int4")


def calls_for(fn, n_copies: int, min_s: float) -> int:
    """How many calls (cycling the copies) one timed loop makes: at least min_s, every copy once."""
    for i in range(min(n_copies, 3) + 2):
        fn(i % n_copies)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < min_s / 4:
        fn(n % n_copies)
        n += 1
    return max(n_copies, 4 * n)


def timed_loop(fn, n_copies: int, calls: int) -> tuple[float, float]:
    """(wall, CPU) seconds per call. CPU time (all threads of the process) is what a busy machine
    distorts least: time slices lost to other jobs count in wall time only."""
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(calls):
        fn(i % n_copies)
    return (time.perf_counter() - t0) / calls, (time.process_time() - c0) / calls


def compiled_reduction(dequant):
    # One-row products as a multiply-and-sum: inductor fuses the (dequantising) read of w into
    # one vectorised reduction over the input dimension.
    def product(x, *w):
        return (x.unsqueeze(1) * dequant(*w)).sum(-1)  # (rows, 1, in) * (out, in) -> (rows, out)

    # One graph per (shape, rows, precision): without a reset, dynamo's recompile limit on
    # `product` would quietly run the later ones eagerly.
    torch.compiler.reset()
    return torch.compile(product, dynamic=False)


def variants(kind: str, w: torch.Tensor, group_size: int, x: torch.Tensor, want_compiled: bool):
    """(bytes, {impl: (tensors per copy, fn(x, *tensors))}) for one precision."""
    ops = torch.ops.llamaworks
    n, k = w.shape
    xb = x.to(torch.bfloat16)
    out: dict = {}
    if kind == "fp32":
        nbytes = w.numel() * 4
        out["native"] = ((w,), lambda t: ops.gemv_f32(x, *t))
        out["torch"] = ((w,), lambda t: F.linear(x, *t))
        if want_compiled:
            red = compiled_reduction(lambda w: w)
            out["compiled"] = ((w,), lambda t: red(x, *t))
    elif kind == "bf16":
        wb = w.to(torch.bfloat16)
        nbytes = wb.numel() * 2
        out["native"] = ((wb,), lambda t: ops.gemv_bf16(xb, *t))
        if x.shape[0] == 1:
            out["torch"] = ((wb,), lambda t: torch.mv(t[0], xb[0]))
        else:
            out["torch"] = ((wb,), lambda t: F.linear(xb, *t))
        if want_compiled:
            red = compiled_reduction(lambda w: w.float())
            out["compiled"] = ((wb,), lambda t: red(xb.float(), *t))
    elif kind == "int8":
        q, s = quantize_int8(w)
        sb = s.to(torch.bfloat16)
        nbytes = q.numel() + s.numel() * 4
        out["native"] = ((q, s), lambda t: ops.gemv_int8(x, *t))
        out["torch"] = ((q, sb), lambda t: torch.ops.aten._weight_int8pack_mm(xb, *t))
        if want_compiled:
            red = compiled_reduction(lambda q: q.float())
            out["compiled"] = ((q, s), lambda t: red(x, t[0]) * t[1])
    else:
        packed, s, z = quantize_int4(w, group_size)
        lay, off = native_int4_layout(packed), (z - 8 * s).contiguous()
        nbytes = lay.numel() + s.numel() * 4 + off.numel() * 4
        out["native"] = ((lay, s.contiguous(), off), lambda t: ops.gemv_int4(x, *t, group_size))
        if int4_tiles_apply(native.current_isa(), n, group_size):
            # Int4Linear's layout here: 16-row tiles (csrc/int4_tiles.cpp); same bytes
            out["tiles"] = (int4_tiles(packed, s, z), lambda t: ops.gemv_int4_tiles(x, *t, group_size))
        if n % 16 == 0:
            tpacked = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(packed).to(torch.int32), 8)
            sz = torch.stack([s, z], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
            out["torch"] = ((tpacked, sz),
                            lambda t: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, t[0], group_size, t[1]))
    return nbytes, out


def run(a, bandwidth: float) -> list[dict]:
    rows_out = []
    for shape in a.shapes:
        n, k = map(int, shape.split("x"))
        for kind in a.kinds:
            w = torch.randn(n, k)
            for rows in a.rows:
                x = torch.randn(rows, k)
                nbytes, impls = variants(kind, w, a.group_size, x, a.compile)
                copies = 1 if a.warm else max(1, -(-a.cold_mb * 2**20 // nbytes))
                rec = {"shape": shape, "out": n, "in": k, "kind": kind, "rows": rows, "bytes": nbytes,
                       "copies": copies}
                base, loops = None, {}
                with torch.no_grad():
                    for impl, (tensors, fn) in impls.items():
                        sets = [tensors] + [tuple(t.clone() for t in tensors) for _ in range(copies - 1)]
                        ref = fn(sets[0]).float()
                        base = ref if base is None else base
                        rec[impl] = {"max_rel_diff_vs_native": float((ref - base).abs().max()
                                                                     / base.abs().max().clamp(min=1e-30))}
                        call = (lambda i, sets=sets, fn=fn: fn(sets[i]))
                        loops[impl] = (call, calls_for(call, copies, a.min_s))
                    # Round-robin over the implementations, so a busy spell of the machine falls on
                    # all of them rather than on one.
                    times = {impl: [] for impl in impls}
                    for _ in range(a.repeats):
                        for impl, (call, calls) in loops.items():
                            times[impl].append(timed_loop(call, copies, calls))
                for impl, ts in times.items():
                    wall = statistics.median(t[0] for t in ts)
                    cpu = statistics.median(t[1] for t in ts)
                    rec[impl].update({"ms": wall * 1e3, "GB/s": nbytes / wall / 1e9, "cpu_ms": cpu * 1e3,
                                      "GB/s per CPU-second": nbytes / cpu / 1e9})
                del loops
                line = "  ".join(f"{impl} {rec[impl]['GB/s']:5.1f} GB/s ({rec[impl]['GB/s per CPU-second']:5.1f}/cpu-s)"
                                 for impl in impls)
                # native's speed over each alternative's (wall clock; same run, taken in turn), and
                # its share of the machine's read bandwidth (the roofline of a cold product)
                rec["native_over"] = {impl: rec["native"]["GB/s"] / rec[impl]["GB/s"] for impl in impls
                                      if impl != "native"}
                rec["native_of_read_bandwidth"] = rec["native"]["GB/s"] / (bandwidth / 1e9)
                ratios = " ".join(f"x{r:4.2f} vs {impl}" for impl, r in rec["native_over"].items())
                print(f"{shape:>12} {kind:>5} rows {rows}:  {line}  | native {ratios}, "
                      f"{100 * rec['native_of_read_bandwidth']:3.0f}% of read bandwidth", flush=True)
                rows_out.append(rec)
            del w
    return rows_out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), help="OUTxIN weight shapes")
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size")
    ap.add_argument("--threads", type=int, default=None, help="default: torch's (the cores)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-s", type=float, default=0.2, help="seconds per timed loop")
    ap.add_argument("--cold-mb", type=int, default=256, help="cycle weight copies totalling this much")
    ap.add_argument("--warm", action="store_true", help="one copy of each weight (cache-resident when small)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the inductor-compiled reduction (one compile per shape and rows)")
    ap.add_argument("--quick", action="store_true", help="512x512 and 4096x4096, no compile, 3 repeats, no JSON")
    ap.add_argument("--note", default="", help="recorded in the JSON (e.g. 'CPU shared with other jobs')")
    ap.add_argument("--out", default="benchmarks/results/gemv.json")
    add_label_argument(ap)
    a = ap.parse_args()
    if a.quick:
        a.shapes, a.compile, a.repeats, a.out = ["512x512", "4096x4096"], False, 3, None
    if a.threads:
        torch.set_num_threads(a.threads)
    if not native.load():
        raise SystemExit("native kernels not built: run `.venv/bin/python -m llamaworks.inference.native build`")
    torch.manual_seed(0)
    bandwidth = measure_bandwidth()
    result = {"machine": machine_record(a.label, bandwidth=bandwidth), "threads": torch.get_num_threads(),
              "torch": torch.__version__,
              "native_isa": native.current_isa(), "read_bandwidth_GB/s": bandwidth / 1e9, "group_size": a.group_size,
              "cold": not a.warm, "note": a.note}
    print(f"{result['machine']['cpu_model']}, {result['threads']} threads, kernels {result['native_isa']}, "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s, torch {torch.__version__}")
    result["results"] = run(a, bandwidth)
    if a.out:
        write_result(a.out, result)


if __name__ == "__main__":
    main()
