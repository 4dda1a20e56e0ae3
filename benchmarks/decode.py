"""Decode speed: llamaworks (fp32, bf16, int8, int4) vs transformers' generate vs llama.cpp, same weights, same run.

    .venv/bin/python benchmarks/decode.py                      # config A, batch 1, prompt 128, 256 new, greedy
    .venv/bin/python benchmarks/decode.py --configs A small base --batches 1 8
    .venv/bin/python benchmarks/decode.py --config B --new-tokens 64 --repeats 1    # the ~1.26B model (5 GB fp32)
    .venv/bin/python benchmarks/decode.py --config llama3.2-1b-shape --batches 1 8 --new-tokens 64 --repeats 1
    .venv/bin/python benchmarks/decode.py --quick                   # smoke test: small preset, 8 tokens, 1 run
    .venv/bin/python benchmarks/decode.py --ppl-model runs/demo/model --ppl-text held_out.txt

Prints one table per (config, batch) and writes JSON (benchmarks/results/decode.json by
default). Figures are medians over --repeats runs after a warm-up; every implementation
decodes exactly the same number of tokens (eos is disabled); "same" is how many of the
greedy tokens agree with llamaworks fp32 before the first difference (quantised and 16-bit
variants drift on random weights, whose logits are nearly tied). "roofline" is the
fraction of the memory-bandwidth bound: decode steps/s x bytes of weights read per step /
read bandwidth (measured here as x.sum() over 1 GB); time includes the prefill.

Equal work at each precision: every table has transformers both as it runs by default
(dynamic cache, eager) and in its best CPU configuration (generation_config.cache_implementation
"static" with its forward compiled for decoding: a CompileConfig that also compiles on CPU), and
rows are grouped by precision: fp32 beside llama.cpp f32, bf16 beside f16, int8 beside Q8_0 and
int4 beside Q4_0. llamaworks runs as `llamaworks generate` loads it: q/k/v and gate/up fused
(inference/fuse.py; --no-fuse for Meta's separate products) and the native one-row kernels where
they are built (kernels.use_native_kernels; LLAMAWORKS_NATIVE=0 turns them off), the weights in
transparent huge pages (inference/hugepages.py; --no-hugepages for 4 KiB pages).

llama.cpp runs through llama-cpp-python on the same weights exported to GGUF f32 and f16
(convert/gguf.py), Q8_0 and Q4_0 (llama.cpp's own quantiser), with llama.cpp's repacked CPU
weight buffers (extra buffer types: AMX, and the interleaved Q4_0/Q8_0 layouts of its AVX2/AVX-512
kernels) where they run; where they crash (each file is probed in a child process) the row runs
without them, is labelled "(no repack)" and says so. Its Python API decodes one sequence at a
time: at batch > 1 llama.cpp's rows come from its own llama-batched-bench on the same files
(B prompts prefilled together, then B tokens a step; random tokens, so no "same" column), built
with `benchmarks/serve.py --build-llama-server`, and are left out with a note where it is not
built; without llama-cpp-python (./dev.sh extras) its rows are skipped with a note. The JSON
records the machine (benchmarks/machine.py: CPU model and flags, threads, measured read
bandwidth, torch, transformers and llama-cpp-python versions, a contended/quiet label; --label)
and the native kernels' instruction set.
--ppl-model prints the perplexity of a trained model on held-out text for fp32, int8 and int4
(llama.cpp's quantisation table).

Rows do not share a process (--isolate, recorded in the JSON with each row): each implementation at
each precision (its eager and compiled rows) is built and timed in a fresh spawned process, one
after another, on weights rebuilt from the same seed (checked against the parent's) with the same
threads; the parent only builds the model, writes the GGUF files and collects the rows. Timed in one
process, rows were not independent: ours bf16 compiled at config A ran at 297 tok/s in the full
command and at 335-344 in a command of its own (session 12, quiet), and `small`'s int8/int4 weights
got 0%/9% huge pages after the other rows' copies (90%/94% in a fresh process; the arena is now a
mapping of its own). No llama.cpp thread used CPU during our rows, nor changed an affinity
(docs/inference.md).
--isolate interleave keeps every row's process alive and runs the repeats round-robin (drift of a
shared machine falls on all rows alike; the memory of all of them at once); --isolate none is the
old single process.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from machine import add_label_argument, machine_record, measure_bandwidth, write_result  # benchmarks/ is on sys.path

from llamaworks.convert.command import llama_cpp_generate
from llamaworks.inference import native
from llamaworks.inference.block import use_native_blocks
from llamaworks.inference.fuse import fuse_projections
from llamaworks.inference.generate import generate_ids
from llamaworks.inference.hugepages import huge_page_fraction, use_hugepages
from llamaworks.inference.kernels import use_fp32_activations, use_gemv, use_native_kernels
from llamaworks.model import ModelArgs, Transformer, build_model, count_parameters

# "Config A" of the issue tracker: about 60M parameters, the shape of the paper's models.
CONFIG_A = dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000, multiple_of=256, max_seq_len=2048)
CONFIGS = {
    "A": CONFIG_A,
    "small": ModelArgs.from_name("small").to_params(),
    "base": ModelArgs.from_name("base").to_params(),
    # ~1.26B, "config B" (TinyLlama's shape without GQA): 2/3 * 4 * 2048 = 5461 rounds up to
    # 11 * 512 = 5632.
    "B": dict(dim=2048, n_layers=22, n_heads=32, vocab_size=32000, multiple_of=512, max_seq_len=2048),
}
CONFIGS["1b"] = CONFIGS["B"]
# Llama 3.2 1B's real shape with random weights (issue 15): GQA 32/8, a 128,256-token vocabulary
# tied to the output, theta 500000 and Llama 3.1's RoPE scaling; the context is cut to 16384 (the
# benchmark's sequences are short; transformers wants it above the original 8192).
CONFIGS["llama3.2-1b-shape"] = {**ModelArgs.from_name("llama3.2-1b").to_params(), "max_seq_len": 16384}
PRECISIONS = ("fp32", "bf16", "int8", "int4")
# llama.cpp's weight format at each of our precisions (the rows a table puts side by side).
LLAMA_CPP_FORMAT = {"fp32": "f32", "bf16": "f16", "int8": "q8_0", "int4": "q4_0"}
# Bytes a decode step reads per weight in each llama.cpp format (Q8_0: 32 int8 + an fp16 scale
# per block of 32; Q4_0: 16 bytes of nibbles + an fp16 scale). Our int4 at the default group size
# 128 (4 bits + an fp32 scale and zero per 128) reads the same 4.5 bits a weight as Q4_0.
LLAMA_CPP_BYTES = {"f32": 4, "f16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device="cpu") -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def bytes_per_step(model) -> int:
    """Weight bytes a decode step reads: everything but the embedding table (one row per token),
    which a tied output projection reads whole (it is the output matrix)."""
    tied = model.output.weight is model.tok_embeddings.weight
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if (name.startswith("tok_embeddings") and not tied) or name == "freqs_cis" or "kv_cache" in name:
            continue
        total += t.numel() * t.element_size()
    return total


def quantized_copy(model: Transformer, mode: str, group_size: int = 128) -> Transformer:
    from llamaworks.inference.quant import quantizable, quantize_model

    # Share the fp32 Linear weights with the original rather than copying them first: for
    # the 1B model that is the difference between 5 and 10 GB at peak.
    memo = {id(lin.weight): lin.weight for _, lin in quantizable(model)}
    return quantize_model(copy.deepcopy(model, memo), mode, group_size)


def decode_copy(model: Transformer, dtype: torch.dtype, fuse: bool, device: str, hugepages: bool = True,
                blocks: bool = True) -> Transformer:
    """The model as `llamaworks generate` loads it, in `dtype`: fused projections (fuse), then the
    native one-row kernels on CPU where built (else bf16 takes GemvLinear) and, with `blocks`, an eager
    decode step as one native call (inference/block.py). Shares the weights
    with `model` where nothing changes them (fp32, unfused)."""
    memo = {id(p): p for p in model.parameters()} if dtype == torch.float32 else {}
    m = copy.deepcopy(model, memo)
    if dtype != torch.float32:
        m.to(dtype).init_rope(torch.device(device))
    if fuse:
        fuse_projections(m)
    if torch.device(device).type == "cpu":
        if use_native_kernels(m):
            if blocks:
                use_native_blocks(m)  # as load_model: an eager decode step as one native call
        else:
            use_gemv(m)
    use_fp32_activations(m)  # as load_model: where the CPU has no bf16, a bf16 model computes in fp32
    if hugepages:
        use_hugepages(m)  # as load_model; fp32 weights shared with `model` are moved once, for all copies
    return m


def time_llamaworks(model, prompt, new, compile=False):
    # With compile, generate_ids compiles and runs the step twice before the prefill (a no-op
    # compile after the warm-up call): that is set-up, not decoding, and is not counted.
    stats = {}
    t0 = time.perf_counter()
    # No log-probabilities: llama.cpp's and transformers' rows compute none either (equal work).
    chunks = list(generate_ids(model, prompt, new, temperature=0.0, sync_every=64, compile=compile, stats=stats,
                               logprobs=False))
    dt = time.perf_counter() - t0 - stats.get("compile_s", 0.0)
    return dt, torch.cat([c[0] for c in chunks], dim=1).tolist()


def hf_static_compiled(hf):
    """transformers' best CPU configuration for decoding: a static cache and the decode forward
    compiled (generate compiles it itself given a CompileConfig; _compile_all_devices lets it do
    so on CPU, where it does not by default). Inductor's default mode: reduce-overhead's CUDA
    graphs do nothing on CPU."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
    config._compile_all_devices = True
    hf.generation_config.cache_implementation = "static"
    hf.generation_config.compile_config = config
    return hf


