"""The engine's prefill over the paged KV cache (issue 18): where a prompt's forward pass spends
its time, and prefill throughput in an in-process engine, with the prefill attention of
inference/paged.py (prefill_attention: SDPA causal over the chunk's own keys, unmasked over its
prefix, merged) against the gather path it replaced (every layer copies the sequence's blocks
into new keys for one SDPA call under a (chunk, width*B) mask; LLAMAWORKS_PAGED_PREFILL=0).

    .venv/bin/python benchmarks/prefill.py --label contended
    .venv/bin/python benchmarks/prefill.py --smoke --output /tmp/prefill.json

Part 1 (passes): random weights of --preset (the serve benchmark's "small" by default), loaded as
`llamaworks serve` loads them (fused projections, native kernels), a paged cache; the forward
passes that prefill a --long-tokens prompt whole, the same prompt in --chunk-token chunks (each
after the ones before it), and --short-tokens prompts one by one and --batch of them in one
batched pass. The two attention paths alternate, --rounds rounds each; the median wall time per
case is reported per path, with prompt tokens/s. Then one more run of each case, timed by parts:
the linear products (with their GFLOP/s), attention, the cache update (the write, and the
gather or prefix view inside it), norms, RoPE and the rest (embedding, SwiGLU's product,
residuals, the mask, Python between operators) = wall - parts. Logits of both paths are compared.

Part 2 (engine): the mixed workload of benchmarks/serve.py in process (--requests requests at
once, every --long-every'th --long-tokens tokens, the rest --short-tokens; --max-tokens each,
greedy) for each --prefill-chunks value: the engine's default step (one ragged forward pass of
the decoding rows and the step's prompt runs, engine._ragged_step), separate passes (each prompt
or batch of rests its own pass, then the decode step: Engine(ragged=False)) and the gather path
(separate passes): wall time, generated tokens/s, seconds in steps (ragged) or in prefill and
decode steps, and the forward passes; greedy tokens of every run compared.
JSON: benchmarks/results/prefill.json (--output), with the machine (benchmarks/machine.py).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from engine_fixtures import PRESETS, NullTokenizer, mixed_requests, run_workload, timed  # benchmarks/ is on sys.path
from machine import add_label_argument, machine_record, write_result

import llamaworks.model
from llamaworks.inference import paged
from llamaworks.inference.block import use_native_blocks
from llamaworks.inference.fuse import fuse_projections
from llamaworks.inference.kernels import use_bf16_prefill, use_native_kernels
from llamaworks.inference.threads import run_in_own_thread
from llamaworks.model import ModelArgs, RMSNorm, build_model
from llamaworks.serve.engine import Engine, table_width
from llamaworks.serve.kvpool import blocks_for

LOCAL_PRESETS = {**PRESETS, "small": dict(ModelArgs.from_name("small").to_params(), max_seq_len=2176),
                 "tiny": dict(ModelArgs.from_name("tiny").to_params(), max_seq_len=512)}
SIZE = 16  # tokens per block, the engine's default


def make_model(preset: str, bf16: bool = False, dtype: torch.dtype = torch.float32):
    # build_model recomputes the RoPE table in fp32 after the cast, as serve's loading does
    model = build_model(ModelArgs(**LOCAL_PRESETS[preset]), seed=0, dtype=dtype).eval()  # serve --dtype
    fuse_projections(model)
    if use_native_kernels(model):
        use_native_blocks(model)  # as load_model: decode passes as one call, prompts' products as serve runs them
    if bf16:  # serve --prefill-bf16
        use_bf16_prefill(model)
    return model


def set_path(model, path: str) -> None:
    """split: prefill_attention (the native kernel where it applies); split_sdpa: the same without
    the kernel (LLAMAWORKS_PREFILL_KERNEL=0: SDPA's parts merged); gather: the gather path."""
    for layer in model.layers:
        layer.attention.kv_cache.splits_prefill = path != "gather"
    if path == "split_sdpa":
        os.environ["LLAMAWORKS_PREFILL_KERNEL"] = "0"
    else:
        os.environ.pop("LLAMAWORKS_PREFILL_KERNEL", None)


def cases(a, vocab: int) -> dict[str, list[tuple[list[list[int]], int]]]:
    """Per case, its passes: (token ids per row, first position)."""
    g = torch.Generator().manual_seed(0)
    long = torch.randint(3, vocab, (a.long_tokens,), generator=g).tolist()
    shorts = [torch.randint(3, vocab, (a.short_tokens,), generator=g).tolist() for _ in range(a.batch)]
    return {"long_whole": [([long], 0)],
            "long_chunked": [([long[s:s + a.chunk]], s) for s in range(0, a.long_tokens, a.chunk)],
            "short_one_by_one": [([p], 0) for p in shorts],
            "short_batched": [(shorts, 0)]}


def run_case(model, table, passes, rows_blocks) -> torch.Tensor:
    """The passes in order, each row in its own blocks; the last position's logits of each pass."""
    out = []
    for ids, start in passes:
        n = len(ids[0])
        width = table_width(blocks_for(start + n, SIZE), rows_blocks.shape[1], False)
        table.blocks = rows_blocks[: len(ids), :width]
        h = model(torch.tensor(ids), torch.arange(start, start + n).expand(len(ids), n), return_hidden=True)
        out.append(model.output(h[:, -1]).float())
    return torch.cat(out)


class Parts:
    """Wall time by kind of work, from wrappers around the model's calls (CPU work is synchronous)."""

    def __init__(self):
        self.t = collections.defaultdict(float)
        self.linear_flop = 0.0

    def wrap(self, name, fn, flop=None):
        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.t[name] += time.perf_counter() - t0
                if flop is not None:
                    self.linear_flop += flop(*args)
        return wrapper


def by_parts(model, table, passes, rows_blocks) -> dict:
    """One run of `passes` with every kind of call timed (the wrappers cost ~1 us a call)."""
    p = Parts()
    saved = {"linear": F.linear, "rope": llamaworks.model.apply_rotary_emb, "gather": paged.gather,
             "prefix": paged.prefix_keys}
    flop = lambda x, w, *_: 2.0 * x.numel() * w.shape[0]  # noqa: E731 (2 * rows * out * in)
    F.linear = p.wrap("linear", saved["linear"], flop)
    # fp32 prompt products where kernels.prompt_gemm() picks oneDNN (non-Intel CPUs) go there instead
    onednn = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
    if onednn is not None:
        torch.ops.mkldnn._linear_pointwise = p.wrap("linear", onednn, flop)
    llamaworks.model.apply_rotary_emb = p.wrap("rope", saved["rope"])
    paged.gather = p.wrap("gather", saved["gather"])
    paged.prefix_keys = p.wrap("prefix_view_or_gather", saved["prefix"])
    patched = []
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.forward = p.wrap("norm", m.forward)
            patched.append(m)
    for layer in model.layers:
        att = layer.attention
        att.attend = p.wrap("attention", att.attend)
        att.kv_cache.update = p.wrap("cache_update", att.kv_cache.update)
        patched += [att, att.kv_cache]
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            run_case(model, table, passes, rows_blocks)
        wall = time.perf_counter() - t0
    finally:
        F.linear, llamaworks.model.apply_rotary_emb = saved["linear"], saved["rope"]
        if onednn is not None:
            torch.ops.mkldnn._linear_pointwise = onednn
        paged.gather, paged.prefix_keys = saved["gather"], saved["prefix"]
        for m in patched:
            for name in ("forward", "attend", "update"):
                m.__dict__.pop(name, None)
    t = dict(p.t)
    inner = t.get("gather", 0.0) + t.get("prefix_view_or_gather", 0.0)
    t["cache_write_and_rest_of_update"] = t.pop("cache_update", 0.0) - inner
    out = {"wall_ms": wall * 1e3, **{f"{k}_ms": v * 1e3 for k, v in sorted(t.items())}}
    out["rest_ms"] = (wall - sum(t.values())) * 1e3
    out["linear_gflop_per_s"] = p.linear_flop / t["linear"] / 1e9 if t.get("linear") else None
    return out


def pass_bench(a, model) -> dict:
    rows = max(a.batch, 1)
    max_blocks = blocks_for(model.args.max_seq_len, SIZE)
    table = paged.setup_paged_caches(model, rows * max_blocks + 1, SIZE, model.args.max_seq_len)
    if not model.layers[0].attention.kv_cache.splits_prefill:
        sys.exit("the prefill attention is off here: leave LLAMAWORKS_PAGED_PREFILL unset (CPU only)")
    # Each row's blocks in order side by side, as a fresh pool hands them out (the prefix is a view),
    # or (--scattered) interleaved with the other rows' (the prefix is gathered).
    ids = torch.arange(1, rows * max_blocks + 1)
    rows_blocks = (ids.view(max_blocks, rows).t() if a.scattered else ids.view(rows, max_blocks)).contiguous()
    out = {}
    paths = ("split", "split_sdpa" if a.attention_ab else "gather")
    other = paths[1]
    for name, passes in cases(a, model.args.vocab_size).items():
        tokens = sum(len(r) for ids_, _ in passes for r in ids_)
        times = {p: [] for p in paths}
        logits = {}
        with torch.no_grad():
            for _ in range(a.rounds):
                for path in paths:
                    set_path(model, path)
                    t0 = time.perf_counter()
                    logits[path] = run_case(model, table, passes, rows_blocks)
                    times[path].append(time.perf_counter() - t0)
        med = {p: statistics.median(t) * 1e3 for p, t in times.items()}
        parts = {}
        for path in paths:
            set_path(model, path)
            parts[path] = by_parts(model, table, passes, rows_blocks)
        set_path(model, "split")
        diff = (logits["split"] - logits[other]).abs().max().item()
        out[name] = {"passes": len(passes), "prompt_tokens": tokens, "wall_ms_median": med,
                     "tokens_per_s": {p: tokens / m * 1e3 for p, m in med.items()},
                     f"{other}_over_split": med[other] / med["split"], "parts": parts,
                     "max_abs_logit_diff": diff,
                     "argmax_equal": bool(torch.equal(logits["split"].argmax(-1), logits[other].argmax(-1)))}
        print(f"{name}: {len(passes)} passes, {tokens} tokens: split {med['split']:.1f} ms, {other} "
              f"{med[other]:.1f} ms ({med[other] / med['split']:.2f}x); max |logit diff| {diff:.2e}")
        for path in paths:
            print(f"  {path} by parts: " + ", ".join(f"{k[:-3] if k.endswith('_ms') else k} "
                                                    f"{v:.1f}" for k, v in parts[path].items() if v is not None))
    return out


def engine_bench(a, split: bool, chunk: int | None, bf16: bool = False, ragged: bool = True) -> dict:
    os.environ["LLAMAWORKS_PAGED_PREFILL"] = "1" if split else "0"
    try:
        # Built in threads that exit, as `serve` does: the engine's thread then holds the only
        # OpenMP team (inference/threads.py; a second one throttles both).
        model = run_in_own_thread(make_model, a.preset, bf16)
        eng = run_in_own_thread(Engine, model, NullTokenizer(model.args.vocab_size), max_batch=a.max_batch,
                                max_queue=256, prefill_chunk=chunk, ragged=ragged)
    finally:
        os.environ.pop("LLAMAWORKS_PAGED_PREFILL", None)
    parts = {"prefill": 0.0, "decode": 0.0, "ragged_step": 0.0, "passes": 0.0}
    eng._prefill_step = timed(parts, "prefill", eng._prefill_step)
    eng._decode = timed(parts, "decode", eng._decode)
    eng._ragged_step = timed(parts, "ragged_step", eng._ragged_step)
    forward, decode = eng.runner.forward, eng.runner.decode

    def count(fn):
        def wrapper(*args, **kw):
            parts["passes"] += 1
            return fn(*args, **kw)
        return wrapper
    eng.runner.forward, eng.runner.decode = count(forward), count(decode)
    reqs = mixed_requests(model.args.vocab_size, a.requests, a.short_tokens, a.long_tokens, a.long_every,
                          a.max_tokens, long_first=True)  # serve.py's order: the first is long
    wall, _ = run_workload(eng, reqs, parts)
    gen = sum(len(r.tokens) for r in reqs)
    prompt = sum(len(r.prompt_ids) for r in reqs)
    steps = parts["prefill"] + parts["decode"] + parts["ragged_step"]
    return {"split": split, "prefill_bf16": bf16, "prefill_chunk": chunk, "ragged": eng._ragged, "wall_s": wall,
            "generated_tokens": gen, "tokens_per_s": gen / wall, "prompt_tokens": prompt,
            "prefill_s": parts["prefill"],
            "prefill_tokens_per_s": prompt / parts["prefill"] if parts["prefill"] else None,
            "decode_s": parts["decode"], "ragged_step_s": parts["ragged_step"], "other_s": wall - steps,
            "forward_passes": int(parts["passes"]), "tokens": [r.tokens for r in reqs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=sorted(LOCAL_PRESETS))
    ap.add_argument("--long-tokens", type=int, default=2049, help="serve.py's long prompt: BOS + 2048")
    ap.add_argument("--short-tokens", type=int, default=129)
    ap.add_argument("--chunk", type=int, default=512, help="part 1's chunk (llama-server's n_ubatch)")
    ap.add_argument("--batch", type=int, default=7, help="short prompts in part 1")
    ap.add_argument("--scattered", action="store_true", help="part 1: rows' blocks interleaved (prefix gathered)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-engine", action="store_true", help="part 1 only")
    ap.add_argument("--no-passes", action="store_true", help="part 2 only")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--long-every", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prefill-chunks", default="none,512", help="part 2's engines (comma-separated; none: whole; "
                    "repeat a value to interleave repeated runs)")
    ap.add_argument("--prefill-bf16", action="store_true", help="part 2: a third engine per chunk value, the split "
                    "attention with prompt products in bf16 (serve --prefill-bf16)")
    ap.add_argument("--attention-ab", action="store_true", help="part 1: the split path with the native prefill "
                    "kernel against without it (LLAMAWORKS_PREFILL_KERNEL=0) instead of against the gather path")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="part 1's model and cache (serve --dtype)")
    ap.add_argument("--smoke", action="store_true", help="the tiny preset, short prompts, one round, a few requests")
    ap.add_argument("--output", default="benchmarks/results/prefill.json")
    add_label_argument(ap)
    a = ap.parse_args()
    if a.smoke:
        a.preset, a.long_tokens, a.short_tokens, a.chunk, a.batch, a.rounds = "tiny", 200, 20, 64, 3, 1
        a.requests, a.long_every, a.max_tokens, a.max_batch, a.prefill_chunks = 4, 2, 4, 2, "none,64"
    if a.threads:
        torch.set_num_threads(a.threads)
    machine = machine_record(a.label, bandwidth=False)
    out = {"command": "prefill.py " + " ".join(sys.argv[1:]), "machine": machine, "preset": a.preset,
           "threads": torch.get_num_threads(),
           "dtype": a.dtype, "passes": None}
    if not a.no_passes:  # in a thread whose OpenMP team ends with it, before the engines run
        dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
        out["passes"] = run_in_own_thread(lambda: pass_bench(a, make_model(a.preset, dtype=dtype)))
    if not a.no_engine:
        runs = []
        for chunk in [None if c.strip().lower() == "none" else int(c) for c in a.prefill_chunks.split(",")]:
            for split, bf16, ragged in ([(True, False, True), (True, False, False), (False, False, False)]
                                        + [(True, True, True)] * a.prefill_bf16):
                r = engine_bench(a, split, chunk, bf16, ragged)
                runs.append(r)
                print(f"engine, mixed, prefill_chunk {chunk}, {'split' if split else 'gather'}"
                      f"{', one pass per step' if r['ragged'] else ', separate passes'}"
                      f"{' + bf16 prefill' if bf16 else ''}: "
                      f"{r['tokens_per_s']:.1f} tok/s, wall {r['wall_s']:.2f} s: "
                      f"ragged steps {r['ragged_step_s']:.2f} s, "
                      f"prefill {r['prefill_s']:.2f} s, decode {r['decode_s']:.2f} s, other {r['other_s']:.2f} s, "
                      f"{r['forward_passes']} passes")
        fp32 = [r for r in runs if not r["prefill_bf16"]]
        out["engine_tokens_equal"] = all(r["tokens"] == fp32[0]["tokens"] for r in fp32)
        for r in runs:  # bf16 prefill: the share of requests whose greedy tokens are fp32's
            if r["prefill_bf16"]:
                r["requests_equal_to_fp32"] = sum(x == y for x, y in zip(r["tokens"], fp32[0]["tokens"])) / len(
                    r["tokens"])
        for r in runs:
            del r["tokens"]
        out["engine"] = runs
        print(f"engine greedy tokens equal across fp32 runs: {out['engine_tokens_equal']}")
    write_result(a.output, out)


if __name__ == "__main__":
    main()
