"""The batched decode step over the paged KV cache, read through the block table
(llamaworks::paged_attention) against the gather path (every row's blocks copied up to the
longest row's, one SDPA call), and where an in-process engine spends its time (issue 18).

    .venv/bin/python benchmarks/paged_decode.py --label contended
    .venv/bin/python benchmarks/paged_decode.py --preset A --lengths 2048,128,128,128,128,128,128,128

Part 1 (step): random weights of --preset (the serve benchmark's "small" by default), loaded as
`llamaworks serve` loads them (fused projections, native kernels), a paged cache of
--max-batch rows; the decode step, model(tokens (rows, 1), positions) as the engine runs it, over
rows holding --lengths tokens each (the mixed workload's: one 2k-token prompt among 128-token
ones; "chat": 8 rows of ~1.1k tokens), table width rounded as the engine does (table_width).
The two paths alternate, --rounds rounds of --steps steps each; the median step (ms) is reported
per path, and their ratio (same run, interleaved). Greedy tokens of both are checked equal.

Part 2 (engine): the mixed workload in process (--requests requests at once, every --long-every'th
--long-tokens tokens long, the rest --short-tokens; --max-tokens each, greedy), the engine's
iteration timed by parts: the decode forward, sampling and acceptance (the rest of _decode),
prefill passes, and everything else (scheduling, admission, Python between steps). With the
serve benchmark's tokens/s this separates the engine from HTTP and streaming.
JSON: benchmarks/results/paged_decode.json (--output), with the machine (benchmarks/machine.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from engine_fixtures import PRESETS, NullTokenizer, mixed_requests, run_workload, timed  # benchmarks/ is on sys.path
from machine import add_label_argument, machine_record, write_result

from llamaworks.inference.fuse import fuse_projections
from llamaworks.inference.kernels import use_native_kernels
from llamaworks.inference.paged import NULL_BLOCK, setup_paged_caches
from llamaworks.inference.threads import run_in_own_thread
from llamaworks.model import ModelArgs, build_model
from llamaworks.serve.engine import Engine, table_width
from llamaworks.serve.kvpool import blocks_for

LOCAL_PRESETS = {**PRESETS, "small": dict(ModelArgs.from_name("small").to_params(), max_seq_len=2176)}


def make_model(preset: str):
    model = build_model(ModelArgs(**LOCAL_PRESETS[preset]), seed=0).eval()
    fuse_projections(model)
    use_native_kernels(model)
    return model


def set_reads_table(model, on: bool) -> None:
    for layer in model.layers:
        layer.attention.kv_cache.reads_table = on


def step_bench(a, model) -> dict:
    size, rows = 16, a.max_batch
    lengths = [int(x) for x in a.lengths.split(",")]
    assert len(lengths) <= rows, "more --lengths than --max-batch rows"
    max_blocks = blocks_for(model.args.max_seq_len, size)
    table = setup_paged_caches(model, rows * max_blocks + 1, size, model.args.max_seq_len)
    if not model.layers[0].attention.kv_cache.reads_table:
        sys.exit("decode does not read through the block table here: build the native kernels "
                 "(python -m llamaworks.inference.native build) and leave LLAMAWORKS_PAGED_ATTENTION unset")
    width = table_width(max(blocks_for(n + a.steps, size) for n in lengths), max_blocks, False)
    blocks = torch.full((rows, width), NULL_BLOCK, dtype=torch.long)
    nxt = 1
    for r, n in enumerate(lengths):  # each row its own blocks, filled by one prefill
        k = blocks_for(n + a.steps, size)
        blocks[r, :k] = torch.arange(nxt, nxt + k)
        nxt += k
        table.blocks = blocks[r: r + 1]
        with torch.no_grad():
            model(torch.randint(0, model.args.vocab_size, (1, n)), torch.arange(n), rows=torch.tensor([0]))
    table.blocks = blocks
    start = torch.tensor(lengths + [0] * (rows - len(lengths))).view(rows, 1)
    times = {"table": [], "gather": []}
    tokens = {}
    for _ in range(a.rounds):
        for path in ("table", "gather"):
            set_reads_table(model, path == "table")
            tok = torch.ones(rows, 1, dtype=torch.long)
            out = []
            with torch.no_grad():
                for i in range(a.steps):  # the same positions each round: the cache rewritten alike
                    pos = torch.where(start > 0, start + i, 0)
                    t0 = time.perf_counter()
                    logits = model(tok, pos)[:, -1]
                    times[path].append(time.perf_counter() - t0)
                    tok = logits.argmax(-1, keepdim=True)
                    out.append(tok[: len(lengths), 0].tolist())
            tokens.setdefault(path, out)
    set_reads_table(model, True)
    med = {p: statistics.median(t) * 1e3 for p, t in times.items()}
    return {"lengths": lengths, "rows": rows, "table_width_blocks": width, "steps_per_round": a.steps,
            "rounds": a.rounds, "step_ms_median": med, "gather_over_table": med["gather"] / med["table"],
            "greedy_tokens_equal": tokens["table"] == tokens["gather"]}


def engine_bench(a, model, reads_table: bool) -> dict:
    os.environ["LLAMAWORKS_PAGED_ATTENTION"] = "1" if reads_table else "0"
    eng = run_in_own_thread(Engine, model, NullTokenizer(model.args.vocab_size), max_batch=a.max_batch, max_queue=256)
    parts = {"decode_forward": 0.0, "decode_total": 0.0, "prefill": 0.0, "ragged_step": 0.0, "ragged_forward": 0.0}
    runner = eng.runner
    runner.decode = timed(parts, "decode_forward", runner.decode)
    eng._decode = timed(parts, "decode_total", eng._decode)
    eng._prefill_step = timed(parts, "prefill", eng._prefill_step)
    # The engine's default step is one ragged pass (decoding rows and prompt runs together, issue 20):
    # its own parts, or the split path's decode and prefill parts would read zero.
    eng._ragged_step = timed(parts, "ragged_step", eng._ragged_step)
    runner.forward = timed(parts, "ragged_forward", runner.forward)
    reqs = mixed_requests(model.args.vocab_size, a.requests, a.short_tokens, a.long_tokens, a.long_every,
                          a.max_tokens, long_first=False)
    wall, steps = run_workload(eng, reqs, parts)
    os.environ.pop("LLAMAWORKS_PAGED_ATTENTION", None)
    gen = sum(len(r.tokens) for r in reqs)
    return {"reads_table": reads_table, "wall_s": wall, "generated_tokens": gen, "tokens_per_s": gen / wall,
            "decode_steps": steps, "decode_forward_ms_per_step": parts["decode_forward"] / max(steps, 1) * 1e3,
            "sampling_and_accept_ms_per_step": (parts["decode_total"] - parts["decode_forward"]) / max(steps, 1) * 1e3,
            "prefill_s": parts["prefill"], "ragged": eng._ragged, "ragged_steps_s": parts["ragged_step"],
            "ragged_forward_s": parts["ragged_forward"] if eng._ragged else 0.0,
            "other_s": wall - parts["decode_total"] - parts["prefill"] - parts["ragged_step"],
            "tokens": [r.tokens for r in reqs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=sorted(LOCAL_PRESETS))
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--lengths", default="2048,128,128,128,128,128,128,128",
                    help="tokens in each row's cache (comma-separated; rows beyond are free)")
    ap.add_argument("--chat-lengths", default="1100,1100,1100,1100,1100,1100,1100,1100",
                    help="a second step case (empty: none)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-engine", action="store_true", help="part 1 only")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--short-tokens", type=int, default=128)
    ap.add_argument("--long-tokens", type=int, default=2048)
    ap.add_argument("--long-every", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--output", default="benchmarks/results/paged_decode.json")
    add_label_argument(ap)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    machine = machine_record(a.label, bandwidth=False)
    # Models, the step loops and engines are built and run in threads that exit, as `serve` does, so
    # that an engine's thread holds the only OpenMP team (inference/threads.py).
    model = run_in_own_thread(make_model, a.preset)
    out = {"command": "paged_decode.py " + " ".join(sys.argv[1:]), "machine": machine,
           "preset": a.preset, "threads": torch.get_num_threads(), "steps": {}}
    cases = {"mixed": a.lengths, **({"chat": a.chat_lengths} if a.chat_lengths else {})}
    for name, lengths in cases.items():
        a.lengths = lengths
        r = run_in_own_thread(step_bench, a, model)
        out["steps"][name] = r
        print(f"decode step, {name} rows {r['lengths']}: through the table {r['step_ms_median']['table']:.2f} ms, "
              f"gather {r['step_ms_median']['gather']:.2f} ms ({r['gather_over_table']:.2f}x), "
              f"greedy tokens equal: {r['greedy_tokens_equal']}")
    if not a.no_engine:
        runs = []
        for reads_table in (True, False):
            runs.append(engine_bench(a, run_in_own_thread(make_model, a.preset), reads_table))
            r = runs[-1]
            where = (f"ragged steps {r['ragged_steps_s']:.2f} s (forward passes {r['ragged_forward_s']:.2f} s)"
                     if r["ragged"] else
                     f"forward {r['decode_forward_ms_per_step']:.2f} ms/step, sampling+accept "
                     f"{r['sampling_and_accept_ms_per_step']:.2f} ms/step; prefill {r['prefill_s']:.2f} s")
            print(f"engine, mixed, {'through the table' if reads_table else 'gather'}: {r['tokens_per_s']:.1f} tok/s, "
                  f"{r['decode_steps']} engine steps: {where}, other {r['other_s']:.2f} s of {r['wall_s']:.2f} s")
        out["engine_tokens_equal"] = runs[0]["tokens"] == runs[1]["tokens"]
        for r in runs:
            del r["tokens"]
        out["engine"] = runs
        print(f"engine greedy tokens equal: {out['engine_tokens_equal']}")
    write_result(a.output, out)


if __name__ == "__main__":
    main()
