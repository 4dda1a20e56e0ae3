"""Pretraining with the paper's recipe (sections 2.3-2.4): AdamW (0.9, 0.95), weight
decay 0.1, clipping 1.0, 2,000 warm-up steps, cosine to 10%, 4M-token batches by
gradient accumulation, activation checkpointing, exact resume.

The same Trainer fine-tunes (train/finetune.py): a run is a `DataSource` (the tokenizer and
loaders) and a `ModelSpec` (the model's arguments and how its weights start) handed to `launch`;
pretraining's come from token shards and a preset (`train`), fine-tuning's from instruction
examples and a checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F

from llamaworks.args import Arg
from llamaworks.atomic import atomic_write_json, atomic_write_text
from llamaworks.carbon import run_summary
from llamaworks.configfile import dumps, load_config, merge, parse_overrides, resolve_config_path
from llamaworks.data.sft import IGNORE_INDEX
from llamaworks.data.shards import open_token_dataset
from llamaworks.device import default_dtype, parse_dtype, resolve_device
from llamaworks.eval.during_training import TaskEvaluator
from llamaworks.model import ModelArgs, build_model
from llamaworks.modeldir import save_model
from llamaworks.parallel.distributed import (
    DistEnv,
    clip_grad_norm_,
    close_distributed,
    env_world_size,
    global_mean,
    init_distributed,
)
from llamaworks.parallel.parallelize import ParallelDims, parallelize, resolve_mp_dtypes
from llamaworks.parallel.pipeline import (
    Pipeline,
    PipelinePlan,
    gather_full_model,
    resolve_pipeline,
    schedule_name,
)
from llamaworks.plan import flops_per_token
from llamaworks.tokenizer import Tokenizer, load_tokenizer
from llamaworks.train import checkpoint as ckpt_io
from llamaworks.train.config import JobConfig
from llamaworks.train.heap import keep_freed_memory
from llamaworks.train.init import init_weights
from llamaworks.train.init_from import load_init_from
from llamaworks.train.loader import TokenLoader
from llamaworks.train.loss import lm_loss
from llamaworks.train.metrics_log import MetricsLog, measure_peak_flops, plot_loss_curve
from llamaworks.train.optim import build_optimizer
from llamaworks.train.profiling import StepProfiler, profile_window
from llamaworks.train.schedule import lr_at
from llamaworks.train.tracking import build_trackers, check_backends, peak_memory_gb

log = logging.getLogger("llamaworks")


class NonFiniteLossError(RuntimeError):
    pass


def resolve_amp(device: torch.device, dtype: str) -> torch.dtype:
    return default_dtype(device) if dtype == "auto" else parse_dtype(dtype)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # (bsz*seq, vocab) against (bsz*seq,)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


def grad_sync_schedule(accum: int, every_microbatch: bool = False) -> list[bool]:
    """Whether each of a step's `accum` micro-batches synchronises gradients across data-parallel
    ranks: only the last, since the update needs the sum over all micro-batches once (the
    earlier syncs would reduce partial sums that the last one reduces again)."""
    return [every_microbatch or i == accum - 1 for i in range(accum)]


def _set_grad_sync(model, sync: bool) -> None:
    # FSDP2's fully_shard and the composable replicate (DDP) both offer set_requires_gradient_sync;
    # a model without data parallelism has nothing to synchronise.
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)


def accumulate_gradients(model, loader, accum: int, device, amp, loss_context=nullcontext,
                         sync_every_microbatch: bool = False) -> torch.Tensor:
    """Forward and backward `accum` micro-batches; return their mean loss (detached).

    Each micro-batch loss is divided by `accum` before backward, so the summed gradients
    are those of the mean loss over all accum * micro_batch_size sequences: the same
    update as one batch that large (the paper's 4M-token batches, section 2.3).
    loss_context: a factory of the context forward and backward run in (torch's
    loss_parallel with tensor parallelism). Only the last micro-batch's backward synchronises the
    gradients across data-parallel ranks (grad_sync_schedule) unless sync_every_microbatch.
    """
    loss_sum = torch.zeros((), device=device)
    for sync in grad_sync_schedule(accum, sync_every_microbatch):
        _set_grad_sync(model, sync)
        x, y = next(loader)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with loss_context():
            with amp:
                loss = lm_loss(model, x, y) / accum  # output layer and cross-entropy fused (train/loss.py)
            loss.backward()
        loss_sum += loss.detach()
    return loss_sum


def accumulate_masked_gradients(model, loader, accum: int, device, amp, loss_context=nullcontext,
                                dp: int = 1, sync_every_microbatch: bool = False) -> tuple[torch.Tensor, int]:
    """accumulate_gradients for targets that hold IGNORE_INDEX (fine-tuning: prompts, padding).

    Micro-batches differ in how many targets count, so the mean of their mean losses would weigh
    a target of a short micro-batch more than one of a long one (and change with the micro-batch
    size). Each micro-batch's mean loss is scaled by its share of the unmasked targets of the whole
    global batch instead, so the summed gradients are those of the mean over all of them: the same
    update whatever the micro-batch size, accumulation or data-parallel degree. FSDP/DDP average
    the gradients of the dp ranks, hence the factor dp. Returns (this rank's share of that mean
    loss, detached: global_mean of it is the mean; tokens read by all dp ranks, padding included).
    """
    batches = [next(loader) for _ in range(accum)]
    counts = [int((b[1] != IGNORE_INDEX).sum()) for b in batches]
    local = torch.tensor([sum(counts), sum(b[0].numel() for b in batches)], dtype=torch.float64, device=device)
    # The mean over all ranks times dp: the sum over dp ranks (tensor-parallel ranks read the same batch).
    targets, tokens = (global_mean(local) * dp).tolist()
    loss_sum = torch.zeros((), device=device)
    for (x, y, *packed), count, sync in zip(batches, counts, grad_sync_schedule(accum, sync_every_microbatch)):
        _set_grad_sync(model, sync)
        # packed: the doc_ids of examples packed into rows (train/sft.py), each attending to itself only.
        doc_ids = packed[0].to(device, non_blocking=True) if packed else None
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with loss_context():
            with amp:
                loss = lm_loss(model, x, y, doc_ids=doc_ids) * (count * dp / targets)
            loss.backward()
        loss_sum += loss.detach()
    return loss_sum, round(tokens)


def accumulate_pipeline_gradients(pipe: Pipeline, loader, device, amp, loss_context=nullcontext,
                                  sync_every_microbatch: bool = False) -> torch.Tensor:
    """accumulate_gradients through a pipeline: plan.rounds schedule steps of plan.microbatches
    micro-batches each (the same micro-batches, in the same order, as without the pipeline).
    Each microbatch's loss is weighted 1 / (rounds x microbatches), so the gradients are those
    of the step's mean loss; the returned mean loss is the same on every rank of the pipeline.
    Gradients are synchronised across data-parallel ranks once, after the last schedule step
    (torch's schedule already does so once per schedule step, not per microbatch), or after
    each with sync_every_microbatch."""
    plan = pipe.plan
    loss_sum = torch.zeros((), device=device)
    for sync in grad_sync_schedule(plan.rounds, sync_every_microbatch):
        batches = [next(loader) for _ in range(plan.microbatches)]
        x = torch.cat([b[0] for b in batches]).to(device, non_blocking=True)  # (microbatches * mbs, seq)
        y = torch.cat([b[1] for b in batches]).to(device, non_blocking=True)
        with loss_context():
            with amp:
                loss_sum += pipe.step(x, y, sync=sync)
    return loss_sum


@torch.no_grad()
def evaluate_pipeline(pipe: Pipeline, loader, batches: int, device, amp) -> float | None:
    """evaluate through a pipeline (pretraining's validation: every target counts): the val
    loader's first `batches` micro-batches in groups of plan.microbatches, forward only; a last
    group smaller than that is left out."""
    loader.rewind()
    pipe.model.eval()
    total, n, group = 0.0, 0, []
    for i, (x, y, *_) in enumerate(loader):
        if 0 < batches <= i:
            break
        group.append((x, y))
        if len(group) == pipe.plan.microbatches:
            with amp:
                total += pipe.step(torch.cat([g[0] for g in group]).to(device),
                                   torch.cat([g[1] for g in group]).to(device), train=False).item()
            n, group = n + 1, []
    pipe.model.train()
    return total / n if n else None


@torch.no_grad()
def evaluate(model, loader, batches: int, device, amp) -> float | None:
    """Mean loss per target over the first `batches` batches of `loader` (a finite, unshuffled val
    loader; batches <= 0: all of it). Targets equal to IGNORE_INDEX do not count.

    Every measurement reads the same batches from the start, so validation losses at different
    steps are comparable, and a resumed run measures exactly what an uninterrupted one does
    without the val loader's position in the checkpoint.
    """
    loader.rewind()
    model.eval()
    total, n = 0.0, 0
    for i, (x, y, *packed) in enumerate(loader):
        if 0 < batches <= i:
            break
        y = y.to(device)
        with amp:
            logits = model(x.to(device), **({"doc_ids": packed[0].to(device)} if packed else {}))
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(0, 1), ignore_index=IGNORE_INDEX,
                                 reduction="sum").item()
        n += int((y != IGNORE_INDEX).sum())
    model.train()
    return total / n if n else None


@dataclass
class DataSource:
    """What a run reads: its tokenizer, the training loader of a data-parallel rank and the
    validation loader. A loader yields (x, y) int64 batches, or (x, y, doc_ids) when it packs several
    examples into a row (train/sft.py), and has state_dict/load_state_dict
    (checkpoints); a validation loader is finite and has rewind(). Pretraining's reads token shards
    (`shard_source`), fine-tuning's instruction examples (train/finetune.py)."""

    tokenizer: Tokenizer
    train_loader: Callable[[int, int], Any]  # (data-parallel rank, data-parallel size) -> infinite loader
    val_loader: Any | None
    # Targets hold IGNORE_INDEX: a step's loss is the mean over the global batch's unmasked targets
    # (accumulate_masked_gradients) and its tokens are counted as read, rows differing in length.
    masked: bool = False


@dataclass
class ModelSpec:
    """The model a run trains: its arguments, a name for logs and the loss curve, how its
    weights start, and what the run leaves as its final model."""

    args: ModelArgs
    name: str
    # Fills the materialised (possibly sharded) model: (model, seed, device). Pretraining draws
    # the weights (train/init.py); fine-tuning copies a checkpoint's.
    init: Callable[[torch.nn.Module, int, torch.device], None] = init_weights
    # Changes the model on the meta device, before it is split (parallelize) and materialised: e.g.
    # LoRA layers on a frozen base, which FSDP then shards with their block. init fills all of it.
    prepare: Callable[[torch.nn.Module], None] | None = None
    # Changes the initialised model before the optimizer is built, e.g. LoRA adapters on a frozen
    # base: the optimizer then trains the parameters that still require gradients.
    adapt: Callable[[torch.nn.Module], None] | None = None
    # Writes the final model under the run folder and returns its path: (model, tokenizer, run
    # folder) -> path. None: OUT/model, a model directory.
    save_final: Callable[[torch.nn.Module, Any, Path], Path] | None = None
    # What the frozen weights started from (fine-tuning's base: train/finetune.py base_fingerprint),
    # recorded in each checkpoint, which then holds the trainable tensors only; resume checks it.
    base: dict | None = None


@dataclass
class Trainer:
    """One run's state: what a step updates, what a checkpoint holds and what the loop reports.
    `build` makes it; `train_step`, `validate` and `save_checkpoint` act on it; `run` loops."""

    cfg: JobConfig
    out: Path
    env: DistEnv
    dims: ParallelDims
    device: torch.device
    amp: Any  # the autocast context (nullcontext in fp32)
    loss_context: Callable  # factory of the context forward and backward run in (loss_parallel)
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    tokenizer: Tokenizer
    loader: Any  # TokenLoader, SFTLoader
    val_loader: Any | None
    task_eval: TaskEvaluator | None
    accum: int  # micro-batches per optimizer step on each data-parallel rank
    n_params: int
    flops_per_token: float
    peak_flops: float  # per device
    model_name: str  # for the loss curve's title
    max_steps: int  # train.max_steps, or what fine-tuning's epochs come to
    warmup_steps: int
    masked: bool  # DataSource.masked
    save_final: Callable[[torch.nn.Module, Any, Path], Path] | None  # ModelSpec.save_final
    base: dict | None = None  # ModelSpec.base
    pipeline: Pipeline | None = None  # with parallel.pp > 1: the schedule over this rank's stages
    step: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0  # seconds trained by the processes before this one (resume)
    last_ckpt: Path | None = None  # with checkpoint.async_mode = "async", possibly still being written
    checkpointer: ckpt_io.Checkpointer | None = None  # made at the first save
    started: float = field(default_factory=time.perf_counter)  # this process's start of training

    @property
    def tokens_per_step(self) -> int:
        """Tokens in a step's rows at full length (pretraining's rows always are)."""
        t = self.cfg.train
        return self.accum * t.micro_batch_size * t.seq_len * self.dims.dp

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started


@dataclass
class StepResult:
    loss: float  # the global batch's mean loss, before the update
    grad_norm: float  # before clipping
    lr: float
    tokens: int  # read by all data-parallel ranks in this step


def train(cfg: JobConfig, resume: bool = False) -> dict:
    """Run (or continue) the job; returns the run summary (also written to OUT/summary.json).

    Under torchrun (WORLD_SIZE > 1) every process calls this: it joins the process group,
    parallelizes the model as cfg.parallel says and leaves the group on return.
    """
    t_cfg = cfg.train
    init = load_init_from(cfg.model) if cfg.model.init_from else None  # a checkpoint's model, not a preset's
    dims = check_job(cfg, (init.args if init else cfg.model.build_args()).n_heads)
    if not cfg.data.dir:
        raise ValueError("data.dir is not set: point it at token shards made by `llamaworks prepare`")
    manifest = open_token_dataset(cfg.data.dir)
    tok_path = cfg.data.tokenizer or (manifest.get("tokenizer") or {}).get("path")
    if not tok_path:
        raise ValueError("data.tokenizer is not set and the shards' manifest names no tokenizer")
    tokenizer = load_tokenizer(tok_path)
    if init is None:
        args = cfg.model.build_args(tokenizer.vocab_size)
        spec = ModelSpec(args, f"{cfg.model.preset} preset")
    else:
        tokenizer, args = init.run_tokenizer(tokenizer, manifest, cfg.data.dir), init.args
        spec = ModelSpec(args, init.name, init=init.weights_init)
    if t_cfg.seq_len > args.max_seq_len:
        raise ValueError(f"train.seq_len={t_cfg.seq_len} exceeds the model's max_seq_len={args.max_seq_len}; "
                         "lower train.seq_len or raise model.max_seq_len")
    check_out_dir(Path(cfg.run.out_dir))
    return launch(cfg, resume, dims, shard_source(cfg, manifest, tokenizer), spec, t_cfg.max_steps,
                  cfg.schedule.warmup_steps)


def check_job(cfg, n_heads: int) -> ParallelDims:
    """The parallel degrees, checked against the world size and the head count, and the train
    section's limits: before any process group, data or model exists, so that a bad mesh is an
    error, not a hang."""
    t_cfg, par = cfg.train, cfg.parallel
    dims = ParallelDims.resolve(par.dp_replicate, par.dp_shard, par.tp, env_world_size(), n_heads,
                                getattr(par, "pp", 1))
    if t_cfg.seq_len % dims.tp:
        raise ValueError(f"train.seq_len={t_cfg.seq_len} is not divisible by parallel.tp={dims.tp}: sequence "
                         "parallelism splits each sequence across the tensor-parallel ranks")
    cfg.grad_accum_steps(dims.dp)  # a batch below one micro-batch per rank is an error now
    resolve_mp_dtypes(par.mp_param_dtype, par.mp_reduce_dtype, "cpu")  # a bad dtype name is an error now
    schedule_name(getattr(par, "pp_schedule", "1F1B"))  # a typo is an error with pp = 1 too, not on the day pp > 1
    if hasattr(cfg, "profile"):
        profile_window(cfg.profile.steps)
    check_backends(cfg.log)
    if t_cfg.max_minutes is not None and t_cfg.max_minutes <= 0:
        # 0 would otherwise read as "no limit"; an unset value is the way to ask for none.
        raise ValueError(f"train.max_minutes must be > 0, got {t_cfg.max_minutes}; "
                         "remove it for no time limit")
    return dims


def launch(cfg, resume: bool, dims: ParallelDims, data: DataSource, spec: ModelSpec, max_steps: int,
           warmup_steps: int) -> dict:
    """Join the process group (under torchrun), build the run and train it to max_steps; the
    summary. `cfg` is any job config with the sections the Trainer reads (run, train, optim,
    schedule, checkpoint, eval, log, parallel, hardware) and grad_accum_steps(dp)."""
    pipeline_plan(cfg, dims, spec.args, data, spec)  # a bad pipeline is an error before any process group
    device, _ = resolve_device(cfg.train.device)
    env, device = init_distributed(device)
    try:
        return run(build(cfg, resume, dims, env, device, data, spec, max_steps, warmup_steps))
    finally:
        close_distributed(env)


def pipeline_plan(cfg, dims: ParallelDims, args: ModelArgs, data: DataSource, spec: ModelSpec) -> PipelinePlan | None:
    """The stages of a run with parallel.pp > 1 (parallel/pipeline.py), checked against the model,
    the batch and what the run does besides training steps; None without a pipeline."""
    if dims.pp == 1:
        return None
    if data.masked or spec.prepare is not None:
        raise ValueError(f"parallel.pp={dims.pp}: pipeline parallelism trains from scratch on token shards "
                         "(pretrain); fine-tuning runs use data parallelism (parallel.dp_shard) instead")
    if cfg.eval.tasks:
        raise ValueError(f"eval.tasks={cfg.eval.tasks} with parallel.pp={dims.pp}: task scoring runs the whole "
                         "model on each rank; score the final model instead (llamaworks eval) and set eval.tasks = []")
    par = cfg.parallel
    plan = resolve_pipeline(dims.pp, par.pp_schedule, par.pp_microbatches, par.pp_split_points,
                            par.pp_stages_per_rank, args.n_layers, cfg.grad_accum_steps(dims.dp),
                            args.tie_word_embeddings)
    if cfg.eval.every > 0 and 0 < cfg.eval.batches < plan.microbatches:
        raise ValueError(f"eval.batches={cfg.eval.batches} is fewer than the {plan.microbatches} micro-batches of one "
                         f"schedule step (parallel.pp_microbatches): validation runs whole schedule steps; raise "
                         f"eval.batches to a multiple of {plan.microbatches} (0: the whole val split)")
    return plan


def pipeline_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # The last stage's logits (mbs, seq, vocab) against (mbs, seq): the microbatch's mean loss.
    return cross_entropy(logits, targets)


def shard_source(cfg: JobConfig, manifest: dict, tokenizer: Tokenizer) -> DataSource:
    """Pretraining's data: windows of the token shards in cfg.data.dir."""
    t_cfg = cfg.train

    def train_loader(rank: int, world: int) -> TokenLoader:
        return TokenLoader(cfg.data.dir, "train", batch_size=t_cfg.micro_batch_size, seq_len=t_cfg.seq_len,
                           rank=rank, world_size=world, seed=t_cfg.seed)

    return DataSource(tokenizer, train_loader, build_val_loader(cfg, manifest))


def check_out_dir(out: Path) -> None:
    """Create run.out_dir and write a file in it: a read-only or impossible folder is an error
    now, not a traceback at the first checkpoint after minutes (or days) of training."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"run.out_dir {out} is not writable ({e.strerror or e}); fix its permissions or choose "
                         "another run.out_dir") from None


def build(cfg, resume: bool, dims: ParallelDims, env: DistEnv, device: torch.device, data: DataSource,
          spec: ModelSpec, max_steps: int, warmup_steps: int) -> Trainer:
    """The model (sharded and initialised), optimizer and loaders, restored from the run's
    latest checkpoint when resuming; the run's config.toml written."""
    out = Path(cfg.run.out_dir)
    t_cfg, par = cfg.train, cfg.parallel
    amp_dtype = resolve_amp(device, t_cfg.dtype)
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype != torch.float32 else nullcontext()
    torch.manual_seed(t_cfg.seed)
    if device.type == "cpu" and not t_cfg.keep_freed_memory:
        # Freed memory returned (train/heap.py) from before the weights are filled in: set after, the
        # set-up's blocks would already sit in the heap under the threshold glibc raised, and the
        # steps' small blocks would fault their holes in again (QLoRA at B: +18 MiB a block).
        keep_freed_memory(False)
    # Sharded initialisation: the model is built on the meta device (no memory), split as
    # cfg.parallel says, and only then are this rank's shards allocated and filled, each
    # parameter from its own (seed, name) generator (train/init.py): the weights of a
    # 1-process run, which takes the same path, and no rank ever holds the whole model.
    args = spec.args
    plan = pipeline_plan(cfg, dims, args, data, spec)
    model = build_model(args, device="meta")
    n_params = sum(p.numel() for p in model.parameters())
    if spec.prepare is not None:
        spec.prepare(model)
    mesh = dims.build_mesh(device.type) if dims.distributed else None
    loss_parallel = par.loss_parallel and dims.tp > 1
    mp_param, mp_reduce = resolve_mp_dtypes(par.mp_param_dtype, par.mp_reduce_dtype, device.type)
    if dims.dp_shard == 1 and (mp_param, mp_reduce) != (torch.float32, torch.float32):
        log.info("parallel.mp_param_dtype/mp_reduce_dtype apply to FSDP only (parallel.dp_shard > 1): this run "
                 "computes in train.dtype's autocast")
    # With parallel.pp > 1: this rank's stages of the model (a PipelineModel), the rest dropped.
    model = parallelize(model, dims, t_cfg.activation_checkpointing, t_cfg.compile, mesh,
                        par.fsdp_reshard_after_forward, loss_parallel=loss_parallel, mp_param_dtype=mp_param,
                        mp_reduce_dtype=mp_reduce, pipeline=plan)
    model.to_empty(device=device)
    spec.init(model, t_cfg.seed, device)
    if spec.adapt is not None:
        spec.adapt(model)
    model.train()
    if device.type == "cpu" and t_cfg.keep_freed_memory:  # each step's activations reuse the last step's pages
        keep_freed_memory(True)  # after the weights: what their set-up freed is given back first
    if loss_parallel:
        from torch.distributed.tensor.parallel import loss_parallel as loss_context
    else:
        loss_context = nullcontext
    optimizer = build_optimizer(model, cfg.optim)
    pipe = Pipeline(model, mesh["pp"].get_group(), device, pipeline_loss) if plan else None
    # The tp ranks of one data-parallel replica, and the ranks of one pipeline, read the same
    # batch (the first stage uses its inputs, the last its targets).
    loader = data.train_loader(dims.dp_rank(env.rank), dims.dp)
    ckpt, state = restore(out, resume, model, optimizer, loader, spec.base)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.toml", dumps(cfg))

    accum = cfg.grad_accum_steps(dims.dp)
    fpt = flops_per_token(args, t_cfg.seq_len)
    peak = cfg.hardware.peak_flops or measure_peak_flops(device)
    trainer = Trainer(cfg=cfg, out=out, env=env, dims=dims, device=device, amp=amp, loss_context=loss_context,
                      model=model, optimizer=optimizer, tokenizer=data.tokenizer, loader=loader,
                      # Benchmark scores every eval.task_every steps (Figure 2); task files read (and checked) now.
                      val_loader=data.val_loader, task_eval=TaskEvaluator.from_config(cfg.eval),
                      accum=accum, n_params=n_params, flops_per_token=fpt, peak_flops=peak, model_name=spec.name,
                      max_steps=max_steps, warmup_steps=warmup_steps, masked=data.masked,
                      save_final=spec.save_final, base=spec.base, pipeline=pipe,
                      step=state.get("step", 0), tokens_seen=state.get("tokens", 0),
                      elapsed_before=state.get("elapsed_s", 0.0), last_ckpt=ckpt)
    log.info("model: %s, %.2fM parameters; %d sequences/step (%d micro-batches of %d x %s%d tokens, dp=%d); "
             "%d steps; %.3g FLOPs/token; peak %.3g FLOP/s (%s)", spec.name, n_params / 1e6,
             accum * t_cfg.micro_batch_size * dims.dp, accum, t_cfg.micro_batch_size,
             "up to " if data.masked else "", t_cfg.seq_len, dims.dp, max_steps, fpt, peak,
             "given" if cfg.hardware.peak_flops else "measured")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable != n_params:
        log.info("training %.3gM of the parameters (%.2g%%); the others are frozen", trainable / 1e6,
                 100 * trainable / n_params)
    batch_tokens = getattr(t_cfg, "batch_tokens", None)  # pretraining's batch is in tokens, fine-tuning's in examples
    if batch_tokens is not None and trainer.tokens_per_step != batch_tokens:
        log.warning("train.batch_tokens=%d is not a whole number of micro-batches of %d tokens on %d "
                    "data-parallel rank(s): each step trains on %d tokens", batch_tokens,
                    t_cfg.micro_batch_size * t_cfg.seq_len, dims.dp, trainer.tokens_per_step)
    return trainer


def restore(out: Path, resume: bool, model, optimizer, loader, base: dict | None = None) -> tuple[Path | None, dict]:
    """With --resume, load the latest complete checkpoint into model, optimizer and loader (and
    the RNG), checking that the frozen weights are its `base` (ModelSpec.base): (its path, its
    saved state); (None, {}) for a fresh run. A fresh run refuses a
    folder that holds checkpoints: it would interleave its own with another run's."""
    ckpt = ckpt_io.latest_checkpoint(out) if resume else None
    if resume and ckpt is None:
        log.warning("--resume: no complete checkpoint in %s, starting from scratch", out)
    if ckpt is None:
        if not resume and ckpt_io.list_checkpoints(out):
            raise ValueError(f"{out} already holds checkpoints; pass --resume to continue that run or choose "
                             "another run.out_dir")
        return None, {}
    state = ckpt_io.load_checkpoint(ckpt, model, optimizer, loader, base=base)
    log.info("resumed from %s (step %d, %d tokens)", ckpt, state["step"], state["tokens"])
    return ckpt, state


def build_val_loader(cfg: JobConfig, manifest: dict) -> TokenLoader | None:
    """The validation loader, or None when validation is off or the val split is too small."""
    t_cfg = cfg.train
    if cfg.eval.every <= 0:
        return None
    # Built (and so checked) before training: a val split too small for one micro-batch must
    # not surface as a crash at the first evaluation, after minutes of training.
    val_windows = max(0, manifest["splits"]["val"]["tokens"] - 1) // t_cfg.seq_len
    if val_windows < t_cfg.micro_batch_size:
        log.warning("no validation loss: the val split of %s has %d windows of %d tokens, fewer than one "
                    "micro-batch of %d; prepare with a larger val_fraction or set eval.every = 0",
                    cfg.data.dir, val_windows, t_cfg.seq_len, t_cfg.micro_batch_size)
        return None
    return TokenLoader(cfg.data.dir, "val", batch_size=t_cfg.micro_batch_size, seq_len=t_cfg.seq_len,
                       shuffle=False, infinite=False)


def train_step(t: Trainer) -> StepResult:
    """One optimizer step on one global batch: learning rate, gradients, clipping, update."""
    cfg = t.cfg
    decay_steps = cfg.schedule.decay_steps or t.max_steps
    lr = lr_at(t.step, cfg.optim.lr, t.warmup_steps, decay_steps, cfg.schedule.min_lr_ratio)
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    # Each data-parallel rank's loss is the mean over its share of the global batch and
    # FSDP/DDP average the gradients over ranks: together, the gradient of the global
    # batch's mean loss. The logged loss is that global mean, and the clipping norm is
    # the norm of the whole (sharded) gradient.
    sync_every = getattr(cfg.parallel, "sync_every_microbatch", False)
    if t.pipeline is not None:  # gradients synchronised after the last schedule step of the optimizer step
        loss, tokens = accumulate_pipeline_gradients(t.pipeline, t.loader, t.device, t.amp,
                                                     t.loss_context, sync_every), t.tokens_per_step
    elif t.masked:
        loss, tokens = accumulate_masked_gradients(t.model, t.loader, t.accum, t.device, t.amp, t.loss_context,
                                                   t.dims.dp, sync_every)
    else:
        loss, tokens = accumulate_gradients(t.model, t.loader, t.accum, t.device, t.amp, t.loss_context,
                                            sync_every), t.tokens_per_step
    loss = global_mean(loss).item()
    grad_norm = clip_grad_norm_(t.model.parameters(), cfg.optim.grad_clip,
                                t.pipeline.group if t.pipeline else None).item()
    # A finite loss with an inf/nan gradient would still poison the weights (and every
    # later checkpoint) once the optimizer steps, so both are checked before it does.
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        what = "gradient norm" if math.isfinite(loss) else "loss"
        where = f"the last good checkpoint is {t.last_ckpt}" if t.last_ckpt else "no checkpoint was saved yet"
        raise NonFiniteLossError(
            f"non-finite {what} at step {t.step + 1} (loss {loss}, gradient norm {grad_norm}): stopping "
            f"without saving; {where}. Lower optim.lr, raise schedule.warmup_steps or check the data, then "
            "run again with --resume")
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.step += 1
    t.tokens_seen += tokens
    return StepResult(loss, grad_norm, lr, tokens)


def validate(t: Trainer) -> float | None:
    if t.pipeline is not None:
        return evaluate_pipeline(t.pipeline, t.val_loader, t.cfg.eval.batches, t.device, t.amp)
    return evaluate(t.model, t.val_loader, t.cfg.eval.batches, t.device, t.amp)


def save_checkpoint(t: Trainer) -> Path:
    """Write (or, with checkpoint.async_mode = "async", start writing) the checkpoint of this step."""
    if t.checkpointer is None:
        c = t.cfg.checkpoint
        t.checkpointer = ckpt_io.Checkpointer(t.out, c.keep_last, c.async_mode)
    t.last_ckpt = t.checkpointer.save(t.step, t.model, t.tokenizer, t.optimizer, t.loader,
                                      {"tokens": t.tokens_seen, "elapsed_s": t.elapsed(), "config": dumps(t.cfg),
                                       **({"base": t.base} if t.base is not None else {})})
    return t.last_ckpt


class Throughput:
    """Tokens per second of the training steps since `restart`: evaluations and checkpoints
    restart it, so they do not count against the step time (MFU)."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.since, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        return self.tokens / (time.perf_counter() - self.since)


def run(t: Trainer) -> dict:
    """The training loop from t.step to t.max_steps (or the time limit): log, validate,
    score tasks and checkpoint on their schedules; then `finish`."""
    from tqdm import tqdm

    cfg, max_steps = t.cfg, t.max_steps
    # Only rank 0 writes metrics, the progress bar, plots and the summary.
    metrics = MetricsLog(t.out / "metrics.jsonl", truncate_after_step=t.step) if t.env.is_main else _NoMetrics()
    # TensorBoard / W&B (log.tensorboard, log.wandb) receive every metrics row, on rank 0.
    trackers = build_trackers(cfg.log, t.out, dataclasses.asdict(cfg), dumps(cfg), t.env.is_main, t.step)
    profile = getattr(cfg, "profile", None)
    profiler = StepProfiler(t.out, profile_window(profile.steps) if profile else None, t.device, t.env.rank)

    def report(row: dict) -> None:
        metrics.write(row)
        trackers.log_scalars(row["step"], row)

    bar = tqdm(total=max_steps, initial=t.step, disable=not (cfg.log.progress and t.env.is_main),
               dynamic_ncols=True, file=sys.stderr, unit="step")
    t.started = time.perf_counter()
    speed = Throughput()
    deadline = t.started + 60 * cfg.train.max_minutes if cfg.train.max_minutes else None
    stop_reason = "max_steps"
    last: StepResult | None = None  # stays None when resuming a run that already reached max_steps
    start_step, val_step, final_val = t.step, -1, None
    try:
        while t.step < max_steps:
            with profiler.step(t.step + 1):
                last = train_step(t)
            speed.add(last.tokens)
            if t.step % cfg.log.every == 0 or t.step == max_steps:
                tps = speed.rate()
                mfu = tps * t.flops_per_token / (t.peak_flops * t.dims.world_size)  # all ranks over all peaks
                report({"step": t.step, "loss": last.loss, "lr": last.lr, "grad_norm": last.grad_norm,
                        "tokens": t.tokens_seen, "tokens_per_s": tps, "mfu": mfu, "elapsed_s": t.elapsed(),
                        "peak_memory_gb": peak_memory_gb(t.device)})
                bar.set_postfix(loss=f"{last.loss:.3f}", lr=f"{last.lr:.2e}", tok_s=f"{tps:.0f}", mfu=f"{mfu:.1%}")
                speed.restart()
            bar.update(1)
            if t.val_loader and t.step % cfg.eval.every == 0:
                val_step, final_val = t.step, validate(t)
                report({"step": t.step, "tokens": t.tokens_seen, "val_loss": final_val})
                log.info("step %d: validation loss %.4f", t.step, final_val)
                speed.restart()
            if t.task_eval and t.task_eval.due(t.step):
                report({"step": t.step, "tokens": t.tokens_seen, **t.task_eval.run(t.model, t.tokenizer)})
                speed.restart()
            if deadline and time.perf_counter() >= deadline:
                stop_reason = f"time limit ({cfg.train.max_minutes} min)"
                break
            if t.step % cfg.checkpoint.every == 0 and t.step < max_steps:
                save_checkpoint(t)
                speed.restart()
        if t.val_loader and val_step != t.step:  # the final weights' validation loss, unless just measured
            final_val = validate(t)
            if t.step > start_step:  # else the run being resumed already logged it
                report({"step": t.step, "tokens": t.tokens_seen, "val_loss": final_val})
    finally:
        profiler.stop(t.step)  # a run that ends inside the window still writes its profile
        bar.close()
        metrics.close()
        trackers.close()
    return finish(t, stop_reason, last.loss if last else None, final_val)


def finish(t: Trainer, stop_reason: str, final_loss: float | None, final_val: float | None) -> dict:
    """The last checkpoint (unless the loop just saved this step), the final model (a model
    directory, or what ModelSpec.save_final writes), the loss curve and the summary with section
    6's energy estimate."""
    if t.last_ckpt is None or not t.last_ckpt.name.endswith(f"{t.step:08d}"):
        save_checkpoint(t)
    if t.checkpointer is not None:
        t.checkpointer.close()  # the final checkpoint (an async one too) is complete before the run reports
    elapsed = t.elapsed()
    if t.save_final is not None:
        final = t.save_final(t.model, t.tokenizer, t.out)
    elif t.pipeline is not None:  # the stages' weights gathered on rank 0
        whole, final = gather_full_model(t.model, t.pipeline.group), t.out / "model"
        if t.env.is_main:
            save_model(whole.eval(), t.tokenizer, final)
        torch.distributed.barrier()
    else:
        final = ckpt_io.save_model_dir(t.model, t.tokenizer, t.out / "model")
    curve = None if not t.env.is_main else plot_loss_curve(
        t.out / "metrics.jsonl", t.out / "loss_curve.png",
        f"llamaworks {t.model_name}: {t.n_params / 1e6:.1f}M parameters")
    device_hours = elapsed / 3600 * t.dims.world_size
    power = t.cfg.hardware.power_w or (400.0 if t.device.type == "cuda" else 65.0)
    summary = {"steps": t.step, "tokens": t.tokens_seen, "stop_reason": stop_reason, "elapsed_s": elapsed,
               "params": t.n_params, "final_train_loss": final_loss, "final_val_loss": final_val,
               "checkpoint": str(t.last_ckpt), "model_dir": str(final),
               "loss_curve": str(curve) if curve else None,
               "energy": run_summary(device_hours, power)}
    if t.env.is_main:
        atomic_write_json(t.out / "summary.json", summary)
    return summary


class _NoMetrics:
    """MetricsLog's interface for ranks other than 0."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def pretrain(
    config: Annotated[str | None, Arg("TOML config file (see src/llamaworks/configs/)")] = None,
    resume: Annotated[bool, Arg("continue from the run's latest complete checkpoint")] = False,
    init_from: Annotated[str | None, Arg("start from this checkpoint's model (a model directory, HF or Meta "
                                         "folder, or .gguf file; model.init_from): its weights and arguments, a "
                                         "fresh optimizer at step 0")] = None,
    overrides: list[str] | None = None,
) -> int:
    """Pretrain with the paper's recipe. Any config field can be set as --section.key VALUE,
    e.g. --train.max_steps 100 --run.out_dir runs/x --optim.lr 1e-3."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    flags = {"model": {"init_from": init_from}} if init_from is not None else {}
    cfg = load_config(JobConfig, resolve_config_path(config), merge(parse_overrides(overrides or []), flags))
    return report_run("pretrain", lambda: train(cfg, resume=resume))


def report_run(command: str, run: Callable[[], dict]) -> int:
    """A training command's ending: exit 3 on a non-finite loss (its message names the last good
    checkpoint), else the summary, printed once under torchrun."""
    try:
        summary = run()
    except NonFiniteLossError as e:
        print(f"llamaworks {command}: {e}", file=sys.stderr)
        return 3
    if os.environ.get("RANK", "0") == "0":
        print(format_summary(summary))
    return 0


def format_summary(s: dict) -> str:
    val = f", validation loss {s['final_val_loss']:.4f}" if s.get("final_val_loss") is not None else ""
    loss = s.get("final_train_loss")
    train_loss = f"{loss:.4f}" if loss is not None else "n/a (no new steps)"
    e = s["energy"]
    return (f"done: {s['steps']} steps, {s['tokens']:,} tokens in {s['elapsed_s'] / 60:.1f} min "
            f"({s['stop_reason']}); train loss {train_loss}{val}\n"
            f"model: {s['model_dir']}  checkpoint: {s['checkpoint']}\n"
            f"energy: {e['energy_mwh'] * 1e6:.1f} Wh, {e['tco2eq'] * 1e6:.1f} gCO2eq "
            f"(section 6 formula, {e['power_w']:.0f} W, PUE {e['pue']})")

pretrain.config_class = JobConfig