def time_transformers(hf, prompt, new):
    ids = torch.tensor(prompt, device=hf.device)
    t0 = time.perf_counter()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                      do_sample=False, eos_token_id=None, pad_token_id=0)
    dt = time.perf_counter() - t0
    return dt, out[:, ids.shape[1]:].tolist()


class StubTokenizer:
    """A vocabulary of the right size for GGUF export of random weights (llama.cpp needs one)."""

    unk_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def id_to_piece(self, i: int) -> str:
        if i < 3:
            return ("<unk>", "<s>", "</s>")[i]
        if i < 3 + 256:
            return f"<0x{i - 3:02X}>"
        return f"\u2581t{i}"


def export_gguf(model, folder: Path, quantised: tuple[str, ...] = ("q8_0", "q4_0")) -> dict[str, Path]:
    """The same weights as GGUF f32, f16 and llama.cpp's own `quantised` formats. A quantised
    file whose run crashes with llama.cpp's repacked weight buffers is kept as "<q> (no repack)"
    when it runs without them."""
    from llamaworks.convert.gguf import write_gguf

    paths = {}
    sd = model.state_dict()
    for name, dt in (("f32", torch.float32), ("f16", torch.float16)):
        paths[name] = folder / f"model-{name}.gguf"
        write_gguf(sd, model.args, StubTokenizer(model.args.vocab_size), paths[name], dtype=dt)
    try:
        import llama_cpp
    except ImportError as e:
        print(f"(no quantised llama.cpp files: {e})")
        return paths
    for q in quantised:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{q.upper()}")
        out = folder / f"model-{q}.gguf"
        with _quiet_stderr():  # llama.cpp logs every tensor
            ok = llama_cpp.llama_model_quantize(str(paths["f32"]).encode(), str(out).encode(), params) == 0
        if ok and _llama_cpp_runs(out):
            paths[q] = out
        elif ok and _llama_cpp_runs(out, extra_bufts=False):
            paths[f"{q} (no repack)"] = out
            print(f"(llama.cpp {q.upper()} crashes here with its repacked (AMX/interleaved) weight buffers; it runs "
                  "with use_extra_bufts=False, its plain kernels, in the row marked (no repack))")
        else:
            print(f"(llama.cpp {q.upper()} skipped: its quantised file does not run here)")
    return paths


