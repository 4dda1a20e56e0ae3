"""The pretraining loop end to end on the tiny preset: the paper's optimiser recipe (section
2.3), activation checkpointing (2.4), checkpoints and exact resume, and what a run writes."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import llamaworks.model
import llamaworks.train.trainer
from llamaworks.carbon import run_summary
from llamaworks.cli import main
from llamaworks.configfile import dumps, load_config
from llamaworks.inference.load import load_model
from llamaworks.model import ModelArgs, build_model
from llamaworks.plan import flops_per_token
from llamaworks.train.checkpoint import STATE, latest_checkpoint, list_checkpoints
from llamaworks.train.config import JobConfig, OptimConfig
from llamaworks.train.loader import TokenLoader
from llamaworks.train.metrics_log import read_metrics
from llamaworks.train.optim import build_optimizer
from llamaworks.train.schedule import lr_at
from llamaworks.train.trainer import accumulate_gradients, train
from llamaworks.weights import read_safetensors


def column(out: Path, key: str = "loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(out / "metrics.jsonl") if key in r]


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in read_safetensors(model_dir / "model.safetensors").items()}


@pytest.fixture(scope="module")
def reference(make_config, tmp_path_factory):
    """8 uninterrupted steps: checkpoints at 3 and 6 (and 8, the end), val loss at 4 and 8.
    Records the norm of the gradients each AdamW step is handed, i.e. after clipping."""
    out = tmp_path_factory.mktemp("reference")
    cfg = make_config(out)
    handed = []

    def watch(optimizer, args, kwargs):
        grads = [p.grad.flatten() for g in optimizer.param_groups for p in g["params"]]
        handed.append(torch.linalg.vector_norm(torch.cat(grads)).item())

    handle = register_optimizer_step_pre_hook(watch)
    try:
        summary = train(cfg)
    finally:
        handle.remove()
    return cfg, out, summary, handed


# ---------------------------------------------------------------------------- optimiser (2.3)


def test_adamw_recipe_and_weight_decay_groups():
    assert (OptimConfig.beta1, OptimConfig.beta2, OptimConfig.weight_decay, OptimConfig.grad_clip) == (
        0.9, 0.95, 0.1, 1.0)
    cfg = JobConfig()
    assert (cfg.schedule.warmup_steps, cfg.schedule.min_lr_ratio) == (2000, 0.1)

    model = build_model(ModelArgs.from_name("tiny", n_layers=2, vocab_size=512), seed=0)
    opt = build_optimizer(model, OptimConfig())
    assert isinstance(opt, torch.optim.AdamW)
    name = {id(p): n for n, p in model.named_parameters()}
    decay, exempt = opt.param_groups
    assert decay["betas"] == (0.9, 0.95) and decay["weight_decay"] == 0.1 and exempt["weight_decay"] == 0.0
    gains = {n for n in name.values() if n.endswith("norm.weight")}
    assert len(gains) == 2 * 2 + 1  # attention_norm and ffn_norm per block, and the final norm
    assert {name[id(p)] for p in exempt["params"]} == gains
    assert {name[id(p)] for p in decay["params"]} == set(name.values()) - gains

    # With zero gradients Adam's update is 0, so only the decoupled decay moves anything:
    # matrices shrink by lr * 0.1, norm gains stay exactly where they are.
    with torch.no_grad():
        for n in gains:
            model.get_parameter(n).fill_(2.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for g in opt.param_groups:
        g["lr"] = 0.5
    opt.step()
    for n, p in model.named_parameters():
        expected = before[n] if n in gains else before[n] * (1 - 0.5 * 0.1)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0, msg=n)


def test_two_micro_batches_of_4_give_the_gradient_of_one_batch_of_8(token_shards):
    model = build_model(ModelArgs.from_name("tiny", n_layers=2, vocab_size=512), seed=0)
    twin = copy.deepcopy(model)
    one = TokenLoader(token_shards, "train", batch_size=8, seq_len=32)
    two = TokenLoader(token_shards, "train", batch_size=4, seq_len=32)
    cpu = torch.device("cpu")
    loss_one = accumulate_gradients(model, one, 1, cpu, nullcontext())
    loss_two = accumulate_gradients(twin, two, 2, cpu, nullcontext())
    torch.testing.assert_close(loss_two, loss_one, rtol=1e-6, atol=0)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)
    # Not vacuous: the first micro-batch of 4 alone has another loss than all 8 sequences.
    alone = TokenLoader(token_shards, "train", batch_size=4, seq_len=32)
    first_half = accumulate_gradients(copy.deepcopy(model), alone, 1, cpu, nullcontext())
    assert abs(first_half.item() - loss_one.item()) > 1e-4


def test_accumulation_reaches_the_configured_tokens_per_step(make_config, tmp_path):
    runs = {}
    for micro in (8, 4):  # batch_tokens 256 = 8 x 32: one micro-batch of 8, or two of 4
        out = tmp_path / f"micro{micro}"
        train(make_config(out, train={"max_steps": 2, "batch_tokens": 256, "micro_batch_size": micro},
                          eval={"every": 0}, checkpoint={"every": 100}))
        runs[micro] = read_metrics(out / "metrics.jsonl"), weights(out / "model")
    (big, w_big), (small, w_small) = runs[8], runs[4]
    assert [r["tokens"] for r in small] == [r["tokens"] for r in big] == [256, 512]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in small] == pytest.approx([r[key] for r in big], rel=1e-5)
    # Adam divides by |g| + eps, so where a gradient is ~eps (1e-8) its fp32 rounding moves that
    # weight by up to ~lr; the bound is 2-4% of the two steps' lr (5e-4, 1e-3) instead.
    for k in w_big:
        torch.testing.assert_close(w_small[k], w_big[k], rtol=0, atol=2e-5, msg=k)


def test_gradients_are_clipped_to_1_and_the_schedule_is_followed(reference):
    cfg, out, _, handed = reference
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    logged = [r["grad_norm"] for r in rows]
    assert len(handed) == len(logged) == 8
    assert any(g > 1.5 for g in logged), logged  # else clipping would not be exercised
    for pre, post in zip(logged, handed):
        assert post == pytest.approx(min(pre, 1.0), rel=1e-4), (pre, post)
    s = cfg.schedule
    expected = [lr_at(i, cfg.optim.lr, s.warmup_steps, 8, s.min_lr_ratio) for i in range(8)]
    assert [r["lr"] for r in rows] == expected


# ---------------------------------------------------------------------------- what a run writes


def test_run_logs_metrics_val_loss_curve_summary_and_config(reference):
    cfg, out, summary, _ = reference
    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for r in steps:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu"} <= r.keys()
        assert r["tokens"] == r["step"] * 128 and r["tokens_per_s"] > 0
        # MFU = achieved FLOP/s over the given peak (1e12), at the model's FLOPs per token
        fpt = flops_per_token(cfg.model.build_args(512), 32)
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt / 1e12)
    assert steps[-1]["loss"] < steps[0]["loss"]
    # every eval.every steps, and the final weights' value, measured once at step 8
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8]

    import matplotlib.image

    png = out / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(png).shape[0] > 100

    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["steps"] == 8 and summary["tokens"] == 1024 and summary["stop_reason"] == "max_steps"
    assert summary["final_train_loss"] == steps[-1]["loss"]
    assert summary["final_val_loss"] == rows[-1]["val_loss"]
    # section 6's formula on device-hours at the CPU's default 65 W
    assert summary["energy"] == pytest.approx(run_summary(summary["elapsed_s"] / 3600, 65.0))
    assert summary["energy"]["tco2eq"] > 0

    assert load_config(JobConfig, out / "config.toml") == cfg


def test_checkpoints_hold_the_training_state_and_are_model_directories(reference, tmp_path):
    cfg, out, _, _ = reference
    kept = list_checkpoints(out)
    assert [p.name for p in kept] == ["step_00000006", "step_00000008"]  # keep_last = 2
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporary left
    state = torch.load(kept[-1] / STATE, weights_only=False)
    assert {"step", "tokens", "optimizer", "loader", "rng", "config", "elapsed_s"} <= state.keys()
    assert state["step"] == 8 and state["tokens"] == 1024
    assert state["loader"]["position"] == 8 * 4  # 8 steps of one micro-batch of 4 windows
    (tmp_path / "saved.toml").write_text(state["config"])
    assert load_config(JobConfig, tmp_path / "saved.toml") == cfg
    model, tok = load_model(kept[-1])
    assert tok.vocab_size == 512
    final = weights(out / "model")
    for k, v in model.state_dict().items():
        assert torch.equal(v, final[k]), k


def test_selective_checkpointing_trains_like_none(reference, make_config, tmp_path):
    _, ref_out, _, _ = reference
    out = tmp_path / "selective"
    train(make_config(out, train={"activation_checkpointing": "selective"}))
    for key in ("loss", "val_loss"):  # val_loss: the wrapped blocks also run under no_grad
        assert [v for _, v in column(out, key)] == pytest.approx([v for _, v in column(ref_out, key)], rel=1e-6)


# ---------------------------------------------------------------------------- resume


def test_resume_continues_bitwise_identically(reference, make_config, tmp_path):
    _, ref_out, _, _ = reference
    out = tmp_path / "run"
    # Half the run; decay_steps pins the cosine to the full run's length.
    train(make_config(out, train={"max_steps": 4}, schedule={"decay_steps": 8}))
    assert latest_checkpoint(out).name == "step_00000004"
    # The run folder's own config.toml, as is, plus the new step budget.
    argv = ["pretrain", "--config", str(out / "config.toml"), "--resume", "--train.max_steps", "8"]
    assert main(argv) == 0
    for key in ("loss", "grad_norm", "lr"):
        assert column(out, key) == column(ref_out, key), key  # bitwise: fp32 on CPU, same order of ops
    final, ref_final = weights(out / "model"), weights(ref_out / "model")
    assert all(torch.equal(final[k], ref_final[k]) for k in ref_final)

    # Resuming a finished run takes no step and still reports.
    assert main(argv) == 0
    assert column(out) == column(ref_out)


KILL_ON_SECOND_SAVE = """
import os, signal, sys
import torch

