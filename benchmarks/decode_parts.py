"""Where a batch-1 decode run's time goes, by parts (issue 16): llamaworks int4/int8/bf16/fp32 beside llama.cpp
Q4_0/Q8_0/f16/f32.

    .venv/bin/python benchmarks/decode_parts.py --configs A --precisions int4 --threads 1 2 --label contended

Per config, precision and thread count, the model built as benchmarks/decode.py builds it (fused q/k/v and
gate/up, native kernels, huge pages):
  prefill    the prompt's forward pass (--prompt-len tokens), ms, median of 3; for int4 in tiles also as before
             session 11 (prompts over KERNEL_MAX_ROWS rows dequantised the weight), then the tiles again
  step       one decode step (generate.decode_step: the model on one token, greedy), eager and compiled
             (compile_step, guards skipped as generate runs it), ms, median over --steps; --cpp-wrapper also
             with inductor's C++ wrapper (the graph's calls made from C++)
  parts      torch.profiler over --steps steps (it slows every operator call: the profiled step is longer):
             each product by weight (wqkv, wo, w13, w2, output: ms per step, GB/s of its bytes, and its bytes at
             the measured read bandwidth), the decode attention, the eager step operators (rms_norm, rope_cache)
             and the rest (the profiled step minus those: inductor's kernels or PyTorch's small operators, the
             Python wrapper, sampling)
  per call   a one-tile product (16 rows: dispatch, activation quantisation, allocation, no thread fork) and a
             32-tile one (the fork/join of the threads at 2), us
llama.cpp (its own quantiser on the same weights): the type of each tensor in its file, what each side
quantises (its decode speed is benchmarks/decode.py's).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from decode import (  # benchmarks/ is on sys.path
    CONFIGS,
    LLAMA_CPP_FORMAT,
    decode_copy,
    export_gguf,
    quantized_copy,
)
from machine import add_label_argument, machine_record, measure_bandwidth, write_result

from llamaworks.inference import native, quant
from llamaworks.inference.fuse import fuse_projections
from llamaworks.inference.generate import compile_step, decode_step, warmed_step
from llamaworks.inference.hugepages import use_hugepages
from llamaworks.inference.kernels import NativeLinear, use_native_kernels
from llamaworks.inference.quant import QuantizedLinear
from llamaworks.model import ModelArgs, build_model

PRODUCT_OPS = ("llamaworks::gemv_int4_tiles", "llamaworks::gemv_int4", "llamaworks::gemv_int8", "llamaworks::gemv_bf16",
               "llamaworks::gemv_f32")
OTHER_OPS = {"llamaworks::decode_attention": "attention", "llamaworks::rms_norm": "rms_norm",
             "llamaworks::rope_cache": "rope_cache"}


def build(name: str, precision: str, group_size: int):
    model = build_model(ModelArgs.from_params(CONFIGS[name]), seed=0).eval()
    if precision in ("fp32", "bf16"):  # as decode.py: fused, NativeLinear, huge pages
        return model, decode_copy(model, torch.float32 if precision == "fp32" else torch.bfloat16, True, "cpu")
    m = quantized_copy(model, precision, group_size)
    fuse_projections(m)
    use_native_kernels(m)
    use_hugepages(m)
    return model, m


def layer_names(m) -> dict[tuple[int, int], tuple[str, int]]:
    """(out, in) of each product -> (its name without the block index, bytes per call)."""
    out = {}
    for name, mod in m.named_modules():
        if isinstance(mod, NativeLinear):
            out[(mod.out_features, mod.in_features)] = (name.rsplit(".", 1)[-1],
                                                        mod.weight.numel() * mod.weight.element_size())
        elif isinstance(mod, QuantizedLinear):
            kt = mod.kernel_tensors()
            if "native weight" in kt:  # int4: the layout, scales and offsets the kernel reads
                nbytes = sum(t.numel() * t.element_size() for k, t in kt.items() if k.startswith("native"))
            else:  # int8: the weight and its fp32 scales
                nbytes = mod.weight.numel() * mod.weight.element_size() + mod.scales.numel() * 4
            out[(mod.out_features, mod.in_features)] = (name.rsplit(".", 1)[-1], nbytes)
    return out


def op_shape(key: str, shapes) -> tuple[int, int]:
    w = shapes[1]
    if key.endswith("gemv_int4_tiles"):
        return w[0] * 16, w[1] // 8
    if key.endswith("gemv_int4"):
        return w[0], w[1] * 2
    return w[0], w[1]


def median_ms(fn, n: int) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def run_llamaworks(m, a, bandwidth: float) -> dict:
    names = layer_names(m)
    prompt = torch.randint(3, m.args.vocab_size, (1, a.prompt_len), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(a.prompt_len).unsqueeze(0)
    rec = {}
    with torch.inference_mode():
        m.setup_caches(1, 256 if a.prompt_len + 3 * a.steps + 16 <= 256 else 512)
        m(prompt, pos)
        rec["prefill_ms"] = median_ms(lambda: m(prompt, pos), 3)
        if any(getattr(mod, "_tiled", False) for mod in m.modules()):
            # Before this session: prompts of more than KERNEL_MAX_ROWS rows dequantised the weight.
            saved, quant.INT4_TILES_MAX_ROWS = quant.INT4_TILES_MAX_ROWS, quant.KERNEL_MAX_ROWS
            try:
                rec["prefill_ms_dequantised"] = median_ms(lambda: m(prompt, pos), 3)
            finally:
                quant.INT4_TILES_MAX_ROWS = saved
            rec["prefill_ms_tiles_again"] = median_ms(lambda: m(prompt, pos), 3)
        for mode in ("eager", "compiled", "cpp_wrapper")[: 3 if a.cpp_wrapper else 2]:
            torch._dynamo.reset()
            if mode == "eager":
                fns = [decode_step]
            elif mode == "compiled":
                fns = [compile_step(decode_step, torch.device("cpu"), fullgraph=True)]
            else:  # inductor's C++ wrapper: the graph's calls from C++, not a Python function
                fns = [torch.compile(decode_step, dynamic=False, fullgraph=True, options={"cpp_wrapper": True})]
            tok = torch.tensor([[5]])
            ipos = torch.tensor([[a.prompt_len]])

            def step(fns=fns):
                nonlocal tok, ipos
                nxt, _, _, ipos = fns[-1](m, tok, ipos, None, 0.0, None, 1.0, None, None)
                tok = nxt.unsqueeze(1)

            for _ in range(3):
                step()
            if mode != "eager":
                fns.append(warmed_step(fns[-1]))
            step_ms = median_ms(step, a.steps)
            ipos = torch.tensor([[a.prompt_len + a.steps + 3]])
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    step()
                profiled_ms = (time.perf_counter() - t0) * 1e3 / a.steps
            parts = defaultdict(float)
            calls = defaultdict(int)
            for ev in prof.key_averages(group_by_input_shape=True):
                if ev.key in PRODUCT_OPS:
                    label = names.get(op_shape(ev.key, ev.input_shapes), ("?", 0))[0]
                elif ev.key in OTHER_OPS:
                    label = OTHER_OPS[ev.key]
                else:
                    continue
                parts[label] += ev.cpu_time_total / 1e3 / a.steps
                calls[label] += ev.count // a.steps
            prods = {}
            for (n_out, n_in), (label, nbytes) in names.items():
                if label in parts:
                    per_step = nbytes * calls[label]
                    prods[label] = {"shape": f"{n_out}x{n_in}", "calls": calls[label], "ms": parts[label],
                                    "GB/s": per_step / (parts[label] / 1e3) / 1e9,
                                    "ms_at_bandwidth": per_step / bandwidth * 1e3}
            other = {k: parts[k] for k in OTHER_OPS.values() if k in parts}
            rest = profiled_ms - sum(p["ms"] for p in prods.values()) - sum(other.values())
            rec[mode] = {"step_ms": step_ms, "profiled_step_ms": profiled_ms, "products": prods, "other": other,
                         "rest_ms": rest}
            print(f"  {mode:>8}: step {step_ms:.3f} ms (profiled {profiled_ms:.3f}); products "
                  + ", ".join(f"{k} {v['ms']:.3f} ({v['GB/s']:.0f} GB/s, {v['ms_at_bandwidth']:.3f} at bw)"
                              for k, v in prods.items())
                  + "; " + ", ".join(f"{k} {v:.3f}" for k, v in other.items()) + f"; rest {rest:.3f}", flush=True)
        print(f"  prefill {a.prompt_len} tokens: {rec['prefill_ms']:.1f} ms"
              + (f" (dequantised as before: {rec['prefill_ms_dequantised']:.1f} ms; tiles again "
                 f"{rec['prefill_ms_tiles_again']:.1f})" if "prefill_ms_dequantised" in rec else ""), flush=True)
    return rec


def per_call_us(k: int) -> dict:
    from llamaworks.inference.quant import int4_tiles, quantize_int4

    out = {}
    if native.current_isa() not in ("avx512vnni", "avx512bf16"):
        return out
    x = torch.randn(1, k)
    for tiles in (1, 32):
        args = int4_tiles(*quantize_int4(torch.randn(16 * tiles, k), 128))
        op = torch.ops.llamaworks.gemv_int4_tiles
        for _ in range(100):
            op(x, *args, 128)
        n = 2000
        t0 = time.perf_counter()
        for _ in range(n):
            op(x, *args, 128)
        out[f"{16 * tiles}x{k}"] = (time.perf_counter() - t0) / n * 1e6
    print("  per call (warm): " + ", ".join(f"{s} {v:.1f} us" for s, v in out.items()), flush=True)
    return out


def llama_cpp_types(model, precision: str) -> dict:
    try:
        from gguf import GGUFReader
    except ImportError as e:
        return {"skipped": str(e)}
    fmt = LLAMA_CPP_FORMAT[precision]
    with tempfile.TemporaryDirectory(prefix="decode_parts_") as tmp:
        paths = export_gguf(model, Path(tmp), (fmt,) if fmt.startswith("q") else ())  # f32, f16: always written
        key = next((k for k in paths if k.split()[0] == fmt), None)
        if key is None:
            return {"skipped": f"no {fmt} file"}
        types = {}
        for t in GGUFReader(paths[key]).tensors:
            role = t.name.split(".", 2)[-1] if t.name.startswith("blk.") else t.name
            types[role] = t.tensor_type.name
    rec = {"file": key, "tensor_types": types}
    print(f"  llama.cpp {key}: tensor types "
          + ", ".join(f"{k} {v}" for k, v in types.items()), flush=True)
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["A"], choices=list(CONFIGS))
    ap.add_argument("--precisions", nargs="+", default=["int4"], choices=["fp32", "bf16", "int8", "int4"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timing (and per profile)")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--cpp-wrapper", action="store_true", help="also the step compiled with inductor's cpp_wrapper")
    ap.add_argument("--out", default=None, help="JSON results")
    add_label_argument(ap)
    a = ap.parse_args()
    if not native.load():
        raise SystemExit("native kernels not built: run `.venv/bin/python -m llamaworks.inference.native build`")
    bandwidth = measure_bandwidth()
    result = {"machine": machine_record(a.label, bandwidth=bandwidth, native_kernels=native.current_isa()),
              "prompt_len": a.prompt_len, "steps": a.steps, "group_size": a.group_size, "runs": []}
    for name in a.configs:
        for precision in a.precisions:
            model, m = build(name, precision, a.group_size)
            types = None if a.no_llama_cpp else llama_cpp_types(model, precision)
            for threads in a.threads:
                torch.set_num_threads(threads)
                print(f"{name} {precision}, {threads} thread(s), read bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
                rec = {"config": name, "precision": precision, "threads": threads,
                       "llamaworks": run_llamaworks(m, a, bandwidth), "per_call_us": per_call_us(m.args.dim)}
                if types is not None:
                    rec["llama.cpp"] = types
                result["runs"].append(rec)
    if a.out:
        write_result(a.out, result)


if __name__ == "__main__":
    main()
