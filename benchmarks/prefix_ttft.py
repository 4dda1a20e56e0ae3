"""Time to first token on a shared system prompt: the engine before the paged KV cache against
the paged engine with and without prefix caching and chunked prefill (issue 18), in process,
same weights, same requests, same run.

    .venv/bin/python benchmarks/prefix_ttft.py                      # config A, 16 requests, 1k-token system prompt
    .venv/bin/python benchmarks/prefix_ttft.py --preset tiny --smoke

Workload: --requests requests submitted at once, each a shared --system-tokens system prompt
(BOS first) and a distinct --user-tokens user turn (random ids, random weights), greedy,
exactly --max-tokens new tokens (no stop ids). Every engine has --max-batch rows, so all are
admitted at once and TTFT is queueing behind other prompts' prefill plus the request's own.
"before" is the engine of --before (a commit, default the last one before the paged cache),
read from git and run on this checkout's model: the static max_batch x context cache,
each prompt prefilled whole ("--before none" skips it). --compare COMMIT adds the paged engine
with prefix caching at COMMIT (default: the last one that prefilled each prompt's rest in a
forward of its own, before short rests were batched into one pass). --no-uncached skips the
paged engine without prefix caching. Each engine is warmed up by one unrelated request first.

Reported per engine: TTFT mean/p50/p99/max, wall time for the whole batch, prompt tokens
actually prefilled (step log), and mean TTFT as a ratio of the first row's; with --repeat N,
of the engine's best turn (lowest mean TTFT) of N taken in rotation.
JSON: benchmarks/results/prefix_ttft.json with the machine (benchmarks/machine.py).
"""

from __future__ import annotations

import argparse
import queue
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
from engine_fixtures import PRESETS, NullTokenizer  # benchmarks/ is on sys.path
from machine import add_label_argument, machine_record, write_result

from llamaworks.model import ModelArgs, build_model
from llamaworks.serve.engine import Engine, Request

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "3a16adf"  # the last commit whose engine has the static cache
COMPARE = "e97222d"  # the last commit whose engine prefilled each short rest in its own forward