torch.set_num_threads(1)
real_save, calls = torch.save, []


def save(*args, **kwargs):
    calls.append(args[1])
    if len(calls) == 2:  # the second checkpoint: weights written into its temporary folder, state not yet
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(*args, **kwargs)


torch.save = save
from llamaworks.cli import main

sys.exit(main(["pretrain", "--config", sys.argv[1]]))
"""


def test_a_run_killed_while_saving_resumes_from_the_last_complete_checkpoint(reference, make_config, tmp_path,
                                                                              caplog):
    _, ref_out, _, _ = reference
    out = tmp_path / "run"
    config = tmp_path / "job.toml"
    config.write_text(dumps(make_config(out)))
    proc = subprocess.run([sys.executable, "-c", KILL_ON_SECOND_SAVE, str(config)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [p.name for p in list_checkpoints(out)] == ["step_00000003"]
    (partial,) = [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".step_00000006")]
    assert (partial / "model.safetensors").is_file() and not (partial / STATE).exists()
    assert [s for s, _ in column(out)] == list(range(1, 7))  # it logged steps 4-6 before dying
    assert not (out / "model").exists()

    caplog.set_level(logging.INFO, logger="llamaworks")
    summary = train(load_config(JobConfig, out / "config.toml"), resume=True)
    assert f"resumed from {out / 'checkpoints' / 'step_00000003'} (step 3" in caplog.text
    assert summary["steps"] == 8
    assert column(out) == column(ref_out)  # steps 4-6 logged once, by the resumed run, identically
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_resume_reproduces_the_validation_loss(reference, make_config, tmp_path):
    """Every measurement reads the val split's first eval.batches batches, so the val loss at a
    step does not depend on how many measurements the process made before (the resumed one
    made none)."""
    _, ref_out, _, _ = reference
    out = tmp_path / "run"
    # Stopped at 5: val loss at 4 and of the final weights at 5, checkpoint at 3 and 5.
    train(make_config(out, train={"max_steps": 5}, schedule={"decay_steps": 8}))
    assert [s for s, _ in column(out, "val_loss")] == [4, 5]
    summary = train(load_config(JobConfig, out / "config.toml", ["--train.max_steps", "8"]), resume=True)
    assert column(out) == column(ref_out)
    ref_val = dict(column(ref_out, "val_loss"))
    assert dict(column(out, "val_loss"))[8] == ref_val[8] == summary["final_val_loss"]
    assert dict(column(out, "val_loss"))[4] == ref_val[4]


def test_existing_checkpoints_need_resume(reference, capsys):
    _, out, _, _ = reference
    metrics = (out / "metrics.jsonl").read_bytes()
    assert main(["pretrain", "--config", str(out / "config.toml")]) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints" in err and "--resume" in err
    assert (out / "metrics.jsonl").read_bytes() == metrics


def test_resume_without_a_checkpoint_starts_fresh_with_a_warning(make_config, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="llamaworks")
    summary = train(make_config(tmp_path / "run", train={"max_steps": 2}, eval={"every": 0}), resume=True)
    assert "no complete checkpoint" in caplog.text
    assert summary["steps"] == 2


# ---------------------------------------------------------------------------- stopping


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("poison", ["loss", "gradient norm"])
def test_a_non_finite_step_stops_the_run_unsaved(poison, make_config, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    config = tmp_path / "job.toml"
    config.write_text(dumps(make_config(out, checkpoint={"every": 2}, eval={"every": 0})))
    real_build = llamaworks.model.build_model

    def build_poisoned(*args, **kwargs):
        # The final norm's output, whatever loss the trainer computes from it. One micro-batch
        # per step and no evaluation: its 5th forward is step 5.
        model, calls = real_build(*args, **kwargs), itertools.count(1)

        def hook(module, inputs, output):
            if next(calls) == 5:
                return output * float("nan") if poison == "loss" else _InfGrad.apply(output)

        model.norm.register_forward_hook(hook)
        return model

    monkeypatch.setattr(llamaworks.train.trainer, "build_model", build_poisoned)
    assert main(["pretrain", "--config", str(config)]) == 3
    err = capsys.readouterr().err
    assert f"non-finite {poison} at step 5" in err
    assert f"last good checkpoint is {out / 'checkpoints' / 'step_00000004'}" in err
    assert [p.name for p in list_checkpoints(out)] == ["step_00000002", "step_00000004"]
    assert [s for s, _ in column(out)] == [1, 2, 3, 4]
    assert not (out / "model").exists() and not (out / "summary.json").exists()


def test_max_minutes_stops_on_time_and_saves(make_config, tmp_path):
    out = tmp_path / "run"
    summary = train(make_config(out, train={"max_steps": 200, "max_minutes": 1e-4}))  # 6 ms, ~1 step
    assert summary["stop_reason"].startswith("time limit") and 1 <= summary["steps"] < 200
    assert latest_checkpoint(out).name == f"step_{summary['steps']:08d}"
    model, _ = load_model(out / "model")
    ckpt, _ = load_model(latest_checkpoint(out))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ckpt.state_dict().values()))
    with pytest.raises(ValueError, match="train.max_minutes must be > 0"):
        train(make_config(tmp_path / "zero", train={"max_minutes": 0}))


def test_unknown_config_keys_are_rejected_with_the_valid_ones(capsys):
    assert main(["pretrain", "--config", "tiny_cpu", "--train.bogus", "1"]) == 2
    err = capsys.readouterr().err
    assert "train.bogus" in err and "valid keys:" in err and "max_steps" in err and "micro_batch_size" in err


@pytest.mark.parametrize("world, micro", [(2, 4), (4, 2)])
def test_a_batch_smaller_than_one_micro_batch_per_rank_is_an_error_before_any_work(make_config, tmp_path,
                                                                                   monkeypatch, world, micro):
    """batch_tokens 128 = 4 x 32 on one process; 2 data-parallel ranks of 4 sequences each would
    train on 256 tokens a step (another loss curve), so the run refuses and names the fix."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=f"train.batch_tokens=128 .* = {micro * 32 * world} tokens") as e:
        train(make_config(out, train={"micro_batch_size": micro}))
    assert f"train.micro_batch_size = {4 // world}" in str(e.value)
    assert not out.exists()


@pytest.fixture
def read_only_dir(tmp_path) -> Path:
    """A folder no file can be created in: read-only by its mode, or, where the tests run as
    root (which ignores modes), one under /sys (read-only for root too in a container)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys/fs/llamaworks-test")):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            (candidate / "probe").touch()
        except OSError:
            yield candidate
            break
        (candidate / "probe").unlink()
    else:
        pytest.skip("no read-only folder on this machine")
    folder.chmod(0o755)


@pytest.mark.parametrize("where", ["itself", "below"])
def test_a_read_only_out_dir_is_a_clear_error(make_config, tmp_path, read_only_dir, capsys, where):
    out = read_only_dir if where == "itself" else read_only_dir / "runs" / "x"
    config = tmp_path / "job.toml"
    config.write_text(dumps(make_config(out)))
    assert main(["pretrain", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"run.out_dir {out} is not writable" in err and "choose another run.out_dir" in err
    assert "Traceback" not in err
