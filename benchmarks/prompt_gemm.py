"""fp32 products of many rows (prompts, batches above the native kernels' 8 rows) at inference: torch's
F.linear (MKL's sgemm in torch's x86 wheels) beside oneDNN's linear (torch.ops.mkldnn._linear_pointwise),
the two libraries kernels.prompt_gemm() chooses between (LLAMAWORKS_PROMPT_GEMM=onednn|torch overrides;
the default is oneDNN where the CPU is not Intel's, because MKL takes a generic path there).

    .venv/bin/python benchmarks/prompt_gemm.py --label quiet      # products, then 128-token prefills
    .venv/bin/python benchmarks/prompt_gemm.py --quick            # small shapes, small and A, no JSON

Part 1 (products): each projection shape of the --configs (fused QKV, the attention output, fused
gate/up, the down projection, the output layer) times --rows rows, GFLOP/s of each library and the
ratio, the libraries alternating, the median of --repeats timings of a loop of at least --min-s seconds.
Part 2 (prefill): a --prompt-len-token prefill of each config, fp32 and int4 (group 128), loaded as
`llamaworks generate` loads them (benchmarks/decode.py's decode_copy: fused projections, native
kernels), in ms with each library and the largest difference of the logits. The machine (CPU,
flags, measured read bandwidth, torch) is recorded in the JSON beside the figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from decode import CONFIGS, decode_copy, quantized_copy  # benchmarks/ is on sys.path
from machine import add_label_argument, machine_record, write_result

from llamaworks.inference import kernels
from llamaworks.inference.block import use_native_blocks
from llamaworks.inference.fuse import fuse_projections
from llamaworks.inference.kernels import use_native_kernels
from llamaworks.model import ModelArgs, build_model

LIBRARIES = ("torch", "onednn")


def shapes(config: str) -> list[tuple[str, int, int]]:
    """(name, out, in) of each product a prompt runs through, fused as load_model fuses them."""
    a = ModelArgs(**CONFIGS[config])
    kv_dim = (a.n_kv_heads or a.n_heads) * (a.dim // a.n_heads)
    return [("wqkv", a.dim + 2 * kv_dim, a.dim), ("wo", a.dim, a.dim), ("w13", 2 * a.hidden_dim, a.dim),
            ("w2", a.dim, a.hidden_dim), ("output", a.vocab_size, a.dim)]


def timed_loop(fn, min_s: float) -> float:
    """Seconds per call of fn over a loop of at least min_s seconds."""
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_s:
            return dt / n


def product_rows(configs, rows, repeats, min_s) -> list[dict]:
    out, seen = [], set()
    for config in configs:
        for name, n, k in shapes(config):
            if (n, k) in seen:
                continue
            seen.add((n, k))
            w = torch.randn(n, k)
            for m in rows:
                x = torch.randn(m, k)
                times = {lib: [] for lib in LIBRARIES}
                for _ in range(repeats):
                    for lib in LIBRARIES:
                        kernels.set_prompt_gemm(lib)
                        with kernels.cache_pass():  # as in a prefill: the library chosen applies
                            times[lib].append(timed_loop(lambda x=x, w=w: kernels.prompt_linear(x, w), min_s))
                med = {lib: statistics.median(t) for lib, t in times.items()}
                flops = 2 * m * n * k
                row = {"config": config, "product": name, "out": n, "in": k, "rows": m,
                       **{f"{lib}_gflops": flops / med[lib] / 1e9 for lib in LIBRARIES},
                       "onednn_speedup": med["torch"] / med["onednn"]}
                out.append(row)
                print(f"{config:>6} {name:<7}{n:>6}x{k:<6} rows {m:>5}: torch {row['torch_gflops']:7.1f}  "
                      f"oneDNN {row['onednn_gflops']:7.1f} GFLOP/s  x{row['onednn_speedup']:.2f}", flush=True)
    return out


def prefill_rows(configs, precisions, prompt_len, repeats) -> list[dict]:
    out = []
    for config in configs:
        base = build_model(ModelArgs(**CONFIGS[config]), seed=0).eval()
        for precision in precisions:
            if precision == "fp32":
                model = decode_copy(base, torch.float32, True, "cpu")
            else:  # as decode.py's integer rows and load_model: quantised, fused, native kernels
                model = quantized_copy(base, precision)
                fuse_projections(model)
                if use_native_kernels(model):
                    use_native_blocks(model)  # as load_model (its prompts run inside kernels.cache_pass)
            model.setup_caches(1, prompt_len)
            tokens = torch.randint(3, base.args.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
            pos = torch.arange(prompt_len)
            times, logits = {lib: [] for lib in LIBRARIES}, {}
            with torch.no_grad():
                for _ in range(repeats + 1):  # the first round warms both up (oneDNN builds its kernels per shape)
                    for lib in LIBRARIES:
                        kernels.set_prompt_gemm(lib)
                        t0 = time.perf_counter()
                        logits[lib] = model(tokens, pos)
                        times[lib].append(time.perf_counter() - t0)
            med = {lib: statistics.median(t[1:]) for lib, t in times.items()}
            row = {"config": config, "precision": precision, "prompt_len": prompt_len,
                   **{f"{lib}_ms": 1e3 * med[lib] for lib in LIBRARIES}, "onednn_speedup": med["torch"] / med["onednn"],
                   "max_logit_difference": float((logits["torch"] - logits["onednn"]).abs().max())}
            out.append(row)
            print(f"prefill {config:>6} {precision}: torch {row['torch_ms']:8.1f} ms  "
                  f"oneDNN {row['onednn_ms']:8.1f} ms  x{row['onednn_speedup']:.2f}  "
                  f"(logits differ by {row['max_logit_difference']:.1e})", flush=True)
            del model
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), help="default: small A base B (--quick: small A)")
    ap.add_argument("--rows", nargs="+", type=int, default=[9, 16, 32, 128, 512])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int4"], choices=["fp32", "int8", "int4"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-s", type=float, default=0.2)
    ap.add_argument("--quick", action="store_true", help="small and A, rows 16 and 128, one repeat, no JSON")
    ap.add_argument("--json", default="benchmarks/results/prompt_gemm.json")
    add_label_argument(ap)
    a = ap.parse_args(argv)
    if a.quick:
        a.configs, a.rows, a.repeats, a.json = a.configs or ["small", "A"], [16, 128], 1, None
        a.min_s = min(a.min_s, 0.05)
    a.configs = a.configs or ["small", "A", "base", "B"]
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        print("this torch has no oneDNN linear: nothing to compare")
        return 1
    torch.set_num_threads(a.threads)
    chosen = kernels.set_prompt_gemm(None)
    print(f"{kernels.cpu_vendor() or 'unknown vendor'}: the default here is {chosen}; {a.threads} threads", flush=True)
    try:
        products = product_rows(a.configs, a.rows, a.repeats, a.min_s)
        prefills = prefill_rows(a.configs, a.precisions, a.prompt_len, a.repeats)
    finally:
        kernels.set_prompt_gemm(None)
    if a.json:
        write_result(a.json, {"command": " ".join(["benchmarks/prompt_gemm.py", *sys.argv[1:]]),
                              "machine": machine_record(a.label, threads=a.threads), "default": chosen,
                              "cpu_vendor": kernels.cpu_vendor(), "products": products, "prefill": prefills})
    return 0


if __name__ == "__main__":
    sys.exit(main())
