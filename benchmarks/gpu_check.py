"""The GPU check: one script, under 8 minutes on one GPU, for the day a GPU is lent.

    .venv/bin/python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json
    .venv/bin/python benchmarks/gpu_check.py --device cpu --out /tmp/smoke.json   # CI smoke: tiny sizes
    .venv/bin/python benchmarks/gpu_check.py --render benchmarks/results/gpu_check.json --update-readme

1. runs the tests marked `gpu` (tests/test_gpu.py: bf16 autocast forward/backward, the flash
   SDPA kernel, torch.compile of a block, an NCCL one-process group, an FSDP2 mixed-precision
   step, profile.steps' trace and CUDA memory snapshot) with pytest, and records each outcome;
2. measures training throughput of the ~1B preset (llama3.2-1b: 1.24B parameters) in bf16
   autocast, eager and with compiled blocks: tokens/s and MFU, against the datasheet's dense
   bf16 peak (plan.py's GPU table) and against a measured bf16 matmul peak, and peak memory;
3. measures greedy decode (batch 1) of the same model in bf16 weights, eager and compiled
   (CUDA graphs), against the HBM roofline: bandwidth / bytes read per token (the weights but
   the embedding table, of which one row is read, plus the KV cache), with the bandwidth both
   from the datasheet and measured (x.sum() over 1 GiB).

Everything lands in one JSON (--out), which `render_markdown` turns into the README's GPU
section (between the gpu-check markers; --update-readme rewrites it). --device cpu runs the
same code on tiny sizes (the `tiny` preset, a few steps, no compile for throughput): the
figures mean nothing, but the script and the `gpu` tests cannot rot (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch
from machine import add_label_argument, machine_record, measure_bandwidth  # benchmarks/ is on sys.path

from llamaworks.inference.generate import generate_ids
from llamaworks.inference.kernels import bf16_matmul
from llamaworks.model import ModelArgs, build_model
from llamaworks.parallel.parallelize import apply_compile
from llamaworks.plan import GPUS, flops_per_token
from llamaworks.train.config import OptimConfig
from llamaworks.train.init import init_weights
from llamaworks.train.loss import lm_loss
from llamaworks.train.metrics_log import measure_peak_flops
from llamaworks.train.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
# HBM bandwidth from the vendors' datasheets (bytes/s), by plan.py's GPU names.
HBM_BANDWIDTH = {"v100": 0.9e12, "a100-40gb": 1.555e12, "a100-80gb": 2.039e12, "h100-sxm": 3.35e12,
                 "h100-pcie": 2.0e12, "h200": 4.8e12}
# What each mode runs: (preset, seq_len, micro-batch, timed steps, decode prompt, new tokens).
SIZES = {"cuda": dict(preset="llama3.2-1b", seq_len=2048, micro=4, steps=8, prompt=128, new=256),
         "cpu": dict(preset="tiny", seq_len=64, micro=2, steps=2, prompt=8, new=8)}


def datasheet(device_name: str) -> tuple[str | None, float | None, float | None]:
    """(plan.py's GPU name, dense bf16 FLOP/s, HBM bytes/s) of a CUDA device name, or Nones."""
    name = device_name.lower().replace("nvidia", "").strip()
    for key in sorted(GPUS, key=len, reverse=True):
        model, _, variant = key.partition("-")
        if model in name and (not variant or variant.replace("gb", "") in name.replace("gb", "")
                              or variant in name):
            return key, GPUS[key].peak_flops, HBM_BANDWIDTH.get(key)
    for key in GPUS:  # e.g. "A100-SXM4-80GB" without a matching variant word: the model alone
        if key.partition("-")[0] in name:
            return key, GPUS[key].peak_flops, HBM_BANDWIDTH.get(key)
    return None, None, None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    # The previous measurement's model and optimizer state are garbage now: give their memory back.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_gpu_tests(device: torch.device, timeout: float = 300) -> dict:
    """pytest -m gpu on tests/test_gpu.py in a child process: per-test outcomes from its JUnit XML."""
    env = dict(os.environ)
    if device.type == "cpu":
        env["LLAMAWORKS_GPU_CHECK_DEVICE"] = "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                               str(ROOT / "tests" / "test_gpu.py"), f"--junitxml={xml}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        tests = {}
        if xml.exists():
            for case in ET.parse(xml).getroot().iter("testcase"):
                outcome = "passed"
                for tag in ("failure", "error", "skipped"):
                    node = case.find(tag)
                    if node is not None:
                        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                        tests[case.get("name")] = {"outcome": outcome, "message": (node.get("message") or "")[:500]}
                        break
                else:
                    tests[case.get("name")] = {"outcome": outcome}
                tests[case.get("name")]["seconds"] = float(case.get("time") or 0)
    counts = {k: sum(t["outcome"] == k for t in tests.values()) for k in ("passed", "failed", "error", "skipped")}
    return {"returncode": proc.returncode, "seconds": time.perf_counter() - t0, **counts, "tests": tests,
            "output_tail": (proc.stdout + proc.stderr)[-3000:] if proc.returncode else ""}


def measure_training(device: torch.device, preset: str, seq_len: int, micro: int, steps: int, compile: bool,
                     peaks: dict) -> dict:
    """Tokens/s and MFU of bf16-autocast training steps (AdamW, fp32 master weights), after 2 warm-up steps."""
    args = ModelArgs.from_name(preset, max_seq_len=max(seq_len, 64))
    model = build_model(args, device="meta")
    model.to_empty(device=device)
    init_weights(model, 0, device)
    if compile:
        apply_compile(model)
    opt = build_optimizer(model, OptimConfig())
    tokens = torch.randint(0, args.vocab_size, (micro, seq_len + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = lm_loss(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(2):  # warm-up (and the compile)
        step()
    _sync(device)
    warmup = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    tps = micro * seq_len / dt
    fpt = flops_per_token(args, seq_len)
    out = {"preset": preset, "params": sum(p.numel() for p in model.parameters()), "seq_len": seq_len,
           "micro_batch": micro, "compile": compile, "steps": steps, "step_s": dt, "warmup_s": warmup,
           "tokens_per_s": tps, "flops_per_token": fpt, "final_loss": float(loss.detach()),
           "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None}
    for name, peak in peaks.items():
        out[f"mfu_vs_{name}"] = tps * fpt / peak if peak else None
    return out


def decode_bytes_per_token(model, context: int) -> int:
    """Bytes a batch-1 decode step reads: every weight once (one row of an untied embedding
    table, which is gathered, not multiplied) and the KV cache of `context` positions."""
    args = model.args
    emb = model.tok_embeddings.weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if not args.tie_word_embeddings:
        weights -= emb.numel() * emb.element_size() - args.dim * emb.element_size()
    kv = 2 * args.n_layers * context * args.n_kv_heads * (args.dim // args.n_heads) * emb.element_size()
    return weights + kv


def measure_decode(device: torch.device, preset: str, prompt: int, new: int, compile: bool,
                   bandwidths: dict) -> dict:
    """Greedy batch-1 decode tokens/s in bf16 weights (eos off), against the HBM roofline."""
    args = ModelArgs.from_name(preset, max_seq_len=max(prompt + new, 64))
    model = build_model(args, device="meta")
    model.to_empty(device=device)
    init_weights(model, 0, device)
    model = model.to(torch.bfloat16).eval()
    model.init_rope()  # the RoPE table stays fp32 (build_model's rule for low-precision weights)
    ids = [list(range(1, prompt + 1))]

    def run() -> float:
        stats: dict = {}
        _sync(device)
        t0 = time.perf_counter()
        n = 0
        for toks, _ in generate_ids(model, ids, new, temperature=0.0, compile=compile, stats=stats, logprobs=False):
            n += toks.shape[1]  # each chunk holds the tokens since the previous one
        _sync(device)
        assert n == new, (n, new)
        return time.perf_counter() - t0 - stats.get("compile_s", 0.0)

    run()  # warm-up (and the compile)
    dt = min(run() for _ in range(2))
    tps = new / dt
    bytes_per_token = decode_bytes_per_token(model, prompt + new // 2)
    out = {"preset": preset, "prompt": prompt, "new_tokens": new, "compile": compile, "seconds": dt,
           "tokens_per_s": tps, "bytes_per_token": bytes_per_token, "time_includes": "the prefill"}
    for name, bw in bandwidths.items():
        out[f"roofline_tokens_per_s_{name}"] = bw / bytes_per_token if bw else None
        out[f"roofline_fraction_{name}"] = tps * bytes_per_token / bw if bw else None
    return out


def _pct(x) -> str:
    return f"{100 * x:.1f}%" if x is not None else "n/a"


def _flops(x: float) -> str:
    return f"{x / 1e12:.0f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:.0f} GFLOP/s"


def render_markdown(result: dict) -> str:
    """The README's GPU section from a gpu_check JSON."""
    m, t = result["machine"], result["tests"]
    outcomes = ", ".join(f"{k}: {v['outcome']}" for k, v in t["tests"].items())
    where = m.get("gpu") or f"CPU smoke mode ({m.get('cpu_model')}, {m.get('label')})"
    lines = [f"`benchmarks/gpu_check.py` on {where}, {m.get('date', '')[:10]}, torch {m.get('torch', '?')}, "
             f"{result['total_s'] / 60:.1f} min in all"
             + (" (figures from tiny sizes on a CPU: they say the script runs, nothing about a GPU)."
                if result["device"] == "cpu" else "."), "",
             f"Tests marked `gpu`: {t['passed']} passed, {t['failed'] + t['error']} failed, {t['skipped']} skipped "
             f"({outcomes}).", "",
             "| training (bf16 autocast) | tokens/s | step (s) | MFU vs datasheet | MFU vs measured matmul "
             "| peak memory |", "|---|---|---|---|---|---|"]
    for r in result["train"]:
        mem = f"{r['peak_memory_gb']:.1f} GB" if r.get("peak_memory_gb") else "n/a"
        size = f"{r['params'] / 1e9:.2f}B" if r["params"] >= 1e8 else f"{r['params'] / 1e6:.1f}M"
        lines.append(f"| {r['preset']} ({size}), {r['micro_batch']} x {r['seq_len']}"
                     f"{', compiled' if r['compile'] else ', eager'} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} "
                     f"| {_pct(r.get('mfu_vs_datasheet'))} | {_pct(r.get('mfu_vs_measured'))} | {mem} |")
    lines += ["", "| decode (batch 1, bf16) | tokens/s | roofline (datasheet HBM) | of roofline "
              "| roofline (measured) | of roofline |", "|---|---|---|---|---|---|"]
    for r in result["decode"]:
        roof = r.get("roofline_tokens_per_s_datasheet")
        lines.append(f"| {r['preset']}, {r['prompt']} + {r['new_tokens']} tokens"
                     f"{', compiled' if r['compile'] else ', eager'} | {r['tokens_per_s']:,.0f} | "
                     f"{f'{roof:,.0f}' if roof else 'n/a'} | {_pct(r.get('roofline_fraction_datasheet'))} | "
                     f"{r['roofline_tokens_per_s_measured']:,.0f} | {_pct(r.get('roofline_fraction_measured'))} |")
    p = result["peaks"]
    lines += ["", f"Peaks: datasheet {p['datasheet_flops'] / 1e12:.0f} TFLOP/s bf16 and "
              f"{p['datasheet_bandwidth'] / 1e12:.2f} TB/s ({p['gpu_key']}); " if p.get("datasheet_flops") else "",
              f"measured {_flops(p['measured_flops'])} ({p.get('measured_flops_dtype', 'bfloat16')} matmul), "
              f"{p['measured_bandwidth'] / 1e9:.0f} GB/s (x.sum() over 1 GiB). JSON: `{result.get('out', '')}`."]
    return "\n".join(x for x in lines if x is not None).replace("\n\n\n", "\n\n")


def update_readme(markdown: str, readme: Path = README) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme} has no {BEGIN} ... {END} section to replace")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{markdown}\n{END}{tail}")


def check(device: torch.device, label: str | None, compile: bool, out: str) -> dict:
    t_start = time.perf_counter()
    sizes = SIZES[device.type]
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    key, sheet_flops, sheet_bw = datasheet(gpu_name) if gpu_name else (None, None, None)
    tests = run_gpu_tests(device)
    bandwidth = measure_bandwidth(device=str(device))
    # bf16 on GPUs and on CPUs that multiply it in hardware; elsewhere (AVX2-only) oneDNN emulates a
    # bf16 matmul on one core, and the 2048^3 peak of the CPU smoke mode took minutes: fp32 there.
    peak_dtype = torch.bfloat16 if device.type == "cuda" or bf16_matmul() else torch.float32
    measured_flops = measure_peak_flops(device, peak_dtype)
    peaks = {"gpu_key": key, "datasheet_flops": sheet_flops, "datasheet_bandwidth": sheet_bw,
             "measured_flops": measured_flops, "measured_flops_dtype": str(peak_dtype).removeprefix("torch."),
             "measured_bandwidth": bandwidth}
    flops = {"datasheet": sheet_flops, "measured": measured_flops}
    bws = {"datasheet": sheet_bw, "measured": bandwidth}
    modes = [False, True] if compile and device.type == "cuda" else [False]
    train, decode = [], []
    for c in modes:
        train.append(measure_training(device, sizes["preset"], sizes["seq_len"], sizes["micro"], sizes["steps"], c,
                                      flops))
        _free(device)
    for c in modes:
        decode.append(measure_decode(device, sizes["preset"], sizes["prompt"], sizes["new"], c, bws))
        _free(device)
    machine = machine_record(label, bandwidth=bandwidth, device=str(device))
    return {"device": device.type, "out": out, "machine": machine, "sizes": sizes, "peaks": peaks, "tests": tests,
            "train": train, "decode": decode, "total_s": time.perf_counter() - t_start}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cuda (default when present) or cpu: the smoke mode, tiny sizes")
    ap.add_argument("--out", default="benchmarks/results/gpu_check.json", help="the JSON to write")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled training and decode rows")
    ap.add_argument("--render", metavar="JSON", help="only print the markdown of an existing JSON")
    ap.add_argument("--update-readme", action="store_true", help="write the markdown into README.md's GPU section")
    add_label_argument(ap)
    a = ap.parse_args(argv)
    if a.render:
        result = json.loads(Path(a.render).read_text())
    else:
        if a.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device here; --device cpu runs the smoke mode")
        result = check(torch.device(a.device), a.label, not a.no_compile, a.out)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    markdown = render_markdown(result)
    print(markdown)
    if a.update_readme:
        update_readme(markdown)
    t = result["tests"]
    return 0 if t["returncode"] == 0 and not (t["failed"] or t["error"]) else 1


if __name__ == "__main__":
    sys.exit(main())
