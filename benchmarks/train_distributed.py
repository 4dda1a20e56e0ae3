"""Distributed training throughput on CPU (gloo) and communication volume per step.

    .venv/bin/python benchmarks/train_distributed.py                  # small preset, 2 layers, 8 x 128 tokens
    .venv/bin/python benchmarks/train_distributed.py --steps 5 --preset tiny

For each strategy (one process; DDP, FSDP, FSDP with bf16 parameters, TP+SP and a 1F1B pipeline on 2
processes; their products FSDP x TP, FSDP(bf16) x TP, PP x FSDP and PP x TP on 4; --strategies picks
rows) a fresh set of processes builds the same model on the meta device, parallelizes it with
llamaworks.parallel.parallelize, allocates each rank's part only (as the trainer does) and
times full training steps (forward, loss, backward, global-norm clipping, AdamW) on the
same global batch of random tokens: the 2-process runs each take half of it (DDP, FSDP),
all of it split by heads and sequence (TP), or all of it in --pp-microbatches microbatches
through two stages of --n-layers / 2 layers (PP). tokens/s is the global batch over the median
step time after --warmup steps; peak memory is each rank's peak resident set. One thread per process.

Communication per step (bytes one rank sends, ring algorithms, W ranks, P parameter bytes,
A = micro_batch * seq_len * dim * activation bytes, L layers), without gradient accumulation:
  DDP   all-reduce of the gradients:                      2 (W-1)/W * P        ("2x params")
  FSDP  all-gather in forward and again in backward, reduce-scatter of the gradients:
                                                          3 (W-1)/W * P        ("3x params")
  TP+SP per layer two all-gathers and two reduce-scatters in forward and as many in
        backward, each (W-1)/W * A; plus the logits' all-gather (vocab columns)
                                                          8 L (W-1)/W * A + ...
  FSDP + mixed precision (parallel.mp_param_dtype = bf16, the "fsdp_bf16" row): the all-gathers
        move bf16 parameters, the reduce-scatter fp32 gradients: 2 (W-1)/W * P/2 + (W-1)/W * P
  PP    each of the S-1 stage boundaries carries every microbatch's hidden states forward and
        their gradient back, batch * seq_len * dim activation bytes in all each way, spread over
        the W ranks:                                      2 (S-1)/W * A
        Its cost is the bubble instead: with p ranks, v stages per rank and m microbatches a
        rank idles (p-1)/(v m + p-1) of the step (Narayanan et al. 2021); the row gives that figure.
With gradient accumulation DDP and FSDP reduce once per step (the last micro-batch's backward;
parallel.sync_every_microbatch = true reduces after each), while FSDP still gathers per
micro-batch; TP's volume scales with tokens. A product applies each formula to its share
(comm_terms). "measured" counts the bytes rank 0 handed to the collectives (SentBytes: FSDP's
all-gathers and reduce-scatters, DDP's buckets, TP's DTensor redistributions, the pipeline's
sends), the same ring arithmetic applied; both are also given by kind (fsdp, ddp, tp, pp).

On a CPU with 2 cores shared by 2 processes there is no speed-up to expect: gloo copies
through shared memory and both processes compete for the same cores. The point is the
overhead each strategy adds; the GPU expectations below come from llamaworks.plan.

GPU clusters: `gpu_expectations` prints, from llamaworks.plan, the paper's setting (LLaMA-65B
on 2048 A100-80GB, tp=8 inside a node and FSDP over the 256 data-parallel groups, bf16): the
paper's ~380 tokens/s/GPU is ~49% MFU and ~21 days for 1.4T tokens; per micro-batch each GPU
all-gathers/reduce-scatters its tp slice of the weights over InfiniBand (FSDP) and moves
activations over NVLink (TP). TP's volume per micro-batch is of the order of FSDP's while
NVLink is ~24x faster than a GPU's share of InfiniBand: the reason tp stays within a node.

Checkpoints (`--checkpoint-only` runs just these rows; `--checkpoint-preset ""` skips them): how
long a save keeps training from going on, blocking (checkpoint.async_mode = "disabled") against
async (the CPU snapshot, then a background write), for one process (model directory) and FSDP on
2 processes (DCP, async_save); the same model, optimizer state and files either way. Also the
step that runs while the async write does (on 2 shared cores the write competes with it; on a
GPU node it would use the host's CPUs only) and how long the end of that step still waits for
the write ("then waits": 0 when the write hid behind it).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from machine import add_label_argument, machine_record  # benchmarks/ is on sys.path

STRATEGIES = {  # name -> (world size, ParallelDims fields, FSDP parameter dtype: parallel.mp_param_dtype)
    "single": (1, dict(dp_replicate=1, dp_shard=1, tp=1), "float32"),
    "ddp": (2, dict(dp_replicate=2, dp_shard=1, tp=1), "float32"),
    "fsdp": (2, dict(dp_replicate=1, dp_shard=2, tp=1), "float32"),
    "fsdp_bf16": (2, dict(dp_replicate=1, dp_shard=2, tp=1), "bfloat16"),
    "tp": (2, dict(dp_replicate=1, dp_shard=1, tp=2), "float32"),
    "pp": (2, dict(dp_replicate=1, dp_shard=1, tp=1, pp=2), "float32"),  # 1F1B, --pp-microbatches
    # the products, on 4 processes (2 x 2 on the same 2 cores)
    "fsdp_x_tp": (4, dict(dp_replicate=1, dp_shard=2, tp=2), "float32"),
    "fsdp_bf16_x_tp": (4, dict(dp_replicate=1, dp_shard=2, tp=2), "bfloat16"),
    "pp_x_fsdp": (4, dict(dp_replicate=1, dp_shard=2, tp=1, pp=2), "float32"),
    "pp_x_tp": (4, dict(dp_replicate=1, dp_shard=1, tp=2, pp=2), "float32"),
}


def comm_terms(name: str, param_bytes: int, act_bytes: int, n_layers: int, logits_bytes: int,
               stage0_bytes: int) -> dict[str, float]:
    """Computed bytes rank 0 sends per step, by collective family (the module docstring's formulas):
    FSDP's all-gathers and reduce-scatter over its D shards, TP's activation collectives over its
    T ranks, PP's hidden states sent to the next stage. A product applies each to its share: FSDP
    x TP shards the tp slice (P/T) and runs TP on the batch of one data-parallel rank (A/D); in PP
    rank 0 holds the first stage (stage0_bytes of parameters, n_layers/2 layers), whose FSDP
    gathers once per step (the pipeline keeps the weights gathered over its microbatches) and
    whose hidden states travel split along the sequence under TP (A/T)."""
    dims = STRATEGIES[name][1]
    D, T, pp = dims["dp_shard"] * dims["dp_replicate"], dims["tp"], dims.get("pp", 1)
    bf16 = STRATEGIES[name][2] == "bfloat16"
    out: dict[str, float] = {}
    if dims["dp_shard"] == 1 and dims["dp_replicate"] > 1:
        out["ddp"] = 2 * (D - 1) / D * param_bytes
    elif D > 1:
        p = stage0_bytes if pp > 1 else param_bytes / T
        gathers = 1 if pp > 1 else 2  # forward and again in backward, without a pipeline
        out["fsdp"] = (D - 1) / D * (gathers * p / (2 if bf16 else 1) + p)
    if T > 1:
        layers = n_layers // pp
        # with bf16 parameters the activations are bf16 too
        out["tp"] = (T - 1) / T * (8 * layers * act_bytes / D + (2 * logits_bytes / D if pp == 1 else 0)) / (
            2 if bf16 else 1)
    if pp > 1:
        out["pp"] = act_bytes / D / T
    return out


def comm_bytes(name: str, world: int, param_bytes: int, act_bytes: int, n_layers: int, logits_bytes: int,
               stage0_bytes: int = 0) -> int:
    """Computed bytes rank 0 sends per step (comm_terms summed; param_bytes in fp32). fsdp_bf16
    all-gathers bf16 parameters (half the bytes, twice) and reduce-scatters fp32 gradients."""
    return int(sum(comm_terms(name, param_bytes, act_bytes, n_layers, logits_bytes, stage0_bytes).values()))


def _group_size(group) -> int:
    # DTensor names its group as (mesh, mesh_dim); a DeviceMesh or ProcessGroup has a size()
    if isinstance(group, tuple):
        return group[0].size(group[1])
    if isinstance(group, list):
        return len(group)
    if isinstance(group, str):
        import torch.distributed as dist

        return dist.distributed_c10d._resolve_process_group(group).size()
    return group.size()


class SentBytes:
    """Measured bytes this rank sends, by wrapping what each strategy calls: the collectives FSDP2
    calls (torch.distributed.all_gather_single, reduce_scatter_single; group size W), DDP's buckets
    (a comm hook), TP's DTensor redistributions (the functional collectives all_gather_single,
    reduce_scatter_single and all_reduce, over the tp group) and the pipeline's sends (the tensors
    of isend in its batched point-to-point ops). Ring algorithms: an all-gather sends (W-1) input
    shards, a reduce-scatter (W-1)/W of its input, an all-reduce twice that; a send its tensor."""

    def __init__(self, world: int, fsdp_world: int = 0):
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol
        import torch.distributed.pipelining.schedules as schedules

        self.world, self.bytes, self.counted = world, 0, False
        self.by_kind: dict[str, float] = {}
        w = fsdp_world or world
        for name, factor in (("all_gather_single", w - 1), ("reduce_scatter_single", (w - 1) / w)):
            original = getattr(dist, name)

            def counted(*args, _original=original, _factor=factor, **kwargs):
                sent = kwargs.get("input", args[1] if len(args) > 1 else None)
                self.add("fsdp", _factor * sent.numel() * sent.element_size())
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        ring = {"all_gather_single": lambda n: n - 1, "reduce_scatter_single": lambda n: (n - 1) / n,
                "all_reduce": lambda n: 2 * (n - 1) / n}
        for name, factor in ring.items():
            original = getattr(funcol, name)
            signature = inspect.signature(original)

            def counted_funcol(*args, _original=original, _factor=factor, _sig=signature, **kwargs):
                call = _sig.bind(*args, **kwargs).arguments  # (self, [reduceOp,] [dim,] group, tag)
                tensor = call["self"]
                self.add("tp", _factor(_group_size(call["group"])) * tensor.numel() * tensor.element_size())
                return _original(*args, **kwargs)

            setattr(funcol, name, counted_funcol)
        batch_p2p = schedules._batch_p2p

        def counted_p2p(p2p_ops, *args, **kwargs):
            for op in p2p_ops:
                if op.op is dist.isend:
                    self.add("pp", op.tensor.numel() * op.tensor.element_size())
            return batch_p2p(p2p_ops, *args, **kwargs)

        schedules._batch_p2p = counted_p2p

    def add(self, kind: str, n: float) -> None:
        self.bytes += n
        self.by_kind[kind] = self.by_kind.get(kind, 0) + n
        self.counted = True

    def ddp_hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        buf = bucket.buffer()
        self.add("ddp", 2 * (self.world - 1) / self.world * buf.numel() * buf.element_size())
        return allreduce_hook(None, bucket)


def _peak_rss_mib() -> float:
    # VmHWM, this process's peak resident set: ru_maxrss would carry the parent's peak across the
    # exec of a spawned process (Linux keeps it), and the parent measured bandwidth over 1 GiB.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _worker(rank: int, world: int, port: int, name: str, a: argparse.Namespace, result: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist
    import torch.nn.functional as F

    from llamaworks.model import ModelArgs, build_model
    from llamaworks.parallel.distributed import clip_grad_norm_
    from llamaworks.parallel.parallelize import ParallelDims, parallelize, resolve_mp_dtypes
    from llamaworks.parallel.pipeline import Pipeline, resolve_pipeline
    from llamaworks.train.config import OptimConfig
    from llamaworks.train.init import init_weights
    from llamaworks.train.optim import build_optimizer

    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    args = ModelArgs.from_name(a.preset, n_layers=a.n_layers)
    dims = ParallelDims(world_size=world, **STRATEGIES[name][1])
    mesh = dims.build_mesh("cpu") if world > 1 else None
    # One schedule step of --pp-microbatches microbatches per optimizer step.
    m = min(a.pp_microbatches, a.batch // dims.dp)  # this data-parallel rank's sequences at most
    plan = resolve_pipeline(dims.pp, "1F1B", m, [], 0, args.n_layers, m) if dims.pp > 1 else None
    model = build_model(args, device="meta")  # each rank allocates its own part only, as the trainer
    sent = SentBytes(world, dims.dp_shard)
    param_dtype, reduce_dtype = resolve_mp_dtypes(STRATEGIES[name][2], "float32", "cpu")
    model = parallelize(model, dims, "selective", False, mesh, mp_param_dtype=param_dtype,
                        mp_reduce_dtype=reduce_dtype, pipeline=plan)
    model.to_empty(device="cpu")
    init_weights(model, 0, torch.device("cpu"))
    pipe = Pipeline(model, mesh["pp"].get_group(), torch.device("cpu"),
                    lambda out, tgt: F.cross_entropy(out.flatten(0, 1), tgt.flatten())) if plan else None
    if name == "ddp":
        model.register_comm_hook(None, sent.ddp_hook)
    opt = build_optimizer(model, OptimConfig())
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, args.vocab_size, (a.batch, a.seq_len + 1), generator=g)
    per = a.batch // dims.dp
    r = dims.dp_rank(rank)
    x, y = batch[r * per:(r + 1) * per, :-1], batch[r * per:(r + 1) * per, 1:]
    times, step_bytes = [], []
    for _ in range(a.warmup + a.steps):
        if world > 1:
            dist.barrier()
        sent.bytes, sent.by_kind = 0, {}
        t = time.perf_counter()
        if pipe is not None:
            pipe.step(x, y)
        else:
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        clip_grad_norm_(model.parameters(), 1.0, pipe.group if pipe else None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        step_bytes.append((sent.bytes, dict(sent.by_kind)))
    rss = [_peak_rss_mib()] * world
    if world > 1:
        dist.all_gather_object(rss, rss[0])
    if rank == 0:
        step_s = statistics.median(times[a.warmup:])
        result.write_text(json.dumps({"step_s": step_s, "tokens_per_s": a.batch * a.seq_len / step_s,
                                      "measured_bytes": int(step_bytes[-1][0]) if sent.counted else None,
                                      "measured_by_kind": {k: int(v) for k, v in step_bytes[-1][1].items()},
                                      "peak_rss_mib": rss,
                                      "bubble_fraction": plan.bubble_fraction() if plan else None}))
    if world > 1:
        dist.destroy_process_group()


class _LoaderState:
    def state_dict(self) -> dict:
        return {"position": 0}


def _checkpoint_worker(rank: int, world: int, port: int, mode: str, a: argparse.Namespace, result: Path) -> None:
    """Train a step (so that AdamW has state), time a plain step, then save (async_mode = mode; after a first,
    untimed save, as in a long run), time the step that follows and the wait for the write to finish."""
    import shutil
    import tempfile

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist
    import torch.nn.functional as F

    from llamaworks.model import ModelArgs, build_model
    from llamaworks.parallel.parallelize import ParallelDims, parallelize
    from llamaworks.train.checkpoint import Checkpointer
    from llamaworks.train.config import OptimConfig
    from llamaworks.train.optim import build_optimizer

    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    args = ModelArgs.from_name(a.checkpoint_preset)
    model = build_model(args, seed=0)
    if world > 1:
        dims = ParallelDims(world_size=world, dp_replicate=1, dp_shard=world, tp=1)
        parallelize(model, dims, "selective", False, dims.build_mesh("cpu"))
    opt = build_optimizer(model, OptimConfig())
    x = torch.randint(0, args.vocab_size, (a.batch // world, a.seq_len + 1), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        t = time.perf_counter()
        F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    step()
    plain = step()
    folder = [tempfile.mkdtemp(prefix="llamaworks-ckpt-bench-") if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(folder, src=0)
        dist.barrier()
    writer = Checkpointer(folder[0], keep_last=1, async_mode=mode)
    writer.save(0, model, None, opt, _LoaderState(), {})  # once: the gloo group async_save talks over
    writer.wait()
    t0 = time.perf_counter()
    path = writer.save(1, model, None, opt, _LoaderState(), {})
    stall = time.perf_counter() - t0
    during = step()
    t1 = time.perf_counter()
    writer.close()
    waited = time.perf_counter() - t1  # ~0 when the write hid behind the step
    if rank == 0:
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        result.write_text(json.dumps({"stall_s": stall, "wait_after_step_s": waited, "plain_step_s": plain,
                                      "step_during_write_s": during, "bytes": size}))
        shutil.rmtree(folder[0], ignore_errors=True)
    if world > 1:
        dist.destroy_process_group()


def checkpoint_rows(a: argparse.Namespace, tmp: Path) -> list[dict]:
    rows = []
    for world in (1, 2):
        for mode in ("disabled", "async"):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(_checkpoint_worker, args=(world, port, mode, a, tmp), nprocs=world, join=True)
            rows.append({"processes": world, "format": "DCP (FSDP)" if world > 1 else "model directory",
                         "async_mode": mode, **json.loads(tmp.read_text())})
    return rows


def print_checkpoint_rows(a: argparse.Namespace, rows: list[dict]) -> None:
    print(f"\ncheckpoint of the {a.checkpoint_preset} preset with AdamW state ({rows[0]['bytes'] / 2**20:.0f} MiB), "
          "time training waits for the save (contended CPU, 1 thread per process)")
    print(f"{'procs':>5} {'async_mode':>10} {'stall s':>8} {'vs blocking':>11} {'plain step s':>12} "
          f"{'next step s':>11} {'then waits s':>12}")
    blocking = {r["processes"]: r["stall_s"] for r in rows if r["async_mode"] == "disabled"}
    for r in rows:
        print(f"{r['processes']:>5} {r['async_mode']:>10} {r['stall_s']:>8.2f} "
              f"{r['stall_s'] / blocking[r['processes']]:>10.2f}x {r['plain_step_s']:>12.2f} "
              f"{r['step_during_write_s']:>11.2f} {r['wait_after_step_s']:>12.2f}")


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
    p.add_argument("--pp-microbatches", type=int, default=4, help="microbatches of the pp row (at most --batch)")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), metavar="NAME",
                   help=f"rows to run besides single (default all: {' '.join(STRATEGIES)})")
    p.add_argument("--out", default="benchmarks/results/distributed.json")
    p.add_argument("--checkpoint-preset", default="small", help="model of the checkpoint rows; '' skips them")
    p.add_argument("--checkpoint-only", action="store_true", help="only the checkpoint rows (default --out: "
                   "benchmarks/results/checkpoint_async.json)")
    add_label_argument(p)
    a = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    machine = machine_record(a.label, threads=1)
    if a.checkpoint_only:
        out = Path("benchmarks/results/checkpoint_async.json" if a.out == p.get_default("out") else a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        ckpt = checkpoint_rows(a, out.with_suffix(".part"))
        out.with_suffix(".part").unlink(missing_ok=True)
        print_checkpoint_rows(a, ckpt)
        out.write_text(json.dumps({"config": vars(a), "checkpoint": ckpt, "machine": machine}, indent=1))
        return

    from llamaworks.model import ModelArgs, count_parameters

    args = ModelArgs.from_name(a.preset, n_layers=a.n_layers)
    n_params = count_parameters(args)
    param_bytes, act_bytes = 4 * n_params, 4 * a.batch * a.seq_len * args.dim  # fp32
    # the first pipeline stage's parameters: the embedding and the first half of the layers
    embedding = args.vocab_size * args.dim
    stage0_bytes = 4 * (embedding + (n_params - 2 * embedding - args.dim) * (a.n_layers // 2) // a.n_layers)
    logits_bytes = 4 * a.batch * a.seq_len * args.vocab_size
    rows = []
    tmp = Path(a.out).with_suffix(".part")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    unknown = set(a.strategies) - set(STRATEGIES)
    if unknown:
        p.error(f"--strategies: unknown {sorted(unknown)}; choose from {', '.join(STRATEGIES)}")
    for name in ["single", *(n for n in STRATEGIES if n in a.strategies and n != "single")]:
        world = STRATEGIES[name][0]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(world, port, name, a, tmp), nprocs=world, join=True)
        r = json.loads(tmp.read_text())
        comm = comm_bytes(name, world, param_bytes, act_bytes, a.n_layers, logits_bytes, stage0_bytes)
        terms = comm_terms(name, param_bytes, act_bytes, a.n_layers, logits_bytes, stage0_bytes)
        rows.append({"strategy": name, "processes": world, "tokens_per_s": r["tokens_per_s"],
                     "step_s": r["step_s"], "comm_bytes_per_rank_per_step": comm,
                     "measured_comm_bytes_per_rank_per_step": r["measured_bytes"] if world > 1 else 0,
                     "comm_bytes_by_kind": {k: int(v) for k, v in terms.items()},
                     "measured_comm_bytes_by_kind": r["measured_by_kind"],
                     "peak_rss_mib_per_rank": r["peak_rss_mib"],
                     "bubble_fraction_computed": r["bubble_fraction"]})
    ckpt = checkpoint_rows(a, tmp) if a.checkpoint_preset else []
    tmp.unlink(missing_ok=True)
    print(f"{a.preset} preset, {a.n_layers} layers, {n_params / 1e6:.1f}M parameters ({param_bytes / 2**20:.1f} MiB "
          f"fp32); global batch {a.batch} x {a.seq_len}; CPU gloo, 1 thread per process")
    print(f"{'strategy':<14} {'procs':>5} {'tokens/s':>10} {'vs single':>9} {'step ms':>9} "
          f"{'sent MiB by rank 0/step: computed':>34} {'measured':>9} {'peak RSS MiB/rank':>23} {'bubble':>6}")
    single = rows[0]["tokens_per_s"]
    for r in rows:
        measured = r["measured_comm_bytes_per_rank_per_step"]
        print(f"{r['strategy']:<14} {r['processes']:>5} {r['tokens_per_s']:>10.0f} {r['tokens_per_s'] / single:>8.2f}x "
              f"{1e3 * r['step_s']:>9.1f} {r['comm_bytes_per_rank_per_step'] / 2**20:>34.1f} "
              f"{measured / 2**20 if measured is not None else float('nan'):>9.1f} "
              f"{' / '.join(f'{m:.0f}' for m in r['peak_rss_mib_per_rank']):>23} "
              f"{r['bubble_fraction_computed'] if r['bubble_fraction_computed'] is not None else float('nan'):>6.2f}")
    print("\nby kind, MiB computed / measured:")
    for r in rows[1:]:
        computed, got = r["comm_bytes_by_kind"], r["measured_comm_bytes_by_kind"]
        print(f"  {r['strategy']:<14} " + ", ".join(
            f"{k} {computed.get(k, 0) / 2**20:.2f} / {got.get(k, 0) / 2**20:.2f}" for k in sorted({*computed, *got})))
    print("FSDP's computed volume re-gathers every block in backward; by default the last block and the root "
          "stay gathered after forward (parallel.fsdp_reshard_after_forward), so the measured one is lower. "
          "TP's computed volume leaves out the embedding's and the loss's collectives (measured: every DTensor "
          "redistribution, over the tp group). PP's bubble is the ideal (p-1)/(m+p-1) of its 1F1B schedule "
          "(p ranks, m microbatches).")
    gpu = gpu_expectations()
    print(f"\nGPU expectation (llamaworks.plan): {gpu['setting']}: {gpu['tokens_per_gpu_s']:.0f} tokens/s/GPU "
          f"is MFU {gpu['mfu']:.1%}, {gpu['days']:.1f} days; a step of 4M tokens takes {gpu['step_s']:.1f} s in "
          f"{gpu['micro_batches']} micro-batches, each moving {gpu['fsdp_bytes_per_gpu_per_micro_batch'] / 1e9:.1f} GB "
          f"of FSDP traffic (InfiniBand) and {gpu['tp_bytes_per_gpu_per_micro_batch'] / 1e9:.1f} GB of TP "
          "activations (NVLink) per GPU")
    if ckpt:
        print_checkpoint_rows(a, ckpt)
    Path(a.out).write_text(json.dumps({"config": vars(a), "params": n_params, "rows": rows, "gpu": gpu,
                                       "checkpoint": ckpt, "machine": machine}, indent=1))


if __name__ == "__main__":
    main()