def engine_at(commit: str):
    """serve/engine.py at `commit`, as a module of its own; None where git does not have it (a
    shallow clone, a source tree without .git) or for "none"."""
    if commit.lower() == "none":
        return None
    try:
        src = subprocess.check_output(["git", "show", f"{commit}:src/llamaworks/serve/engine.py"], cwd=ROOT,
                                      text=True, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError):
        return None
    mod = types.ModuleType(f"engine_{commit}")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up
    exec(compile(src, f"engine.py@{commit}", "exec"), mod.__dict__)
    return mod


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def measure(name: str, engine, request_cls, prompts: list[list[int]], warm: list[int], max_tokens: int) -> dict:
    engine.start()
    try:
        engine.complete(request_cls(warm, 2, stop_ids=()), timeout=3600)
        done: queue.Queue = queue.Queue()
        reqs = [request_cls(p, max_tokens, stop_ids=(), on_event=lambda ev, q=done: ev.kind != "text" and q.put(ev))
                for p in prompts]
        log_start = len(getattr(engine, "step_log", ()))
        t0 = time.perf_counter()
        for r in reqs:
            engine.submit(r)
        events = [done.get(timeout=3600) for _ in reqs]
        wall = time.perf_counter() - t0
        assert all(ev.kind == "done" for ev in events), [ev.text for ev in events]
        ttft = [r.first_token - r.submitted for r in reqs]
        log = list(getattr(engine, "step_log", ()))[log_start:]
        prefilled = sum(e[3] - e[2] for e in log if e[0] == "prefill") if log else sum(map(len, prompts))
        row = {"engine": name, "ttft_mean_s": sum(ttft) / len(ttft), "ttft_p50_s": percentile(ttft, 0.5),
               "ttft_p99_s": percentile(ttft, 0.99), "ttft_max_s": max(ttft), "wall_s": wall,
               "prompt_tokens": sum(map(len, prompts)), "prompt_tokens_prefilled": prefilled,
               "tokens": [r.tokens for r in reqs]}
        if hasattr(engine, "stats"):
            row["stats"] = engine.stats()
        return row
    finally:
        engine.stop(cancel=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="A", choices=list(PRESETS))
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--system-tokens", type=int, default=1024)
    ap.add_argument("--user-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=256, help="the chunked row's --prefill-chunk")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--before", default=BEFORE, help="the commit whose engine is 'before' (none: skip it)")
    ap.add_argument("--compare", default=COMPARE, help="a commit whose paged engine with prefix caching is a row too "
                    "(none: no such row)")
    ap.add_argument("--no-uncached", action="store_true", help="skip the paged engine without prefix caching")
    ap.add_argument("--repeat", type=int, default=1, help="turns per engine, taken in rotation; each row is the "
                    "engine's turn with the lowest mean TTFT")
    ap.add_argument("--smoke", action="store_true", help="4 requests, 64-token system prompt")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prefix_ttft.json"))
    add_label_argument(ap)
    a = ap.parse_args()
    if a.smoke:
        a.requests, a.system_tokens, a.user_tokens, a.max_tokens = 4, 64, 8, 4
    if a.threads:
        torch.set_num_threads(a.threads)
    args = ModelArgs(**PRESETS[a.preset])
    gen = torch.Generator().manual_seed(0)
    n_ids = a.system_tokens + a.requests * a.user_tokens + 16
    ids = torch.randint(3, args.vocab_size, (n_ids,), generator=gen).tolist()
    system = [1] + ids[:a.system_tokens - 1]
    users = [ids[a.system_tokens + i * a.user_tokens:a.system_tokens + (i + 1) * a.user_tokens]
             for i in range(a.requests)]
    prompts = [system + u for u in users]
    warm = [1] + ids[-16:]
    tok = NullTokenizer(args.vocab_size)
    before = engine_at(a.before)
    context = len(prompts[0]) + a.max_tokens

    def model():
        return build_model(args, seed=0).eval()

    runs = [] if before is None else [
        (f"before ({a.before}: static cache)", lambda: before.Engine(model(), tok, max_batch=a.max_batch,
                                                                      max_seq_len=context), before.Request)]
    if before is None:
        print(f"no engine at {a.before!r} here: 'before' skipped, ratios are over the first row")
    if not a.no_uncached:
        runs.append(("paged, no prefix cache", lambda: Engine(model(), tok, max_batch=a.max_batch,
                                                              max_seq_len=context, prefix_cache=False), Request))
    compare = engine_at(a.compare)
    if compare is not None:
        runs += [(f"paged + prefix cache @{a.compare}", lambda: compare.Engine(model(), tok, max_batch=a.max_batch,
                                                                               max_seq_len=context), compare.Request)]
    runs += [
        ("paged + prefix cache", lambda: Engine(model(), tok, max_batch=a.max_batch, max_seq_len=context), Request),
        (f"paged + prefix cache + chunk {a.prefill_chunk}",
         lambda: Engine(model(), tok, max_batch=a.max_batch, max_seq_len=context, prefill_chunk=a.prefill_chunk),
         Request),
    ]
    # --repeat N: the engines take turns N times (a burst of load on a shared machine hits one
    # turn, not one engine), and each engine's row is its turn with the lowest mean TTFT.
    turns: list[list[dict]] = [[] for _ in runs]
    for rep in range(a.repeat):
        for k, (name, make, req_cls) in enumerate(runs):
            with torch.no_grad():
                turns[k].append(measure(name, make(), req_cls, prompts, warm, a.max_tokens))
            r = turns[k][-1]
            print(f"{name:40s} TTFT mean {r['ttft_mean_s']:7.3f} s  p50 {r['ttft_p50_s']:7.3f}  p99 "
                  f"{r['ttft_p99_s']:7.3f}  wall {r['wall_s']:7.2f} s  prefilled {r['prompt_tokens_prefilled']}/"
                  f"{r['prompt_tokens']} tokens  (turn {rep + 1})", flush=True)
    rows = []
    for ts in turns:
        best = dict(min(ts, key=lambda r: r["ttft_mean_s"]))
        best["ttft_mean_s_each_turn"] = [r["ttft_mean_s"] for r in ts]
        rows.append(best)
    for r in rows:
        print(f"{r['engine']:40s} best of {a.repeat}: TTFT mean {r['ttft_mean_s']:7.3f} s  p99 {r['ttft_p99_s']:7.3f}"
              f"  mean TTFT vs {rows[0]['engine']}: {rows[0]['ttft_mean_s'] / r['ttft_mean_s']:.2f}x")
    same = all(r["tokens"] == turns[0][0]["tokens"] for ts in turns for r in ts)
    print(f"greedy tokens identical across engines: {same}")
    for r in rows:
        r["ttft_mean_speedup_vs_first_row"] = rows[0]["ttft_mean_s"] / r["ttft_mean_s"]
        del r["tokens"]
    out = {"benchmark": "prefix_ttft", "preset": a.preset, "model": PRESETS[a.preset], "requests": a.requests,
           "system_tokens": a.system_tokens, "user_tokens": a.user_tokens, "max_tokens": a.max_tokens,
           "max_batch": a.max_batch, "repeat": a.repeat, "tokens_identical": same, "rows": rows,
           "machine": machine_record(a.label, bandwidth=False, threads=torch.get_num_threads())}
    write_result(a.out, out)


if __name__ == "__main__":
    main()
