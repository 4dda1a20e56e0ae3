"""Distributed training throughput on CPU (gloo) and communication volume per step.

    .venv/bin/python benchmarks/distributed.py                  # small preset, 2 layers, 8 x 128 tokens
    .venv/bin/python benchmarks/distributed.py --steps 5 --preset tiny

For each strategy (one process; DDP, FSDP and TP+SP on 2 processes) a fresh set of
processes builds the same model, parallelizes it with llamaworks.parallel.parallelize and
times full training steps (forward, loss, backward, global-norm clipping, AdamW) on the
same global batch of random tokens: the 2-process runs each take half of it (DDP, FSDP) or
all of it split by heads and sequence (TP). tokens/s is the global batch over the median
step time after --warmup steps. One thread per process.

Communication per step (bytes one rank sends, ring algorithms, W ranks, P parameter bytes,
A = micro_batch * seq_len * dim * activation bytes, L layers), without gradient accumulation:
  DDP   all-reduce of the gradients:                      2 (W-1)/W * P        ("2x params")
  FSDP  all-gather in forward and again in backward, reduce-scatter of the gradients:
                                                          3 (W-1)/W * P        ("3x params")
  TP+SP per layer two all-gathers and two reduce-scatters in forward and as many in
        backward, each (W-1)/W * A; plus the logits' all-gather (vocab columns)
                                                          8 L (W-1)/W * A + ...
With gradient accumulation DDP and FSDP reduce once per micro-batch (and FSDP gathers per
micro-batch), so their volume scales with the accumulation steps; TP's scales with tokens.

On a CPU with 2 cores shared by 2 processes there is no speed-up to expect: gloo copies
through shared memory and both processes compete for the same cores. The point is the
overhead each strategy adds; the GPU expectations below come from llamaworks.plan.

GPU clusters: `gpu_expectations` prints, from llamaworks.plan, the paper's setting (LLaMA-65B
on 2048 A100-80GB, tp=8 inside a node and FSDP over the 256 data-parallel groups, bf16): the
paper's ~380 tokens/s/GPU is ~49% MFU and ~21 days for 1.4T tokens; per micro-batch each GPU
all-gathers/reduce-scatters its tp slice of the weights over InfiniBand (FSDP) and moves
activations over NVLink (TP). TP's volume per micro-batch is of the order of FSDP's while
NVLink is ~24x faster than a GPU's share of InfiniBand: the reason tp stays within a node.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from machine import add_label_argument, machine_record  # benchmarks/ is on sys.path

STRATEGIES = {  # name -> (world size, ParallelDims fields)
    "single": (1, dict(dp_replicate=1, dp_shard=1, tp=1)),
    "ddp": (2, dict(dp_replicate=2, dp_shard=1, tp=1)),
    "fsdp": (2, dict(dp_replicate=1, dp_shard=2, tp=1)),
    "tp": (2, dict(dp_replicate=1, dp_shard=1, tp=2)),
}


def comm_bytes(name: str, world: int, param_bytes: int, act_bytes: int, n_layers: int, logits_bytes: int) -> int:
    if world == 1:
        return 0
    f = (world - 1) / world
    return int({"single": 0, "ddp": 2 * f * param_bytes, "fsdp": 3 * f * param_bytes,
                "tp": 8 * n_layers * f * act_bytes + 2 * f * logits_bytes}[name])


def _worker(rank: int, world: int, port: int, name: str, a: argparse.Namespace, result: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist
    import torch.nn.functional as F

    from llamaworks.model import ModelArgs, build_model
    from llamaworks.parallel.distributed import clip_grad_norm_
    from llamaworks.parallel.parallelize import ParallelDims, parallelize
    from llamaworks.train.config import OptimConfig
    from llamaworks.train.optim import build_optimizer

    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    args = ModelArgs.from_name(a.preset, n_layers=a.n_layers)
    dims = ParallelDims(world_size=world, **STRATEGIES[name][1])
    model = build_model(args, seed=0)
    parallelize(model, dims, "selective", False, dims.build_mesh("cpu") if world > 1 else None)
    opt = build_optimizer(model, OptimConfig())
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, args.vocab_size, (a.batch, a.seq_len + 1), generator=g)
    per = a.batch // dims.dp
    r = rank // dims.tp
    x, y = batch[r * per:(r + 1) * per, :-1], batch[r * per:(r + 1) * per, 1:]
    times = []
    for _ in range(a.warmup + a.steps):
        if world > 1:
            dist.barrier()
        t = time.perf_counter()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    if rank == 0:
        step_s = statistics.median(times[a.warmup:])
        result.write_text(json.dumps({"step_s": step_s, "tokens_per_s": a.batch * a.seq_len / step_s}))
    if world > 1:
        dist.destroy_process_group()


def gpu_expectations(preset: str = "65B", gpus: int = 2048, tp: int = 8, tokens_per_gpu_s: float = 380.0) -> dict:
    """The paper's cluster through llamaworks.plan: throughput, MFU, days, bytes per GPU."""
    from llamaworks.plan import plan

    p = plan(preset, gpus, "a100-80gb", tp=tp, tokens_per_gpu_s=tokens_per_gpu_s)
    a = p.args
    weight_slice = p.params * 2 / tp  # bf16 weights of one tp slice
    fsdp = 3 * (p.dp_shard - 1) / p.dp_shard * weight_slice  # per micro-batch
    tp_bytes = 8 * a.n_layers * (tp - 1) / tp * p.micro_batch * p.seq_len * a.dim * 2  # per micro-batch
    return {"setting": f"LLaMA-{preset}, {gpus} x A100-80GB, tp {tp} x dp {p.dp} (FSDP), bf16",
            "tokens_per_gpu_s": tokens_per_gpu_s, "mfu": p.mfu, "days": p.days,
            "step_s": p.batch_tokens / (gpus * tokens_per_gpu_s), "micro_batches": p.grad_accum,
            "fsdp_bytes_per_gpu_per_micro_batch": fsdp, "tp_bytes_per_gpu_per_micro_batch": tp_bytes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/distributed.json")
    add_label_argument(p)
    a = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    machine = machine_record(a.label, threads=1)

    from llamaworks.model import ModelArgs, count_parameters

    args = ModelArgs.from_name(a.preset, n_layers=a.n_layers)
    n_params = count_parameters(args)
    param_bytes, act_bytes = 4 * n_params, 4 * a.batch * a.seq_len * args.dim  # fp32
    logits_bytes = 4 * a.batch * a.seq_len * args.vocab_size
    rows = []
    tmp = Path(a.out).with_suffix(".part")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    for name, (world, _) in STRATEGIES.items():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(world, port, name, a, tmp), nprocs=world, join=True)
        r = json.loads(tmp.read_text())
        comm = comm_bytes(name, world, param_bytes, act_bytes, a.n_layers, logits_bytes)
        rows.append({"strategy": name, "processes": world, "tokens_per_s": r["tokens_per_s"],
                     "step_s": r["step_s"], "comm_bytes_per_rank_per_step": comm})
    tmp.unlink(missing_ok=True)
    print(f"{a.preset} preset, {a.n_layers} layers, {n_params / 1e6:.1f}M parameters ({param_bytes / 2**20:.1f} MiB "
          f"fp32); global batch {a.batch} x {a.seq_len}; CPU gloo, 1 thread per process")
    print(f"{'strategy':<8} {'procs':>5} {'tokens/s':>10} {'step ms':>9} {'comm MiB/rank/step':>20}")
    for r in rows:
        print(f"{r['strategy']:<8} {r['processes']:>5} {r['tokens_per_s']:>10.0f} {1e3 * r['step_s']:>9.1f} "
              f"{r['comm_bytes_per_rank_per_step'] / 2**20:>20.1f}")
    gpu = gpu_expectations()
    print(f"\nGPU expectation (llamaworks.plan): {gpu['setting']}: {gpu['tokens_per_gpu_s']:.0f} tokens/s/GPU "
          f"is MFU {gpu['mfu']:.1%}, {gpu['days']:.1f} days; a step of 4M tokens takes {gpu['step_s']:.1f} s in "
          f"{gpu['micro_batches']} micro-batches, each moving {gpu['fsdp_bytes_per_gpu_per_micro_batch'] / 1e9:.1f} GB "
          f"of FSDP traffic (InfiniBand) and {gpu['tp_bytes_per_gpu_per_micro_batch'] / 1e9:.1f} GB of TP "
          "activations (NVLink) per GPU")
    Path(a.out).write_text(json.dumps({"config": vars(a), "params": n_params, "rows": rows, "gpu": gpu,
                                       "machine": machine}, indent=1))


if __name__ == "__main__":
    main()
