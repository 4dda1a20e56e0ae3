"""LoRA fine-tuning throughput and memory: llamaworks vs PEFT + transformers, same weights, same run.

    .venv/bin/python benchmarks/finetune.py                          # configs A and B, fp32 and bf16
    .venv/bin/python benchmarks/finetune.py --configs A --steps 3    # config A only (minutes)
    .venv/bin/python benchmarks/finetune.py --configs B --steps 1 --warmup 1 --repeats 2   # B: alternating repeats
    .venv/bin/python benchmarks/finetune.py --configs B --layers 1 3 --steps 2 --qlora-configs   # B fitted to 22 layers
    .venv/bin/python benchmarks/finetune.py --configs A --precisions fp32 --profile llamaworks

What one step is, on both sides: forward, loss, backward, gradient clipping to norm 1.0,
AdamW step on the adapters, zero_grad, on one batch of --batch sequences of --seq-len tokens
whose first quarter of targets is masked (an instruction's prompt: the loss covers the
response only). LoRA r=16, alpha 32, dropout --dropout (default 0.05) on the adapter's input,
adapters on every attention and MLP projection (q, k, v, o, gate, up, down), the frozen base
in fp32. fp32 runs without autocast; bf16 runs the forward under torch.autocast(bfloat16) with
the fp32 weights (what `finetune --train.dtype bfloat16` does, and transformers' Trainer with
bf16=True), the same on both sides; llamaworks' finetune then stores the frozen projections under
the adapters in bf16 once (inference/lora.py cast_frozen_base: the values autocast computes with),
where PEFT keeps them in fp32 and autocast casts them at every product.

- llamaworks: the code `llamaworks finetune --method lora` runs: the job config
  (FinetuneJobConfig), the ModelSpec that finetune builds (train/finetune.py model_spec: LoRA layers from
  inference/lora.py, the checkpoint's weights copied in), the Trainer's `build` (model,
  activation checkpointing --ac, --compile, optimizer: fused AdamW on the adapters with the
  paper's betas 0.9/0.95 and weight decay 0.1) and its `train_step` (masked loss with the fused
  output layer and cross-entropy, clipping, update).
- peft: transformers' LlamaForCausalLM (sdpa attention) with the same weights
  (convert/hf.to_hf_state_dict), PEFT's get_peft_model with the same LoraConfig, the same
  optimizer (llamaworks' build_optimizer: torch's fused AdamW, transformers' Trainer default
  `adamw_torch_fused`, the same hyper-parameters), transformers' causal-LM loss, clipping with
  torch.nn.utils.clip_grad_norm_ as transformers' Trainer does.
- qlora (memory): llamaworks `finetune --method qlora`: the blocks' projections int4
  (group-wise, quant.py; quantised one projection at a time as the weights are copied in, without
  the decode kernels' layout copies), the output layer float, the same adapters, fp32 compute by default
  (--qlora-precisions), freed memory returned as it is freed (finetune's default for qlora:
  train.keep_freed_memory unset = false, train/heap.py). Its peak is compared with fp32 LoRA's at
  the same configuration with the same allocator setting (llamaworks-nokeep: the target's ratio)
  and at LoRA's own default (the heap kept), all with activation checkpointing --qlora-ac
  (default full: QLoRA trains with gradient checkpointing, and without it the activations, the
  same for both, dominate both peaks).

Each (configuration, precision, implementation) runs in a fresh subprocess, so peaks are not
shared. By default the two implementations of one (configuration, precision) run side by side
and step in turn (round-robin), so a change in background load hits both alike. Where two copies
of the model do not fit in memory (B needs about 2 x 14 GB at fp32), or with --no-interleave, they
run one after the other in --repeats rounds (default 2) of fresh processes whose order alternates
(llamaworks, peft, then peft, llamaworks: ABBA), and the speed ratio is the geometric mean of each
round's ratio: a load that rises or falls steadily slows the first side of one round and the
second side of the next, and cancels to first order (one round alone, as before, compared the
two sides under whatever the load did in between). Each step's CPU time is recorded beside its
wall time. Timing: --warmup steps dropped, the median of --steps steps (per round).
--layers N M ...: each configuration at these depths instead of its own (B at 1 and 3 blocks fits
side by side, stepping in turn, in minutes, where B itself takes 75-95 s a step and one side at a
time). Every block is the same work at the same shapes, so each side's step time and peak memory
are a line in the depth, fixed + per_block * depth (fixed: the embedding, the output layer and the
loss, where the two sides differ most, so a shallow model's ratio alone overstates the full one);
the summary fits that line per side through the depths (least squares) and gives the speed and
memory ratios at the configuration's own depth, with the per-block ratio beside them.
Memory: VmHWM from /proc, the peak resident set size (RSS: Python and torch themselves
included); "setup" is the peak while the weights are built and copied in (two copies for a
moment on both sides), then the high-water mark is reset (/proc/self/clear_refs) and "steps" is
the peak of the training steps, the figure compared. Children run with glibc's
MALLOC_MMAP_THRESHOLD_ fixed at 1 MiB (as benchmarks/train_throughput.py's memory children), so
large tensors are returned to the OS when freed and RSS follows live memory
(--no-mmap-threshold: glibc's defaults).

Prints a table per configuration and writes JSON (benchmarks/results/finetune.json by default)
with the machine (CPU model, flags, measured read bandwidth and matmul peak, torch, transformers
and peft versions, threads, load average) and --label (e.g. "under contention").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import loadavg, machine_record, measure_bandwidth  # one machine record (benchmarks/ is on sys.path)

from llamaworks.data.sft import IGNORE_INDEX
from llamaworks.inference.lora import lora_layers
from llamaworks.model import ModelArgs, build_model, count_parameters
from llamaworks.parallel.distributed import DistEnv
from llamaworks.plan import flops_per_token
from llamaworks.train.config import CheckpointConfig, EvalConfig, HardwareConfig, LogConfig, RunConfig
from llamaworks.train.finetune import (
    FinetuneConfig,
    FinetuneJobConfig,
    FinetuneOptimConfig,
    FinetuneTrainConfig,
    model_spec,
)
from llamaworks.train.heap import keep_freed_memory, libc_name, skip_reason
from llamaworks.train.metrics_log import measure_peak_flops
from llamaworks.train.optim import build_optimizer
from llamaworks.train.trainer import DataSource, build, check_job, train_step

# The shapes of the other benchmarks (benchmarks/train_throughput.py, decode.py): "config A",
# about 60M parameters, and "config B", ~1.26B (TinyLlama's shape without GQA).
CONFIGS = {
    "A": dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000, multiple_of=256, max_seq_len=2048),
    "B": dict(dim=2048, n_layers=22, n_heads=32, vocab_size=32000, multiple_of=512, max_seq_len=2048),
}
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}


def config_args(config: str, layers: int | None = None) -> ModelArgs:
    """The ModelArgs of a configuration, with `layers` blocks instead of its own where given
    (--layers): every block is the same work at the same shapes, so a shallower model times the
    same per-block products in a fraction of the time (only the embedding, output layer and loss,
    the same at any depth, weigh more in it)."""
    return ModelArgs(**{**CONFIGS[config], **({"n_layers": layers} if layers else {})})
# llamaworks-nokeep: llamaworks with train.keep_freed_memory = false (freed memory back to the system
# each step, train/heap.py); peft-keep: PEFT in a process given the same glibc setting (equal work).
IMPLS = ("llamaworks", "llamaworks-nokeep", "peft", "peft-keep", "qlora")
RANK, ALPHA = 16, 32
LR = 2e-4  # finetune's default for adapters (QLoRA's); the same on both sides
MIB = 2**20


# --- the batch and the weights ------------------------------------------------------------------

def random_batch(args: ModelArgs, batch: int, seq_len: int, seed: int):
    """(x, y): random tokens and their next tokens, the first quarter of the targets masked."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, args.vocab_size, (batch, seq_len + 1), generator=g)
    x, y = tokens[:, :-1].clone(), tokens[:, 1:].clone()  # clones: one row's slices would share memory
    y[:, : seq_len // 4] = IGNORE_INDEX
    return x, y


class FixedLoader:
    """The Trainer's loader interface over one batch, returned at every step."""

    def __init__(self, x, y):
        self.batch = (x, y)

    def __iter__(self):
        return self

    def __next__(self):
        return self.batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# --- the two sides ------------------------------------------------------------------------------

def job_config(a, method: str, out_dir: str, keep_freed: bool | None = None) -> FinetuneJobConfig:
    """finetune's job config for this benchmark: one micro-batch per step, no validation,
    no checkpoints, the peak FLOP/s given (not measured: the Trainer only logs MFU with it)."""
    return FinetuneJobConfig(
        run=RunConfig(out_dir=out_dir),
        finetune=FinetuneConfig(checkpoint="(random weights)", data="(random batch)", method=method, lora_r=RANK,
                                lora_alpha=ALPHA, lora_dropout=a.dropout, qlora_mode="int4"),
        train=FinetuneTrainConfig(seed=a.seed, max_steps=10_000, batch_size=a.batch, micro_batch_size=a.batch,
                                  seq_len=a.seq_len, device="cpu", dtype=PRECISIONS[a.precision],
                                  compile=a.compile, activation_checkpointing=a.ac,
                                  keep_freed_memory=keep_freed),
        optim=FinetuneOptimConfig(lr=LR),
        checkpoint=CheckpointConfig(every=10_000, keep_last=1),
        eval=EvalConfig(every=0),
        log=LogConfig(every=10_000, progress=False),
        hardware=HardwareConfig(peak_flops=1e12),
    )


class LlamaworksRun:
    def __init__(self, a, args: ModelArgs, x, y, out_dir: str):
        cfg = job_config(a, "qlora" if a.child == "qlora" else "lora", out_dir,
                         False if a.child == "llamaworks-nokeep" else None)  # None: finetune's default
        self.keeps_freed = cfg.train.keep_freed_memory and skip_reason(os.environ, libc_name()) is None
        if not cfg.train.keep_freed_memory:
            # As the trainer does before the weights are filled in; here before this stand-in for the
            # checkpoint (finetune maps a checkpoint's file, this builds it in the heap's reach).
            keep_freed_memory(False)
        state = build_model(args, seed=a.seed).state_dict()
        dims = check_job(cfg, args.n_heads)
        data = DataSource(None, lambda rank, world: FixedLoader(x, y), None, masked=True)
        self.trainer = build(cfg, False, dims, DistEnv(), torch.device("cpu"), data,
                             model_spec(cfg, args, state, f"{cfg.finetune.method} benchmark"), 10_000, 0)
        del state
        self.model = self.trainer.model
        assert lora_layers(self.model), "finetune's ModelSpec added no LoRA layers"

    def step(self) -> float:
        return train_step(self.trainer).loss


class PeftRun:
    def __init__(self, a, args: ModelArgs, x, y, out_dir: str):
        import peft
        from transformers import LlamaConfig, LlamaForCausalLM

        # peft-keep: the glibc setting llamaworks' trainer makes (train/heap.py), which any process can make.
        self.keeps_freed = keep_freed_memory() if a.child == "peft-keep" else False

        from llamaworks.convert.hf import hf_config_dict, to_hf_state_dict

        cfg = LlamaConfig(**hf_config_dict(args))
        cfg._attn_implementation = "sdpa"
        cfg.use_cache = False
        torch.manual_seed(a.seed)
        hf = LlamaForCausalLM(cfg)
        hf.load_state_dict(to_hf_state_dict(build_model(args, seed=a.seed).state_dict(), args))
        lcfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=a.dropout, bias="none", task_type="CAUSAL_LM",
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"])
        self.model = peft.get_peft_model(hf, lcfg).train()
        self.hf = hf
        if a.ac != "none":  # transformers has one policy: recompute each decoder layer
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            hf.enable_input_require_grads()
        if a.compile:
            for layer in hf.model.layers:  # block by block, as llamaworks' apply_compile
                layer.compile()
        self.optimizer = build_optimizer(self.model, FinetuneOptimConfig(lr=LR))
        self.x, self.y = x, y
        self.amp_dtype = torch.bfloat16 if a.precision == "bf16" else None

    def step(self) -> float:
        with torch.autocast("cpu", dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.model(input_ids=self.x, use_cache=False).logits
            # What LlamaForCausalLM(labels=...) computes, the targets given already shifted.
            loss = self.hf.loss_function(logits, None, self.hf.config.vocab_size, shift_labels=self.y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


# --- the child process ----------------------------------------------------------------------------

def proc_status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def emit(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def child(a) -> None:
    """One implementation at one (config, precision): set up, then one step per 'step' line on
    stdin, answering each with its time and loss; 'end' answers with the peaks and exits."""
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    args = config_args(a.config, a.layers[0] if a.layers else None)
    x, y = random_batch(args, a.batch, a.seq_len, a.seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as tmp:
        run = PeftRun(a, args, x, y, tmp) if a.child.startswith("peft") else LlamaworksRun(a, args, x, y, tmp)
        setup_s = time.perf_counter() - t0
        trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        peak_setup, rss_ready = proc_status_bytes("VmHWM"), proc_status_bytes("VmRSS")
        reset = reset_peak()
        emit({"ready": True, "setup_s": setup_s, "trainable": trainable, "peak_setup": peak_setup,
              "rss_ready": rss_ready, "peak_reset": reset, "keeps_freed_memory": run.keeps_freed})
        prof = None
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "end":
                break
            if cmd == "profile":
                from torch.profiler import ProfilerActivity, profile

                prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
                prof.__enter__()
            t, c, u0 = clock(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
            loss = run.step()
            dt, cpu, u1 = clock() - t, time.process_time() - c, resource.getrusage(resource.RUSAGE_SELF)
            if prof is not None:
                prof.__exit__(None, None, None)
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.profile_rows)
                sys.stderr.write(f"--- profile of one {a.child} step ({a.config} {a.precision}) ---\n{table}\n")
                prof = None
            # Where the CPU time went: the kernel's share (page faults: zeroing and mapping) and the faults.
            emit({"dt": dt, "cpu_s": cpu, "loss": loss, "user_s": u1.ru_utime - u0.ru_utime,
                  "sys_s": u1.ru_stime - u0.ru_stime, "minflt": u1.ru_minflt - u0.ru_minflt,
                  "majflt": u1.ru_majflt - u0.ru_majflt})
        emit({"peak_steps": proc_status_bytes("VmHWM"), "rss_end": proc_status_bytes("VmRSS")})


class Child:
    def __init__(self, impl: str, config: str, precision: str, a, ac: str, repeat: int = 0, layers: int | None = None):
        self.impl, self.config, self.precision, self.ac, self.repeat = impl, config, precision, ac, repeat
        self.n_layers = config_args(config, layers).n_layers
        cmd = [sys.executable, __file__, "--child", impl, "--config", config, "--precision", precision,
               "--batch", str(a.batch), "--seq-len", str(a.seq_len), "--seed", str(a.seed), "--dropout",
               str(a.dropout), "--ac", ac, "--clock", a.clock, "--profile-rows", str(a.profile_rows)]
        if a.compile:
            cmd.append("--compile")
        if layers:
            cmd += ["--layers", str(layers)]
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if a.mmap_threshold or impl in a.mmap_threshold_for:
            env["MALLOC_MMAP_THRESHOLD_"] = str(1 * MIB)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info: dict = {}
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.usage: list[dict] = []  # user_s, sys_s, minflt, majflt of each timed step
        self.losses: list[float] = []

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            raise RuntimeError(f"{self.impl} {self.config} {self.precision}: the child process ended (exit code {rc})"
                               "; see its stderr above")
        return json.loads(line)

    def ready(self) -> None:
        self.info.update(self.read())

    def step(self, timed: bool, profile: bool = False) -> float:
        self.proc.stdin.write("profile\n" if profile else "step\n")
        self.proc.stdin.flush()
        r = self.read()
        self.losses.append(r["loss"])
        if timed:
            self.times.append(r["dt"])
            self.cpu_times.append(r["cpu_s"])
            self.usage.append({k: r[k] for k in ("user_s", "sys_s", "minflt", "majflt")})
        return r["dt"]

    def end(self) -> None:
        self.proc.stdin.write("end\n")
        self.proc.stdin.flush()
        self.info.update(self.read())
        self.proc.wait()


def result(runs: list[Child], tokens_per_step: int) -> dict:
    """One implementation's row from its runs (one, or one per repeat, in repeat order): the median
    over all timed steps, each repeat's median, the peaks' maximum, the first run's losses."""
    c0 = runs[0]
    times = [t for c in runs for t in c.times]
    med = statistics.median(times) if times else None
    return {"impl": c0.impl, "config": c0.config, "n_layers": c0.n_layers, "precision": c0.precision, "ac": c0.ac,
            "step_s": med,
            "tokens_per_s": tokens_per_step / med if med else None, "step_times": times,
            "step_cpu_s": [t for c in runs for t in c.cpu_times],
            "step_usage": [u for c in runs for u in c.usage],
            "keeps_freed_memory": [c.info["keeps_freed_memory"] for c in runs],
            "repeat_step_s": [statistics.median(c.times) if c.times else None for c in runs],
            "losses": c0.losses, "first_loss": c0.losses[0] if c0.losses else None,
            "trainable_params": c0.info["trainable"], "setup_s": c0.info["setup_s"],
            "peak_rss": max(c.info["peak_steps"] for c in runs),
            "peak_rss_setup": max(c.info["peak_setup"] for c in runs),
            "rss_ready": c0.info["rss_ready"], "peak_reset": all(c.info["peak_reset"] for c in runs)}


def alternating_orders(impls: list[str], repeats: int) -> list[list[str]]:
    """The order of the implementations in each of `repeats` rounds run one after the other:
    as given, then reversed, and so on (ABBA), so a steady drift of the load favours neither."""
    return [list(impls) if r % 2 == 0 else list(reversed(impls)) for r in range(repeats)]


def repeat_ratio(r: dict, p: dict) -> float:
    """r's tokens/s over p's: the geometric mean of the rounds' ratios where both ran in alternating
    rounds (repeat_step_s), else the ratio of the medians."""
    rs, ps = r.get("repeat_step_s") or [], p.get("repeat_step_s") or []
    if len(rs) > 1 and len(rs) == len(ps) and all(rs) and all(ps):
        return math.exp(statistics.fmean(math.log(b / a) for a, b in zip(rs, ps)))
    return r["tokens_per_s"] / p["tokens_per_s"]


def run_group(impls: list[str], config: str, precision: str, a, interleave: bool, ac: str | None = None,
              layers: int | None = None) -> list[dict]:
    """Run `impls` at one (config, precision): side by side in round-robin, or one after the other
    in --repeats rounds of alternating order; one result row per implementation."""
    rounds = a.warmup + a.steps
    if interleave or len(impls) == 1:
        groups = [(0, impls)]
    else:
        groups = [(rep, [i]) for rep, order in enumerate(alternating_orders(impls, a.repeats)) for i in order]
    done = []
    for rep, group in groups:
        if len(groups) > 1:
            print(f"  {config} {precision}: round {rep + 1}/{a.repeats}, {group[0]}", file=sys.stderr, flush=True)
        children = [Child(impl, config, precision, a, ac or a.ac, rep, layers) for impl in group]
        for c in children:
            c.ready()
        for r in range(rounds):
            dts = [c.step(r >= a.warmup, profile=(r == rounds - 1 and c.impl in a.profile)) for c in children]
            kind = "timed" if r >= a.warmup else "warm-up"
            depth = f" ({layers} layers)" if layers else ""
            print(f"  {config}{depth} {precision} (ac {ac or a.ac}) round {r + 1}/{rounds} ({kind}): "
                  + ", ".join(f"{c.impl} {dt:.2f} s" for c, dt in zip(children, dts)), file=sys.stderr, flush=True)
        for c in children:
            c.end()
        done += children
    return [result(sorted((c for c in done if c.impl == impl), key=lambda c: c.repeat), a.batch * a.seq_len)
            for impl in impls]


# --- the machine ----------------------------------------------------------------------------------

def mem_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fits_twice(config: str, precision: str, layers: int | None = None) -> bool:
    """Whether two implementations of `config` fit in memory side by side: an estimate, 3x the fp32
    weights each (weights, the moment both copies exist at setup, activations of 4 x 512 tokens)."""
    total = mem_total()
    return total is not None and 2 * 3 * 4 * count_parameters(config_args(config, layers)) < 0.8 * total


# --- the report -----------------------------------------------------------------------------------

def summarise(results: list[dict], a) -> dict:
    """Ratios: llamaworks / peft tokens/s and peak memory per (config, precision); qlora's peak
    over fp32 LoRA's (llamaworks) per config."""
    by = {(r["config"], r["precision"], r["impl"], r["ac"], r["n_layers"]): r for r in results}
    out = {}
    for (config, precision, impl, ac, layers), r in by.items():
        full = CONFIGS[config]["n_layers"]
        key = (f"{config} {precision}" + (f" {layers} layers" if layers != full else "")
               + (f" ac {ac}" if ac != a.ac else ""))
        for base in ("peft", "peft-keep"):
            if impl not in ("llamaworks", "llamaworks-nokeep") or (config, precision, base, ac, layers) not in by:
                continue
            p = by[(config, precision, base, ac, layers)]
            # llamaworks vs peft keeps its old key; the allocator variants (IMPLS) are named.
            pair = "" if (impl, base) == ("llamaworks", "peft") else f" {impl} vs {base}"
            out[key + pair] = {
                "speedup_vs_peft": repeat_ratio(r, p),
                "speedup_rounds": [b / a for a, b in zip(r["repeat_step_s"], p["repeat_step_s"])]
                if len(r["repeat_step_s"]) > 1 else None,
                "memory_vs_peft": r["peak_rss"] / p["peak_rss"],
                "first_loss_diff": r["first_loss"] - p["first_loss"],
                "target_speed_1.3x": repeat_ratio(r, p) >= 1.3,
                "target_memory_no_more": r["peak_rss"] <= p["peak_rss"],
            }
        # QLoRA (finetune's default for it: freed memory returned, train/heap.py) against fp32 LoRA with
        # the same allocator setting (llamaworks-nokeep): the target; and against fp32 LoRA's default
        # (the heap kept for speed), what a user comparing the two methods' defaults sees.
        for lora, suffix in (("llamaworks-nokeep", ""), ("llamaworks", "_kept_heap")):
            if impl != "qlora" or (config, "fp32", lora, ac, layers) not in by:
                continue
            f = by[(config, "fp32", lora, ac, layers)]
            ratio = r["peak_rss"] / f["peak_rss"]
            entry = out.setdefault(f"{config} qlora-int4 {precision}" + (f" {layers} layers" if layers != full else "")
                                   + f" ac {ac}", {})
            entry[f"peak_vs_fp32_lora{suffix}"] = ratio
            if not suffix:
                entry["target_at_most_45pct"] = ratio <= 0.45
            entry[f"first_loss_diff_vs_fp32_lora{suffix}"] = r["first_loss"] - f["first_loss"]
    # Several depths of one configuration: each side's step time and peak memory as a line in the
    # depth (the embedding, output layer and loss, then the same work per block), extrapolated to
    # the configuration's own depth.
    groups: dict = {}
    for (config, precision, impl, ac, layers), r in by.items():
        groups.setdefault((config, precision, ac), {}).setdefault(impl, {})[layers] = r
    for (config, precision, ac), sides in groups.items():
        lw, pf = sides.get("llamaworks", {}), sides.get("peft", {})
        depths = sorted(set(lw) & set(pf))
        full = CONFIGS[config]["n_layers"]
        if len(depths) < 2 or full in depths:
            continue
        t_lw = depth_fit(depths, [lw[n]["step_s"] for n in depths])
        t_pf = depth_fit(depths, [pf[n]["step_s"] for n in depths])
        if t_lw[1] <= 0 or t_pf[1] <= 0:  # noise larger than a block's time: no extrapolation
            out[f"{config} {precision} at {full} layers"] = {"fit": "deeper model not slower: too noisy to fit"}
            continue
        m_lw = depth_fit(depths, [lw[n]["peak_rss"] for n in depths])
        m_pf = depth_fit(depths, [pf[n]["peak_rss"] for n in depths])

        def at(fit, full=full):
            return fit[0] + full * fit[1]

        out[f"{config} {precision} at {full} layers, fitted from {depths}" + (f" ac {ac}" if ac != a.ac else "")] = {
            "speedup_vs_peft": at(t_pf) / at(t_lw),
            "speedup_per_block": t_pf[1] / t_lw[1],
            "memory_vs_peft": at(m_lw) / at(m_pf),
            "step_s_llamaworks": at(t_lw), "step_s_peft": at(t_pf),
            "peak_rss_llamaworks": at(m_lw), "peak_rss_peft": at(m_pf),
            "fixed_s_llamaworks": t_lw[0], "fixed_s_peft": t_pf[0],
            "block_s_llamaworks": t_lw[1], "block_s_peft": t_pf[1],
            "target_speed_1.3x": at(t_pf) / at(t_lw) >= 1.3,
            "target_memory_no_more": at(m_lw) <= at(m_pf),
        }
    return out


def depth_fit(depths: list[int], values: list[float]) -> tuple[float, float]:
    """(fixed, per_block): the least-squares line value = fixed + per_block * depth through the
    measurements at >= 2 depths. A block is the same work at any depth, so a configuration's
    full-depth step time (or peak memory) is fixed + per_block * n_layers; the fixed part
    (embedding, output layer, loss) weighs more in a shallow model, which is why a ratio
    measured at a reduced depth alone is not the full-depth ratio."""
    if len(depths) < 2 or len(set(depths)) != len(depths) or len(values) != len(depths):
        raise ValueError(f"depth_fit needs >= 2 distinct depths with one value each, got {depths} and {values}")
    mx, my = statistics.fmean(depths), statistics.fmean(values)
    slope = (sum((x - mx) * (y - my) for x, y in zip(depths, values))
             / sum((x - mx) ** 2 for x in depths))
    return my - slope * mx, slope


def print_table(config: str, results: list[dict], a, fpt: float) -> None:
    rows = [r for r in results if r["config"] == config]
    if not rows:
        return
    peft = {(r["precision"], r["ac"], r["n_layers"]): r for r in rows if r["impl"] == "peft"}
    peft_mem = {k: r["peak_rss"] for k, r in peft.items()}
    # QLoRA's memory against fp32 LoRA's with the same allocator setting (freed memory returned) where run.
    fp32_lora = {(r["ac"], r["n_layers"]): r["peak_rss"] for lora in ("llamaworks", "llamaworks-nokeep")
                 for r in rows if r["impl"] == lora and r["precision"] == "fp32"}
    n = count_parameters(config_args(config))
    print(f"\nconfig {config} ({n / 1e6:.0f}M parameters at {CONFIGS[config]['n_layers']} layers), "
          f"batch {a.batch} x {a.seq_len}, LoRA r={RANK} alpha={ALPHA} "
          f"dropout {a.dropout}, every projection; activation checkpointing {a.ac}{', compiled' if a.compile else ''}")
    print(f"{'implementation':<32}{'step s':>9}{'tokens/s':>10}{'vs peft':>9}{'peak MiB':>10}{'vs peft':>9}"
          f"{'vs fp32 LoRA':>14}{'setup peak':>12}{'first loss':>12}")
    for r in rows:
        name = f"{r['impl']} {r['precision']}" + (" int4" if r["impl"] == "qlora" else "") + \
            (f" (ac {r['ac']})" if r["ac"] != a.ac else "") + \
            (f" {r['n_layers']} layers" if r["n_layers"] != CONFIGS[config]["n_layers"] else "")
        tps, mem, k = r["tokens_per_s"], r["peak_rss"], (r["precision"], r["ac"], r["n_layers"])
        vs_t = f"{repeat_ratio(r, peft[k]):.2f}x" if r["impl"] != "peft" and k in peft else ""
        vs_m = f"{mem / peft_mem[k]:.2f}x" if r["impl"] != "peft" and k in peft_mem else ""
        fk = (r["ac"], r["n_layers"])
        vs_f = f"{mem / fp32_lora[fk]:.0%}" if r["impl"] == "qlora" and fk in fp32_lora else ""
        print(f"{name:<32}{r['step_s']:>9.2f}{tps:>10.1f}{vs_t:>9}{mem / MIB:>10.0f}{vs_m:>9}{vs_f:>14}"
              f"{r['peak_rss_setup'] / MIB:>12.0f}{r['first_loss']:>12.5f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["A", "B"], choices=list(CONFIGS),
                    help="A: ~60M (dim 512, 8 layers); B: ~1.26B (dim 2048, 22 layers)")
    ap.add_argument("--precisions", nargs="*", default=["fp32", "bf16"], choices=list(PRECISIONS),
                    help="fp32, or bf16 autocast over the fp32 weights (both sides); none: the QLoRA runs only")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run; the figure is their median")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation happens there)")
    ap.add_argument("--skip-peft", action="store_true", help="llamaworks (and qlora) only")
    ap.add_argument("--impls", nargs="+", default=["llamaworks", "peft"], choices=IMPLS[:4],
                    help="the LoRA implementations compared: llamaworks (its default: freed memory kept for the next "
                         "step, train/heap.py), llamaworks-nokeep (train.keep_freed_memory=false), peft (glibc's "
                         "defaults), peft-keep (PEFT's process given the same glibc setting as llamaworks)")
    ap.add_argument("--qlora-precisions", nargs="*", default=["fp32"], choices=list(PRECISIONS),
                    help="QLoRA int4 runs (memory against fp32 LoRA); none: no QLoRA run")
    ap.add_argument("--qlora-configs", nargs="*", default=["B"], choices=list(CONFIGS),
                    help="configs (among --configs) that get a QLoRA run (default B: the 1.26B target)")
    ap.add_argument("--qlora-ac", choices=("none", "full", "selective"), default="full",
                    help="activation checkpointing of the QLoRA run and of the fp32 LoRA run it is compared with "
                         "(default full, as QLoRA trains: without it the activations, the same for both, dominate)")
    ap.add_argument("--layers", type=int, nargs="+", default=None,
                    help="run each configuration at these depths (blocks) instead of its own: its per-block shapes "
                         "in minutes, both sides side by side in memory; with two or more depths each side's step "
                         "time and peak memory are fitted as a line in the depth and the ratios given at the "
                         "configuration's own depth (e.g. B: --layers 2 4)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout, both sides")
    ap.add_argument("--ac", choices=("none", "full", "selective"), default="none",
                    help="activation checkpointing (llamaworks' policy; transformers' gradient checkpointing, "
                         "which recomputes whole layers, for any policy but none)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each block, both sides")
    ap.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                    help="run llamaworks and peft side by side, stepping in turn (default: where two copies fit "
                         "in memory)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="rounds of fresh processes, in alternating order, where the implementations run one after "
                         "the other (not side by side); the speed ratio is the geometric mean of the rounds'")
    ap.add_argument("--mmap-threshold", action=argparse.BooleanOptionalAction, default=False,
                    help="children with MALLOC_MMAP_THRESHOLD_=1MiB (RSS follows live memory; the sessions before 12 "
                         "measured so): every block over 1 MiB is mapped afresh and faulted in at each step, and "
                         "llamaworks then leaves glibc's malloc as the environment sets it (train/heap.py)")
    ap.add_argument("--mmap-threshold-for", nargs="+", default=[], metavar="IMPL",
                    help="the 1 MiB MALLOC_MMAP_THRESHOLD_ for these implementations' children only (e.g. peft: at "
                         "config B fp32 with glibc's defaults PEFT's process grew past 24 GiB and was killed, where "
                         "at 1 MiB it peaks near 17 GiB)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: time steps by the child's CPU time (a development aid on a shared machine)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", nargs="*", default=[], choices=IMPLS,
                    help="print a torch.profiler table of the last step of these implementations")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--label", default="", help="recorded in the JSON, e.g. 'under contention'")
    ap.add_argument("--out", default="benchmarks/results/finetune.json")
    ap.add_argument("--child", choices=IMPLS, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config", choices=list(CONFIGS), default="A", help=argparse.SUPPRESS)
    ap.add_argument("--precision", choices=list(PRECISIONS), default="fp32", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child:
        return child(a)
    if a.steps < 1 or a.warmup < 0 or a.repeats < 1:
        ap.error("--steps and --repeats must be >= 1 and --warmup >= 0")
    if a.layers is not None and (min(a.layers) < 1 or len(set(a.layers)) != len(a.layers)):
        ap.error(f"--layers takes distinct depths >= 1, got {a.layers}")

    import peft
    import transformers

    t_start = time.perf_counter()
    load_before = loadavg()
    bandwidth = measure_bandwidth()
    peak_flops = measure_peak_flops(torch.device("cpu"))
    results: list[dict] = []
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {**machine_record(a.label or None, bandwidth=bandwidth, libraries=("peft",)),
               "fp32_matmul_peak": peak_flops, "mem_total": mem_total(), "loadavg_before": load_before}
    cpu, flags = machine["cpu_model"], machine["cpu_flags"]

    def write(done: bool) -> dict:
        """The JSON so far (rewritten after each run, so an interrupted benchmark keeps what it measured)."""
        summary = summarise(results, a)
        out.write_text(json.dumps({
            "label": a.label, "complete": done, "configs": {k: CONFIGS[k] for k in a.configs}, "layers": a.layers,
            "params": {k: count_parameters(config_args(k)) for k in a.configs},
            "batch": a.batch, "seq_len": a.seq_len, "tokens_per_step": a.batch * a.seq_len,
            "masked_targets": "first quarter of each row",
            "lora": {"r": RANK, "alpha": ALPHA, "dropout": a.dropout, "targets": "q,k,v,o,gate,up,down (wq..w3)"},
            "precision": "fp32: no autocast; bf16: torch.autocast(cpu, bfloat16) over fp32 weights, both sides",
            "optimizer": {"name": "torch.optim.AdamW (fused)", "lr": LR, "betas": [0.9, 0.95], "eps": 1e-8,
                          "weight_decay": 0.1, "clip": 1.0},
            "activation_checkpointing": a.ac, "qlora_activation_checkpointing": a.qlora_ac, "compile": a.compile,
            "warmup_steps": a.warmup, "timed_steps": a.steps, "clock": a.clock, "repeats_when_sequential": a.repeats,
            "malloc_mmap_threshold": "1MiB" if a.mmap_threshold else "glibc default",
            "malloc_mmap_threshold_1mib_for": a.mmap_threshold_for,
            "memory_measure": "VmHWM of the training steps in a fresh process per run (reset after setup)",
            "machine": {**machine, "loadavg_now": loadavg()},
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "command": sys.argv[1:], "results": results, "summary": summary,
            "wall_s": time.perf_counter() - t_start,
        }, indent=2) + "\n")
        return summary

    def record(rows: list[dict]) -> None:
        results.extend(rows)
        write(False)

    for config in a.configs:
        for layers in a.layers or [None]:
            for precision in a.precisions:
                impls = [i for i in a.impls if not (a.skip_peft and i.startswith("peft"))]
                interleave = a.interleave if a.interleave is not None else fits_twice(config, precision, layers)
                how = "" if len(impls) == 1 else "side by side" if interleave else f"{a.repeats} alternating rounds"
                print(f"{config}{f' at {layers} layers' if layers else ''} {precision}: {', '.join(impls)} {how}",
                      file=sys.stderr, flush=True)
                record(run_group(impls, config, precision, a, interleave, layers=layers))
            if config in (a.qlora_configs or []):
                # QLoRA's memory beside fp32 LoRA's, both with activation checkpointing --qlora-ac: fp32
                # LoRA with QLoRA's allocator setting (llamaworks-nokeep: freed memory returned) and at its
                # own default (the heap kept), each where the loop above did not run it.
                done = set(impls) if a.qlora_ac == a.ac and "fp32" in a.precisions else set()
                lora = [i for i in ("llamaworks-nokeep", "llamaworks") if i not in done]
                if lora:
                    record(run_group(lora, config, "fp32", a, False, a.qlora_ac, layers))
                for precision in a.qlora_precisions:
                    record(run_group(["qlora"], config, precision, a, False, a.qlora_ac, layers))
    summary = write(True)

    print(f"\nLoRA fine-tuning: {cpu} ({', '.join(flags)}), {torch.get_num_threads()} threads, read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s, fp32 matmul peak {peak_flops / 1e9:.0f} GFLOP/s; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, peft {peft.__version__}; load average {load_before} -> {loadavg()}"
          + (f"; {a.label}" if a.label else ""))
    print(f"median of {a.steps} steps after {a.warmup} warm-up ({a.clock} clock); peak MiB: VmHWM of the training "
          "steps in a fresh process (RSS, Python and torch included)")
    for config in a.configs:
        print_table(config, results, a, flops_per_token(config_args(config), a.seq_len))
    for key, s in summary.items():
        print(f"{key}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()))
    print(f"wrote {out} ({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
