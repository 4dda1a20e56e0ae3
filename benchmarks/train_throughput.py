"""Training throughput: llamaworks vs transformers' LlamaForCausalLM, same weights, same run.

    .venv/bin/python benchmarks/train_throughput.py              # config A, batch 8 x 512, fp32
    .venv/bin/python benchmarks/train_throughput.py --no-compile --no-memory --steps 5

One training step is: forward, loss, backward, gradient clipping to norm 1.0 (section 2.3),
AdamW step, zero_grad. Both sides start from the same weights (llamaworks' build_model(seed)
copied into LlamaForCausalLM with to_hf_state_dict), train on the same random batch, with the
same optimizer: torch's AdamW with the paper's hyper-parameters (0.9, 0.95, weight decay 0.1 on
the matrices only, lr 3e-4), built by llamaworks' build_optimizer for both, which picks the
fused kernel (also transformers Trainer's default optimizer, `adamw_torch_fused`, on
torch >= 2.8). transformers runs with sdpa attention and its own causal-LM loss; llamaworks
with its training loss (train/loss.py). The first step's losses of all variants are compared.

Timing: the variants are interleaved round-robin in one process (one step of each in turn),
so that a change of background load hits all of them alike; --warmup rounds are dropped
(they include torch.compile's compilation), the figure is the median of --steps rounds.
MFU = tokens/s * FLOPs/token / peak, FLOPs/token = 6 N (N: matmul parameters, output layer
included, input embedding excluded) + 12 L d T (attention scores), as llamaworks.plan (PaLM's
model-FLOPs convention: no recomputation counted, no causal halving); the peak is
llamaworks' measure_peak_flops (a 2048 x 2048 fp32 torch.mm), taken before and after the
timed steps, the higher one used.

Memory: for each activation-checkpointing policy a fresh subprocess builds the model and
optimizer, runs one step on a single sequence (which creates the AdamW state) and one on the
full batch; it reports its peak resident set size (VmHWM, reached in the full step) and its
RSS just before that step (weights, AdamW state, Python and torch themselves), the difference
being what a step adds (activations, gradients, temporaries). The children run with glibc's
MALLOC_MMAP_THRESHOLD_ fixed at 1 MiB, so every large tensor is mmap'ed and handed back to
the OS when freed: RSS then follows live memory rather than what malloc keeps cached. The
same is done for transformers (no checkpointing). Their step times are not reported (the
mmap threshold makes allocation slower).

Prints a table and writes JSON (benchmarks/results/train_throughput.json by default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import add_label_argument, machine_record  # benchmarks/ is on sys.path

from llamaworks.model import ModelArgs, build_model, count_parameters
from llamaworks.parallel.parallelize import apply_ac, apply_compile
from llamaworks.plan import flops_per_token, matmul_parameters
from llamaworks.train.config import OptimConfig
from llamaworks.train.loss import lm_loss
from llamaworks.train.metrics_log import measure_peak_flops
from llamaworks.train.optim import build_optimizer

# "Config A" of the issue tracker: about 60M parameters, the shape of the paper's models.
CONFIG_A = dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000, multiple_of=256, max_seq_len=2048)
# --smoke: a model small enough that the whole script runs in seconds (tests/test_benchmarks.py).
CONFIG_SMOKE = dict(dim=64, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=128)


def config(a) -> dict:
    return CONFIG_SMOKE if a.smoke else CONFIG_A
MIB = 2**20


def build_llamaworks(args: ModelArgs, seed: int, ac: str = "none", compile: bool = False):
    model = build_model(args, seed=seed)
    apply_ac(model, ac)
    if compile:
        apply_compile(model)
    return model.train()


def build_transformers(args: ModelArgs, seed: int, compile: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamaworks.convert.hf import hf_config_dict, to_hf_state_dict

    cfg = LlamaConfig(**hf_config_dict(args))
    cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(cfg)
    src = build_model(args, seed=seed)
    hf.load_state_dict(to_hf_state_dict(src.state_dict(), args))
    if compile:
        for layer in hf.model.layers:  # block by block, as llamaworks' apply_compile
            layer.compile()
    return hf.train()


def llamaworks_loss(model, x, y):
    return lm_loss(model, x, y)


def transformers_loss(hf, x, y):
    logits = hf(input_ids=x).logits
    # What LlamaForCausalLM(labels=...) does, with the targets given already shifted.
    return hf.loss_function(logits, None, hf.config.vocab_size, shift_labels=y)


def llamaworks_unfused_loss(model, x, y):
    return lm_loss(model, x, y, fused=False)  # logits, then F.cross_entropy


class Variant:
    def __init__(self, name, model, loss_fn, optim_cfg: OptimConfig, clip: float, optimizer=None):
        self.name, self.model, self.loss_fn, self.clip = name, model, loss_fn, clip
        self.optimizer = optimizer or build_optimizer(model, optim_cfg)
        self.times: list[float] = []
        self.losses: list[float] = []

    clock = time.perf_counter

    def step(self, x, y) -> float:
        t0 = self.clock()
        loss = self.loss_fn(self.model, x, y)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        dt = self.clock() - t0
        self.losses.append(value)
        return dt


def random_batch(args: ModelArgs, batch: int, seq_len: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, args.vocab_size, (batch, seq_len + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def proc_status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(a) -> None:
    """A fresh process per policy: a one-sequence step, then a full step; peak RSS and the RSS between."""
    args = ModelArgs(**config(a))
    if a.memory_child == "transformers":
        v = Variant("transformers", build_transformers(args, a.seed), transformers_loss, optim_cfg(a), a.clip)
    else:
        v = Variant(a.memory_child, build_llamaworks(args, a.seed, ac=a.memory_child), llamaworks_loss,
                    optim_cfg(a), a.clip)
    x, y = random_batch(args, a.batch, a.seq_len, a.seed)
    v.step(x[:1], y[:1])  # one sequence: creates the AdamW state, at an eighth of the cost of a step
    before = proc_status_bytes("VmRSS")
    v.step(x, y)
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across fork
    # and exec, so a child of a big process would report the parent's peak.
    peak = proc_status_bytes("VmHWM")
    print(json.dumps({"policy": a.memory_child, "peak_rss": peak, "rss_before_step": before,
                      "loss": v.losses[-1]}))


def run_memory_children(a, policies: list[str]) -> dict:
    out = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 * MIB))
    for policy in policies:
        cmd = [sys.executable, __file__, "--memory-child", policy, "--batch", str(a.batch), "--seq-len",
               str(a.seq_len), "--seed", str(a.seed), "--clip", str(a.clip), "--lr", str(a.lr)]
        cmd += ["--smoke"] if a.smoke else []
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if res.returncode:
            raise RuntimeError(f"memory run for {policy} failed:\n{res.stderr[-3000:]}")
        out[policy] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def make_variant(name: str, args: ModelArgs, a) -> Variant:
    """Variants by name; the ones after the first four are ablations (--extra)."""
    oc = optim_cfg(a)
    if name in ("transformers", "transformers+compile"):
        return Variant(name, build_transformers(args, a.seed, compile=name.endswith("compile")), transformers_loss,
                       oc, a.clip)
    if name in ("llamaworks", "llamaworks+compile"):
        return Variant(name, build_llamaworks(args, a.seed, compile=name.endswith("compile")), llamaworks_loss,
                       oc, a.clip)
    if name == "llamaworks-unfused-loss":  # the logits -> F.cross_entropy path
        return Variant(name, build_llamaworks(args, a.seed), llamaworks_unfused_loss, oc, a.clip)
    if name in ("llamaworks-ac-selective", "llamaworks-ac-full"):
        return Variant(name, build_llamaworks(args, a.seed, ac=name.rsplit("-", 1)[1]), llamaworks_loss, oc, a.clip)
    if name in ("transformers-foreach-adamw", "transformers-forloop-adamw"):
        # torch's other AdamW implementations, same hyper-parameters: `torch.optim.AdamW(params)` on CPU
        # is the for-loop one; foreach=True was llamaworks' choice before the fused kernel.
        from llamaworks.train.optim import param_groups

        hf = build_transformers(args, a.seed)
        opt = torch.optim.AdamW(param_groups(hf, oc.weight_decay), lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps,
                                foreach=name == "transformers-foreach-adamw")
        return Variant(name, hf, transformers_loss, oc, a.clip, optimizer=opt)
    raise SystemExit(f"unknown variant {name!r}")


def adamw_kind(opt: torch.optim.Optimizer) -> str:
    d = opt.defaults
    return "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for-loop"


def optim_cfg(a) -> OptimConfig:
    return OptimConfig(lr=a.lr)  # betas (0.9, 0.95), eps 1e-8, weight decay 0.1: the paper's


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (compilation happens there)")
    ap.add_argument("--steps", type=int, default=3, help="timed rounds; the figure is their median")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: none)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time llamaworks and transformers with torch.compile (block by block)")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                    help="peak memory per activation-checkpointing policy (one subprocess each)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: time steps by this process's CPU time; with --threads 1 this is robust to other "
                    "jobs on a shared machine (a development aid: the figures to quote are wall-clock)")
    ap.add_argument("--extra", default="", help="comma-separated extra variants: llamaworks-unfused-loss, "
                    "llamaworks-ac-selective, llamaworks-ac-full, transformers-foreach-adamw, "
                    "transformers-forloop-adamw")
    ap.add_argument("--out", default=None, help="JSON results (default benchmarks/results/train_throughput.json)")
    ap.add_argument("--smoke", action="store_true", help="a check that the script runs: a 2-layer model of width "
                    "64, batch 2 x 32, 1 step, no compile, no memory runs, no JSON unless --out is given")
    add_label_argument(ap)
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.smoke:
        a.batch, a.seq_len, a.warmup, a.steps, a.compile, a.memory = 2, 32, 0, 1, False, False
    elif a.out is None:
        a.out = "benchmarks/results/train_throughput.json"
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.clock == "cpu":
        Variant.clock = time.process_time
    if a.memory_child:
        return memory_child(a)

    import transformers

    t_start = time.perf_counter()
    args = ModelArgs(**config(a))
    machine = machine_record(a.label)
    n_params, n_matmul = count_parameters(args), matmul_parameters(args)
    fpt = flops_per_token(args, a.seq_len)
    tokens_per_step = a.batch * a.seq_len
    x, y = random_batch(args, a.batch, a.seq_len, a.seed)
    peaks = [measure_peak_flops(torch.device("cpu"))]

    names = ["transformers", "llamaworks"] + (["transformers+compile", "llamaworks+compile"] if a.compile else [])
    names += [n for n in a.extra.split(",") if n]
    variants = [make_variant(name, args, a) for name in names]
    for r in range(a.warmup + a.steps):
        dts = [v.step(x, y) for v in variants]
        if r >= a.warmup:
            for v, dt in zip(variants, dts):
                v.times.append(dt)
        print(f"round {r + 1}/{a.warmup + a.steps} ({'timed' if r >= a.warmup else 'warm-up'}): "
              + ", ".join(f"{v.name} {dt:.2f} s" for v, dt in zip(variants, dts)), file=sys.stderr, flush=True)
    peaks.append(measure_peak_flops(torch.device("cpu")))
    peak = max(peaks)
    memory = run_memory_children(a, ["none", "selective", "full", "transformers"]) if a.memory else {}

    results = {}
    for v in variants:
        med = statistics.median(v.times)
        results[v.name] = {"step_s": med, "tokens_per_s": tokens_per_step / med,
                           "mfu": tokens_per_step / med * fpt / peak, "step_times": v.times,
                           "first_loss": v.losses[0], "losses": v.losses, "optimizer": adamw_kind(v.optimizer)}
    base = results["transformers"]["tokens_per_s"]
    ref_loss = results["transformers"]["first_loss"]
    for r in results.values():
        r["vs_transformers"] = r["tokens_per_s"] / base
        r["first_loss_diff"] = r["first_loss"] - ref_loss
    same_loss = all(abs(r["first_loss_diff"]) < 1e-4 for r in results.values())

    print(f"training throughput: config {'smoke' if a.smoke else 'A'} ({n_params / 1e6:.1f}M parameters), "
          f"batch {a.batch} x {a.seq_len} tokens, fp32, AdamW (0.9, 0.95), wd 0.1, "
          f"{adamw_kind(variants[1].optimizer)}, clip {a.clip}; "
          f"{torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; {machine['cpu_model']}, "
          f"{machine['label']}")
    print(f"FLOPs/token = 6N + 12LdT = {fpt / 1e6:.1f}M (N = {n_matmul / 1e6:.2f}M matmul parameters); "
          f"measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s; median of {a.steps} interleaved steps after "
          f"{a.warmup} warm-up")
    w = max(22, 2 + max(map(len, results)))
    print(f"{'implementation':<{w}}{'step s':>8}{'tokens/s':>10}{'MFU':>8}{'vs transformers':>17}{'first loss':>12}")
    for k, r in results.items():
        print(f"{k:<{w}}{r['step_s']:>8.2f}{r['tokens_per_s']:>10.1f}{r['mfu']:>8.1%}{r['vs_transformers']:>16.2f}x"
              f"{r['first_loss']:>12.5f}")
    print(f"first-step losses agree within 1e-4: {same_loss}")
    if memory:
        ref = memory.get("none", {}).get("loss")
        memory_same_loss = all(abs(m["loss"] - ref) < 1e-4 for m in memory.values()) if ref is not None else None
        print("peak memory (a fresh process each; RSS includes Python and torch):")
        print(f"{'activation checkpointing':<26}{'peak RSS MiB':>14}{'before step MiB':>17}{'step adds MiB':>15}")
        for k, m in memory.items():
            label = "transformers (none)" if k == "transformers" else f"llamaworks {k}"
            print(f"{label:<26}{m['peak_rss'] / MIB:>14.0f}{m['rss_before_step'] / MIB:>17.0f}"
                  f"{(m['peak_rss'] - m['rss_before_step']) / MIB:>15.0f}")
        print(f"(all of them compute the same loss within 1e-4: {memory_same_loss})")
    if a.out is None:
        return
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "config": config(a), "params": n_params, "matmul_params": n_matmul, "batch": a.batch, "seq_len": a.seq_len,
        "tokens_per_step": tokens_per_step, "dtype": "float32", "flops_per_token": fpt,
        "flops_formula": "6*N_matmul + 12*n_layers*dim*seq_len", "peak_flops": peak, "peak_flops_runs": peaks,
        "optimizer": {"name": "torch.optim.AdamW", "lr": a.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                      "weight_decay": 0.1, "decay_groups": "dim >= 2 (norm gains exempt)"},
        "clip": a.clip, "clock": a.clock, "warmup_rounds": a.warmup, "timed_rounds": a.steps,
        "timing": "interleaved round-robin, median of the timed rounds", "memory_measure": "VmHWM of a fresh "
        "process (MALLOC_MMAP_THRESHOLD_=1MiB), and VmRSS before the full-batch step",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "machine": machine, "results": results, "first_losses_agree": same_loss, "memory": memory,
        "wall_s": time.perf_counter() - t_start,
    }, indent=2) + "\n")
    print(f"wrote {out} ({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