def _llama_cpp_runs(path: Path, extra_bufts: bool = True) -> bool:
    # llama.cpp's Q8_0 decode segfaults on this 2-vCPU AMX Xeon (llama-cpp-python 0.3.36) in its
    # AMX weight-repack buffers; probe in a child process rather than lose the whole run.
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from decode import open_llama_cpp; "
            "llm = open_llama_cpp(sys.argv[1], n_ctx=64, extra_bufts=sys.argv[3] == '1'); "
            "next(iter(llm.generate([5, 6, 7], top_k=1, temp=0.0, repeat_penalty=1.0)))")
    argv = [sys.executable, "-c", code, str(path), str(Path(__file__).parent), "1" if extra_bufts else "0"]
    return subprocess.run(argv, capture_output=True, timeout=300).returncode == 0


# Environment variables that cap the instruction sets each side uses (to measure one CPU family's
# code on a newer CPU: ours with the kernels, torch and oneDNN at AVX2, llama.cpp built for AVX2
# and loaded from LLAMA_CPP_LIB_PATH / LLAMA_SERVER's folder): recorded with every result.
CAP_VARIABLES = ("LLAMAWORKS_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "LLAMA_CPP_LIB_PATH", "LLAMA_SERVER")


def instruction_caps() -> dict:
    """The caps set in this run and the features llama.cpp's CPU backend reports it was built for."""
    caps = {k: os.environ[k] for k in CAP_VARIABLES if os.environ.get(k)}
    try:
        import llama_cpp
        caps["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    except Exception as e:  # not installed, or a library that does not load: said, not fatal
        caps["llama_cpp_system_info"] = f"unavailable: {e}"
    return caps


def open_llama_cpp(path, extra_bufts: bool = True, **kwargs):
    """llama_cpp.Llama on `path`; extra_bufts=False turns off llama.cpp's repacked (AMX and
    interleaved CPU) weight buffers, which Llama() does not expose: its model parameters
    come from llama_model_default_params(), patched for the call."""
    import llama_cpp.llama_cpp as low  # the bindings module Llama() reads its defaults from
    from llama_cpp import Llama

    if extra_bufts:
        return Llama(model_path=str(path), verbose=False, **kwargs)
    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        return Llama(model_path=str(path), verbose=False, **kwargs)
    finally:
        low.llama_model_default_params = default


@contextlib.contextmanager
def _quiet_stderr():
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def time_llama_cpp(llm, prompt, new):
    t0 = time.perf_counter()
    out = llama_cpp_generate(llm, prompt, new)
    return time.perf_counter() - t0, out


BATCHED_NOTE = ("llama.cpp's batched decode needs llama-batched-bench: build it with "
                "`.venv/bin/python benchmarks/serve.py --build-llama-server`")


def llama_cpp_batched(paths: dict, a, batches: list[int], name: str, n_params: int, per_weight: float,
                      bandwidth: float) -> list[dict]:
    """llama.cpp's own batched decode at each batch > 1: llama-batched-bench (built with
    llama-server from llama-cpp-python's vendored sources) on the same GGUF files, B distinct
    prompts of --prompt-len random tokens prefilled together, then --new-tokens steps of B
    tokens; tokens/s = B x new tokens / (prefill + decode time), the figure our rows report."""
    from serve import find_llama_server

    binary = find_llama_server("llama-batched-bench")
    if binary is None:
        print(f"(no llama.cpp rows at batch {', '.join(map(str, batches))}: {BATCHED_NOTE})")
        return []
    by_format = {v: k for k, v in LLAMA_CPP_FORMAT.items()}
    rows = []
    for q, path in paths.items():
        fmt = q.split()[0]
        if by_format.get(fmt) not in a.precisions:
            continue
        for bsz in batches:
            cmd = [str(binary), "-m", str(path), "-c", str(bsz * (a.prompt_len + a.new_tokens) + 16), "-b", "2048",
                   "-ub", "512", "-npp", str(a.prompt_len), "-ntg", str(a.new_tokens), "-npl", str(bsz),
                   "-t", str(torch.get_num_threads()), "--output-format", "jsonl"]
            cmd += ["-nr"] if "no repack" in q else []  # --no-repack: its plain kernels, as the batch-1 row
            times = []
            for _ in range(a.repeats):
                # stdin closed: with stdin an open pipe, llama-batched-bench prints no results (seen with 0.3.36).
                # Its results go through llama.cpp's asynchronous log thread, which exit can cut off before it
                # prints them (exit 0 and no JSON line in 1 to 4 of 6 runs here): such a run is repeated, up to 5 times.
                for _attempt in range(5):
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                                          stdin=subprocess.DEVNULL)
                    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("{")]
                    if proc.returncode or lines:
                        break
                if proc.returncode or not lines:
                    print(f"(llama.cpp {q} batch {bsz}: llama-batched-bench failed, exit {proc.returncode}: "
                          f"{proc.stderr[-500:]})")
                    break
                res = json.loads(lines[-1])
                times.append(res["t_pp"] + res["t_tg"])
            if len(times) < a.repeats:
                continue
            med = statistics.median(times)
            tps = bsz * a.new_tokens / med
            nbytes = int(per_weight * LLAMA_CPP_BYTES[fmt])
            rows.append({"config": name, "params": n_params, "batch": bsz, "impl": f"llama.cpp {q} batched-bench",
                         "precision": by_format[fmt], "llama_cpp_repacked": "no repack" not in q, "seconds": med,
                         "runs": times, "tokens_per_s": tps, "bytes_per_step": nbytes,
                         "roofline": (tps / bsz) * nbytes / bandwidth, "tokens": None})
    return rows


