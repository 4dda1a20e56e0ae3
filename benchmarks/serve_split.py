"""Where the serving engine's time goes on benchmarks/serve.py's mixed workload (issue 18), by
phase, in process (no HTTP), with the engine's one pass per step (engine._ragged_step).

    .venv/bin/python benchmarks/serve_split.py --dtype bf16 --label contended
    .venv/bin/python benchmarks/serve_split.py --dtype bf16 --ab --rounds 3 --label contended
    .venv/bin/python benchmarks/serve_split.py --smoke --output /tmp/split.json

Random weights of --preset (serve.py's "small"), loaded as `llamaworks serve --dtype` loads them
(fused projections, native kernels, huge pages), an engine of --max-batch rows; --requests requests at once,
every --long-every'th a --long-tokens prompt (the first of each run, serve.py's order), the rest
--short-tokens; --max-tokens each, greedy. Each engine step is one forward pass, timed as a
"prompt" pass (it holds prompt tokens, and usually the decoding rows' too) or a "decode" pass
(decoding rows only), split into:
  products           every linear layer (fused q/k/v, wo, w1/w3, w2, output), with GFLOP/s
  prefill_attention  runs longer than 8 tokens (paged.prefill_attention: the native kernel)
  paged_attention    runs of up to 8 tokens (decoding rows: llamaworks::paged_attention)
  ragged_rest        the rest of paged.ragged_attention (slicing the groups, copying outputs)
  rope_cache_write   RoPE of q and k and the pool write (rope_update, or apply_rotary_emb + write)
  norms              RMSNorm
  pass_rest          the rest of the pass: embedding, SwiGLU's product, residuals, Python between
and, per step: sampling (engine._sample_slots) and step_python (the step outside the pass and
sampling: planning, the table and tensors, accepting tokens, events); idle is the wall time
outside any step (the engine thread waiting, admission). Wrappers cost ~1 us a call.
Times are wall seconds of the engine thread (the operators run on --threads threads); the
process's CPU seconds are recorded beside them.

--ab: the same workload with session 13's and 17's changes off too (LLAMAWORKS_PREFILL_DOT=0: bf16
prefill attention widened to fp32 instead of vdpbf16ps; rope_in_one off: RoPE and the pool
write as separate operators, and so a decode pass through the modules instead of one native call,
llamaworks::decode_step_paged, which needs rope_in_one), --rounds rounds alternating on and off,
so that both see the same machine drift: compare only within one run. Greedy tokens are compared (in bf16 the dot
products round the probabilities, so random weights' flat logits can pick other tokens).
JSON: benchmarks/results/serve_split.json (--output), with the machine (benchmarks/machine.py).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

import torch
from engine_fixtures import NullTokenizer, mixed_requests  # benchmarks/ is on sys.path
from machine import add_label_argument, machine_record, write_result
from torch.utils._python_dispatch import TorchDispatchMode

import llamaworks.model
from llamaworks.inference import paged
from llamaworks.inference.block import use_native_blocks
from llamaworks.inference.fuse import fuse_projections
from llamaworks.inference.hugepages import use_hugepages
from llamaworks.inference.kernels import use_native_kernels
from llamaworks.inference.threads import run_in_own_thread
from llamaworks.model import ModelArgs, RMSNorm, build_model
from llamaworks.serve.engine import Engine, Request

PRESETS = {"small": dict(ModelArgs.from_name("small").to_params(), max_seq_len=2176),
           "tiny": dict(ModelArgs.from_name("tiny").to_params(), max_seq_len=512)}
PARTS = ("products", "prefill_attention", "paged_attention", "ragged_rest", "rope_cache_write", "norms")


def make_model(preset: str, dtype: torch.dtype):
    # build_model recomputes the RoPE table in fp32 after the cast, as serve's loading does
    model = build_model(ModelArgs(**PRESETS[preset]), seed=0, dtype=dtype).eval()  # serve --dtype
    fuse_projections(model)
    if use_native_kernels(model):
        use_native_blocks(model)  # as load_model: a decode pass as one native call (decode_step_paged)
    use_hugepages(model)  # as load_model: the weights in 2 MiB pages (inference/hugepages.py)
    return model


class OpCounter(TorchDispatchMode):
    """Counts the aten operators a pass dispatches (views included), per pass kind."""

    def __init__(self, counts: collections.Counter, kind: str):
        super().__init__()
        self.counts, self.kind = counts, kind

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[(self.kind, str(func.overloadpacket))] += 1
        return func(*args, **(kwargs or {}))


class Split:
    """Seconds per (pass kind, part), from wrappers around the engine's and the model's calls."""

    def __init__(self, eng: Engine, count_ops: bool = False):
        self.eng = eng
        self.count_ops = count_ops
        self.ops: collections.Counter = collections.Counter()  # (kind, operator) -> calls, with count_ops
        self.kind = "decode"
        self.t: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()
        self.flop: dict[str, float] = collections.defaultdict(float)
        self.passes: collections.Counter = collections.Counter()
        self.tokens: collections.Counter = collections.Counter()
        self.undo: list = []

    def reset(self) -> None:
        for d in (self.t, self.calls, self.flop, self.passes, self.tokens, self.ops):
            d.clear()

    def wrap(self, name: str, fn, flop=None):
        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.t[f"{self.kind}.{name}"] += time.perf_counter() - t0
                self.calls[f"{self.kind}.{name}"] += 1
                if flop is not None:
                    self.flop[self.kind] += flop(*args)
        return wrapper

    def patch(self, owner, attr: str, name: str, flop=None, instance: bool = False) -> None:
        real = getattr(owner, attr)
        setattr(owner, attr, self.wrap(name, real, flop))
        self.undo.append((owner, attr, None if instance else real))

    def install(self) -> None:
        eng, model = self.eng, self.eng.model
        forward = eng.runner.forward

        def pass_(tokens, pos, rows=None, last=None):
            decoding = sum(1 for s in eng._slots if s is not None and s.ready)
            self.kind = "decode" if tokens.shape[-1] == decoding else "prompt"
            self.passes[self.kind] += 1
            self.tokens[self.kind] += tokens.numel()
            if self.count_ops:  # in the engine's thread: dispatch modes are per thread
                with OpCounter(self.ops, self.kind):
                    return forward(tokens, pos, rows, last)
            return self.wrap("pass", forward)(tokens, pos, rows, last)
        eng.runner.forward = pass_
        self.undo.append((eng.runner, "forward", None))
        self.patch(eng, "_ragged_step", "step", instance=True)
        self.patch(eng, "_sample_slots", "sampling", instance=True)
        for name in ("prefill_attention", "paged_read", "ragged_attention"):
            self.patch(paged, name, {"paged_read": "paged_attention", "ragged_attention": "ragged"}.get(name, name))
        self.patch(llamaworks.model, "apply_rotary_emb", "rope_cache_write")
        for m in model.modules():
            if isinstance(m, RMSNorm):
                self.patch(m, "forward", "norms", instance=True)
            elif hasattr(m, "in_features") and hasattr(m, "out_features"):  # float, native or quantised linear
                self.patch(m, "forward", "products", lambda x, m=m: 2.0 * x.numel() * m.out_features, instance=True)
        for layer in model.layers:
            cache = layer.attention.kv_cache
            self.patch(cache, "rope_update", "rope_cache_write", instance=True)
            self.patch(cache, "write", "rope_cache_write", instance=True)

    def uninstall(self) -> None:
        for owner, attr, real in reversed(self.undo):
            if real is None:
                owner.__dict__.pop(attr, None)  # the instance's wrapper: the class's method again
            else:
                setattr(owner, attr, real)
        self.undo.clear()

    def report(self, wall: float) -> dict:
        out: dict = {}
        steps = 0.0
        for kind in ("prompt", "decode"):
            t = {k.split(".", 1)[1]: v for k, v in self.t.items() if k.startswith(kind + ".")}
            parts = {p: t.get(p, 0.0) for p in PARTS}
            parts["ragged_rest"] = t.get("ragged", 0.0) - parts["prefill_attention"] - parts["paged_attention"]
            parts["pass_rest"] = t.get("pass", 0.0) - sum(parts.values())
            parts["sampling"] = t.get("sampling", 0.0)
            parts["step_python"] = t.get("step", 0.0) - t.get("pass", 0.0) - parts["sampling"]
            steps += t.get("step", 0.0)
            rate = self.flop[kind] / parts["products"] / 1e9 if parts["products"] else None
            out[kind] = {"passes": self.passes[kind], "tokens": self.tokens[kind], "step_s": t.get("step", 0.0),
                         "parts_s": parts, "products_gflop_per_s": rate,
                         "calls_per_pass": {k.split(".", 1)[1]: n / max(self.passes[kind], 1)
                                            for k, n in self.calls.items() if k.startswith(kind + ".")}}
            if self.count_ops:
                ops = {op: n / max(self.passes[kind], 1) for (k, op), n in self.ops.most_common() if k == kind}
                out[kind]["aten_ops_per_pass"] = {"total": sum(ops.values()), **ops}
        out["idle_s"] = wall - steps
        return out


def run_once(a, model, on: bool, count_ops: bool = False) -> dict:
    """The workload on a fresh engine with this session's changes on or off; its split and tokens
    (count_ops: the aten operators of each pass counted instead, an untimed run)."""
    eng = run_in_own_thread(Engine, model, NullTokenizer(model.args.vocab_size), max_batch=a.max_batch, max_queue=256)
    assert eng._ragged, "the one-pass step is off here (it needs the CPU and the paged prefill)"
    for layer in model.layers:
        layer.attention.kv_cache.rope_in_one = on
    if on:
        os.environ.pop("LLAMAWORKS_PREFILL_DOT", None)
    else:
        os.environ["LLAMAWORKS_PREFILL_DOT"] = "0"
    reqs = mixed_requests(model.args.vocab_size, a.requests, a.short_tokens, a.long_tokens, a.long_every,
                          a.max_tokens, long_first=True)
    split = Split(eng, count_ops)
    split.install()
    eng.start()
    try:
        eng.complete(Request([1, 5, 9], 4, stop_ids=()), timeout=600)  # warm-up, not counted
        split.reset()
        steps0, cpu0, t0 = eng.metrics.steps, time.process_time(), time.perf_counter()
        for r in reqs:
            eng.submit(r)
        for r in reqs:
            while r.finish_reason is None:
                time.sleep(0.002)
        wall, cpu, steps = time.perf_counter() - t0, time.process_time() - cpu0, eng.metrics.steps - steps0
    finally:
        eng.stop(cancel=True, timeout=60)
        split.uninstall()
        os.environ.pop("LLAMAWORKS_PREFILL_DOT", None)
    gen = sum(len(r.tokens) for r in reqs)
    return {"changes_on": on, "wall_s": wall, "process_cpu_s": cpu, "generated_tokens": gen,
            "tokens_per_s": gen / wall, "decode_steps": steps, "split": split.report(wall),
            "tokens": [r.tokens for r in reqs]}


def show(r: dict) -> None:
    s = r["split"]
    print(f"changes {'on ' if r['changes_on'] else 'off'}: {r['tokens_per_s']:.1f} tok/s, wall {r['wall_s']:.2f} s, "
          f"process CPU {r['process_cpu_s']:.2f} s, idle {s['idle_s']:.2f} s")
    for kind in ("prompt", "decode"):
        k = s[kind]
        parts = ", ".join(f"{p} {v * 1e3:.0f}" for p, v in k["parts_s"].items())
        rate = f", products {k['products_gflop_per_s']:.0f} GFLOP/s" if k["products_gflop_per_s"] else ""
        print(f"  {kind}: {k['passes']} passes, {k['tokens']} tokens, steps {k['step_s']:.2f} s{rate}; ms: {parts}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="model and cache (serve --dtype)")
    ap.add_argument("--long-tokens", type=int, default=2049, help="serve.py's long prompt: BOS + 2048")
    ap.add_argument("--short-tokens", type=int, default=129)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--long-every", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ab", action="store_true", help="also with this session's changes off, rounds alternating")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--count-ops", action="store_true", help="first an untimed run (each way with --ab) counting "
                    "the aten operators per pass (a dispatch mode in the engine's thread)")
    ap.add_argument("--smoke", action="store_true", help="the tiny preset, a few short requests")
    ap.add_argument("--output", default="benchmarks/results/serve_split.json")
    add_label_argument(ap)
    a = ap.parse_args()
    if a.smoke:
        a.preset, a.long_tokens, a.short_tokens, a.requests, a.long_every, a.max_tokens, a.max_batch = (
            "tiny", 100, 20, 4, 2, 4, 2)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = run_in_own_thread(make_model, a.preset, dtype)  # as serve: the engine's the only OpenMP team
    runs, counted = [], {}
    with torch.no_grad():
        for on in ((True, False) if a.ab else (True,)) if a.count_ops else ():
            split = run_once(a, model, on, count_ops=True)["split"]
            name = "on" if on else "off"
            counted[name] = {kind: split[kind].get("aten_ops_per_pass") for kind in ("prompt", "decode")}
            print(f"aten operators per pass, changes {name}: "
                  + ", ".join(f"{kind} {v['total']:.0f}" for kind, v in counted[name].items() if v))
        for _ in range(a.rounds):
            for on in (True, False) if a.ab else (True,):
                runs.append(run_once(a, model, on))
                show(runs[-1])
    out = {"command": "serve_split.py " + " ".join(sys.argv[1:]), "machine": machine_record(a.label, bandwidth=False),
           "preset": a.preset, "dtype": a.dtype, "threads": torch.get_num_threads(),
           "workload": {"requests": a.requests, "long_every": a.long_every, "long_tokens": a.long_tokens,
                        "short_tokens": a.short_tokens, "max_tokens": a.max_tokens, "max_batch": a.max_batch}}
    if counted:
        out["aten_ops_per_pass"] = counted
    on = [r for r in runs if r["changes_on"]]
    off = [r for r in runs if not r["changes_on"]]
    if off:
        ratios = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(on, off)]
        out["on_over_off_tokens_per_s"] = {"per_round": ratios, "median": statistics.median(ratios)}
        out["greedy_tokens_equal_on_off"] = [x["tokens"] == y["tokens"] for x, y in zip(on, off)]
        print(f"tokens/s on / off per round: {', '.join(f'{r:.3f}' for r in ratios)}; "
              f"greedy tokens equal: {out['greedy_tokens_equal_on_off']}")
    out["tokens_equal_across_rounds"] = all(r["tokens"] == on[0]["tokens"] for r in on)
    for r in runs:
        del r["tokens"]
    out["runs"] = runs
    write_result(a.output, out)


if __name__ == "__main__":
    main()
