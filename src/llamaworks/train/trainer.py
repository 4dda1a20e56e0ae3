"""Pretraining with the paper's recipe (sections 2.3-2.4): AdamW (0.9, 0.95), weight
decay 0.1, clipping 1.0, 2,000 warm-up steps, cosine to 10%, 4M-token batches by
gradient accumulation, activation checkpointing, exact resume."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F

from llamaworks.args import Arg
from llamaworks.atomic import atomic_write_json, atomic_write_text
from llamaworks.carbon import run_summary
from llamaworks.configfile import dumps, load_config, resolve_config_path
from llamaworks.data.shards import open_token_dataset
from llamaworks.device import default_dtype, parse_dtype, resolve_device
from llamaworks.eval.during_training import TaskEvaluator
from llamaworks.model import build_model
from llamaworks.parallel.distributed import (
    clip_grad_norm_,
    close_distributed,
    env_world_size,
    global_mean,
    init_distributed,
)
from llamaworks.parallel.parallelize import ParallelDims, parallelize
from llamaworks.plan import flops_per_token
from llamaworks.tokenizer import Tokenizer
from llamaworks.train import checkpoint as ckpt_io
from llamaworks.train.config import JobConfig
from llamaworks.train.init import init_weights
from llamaworks.train.loader import TokenLoader
from llamaworks.train.loss import lm_loss
from llamaworks.train.metrics_log import MetricsLog, measure_peak_flops, plot_loss_curve
from llamaworks.train.optim import build_optimizer
from llamaworks.train.schedule import lr_at

log = logging.getLogger("llamaworks")


class NonFiniteLossError(RuntimeError):
    pass


def resolve_amp(device: torch.device, dtype: str) -> torch.dtype:
    return default_dtype(device) if dtype == "auto" else parse_dtype(dtype)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # (bsz*seq, vocab) against (bsz*seq,)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


def accumulate_gradients(model, loader, accum: int, device, amp, loss_context=nullcontext) -> torch.Tensor:
    """Forward and backward `accum` micro-batches; return their mean loss (detached).

    Each micro-batch loss is divided by `accum` before backward, so the summed gradients
    are those of the mean loss over all accum * micro_batch_size sequences: the same
    update as one batch that large (the paper's 4M-token batches, section 2.3).
    loss_context: a factory of the context forward and backward run in (torch's
    loss_parallel with tensor parallelism).
    """
    loss_sum = torch.zeros((), device=device)
    for _ in range(accum):
        x, y = next(loader)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with loss_context():
            with amp:
                loss = lm_loss(model, x, y) / accum  # output layer and cross-entropy fused (train/loss.py)
            loss.backward()
        loss_sum += loss.detach()
    return loss_sum


@torch.no_grad()
def evaluate(model, loader, batches: int, device, amp) -> float | None:
    model.eval()
    total, n = 0.0, 0
    for i, (x, y) in enumerate(loader):
        if i >= batches:
            break
        with amp:
            total += cross_entropy(model(x.to(device)), y.to(device)).item()
        n += 1
    model.train()
    return total / n if n else None


def train(cfg: JobConfig, resume: bool = False) -> dict:
    """Run (or continue) the job; returns the run summary (also written to OUT/summary.json).

    Under torchrun (WORLD_SIZE > 1) every process calls this: it joins the process group,
    parallelizes the model as cfg.parallel says and leaves the group on return.
    """
    t_cfg = cfg.train
    par = cfg.parallel
    # The parallel degrees are checked against the world size (and the head count) first,
    # before any process group, data or model exists: a bad mesh is an error, not a hang.
    dims = ParallelDims.resolve(par.dp_replicate, par.dp_shard, par.tp, env_world_size(),
                                cfg.model.build_args().n_heads)
    if t_cfg.seq_len % dims.tp:
        raise ValueError(f"train.seq_len={t_cfg.seq_len} is not divisible by parallel.tp={dims.tp}: sequence "
                         "parallelism splits each sequence across the tensor-parallel ranks")
    if t_cfg.max_minutes is not None and t_cfg.max_minutes <= 0:
        # 0 would otherwise read as "no limit"; an unset value is the way to ask for none.
        raise ValueError(f"train.max_minutes must be > 0, got {t_cfg.max_minutes}; "
                         "remove it for no time limit")
    if not cfg.data.dir:
        raise ValueError("data.dir is not set: point it at token shards made by `llamaworks prepare`")
    manifest = open_token_dataset(cfg.data.dir)
    tok_path = cfg.data.tokenizer or (manifest.get("tokenizer") or {}).get("path")
    if not tok_path:
        raise ValueError("data.tokenizer is not set and the shards' manifest names no tokenizer")
    tokenizer = Tokenizer(tok_path)
    args = cfg.model.build_args(tokenizer.vocab_size)
    if t_cfg.seq_len > args.max_seq_len:
        raise ValueError(f"train.seq_len={t_cfg.seq_len} exceeds the model's max_seq_len={args.max_seq_len}; "
                         "lower train.seq_len or raise model.max_seq_len")
    device, _ = resolve_device(t_cfg.device)
    env, device = init_distributed(device)
    try:
        return _train(cfg, resume, dims, env, device, manifest, tokenizer, args)
    finally:
        close_distributed(env)


def _train(cfg: JobConfig, resume: bool, dims, env, device, manifest, tokenizer, args) -> dict:
    from tqdm import tqdm

    out = Path(cfg.run.out_dir)
    t_cfg, par = cfg.train, cfg.parallel
    amp_dtype = resolve_amp(device, t_cfg.dtype)
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype != torch.float32 else nullcontext()

    torch.manual_seed(t_cfg.seed)
    # Sharded initialisation: the model is built on the meta device (no memory), split as
    # cfg.parallel says, and only then are this rank's shards allocated and filled, each
    # parameter from its own (seed, name) generator (train/init.py): the weights of a
    # 1-process run, which takes the same path, and no rank ever holds the whole model.
    model = build_model(args, device="meta")
    n_params = sum(p.numel() for p in model.parameters())
    mesh = dims.build_mesh(device.type) if dims.distributed else None
    loss_parallel = par.loss_parallel and dims.tp > 1
    parallelize(model, dims, t_cfg.activation_checkpointing, t_cfg.compile, mesh,
                par.fsdp_reshard_after_forward, loss_parallel=loss_parallel)
    model.to_empty(device=device)
    init_weights(model, t_cfg.seed, device)
    model.train()
    if loss_parallel:
        from torch.distributed.tensor.parallel import loss_parallel as loss_context
    else:
        loss_context = nullcontext
    optimizer = build_optimizer(model, cfg.optim)
    # The tp ranks of one data-parallel replica read the same batch: tp is the mesh's
    # innermost dimension, so the data-parallel rank is rank // tp.
    loader = TokenLoader(cfg.data.dir, "train", batch_size=t_cfg.micro_batch_size, seq_len=t_cfg.seq_len,
                         rank=env.rank // dims.tp, world_size=dims.dp, seed=t_cfg.seed)
    accum = cfg.grad_accum_steps(dims.dp)
    tokens_per_step = accum * t_cfg.micro_batch_size * t_cfg.seq_len * dims.dp
    decay_steps = cfg.schedule.decay_steps or t_cfg.max_steps

    step, tokens_seen, elapsed_before = 0, 0, 0.0
    ckpt = ckpt_io.latest_checkpoint(out) if resume else None
    if resume and ckpt is None:
        log.warning("--resume: no complete checkpoint in %s, starting from scratch", out)
    if ckpt is not None:
        state = ckpt_io.load_checkpoint(ckpt, model, optimizer, loader)
        step, tokens_seen, elapsed_before = state["step"], state["tokens"], state.get("elapsed_s", 0.0)
        log.info("resumed from %s (step %d, %d tokens)", ckpt, step, tokens_seen)
    elif not resume and ckpt_io.list_checkpoints(out):
        raise ValueError(f"{out} already holds checkpoints; pass --resume to continue that run or choose "
                         "another run.out_dir")
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.toml", dumps(cfg))

    fpt = flops_per_token(args, t_cfg.seq_len)
    peak = cfg.hardware.peak_flops or measure_peak_flops(device)
    log.info("model: %s preset, %.2fM parameters; %d tokens/step (%d micro-batches of %dx%d, dp=%d); "
             "%.3g FLOPs/token; peak %.3g FLOP/s (%s)", cfg.model.preset, n_params / 1e6, tokens_per_step,
             accum, t_cfg.micro_batch_size, t_cfg.seq_len, dims.dp, fpt, peak,
             "given" if cfg.hardware.peak_flops else "measured")
    # Benchmark scores every eval.task_every steps (Figure 2); task files read (and checked) now.
    task_eval = TaskEvaluator.from_config(cfg.eval)
    # Only rank 0 writes metrics, the progress bar, plots and the summary.
    metrics = MetricsLog(out / "metrics.jsonl", truncate_after_step=step) if env.is_main else _NoMetrics()
    val_loader = None
    if cfg.eval.every > 0:
        # Built (and so checked) here: a val split too small for one micro-batch must not
        # surface as a crash at the first evaluation, after minutes of training.
        val_windows = max(0, manifest["splits"]["val"]["tokens"] - 1) // t_cfg.seq_len
        if val_windows >= t_cfg.micro_batch_size:
            val_loader = TokenLoader(cfg.data.dir, "val", batch_size=t_cfg.micro_batch_size,
                                     seq_len=t_cfg.seq_len, shuffle=False, infinite=False)
        else:
            log.warning("no validation loss: the val split of %s has %d windows of %d tokens, fewer than one "
                        "micro-batch of %d; prepare with a larger val_fraction or set eval.every = 0",
                        cfg.data.dir, val_windows, t_cfg.seq_len, t_cfg.micro_batch_size)

    def checkpoint(elapsed: float) -> Path:
        return ckpt_io.save_checkpoint(out, step, model, tokenizer, optimizer, loader,
                                       {"tokens": tokens_seen, "elapsed_s": elapsed, "config": dumps(cfg)},
                                       cfg.checkpoint.keep_last)

    bar = tqdm(total=t_cfg.max_steps, initial=step, disable=not (cfg.log.progress and env.is_main),
               dynamic_ncols=True,
               file=sys.stderr, unit="step")
    t_start = time.perf_counter()
    t_window, tok_window = t_start, 0
    last_ckpt = ckpt
    deadline = t_start + 60 * t_cfg.max_minutes if t_cfg.max_minutes else None
    stop_reason = "max_steps"
    loss_val: float | None = None  # stays None when resuming a run that already reached max_steps
    start_step, val_step, final_val = step, -1, None
    try:
        while step < t_cfg.max_steps:
            lr = lr_at(step, cfg.optim.lr, cfg.schedule.warmup_steps, decay_steps, cfg.schedule.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Each data-parallel rank's loss is the mean over its share of the global batch and
            # FSDP/DDP average the gradients over ranks: together, the gradient of the global
            # batch's mean loss. The logged loss is that global mean, and the clipping norm is
            # the norm of the whole (sharded) gradient.
            loss_val = global_mean(accumulate_gradients(model, loader, accum, device, amp, loss_context)).item()
            grad_norm = clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            # A finite loss with an inf/nan gradient would still poison the weights (and every
            # later checkpoint) once the optimizer steps, so both are checked before it does.
            if not (math.isfinite(loss_val) and math.isfinite(grad_norm.item())):
                what = "gradient norm" if math.isfinite(loss_val) else "loss"
                where = (f"the last good checkpoint is {last_ckpt}" if last_ckpt
                         else "no checkpoint was saved yet")
                raise NonFiniteLossError(
                    f"non-finite {what} at step {step + 1} (loss {loss_val}, gradient norm "
                    f"{grad_norm.item()}): stopping without saving; {where}. Lower optim.lr, raise "
                    "schedule.warmup_steps or check the data, then run again with --resume")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            tok_window += tokens_per_step
            now = time.perf_counter()
            if step % cfg.log.every == 0 or step == t_cfg.max_steps:
                tps = tok_window / (now - t_window)
                mfu = tps * fpt / (peak * dims.world_size)  # tokens of all ranks over all devices' peak
                metrics.write({"step": step, "loss": loss_val, "lr": lr, "grad_norm": grad_norm.item(),
                               "tokens": tokens_seen, "tokens_per_s": tps, "mfu": mfu,
                               "elapsed_s": elapsed_before + now - t_start})
                bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}", mfu=f"{mfu:.1%}")
                t_window, tok_window = now, 0
            bar.update(1)
            if val_loader and step % cfg.eval.every == 0:
                val_step, final_val = step, evaluate(model, val_loader, cfg.eval.batches, device, amp)
                metrics.write({"step": step, "tokens": tokens_seen, "val_loss": final_val})
                log.info("step %d: validation loss %.4f", step, final_val)
                t_window, tok_window = time.perf_counter(), 0
            if task_eval and task_eval.due(step):
                metrics.write({"step": step, "tokens": tokens_seen, **task_eval.run(model, tokenizer)})
                t_window, tok_window = time.perf_counter(), 0
            if deadline and time.perf_counter() >= deadline:
                stop_reason = f"time limit ({t_cfg.max_minutes} min)"
                break
            if step % cfg.checkpoint.every == 0 and step < t_cfg.max_steps:
                last_ckpt = checkpoint(elapsed_before + time.perf_counter() - t_start)
                t_window, tok_window = time.perf_counter(), 0
        if val_loader and val_step != step:  # the final weights' validation loss, unless just measured
            final_val = evaluate(model, val_loader, cfg.eval.batches, device, amp)
            if step > start_step:  # else the run being resumed already logged it
                metrics.write({"step": step, "tokens": tokens_seen, "val_loss": final_val})
    finally:
        bar.close()
        metrics.close()

    elapsed = elapsed_before + time.perf_counter() - t_start
    if last_ckpt is None or not last_ckpt.name.endswith(f"{step:08d}"):
        last_ckpt = checkpoint(elapsed)
    ckpt_io.save_model_dir(model, tokenizer, out / "model")
    curve = None if not env.is_main else plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png",
                            f"llamaworks {cfg.model.preset}: {n_params / 1e6:.1f}M parameters")
    device_hours = elapsed / 3600 * dims.world_size
    power = cfg.hardware.power_w or (400.0 if device.type == "cuda" else 65.0)
    summary = {"steps": step, "tokens": tokens_seen, "stop_reason": stop_reason, "elapsed_s": elapsed,
               "params": n_params, "final_train_loss": loss_val, "final_val_loss": final_val,
               "checkpoint": str(last_ckpt), "model_dir": str(out / "model"),
               "loss_curve": str(curve) if curve else None,
               "energy": run_summary(device_hours, power)}
    if env.is_main:
        atomic_write_json(out / "summary.json", summary)
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
    overrides: list[str] | None = None,
) -> int:
    """Pretrain with the paper's recipe. Any config field can be set as --section.key VALUE,
    e.g. --train.max_steps 100 --run.out_dir runs/x --optim.lr 1e-3."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = load_config(JobConfig, resolve_config_path(config), overrides or [])
    try:
        summary = train(cfg, resume=resume)
    except NonFiniteLossError as e:
        print(f"llamaworks pretrain: {e}", file=sys.stderr)
        return 3
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary rather than one per process
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