def same_prefix(a: list[list[int]], b: list[list[int]]) -> int:
    n = 0
    for x, y in zip(a, b):
        for s, t in zip(x, y):
            if s != t:
                break
            n += 1
    return n


class Variant(NamedTuple):
    """One implementation at one precision as a table row (per batch size): `factory()` builds it and
    returns its runner (prompts -> (seconds, tokens)), or (runner, bytes per step) where the bytes are
    known only once built. `group` names the process that builds and times it under isolation."""

    label: str
    precision: str
    group: str
    nbytes: int | None
    batch1_only: bool
    factory: Callable


# How rows share processes (--isolate). Rows timed one after another in one process were not
# independent (the module docstring): each carried the allocator's state the rows before it left.
ISOLATION = {
    "process": "each (implementation, precision) in a fresh process of its own (spawned: no inherited threads, "
               "allocator, huge-page or compiler state), one after another; same weights (checked), same threads",
    "interleave": "each (implementation, precision) in a fresh process of its own, all built and warmed up first, "
                  "then the repeats round-robin over the rows (one process runs at a time, the others wait on a "
                  "pipe): drift of a shared machine falls on every row alike; memory of all of them at once",
    "none": "every row in this one process, one after another (decode.py before session 12)",
}


def weights_fingerprint(model) -> float:
    """A sum over every weight: equal in the processes that rebuild the model from the same seed."""
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def plan_variants(name: str, a, model_fn: Callable, paths: dict) -> list[Variant]:
    """The rows of config `name` for a's implementations and precisions, nothing built yet:
    model_fn() gives the fp32 model (built on first use), paths the GGUF files (export_gguf)."""
    args = ModelArgs(**CONFIGS[name])
    with torch.device("meta"):  # bytes per step from the shapes, without building the weights
        fp32_bytes = bytes_per_step(Transformer(args))
    per_weight = fp32_bytes / 4
    variants = []
    if "transformers" in a.impls:
        def hf_factory(dtype, best=False):
            def make():
                from transformers import LlamaConfig, LlamaForCausalLM
                from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

                from llamaworks.convert.hf import hf_config_dict, to_hf_state_dict

                cfg = LlamaConfig(**hf_config_dict(args))
                cfg._attn_implementation = "sdpa"
                with torch.device("meta"):  # no random init of a second copy (seconds and GB for 1b)
                    hf = LlamaForCausalLM(cfg)
                # A tied model has no lm_head in its state dict: load the rest, then tie as HF does.
                hf.load_state_dict({k: v.to(dtype) for k, v in to_hf_state_dict(model_fn().state_dict(), args).items()},
                                   assign=True, strict=not args.tie_word_embeddings)
                if args.tie_word_embeddings:
                    hf.lm_head.weight = hf.model.embed_tokens.weight
                hf.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)  # its buffers are not in the state dict
                hf = hf.eval().to(a.device)
                if best:
                    hf_static_compiled(hf)
                return lambda p: time_transformers(hf, p, a.new_tokens)
            return make
        for prec, dtype, nbytes in (("fp32", torch.float32, fp32_bytes), ("bf16", torch.bfloat16, fp32_bytes // 2)):
            if prec in a.precisions:
                group = f"transformers {prec}"
                variants.append(Variant(f"transformers {prec}", prec, group, nbytes, False, hf_factory(dtype)))
                if a.compile:
                    variants.append(Variant(f"transformers {prec} static+compile", prec, group, nbytes, False,
                                            hf_factory(dtype, best=True)))
    if "llamaworks" in a.impls:
        # --native-blocks both: each eager row also without the block calls (" modules"), an A/B in one run
        block_modes = {"on": (True,), "off": (False,), "both": (True, False)}[a.native_blocks]

        def row(label: str, blocks: bool) -> str:
            return label if blocks or len(block_modes) == 1 else label + " modules"

        for prec in a.precisions:
            group = f"llamaworks {prec}"
            if prec in ("fp32", "bf16"):
                def make_float(prec=prec, compile=False, blocks=True):
                    m = decode_copy(model_fn(), torch.float32 if prec == "fp32" else torch.bfloat16, a.fuse, a.device,
                                    a.hugepages, blocks)
                    return _with_model(lambda p: time_llamaworks(m, p, a.new_tokens, compile), m)
                nbytes = fp32_bytes if prec == "fp32" else fp32_bytes // 2
                for blocks in block_modes:
                    variants.append(Variant(row(f"llamaworks {prec}", blocks), prec, group, nbytes, False,
                                            lambda prec=prec, b=blocks: make_float(prec, False, b)))
                if a.compile:
                    variants.append(Variant(f"llamaworks {prec}+compile", prec, group, nbytes, False,
                                            lambda prec=prec: make_float(prec, True)))
            else:
                def make_q(mode=prec, compile=False, blocks=True):
                    m = quantized_copy(model_fn(), mode, a.group_size)
                    if a.fuse:
                        fuse_projections(m)
                    if torch.device(a.device).type == "cpu":
                        # as load_model: the decode attention (the layers are quantised), one call per step
                        if use_native_kernels(m) and blocks:
                            use_native_blocks(m)
                        if a.hugepages:
                            use_hugepages(m)
                    return _with_model(lambda p: time_llamaworks(m, p, a.new_tokens, compile), m), bytes_per_step(m)
                label = "llamaworks int8" if prec == "int8" else f"llamaworks int4 g{a.group_size}"
                for blocks in block_modes:
                    variants.append(Variant(row(label, blocks), prec, group, None, False,
                                            lambda mode=prec, b=blocks: make_q(mode, False, b)))
                if a.compile:
                    variants.append(Variant(label + "+compile", prec, group, None, False,
                                            lambda mode=prec: make_q(mode, True)))
    by_format = {v: k for k, v in LLAMA_CPP_FORMAT.items()}
    wanted = tuple(LLAMA_CPP_FORMAT[p] for p in a.precisions)
    for q, path in paths.items():
        fmt = q.split()[0]
        if fmt not in wanted:
            continue
        def make_cpp(path=path, extra_bufts="no repack" not in q):
            llm = open_llama_cpp(path, extra_bufts, n_ctx=a.prompt_len + a.new_tokens + 8,
                                 n_threads=torch.get_num_threads(), n_batch=512)
            return lambda p: time_llama_cpp(llm, p, a.new_tokens)
        variants.append(Variant(f"llama.cpp {q}", by_format[fmt], f"llama.cpp {q}",
                                int(per_weight * LLAMA_CPP_BYTES[fmt]), True, make_cpp))
    return variants


def _with_model(run: Callable, model) -> Callable:
    run.model = model  # for RowTimer's huge-page check
    return run


class RowTimer:
    """Builds variants and times them on the prompts, in this process: what an isolated worker runs
    (and, with --isolate none, the main process)."""

    def __init__(self, variants: list[Variant], prompts: list[list[int]]):
        self.variants = {v.label: v for v in variants}
        self.prompts = prompts
        self.built: dict[str, tuple[Callable, int | None]] = {}

    def prepare(self, label: str, bsz: int) -> dict:
        """Build `label` (once) and warm it up (compile) at batch bsz: its bytes per step, and the
        fraction of its weights in huge pages (ours; None for the others)."""
        with torch.inference_mode():
            if label not in self.built:
                # Every variant compiles generate's one decode_step function: dynamo's per-function cache
                # (8 entries) would otherwise fill up over models and batch sizes and fall back to eager.
                torch._dynamo.reset()
                v = self.variants[label]
                run, nbytes = v.factory(), v.nbytes
                if isinstance(run, tuple):  # quantised: bytes known once built
                    run, nbytes = run
                self.built[label] = (run, nbytes)
            run, nbytes = self.built[label]
            run(self.prompts[:bsz])  # warm-up (and compilation)
        model = getattr(run, "model", None)
        return {"bytes_per_step": nbytes,
                "weights_in_huge_pages": None if model is None else huge_page_fraction(model.output.weight)}

    def run(self, label: str, bsz: int) -> tuple[float, list[list[int]]]:
        with torch.inference_mode():
            return self.built[label][0](self.prompts[:bsz])

    def drop(self, label: str) -> None:
        self.built.pop(label, None)


def _worker(conn, spec: dict) -> None:
    """A row group's process (spawned): rebuild the model from the seed, check it is the parent's,
    then run RowTimer's commands from the pipe until "close"."""
    try:
        a = argparse.Namespace(**spec["args"])
        if a.threads:
            torch.set_num_threads(a.threads)
        model = None

        def model_fn():
            nonlocal model
            if model is None:
                model = build_model(ModelArgs(**CONFIGS[spec["config"]]), seed=0).eval().to(a.device)
                got = weights_fingerprint(model)
                if abs(got - spec["fingerprint"]) > 1e-9 * max(1.0, abs(spec["fingerprint"])):
                    raise RuntimeError(f"the worker's weights differ from the parent's (sum {got!r} vs "
                                       f"{spec['fingerprint']!r}): the seed no longer gives the same model")
            return model

        paths = {q: Path(p) for q, p in spec["paths"].items()}
        variants = [v for v in plan_variants(spec["config"], a, model_fn, paths) if v.group == spec["group"]]
        timer = RowTimer(variants, spec["prompts"])
        conn.send(("ok", os.getpid()))
        while True:
            cmd, args = conn.recv()
            if cmd == "close":
                break
            conn.send(("ok", getattr(timer, cmd)(*args)))
    except BaseException:  # noqa: BLE001 - the parent reports it with the worker's traceback
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class _Worker:
    """The parent's end of one row group's process."""

    def __init__(self, spec: dict):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # a fresh interpreter: nothing of this process's state
        self.group = spec["group"]
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, spec), name=f"decode {self.group}")
        self.proc.start()
        child.close()
        self._reply()

    def _reply(self):
        try:
            status, value = self.conn.recv()
        except EOFError:
            self.proc.join(10)
            raise RuntimeError(f"the process timing {self.group} ended (exit code {self.proc.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"the process timing {self.group} failed:\n{value}")
        return value

    def call(self, cmd: str, *args):
        self.conn.send((cmd, args))
        return self._reply()

    def close(self):
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(("close", ()))
            self.proc.join(60)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


class _InProcess:
    """--isolate none: the same commands, run here."""

    def __init__(self, timer: RowTimer):
        self.timer = timer

    def call(self, cmd: str, *args):
        return getattr(self.timer, cmd)(*args)

    def close(self):
        pass


def time_variants(variants: list[Variant], a, open_group: Callable) -> dict:
    """Warm-up and a.repeats timed runs of every (variant, batch) job, each group's in the worker
    open_group(group) returns, isolated as a.isolate says: (label, bsz) -> (info, times, tokens)."""
    groups = list(dict.fromkeys(v.group for v in variants))
    jobs = {g: [(v.label, bsz) for v in variants if v.group == g for bsz in a.batches
                if not (v.batch1_only and bsz > 1)] for g in groups}
    out = {}
    if a.isolate == "interleave":
        workers = {}
        try:
            for g in groups:  # built and warmed up one after another: no compile under another's timing
                workers[g] = open_group(g)
                for job in jobs[g]:
                    out[job] = (workers[g].call("prepare", *job), [], None)
            for _ in range(a.repeats):
                for g in groups:
                    for job in jobs[g]:
                        dt, toks = workers[g].call("run", *job)
                        out[job] = (out[job][0], out[job][1] + [dt], toks)
        finally:
            for w in workers.values():
                w.close()
        return out
    for g in groups:
        w = open_group(g)
        try:
            for i, job in enumerate(jobs[g]):
                info, times, toks = w.call("prepare", *job), [], None
                for _ in range(a.repeats):
                    dt, toks = w.call("run", *job)
                    times.append(dt)
                out[job] = (info, times, toks)
                if all(other[0] != job[0] for other in jobs[g][i + 1:]):
                    w.call("drop", job[0])  # its last batch size: free it before the next variant
        finally:
            w.close()
    return out


def run_config(name: str, a, bandwidth: float) -> list[dict]:
    args = ModelArgs(**CONFIGS[name])
    n_params = count_parameters(args)
    model = build_model(args, seed=0).eval().to(a.device)  # the same random weights on every device
    g = torch.Generator().manual_seed(0)
    max_batch = max(a.batches)
    prompts = torch.randint(3, args.vocab_size, (max_batch, a.prompt_len), generator=g).tolist()
    fp32_bytes = bytes_per_step(model)

    tmp, paths = None, {}
    if "llama.cpp" in a.impls and torch.device(a.device).type != "cpu":
        print(f"(llama.cpp rows skipped on {a.device}: llama-cpp-python from PyPI is built for the CPU)")
    elif "llama.cpp" in a.impls:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("(llama-cpp-python is not installed: no llama.cpp rows; build it with "
                  "`./dev.sh extras` (compiles llama.cpp) to compare)")
        else:
            tmp = tempfile.TemporaryDirectory(prefix="decode_bench_")
            wanted = tuple(LLAMA_CPP_FORMAT[p] for p in a.precisions)
            paths = export_gguf(model, Path(tmp.name), tuple(q for q in wanted if q.startswith("q")))

    out_bytes = model.output.weight.numel() * model.output.weight.element_size()
    print(f"\n{name}: the output projection ({args.vocab_size} x {args.dim}) is {out_bytes / 1e6:.0f} of "
          f"{fp32_bytes / 1e6:.0f} MB read per fp32 decode step ({100 * out_bytes / fp32_bytes:.0f}%)")
    if torch.device(a.device).type == "cpu":
        with torch.inference_mode():  # one-row product through F.linear, as the model runs it
            x = torch.randn(1, args.dim)
            F.linear(x, model.output.weight)
            t_out = statistics.median(_timed(lambda: F.linear(x, model.output.weight)) for _ in range(20))
        print(f"  its one-row fp32 product alone takes {t_out * 1e3:.2f} ms "
              f"({out_bytes / t_out / 1e9:.1f} GB/s of weights)")

    variants = plan_variants(name, a, lambda: model, paths)
    if a.isolate == "none":
        timer = _InProcess(RowTimer(variants, prompts))
        timed = time_variants(variants, a, lambda group: timer)
    else:
        spec = {"config": name, "args": vars(a), "prompts": prompts, "fingerprint": weights_fingerprint(model),
                "paths": {q: str(p) for q, p in paths.items()}}
        model = None  # the workers build their own: not two copies of a large model at once
        timed = time_variants(variants, a, lambda group: _Worker({**spec, "group": group}))
    rows = []
    for v in variants:
        for bsz in a.batches:
            if (v.label, bsz) not in timed:
                continue
            info, times, toks = timed[(v.label, bsz)]
            med = statistics.median(times)
            tps = bsz * a.new_tokens / med
            nbytes = info["bytes_per_step"]
            rows.append({"config": name, "params": n_params, "batch": bsz, "impl": v.label, "precision": v.precision,
                         "llama_cpp_repacked": (None if not v.label.startswith("llama.cpp")
                                                else "no repack" not in v.label),
                         "seconds": med,
                         "runs": times, "tokens_per_s": tps, "bytes_per_step": nbytes,
                         "roofline": (tps / bsz) * nbytes / bandwidth, "tokens": toks, "isolation": a.isolate,
                         "weights_in_huge_pages": info["weights_in_huge_pages"]})
    per_weight = fp32_bytes / 4
    batched = [b for b in a.batches if b > 1]
    if paths and batched:
        rows += llama_cpp_batched(paths, a, batched, name, n_params, per_weight, bandwidth)
    if tmp is not None:
        tmp.cleanup()
    for bsz in a.batches:
        # Grouped by precision (stable): each of ours beside transformers and llama.cpp at the same one.
        table = sorted((r for r in rows if r["batch"] == bsz), key=lambda r: PRECISIONS.index(r["precision"]))
        if not table:
            continue
        ref = next((r for r in table if r["impl"] == "llamaworks fp32"), table[0])
        base = next((r for r in table if r["impl"] == "transformers fp32"), ref)
        print(f"\n{name}: {n_params / 1e6:.1f}M params, batch {bsz}, prompt {a.prompt_len}, {a.new_tokens} new "
              f"tokens, greedy, {a.device if a.device != 'cpu' else f'{torch.get_num_threads()} threads'}, "
              f"read bandwidth {bandwidth / 1e9:.1f} GB/s")
        print(f"{'implementation':<34}{'tokens/s':>10}{'vs transformers':>17}{'vs ours fp32':>14}"
              f"{'MB/step':>9}{'roofline':>10}{'same':>11}")
        if bsz > 1 and any(v.batch1_only for v in variants):
            print("(llama.cpp at batch > 1: llama-batched-bench, llama.cpp's own batched decode of random tokens "
                  "(its Python API decodes one sequence at a time): no tokens to compare)"
                  if any(r["impl"].endswith("batched-bench") for r in table) else
                  f"(llama.cpp: batch 1 only: its Python API decodes one sequence at a time; {BATCHED_NOTE})")
        for r in table:
            same = same_prefix(r["tokens"], ref["tokens"]) if r["tokens"] is not None else None
            r["same_tokens"] = same
            print(f"{r['impl']:<34}{r['tokens_per_s']:>10.1f}{r['tokens_per_s'] / base['tokens_per_s']:>16.2f}x"
                  f"{r['tokens_per_s'] / ref['tokens_per_s']:>13.2f}x{r['bytes_per_step'] / 1e6:>9.0f}"
                  f"{100 * r['roofline']:>9.0f}%" + (f"{same:>6}/{bsz * a.new_tokens}" if same is not None else
                                                     f"{'-':>11}"))
    for r in rows:
        r.pop("tokens")
    return rows


def perplexity_table(model_dir: str, text_file: str, seq_len: int, group_sizes: list[int], new_tokens: int = 64,
                     compile: bool = False) -> list[dict]:
    """llama.cpp's quantisation table: per weight format, perplexity on held-out text, its
    change, bytes read per decode step and decode tokens/s (batch 1, the text's first 128
    tokens as the prompt, greedy), eager and with --compile."""
    from llamaworks.inference.load import load_model
    from llamaworks.inference.perplexity import perplexity

    model, tok = load_model(model_dir)
    ids = tok.encode(Path(text_file).read_text(encoding="utf-8", errors="replace"), bos=True, eos=False)
    rows = []
    variants = [("fp32", lambda: model), ("int8", lambda: quantized_copy(model, "int8"))]
    variants += [(f"int4 g{g}", lambda g=g: quantized_copy(model, "int4", g)) for g in group_sizes]
    print(f"\nperplexity of {model_dir} on {text_file} ({len(ids)} tokens, windows of {seq_len})")
    print(f"{'weights':<12}{'perplexity':>12}{'change':>9}{'MB/step':>9}{'tokens/s':>10}"
          + (f"{'+compile':>10}" if compile else ""))
    prompt = [ids[:128]]
    for label, make in variants:
        m = make()
        with torch.inference_mode():
            ppl = perplexity(m, ids, seq_len)
            speeds = []
            for c in [False, True] if compile else [False]:
                torch._dynamo.reset()
                time_llamaworks(m, prompt, new_tokens, compile=c)  # warm-up (and compilation)
                speeds.append(new_tokens / min(time_llamaworks(m, prompt, new_tokens, compile=c)[0] for _ in range(3)))
        rows.append({"weights": label, "perplexity": ppl, "bytes_per_step": bytes_per_step(m),
                     "tokens_per_s": speeds[0], "tokens_per_s_compiled": speeds[1] if compile else None})
        print(f"{label:<12}{ppl:>12.3f}{100 * (ppl / rows[0]['perplexity'] - 1):>+8.2f}%"
              f"{rows[-1]['bytes_per_step'] / 1e6:>9.1f}" + "".join(f"{v:>10.1f}" for v in speeds))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", "--config", nargs="+", default=None, choices=list(CONFIGS),
                    help="model shapes (default A; B is the ~1.26B configuration)")
    ap.add_argument("--batches", "--batch", nargs="+", type=int, default=[1])
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    ap.add_argument("--impls", nargs="+", default=["transformers", "llamaworks", "llama.cpp"],
                    choices=["transformers", "llamaworks", "llama.cpp"])
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 128")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 256")
    ap.add_argument("--repeats", type=int, default=None, help="default 3")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available). On a GPU the "
                    "table has the same rows but llama.cpp's; int8/int4 there dequantise per call (the fused "
                    "kernels are CPU ones), and --compile uses CUDA graphs")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="also time llamaworks fp32 and int8 with torch.compile on the decode step (default on)")
    ap.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                    help="llamaworks with q/k/v and gate/up fused at load (inference/fuse.py), as `llamaworks "
                         "generate` runs (default on)")
    ap.add_argument("--hugepages", action=argparse.BooleanOptionalAction, default=True,
                    help="llamaworks' CPU weights in transparent huge pages (inference/hugepages.py), as "
                         "load_model does (default on)")
    ap.add_argument("--native-blocks", choices=("on", "off", "both"), default="on",
                    help="llamaworks' eager rows with each decode step as one native call (inference/block.py's "
                         "use_native_blocks), as load_model does (on, the default), without (off), or both rows "
                         "(the one without labelled 'modules')")
    ap.add_argument("--isolate", choices=list(ISOLATION), default="process",
                    help="how rows share processes: " + "; ".join(f"{k}: {v}" for k, v in ISOLATION.items())
                    + " (default process)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke test: defaults become the small preset, prompt 16, 8 new tokens, 1 run, no "
                         "compile, and no JSON unless --out is given")
    ap.add_argument("--ppl-model", help="trained model directory: print fp32/int8/int4 perplexity")
    ap.add_argument("--ppl-text", help="held-out text file for --ppl-model")
    ap.add_argument("--ppl-seq-len", type=int, default=256)
    ap.add_argument("--out", default=None, help="JSON results (default benchmarks/results/decode.json)")
    add_label_argument(ap)
    a = ap.parse_args()
    # Explicit options win over --quick's defaults.
    quick = {"configs": ["small"], "prompt_len": 16, "new_tokens": 8, "repeats": 1, "compile": False}
    full = {"configs": ["A"], "prompt_len": 128, "new_tokens": 256, "repeats": 3, "compile": True,
            "out": "benchmarks/results/decode.json"}
    for key, value in full.items():
        if getattr(a, key) is None:
            setattr(a, key, quick.get(key) if a.quick else value)
    if a.threads:
        torch.set_num_threads(a.threads)
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "machine": machine_record(a.label, bandwidth=False, device=a.device, native_kernels=(
                  native.current_isa() if native.available() else None)), "device": a.device, "fuse": a.fuse,
              "hugepages": a.hugepages,
              "native_blocks": a.native_blocks, "isolation": a.isolate, "isolation_note": ISOLATION[a.isolate],
              "gpu": torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else None,
              "prompt_len": a.prompt_len,
              "new_tokens": a.new_tokens, "configs": {k: CONFIGS[k] for k in a.configs},
              "instruction_caps": instruction_caps()}
    if a.ppl_model:
        if not a.ppl_text:
            ap.error("--ppl-model needs --ppl-text FILE (held-out text)")
        result["perplexity"] = perplexity_table(a.ppl_model, a.ppl_text, a.ppl_seq_len, [32, 128],
                                                a.new_tokens, a.compile)
    else:
        bandwidth = measure_bandwidth(device=a.device)
        result["read_bandwidth"] = result["machine"]["read_bandwidth"] = bandwidth
        result["results"] = []
        for name in a.configs:
            result["results"] += run_config(name, a, bandwidth)
    if a.out is None:
        return
    print()
    write_result(a.out, result)


if __name__ == "__main__":
    main()
