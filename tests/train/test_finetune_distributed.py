"""`llamaworks finetune` under FSDP on 2 gloo processes (CPU): full fine-tuning and LoRA (a frozen
base sharded with its adapters) give one process's loss curve for the same global batch of
examples, and so does LoRA under DDP; a LoRA run's distributed checkpoint holds the adapters alone
and resumes in one process (and a one-process checkpoint under FSDP) without changing a loss. QLoRA
under FSDP and DDP (the quantised base replicated on every rank, only the adapters' gradients
averaged) gives one process's QLoRA loss curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torchrun import spawn as spawn_fn
from torchrun import torchrun

from llamaworks.configfile import dumps
from llamaworks.train.checkpoint import DCP_DIR, TRAINABLE, dcp_to_model_dir, is_dcp_checkpoint, latest_checkpoint
from llamaworks.train.finetune import run_finetune
from llamaworks.weights import read_safetensors
from train.test_finetune import column, config_factory, instruction_records

pytestmark = pytest.mark.slow

TOL = 1e-5  # fp32, as the distributed pretraining tests (tests/parallel/test_distributed.py)
STEPS = 4
# 16 examples a step: 2 micro-batches of 8 in one process, 2 of 4 on each of 2 ranks (the loaders'
# streams then continue each other's checkpoints). A checkpoint every 2 steps, validation at step 4,
# the default selective activation checkpointing; lora without dropout (its masks are drawn per
# process).
SECTIONS = {"train": {"max_steps": STEPS, "activation_checkpointing": "selective"},
            "schedule": {"warmup_steps": 1, "decay_steps": STEPS}, "checkpoint": {"every": 2}, "eval": {"every": STEPS}}
LORA = {"method": "lora", "lora_r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0}
FSDP = {"parallel": {"dp_shard": 2}, "train": {"micro_batch_size": 4}}


def _worker(rank: int, world: int, cfg, resume: bool) -> None:
    run_finetune(cfg, resume=resume)


def spawn(cfg, resume: bool = False) -> None:
    spawn_fn(_worker, cfg, resume)


def assert_same_curve(got: Path, want: Path, steps) -> None:
    a, b = dict(column(got)), dict(column(want))
    assert sorted(a) == list(steps), sorted(a)
    assert max(abs(a[s] - b[s]) for s in steps) < TOL, {s: (a[s], b[s]) for s in steps}
    norms, want_norms = dict(column(got, "grad_norm")), dict(column(want, "grad_norm"))
    for s in steps:
        assert norms[s] == pytest.approx(want_norms[s], rel=1e-4)
    if STEPS in steps:
        val, want_val = dict(column(got, "val_loss")), dict(column(want, "val_loss"))
        assert abs(val[STEPS] - want_val[STEPS]) < TOL, (val, want_val)


def make(make_ft_config, out: Path, **sections):
    merged = {k: dict(v) for k, v in SECTIONS.items()}
    for name, values in sections.items():
        merged[name] = {**merged.get(name, {}), **values}
    return make_ft_config(out, **merged)


@pytest.fixture(scope="module")
def make_ft_config(tiny_model_dir, tmp_path_factory):
    """test_finetune's configs: finetune_tiny on the tiny model and its instruction records."""
    data = tmp_path_factory.mktemp("sft") / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in instruction_records()))
    return config_factory(tiny_model_dir, data)


@pytest.fixture(scope="module")
def lora_reference(make_ft_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_one")
    run_finetune(make(make_ft_config, out, finetune=LORA))
    return out


def test_full_finetuning_under_fsdp_matches_one_process(make_ft_config, tmp_path):
    ref, out = tmp_path / "one", tmp_path / "fsdp"
    run_finetune(make(make_ft_config, ref))
    spawn(make(make_ft_config, out, **FSDP))
    assert_same_curve(out, ref, range(1, STEPS + 1))
    a, b = read_safetensors(out / "model" / "model.safetensors"), read_safetensors(ref / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # the final model directory, gathered from the shards (Adam's steps of lr 1e-3 are about
        # the size of a weight's change where its gradient is ~0, whose sign summation order decides)
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=k)


def test_lora_under_torchrun_fsdp_matches_one_process_and_resumes_in_one(make_ft_config, lora_reference, tmp_path):
    """Launched the documented way, `torchrun --nproc-per-node 2 -m llamaworks finetune ... --parallel.dp_shard 2`,
    to step 2 of 4 (a distributed checkpoint); then one process resumes it to step 4."""
    out = tmp_path / "fsdp"
    config = tmp_path / "job.toml"
    config.write_text(dumps(make(make_ft_config, out, finetune=LORA, train={"max_steps": 2, "micro_batch_size": 4})))
    proc = torchrun(["finetune", "--config", str(config), "--parallel.dp_shard", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "applied FSDP" in proc.stderr and "training 0.0471M of the parameters" in proc.stderr, proc.stderr[-2000:]
    assert_same_curve(out, lora_reference, range(1, 3))
    # The distributed checkpoint: the adapters and their optimizer state, no frozen weight.
    ckpt = latest_checkpoint(out)
    assert ckpt.name == "step_00000002" and is_dcp_checkpoint(ckpt)
    keys = FileSystemReader(str(ckpt / DCP_DIR)).read_metadata().state_dict_metadata.keys()
    model_keys = {k for k in keys if k.startswith("model.")}
    assert len(model_keys) == 2 * 7 * 2 and all(".lora_A" in k or ".lora_B" in k for k in model_keys), model_keys
    assert all(".lora_" in k for k in keys if k.startswith("optim.state.")), keys
    with pytest.raises(ValueError, match="holds only the trainable tensors .* adapter/ folder is its result"):
        dcp_to_model_dir(ckpt, tmp_path / "model")
    # One process continues it (DCP reshards the adapters) exactly as the uninterrupted run.
    cfg = make(make_ft_config, out, finetune=LORA)
    run_finetune(cfg, resume=True)
    assert_same_curve(out, lora_reference, range(1, STEPS + 1))
    a = read_safetensors(out / "adapter" / "adapter_model.safetensors")
    b = read_safetensors(lora_reference / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # as above: where a gradient is ~0, summation order (2 shards or one process; the CPU's
        # GEMM kernels) sets the sign of an Adam step; up to 1.1e-5 of 3.1e-3 measured on an AVX2-only Zen 3
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=5e-5, msg=k)


def test_a_one_process_lora_checkpoint_resumes_under_fsdp(make_ft_config, lora_reference, tmp_path):
    out = tmp_path / "run"
    run_finetune(make(make_ft_config, out, finetune=LORA, train={"max_steps": 2}))
    assert (latest_checkpoint(out) / TRAINABLE).is_file()
    spawn(make(make_ft_config, out, finetune=LORA, **FSDP), resume=True)
    assert_same_curve(out, lora_reference, range(1, STEPS + 1))
    # The adapters FSDP trained, gathered onto rank 0 and written in PEFT's layout.
    a = read_safetensors(out / "adapter" / "adapter_model.safetensors")
    b = read_safetensors(lora_reference / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


def test_lora_under_ddp_matches_one_process(make_ft_config, lora_reference, tmp_path):
    """DDP (parallel.dp_replicate 2): every rank holds the frozen base whole; the adapters' gradients
    are all-reduced."""
    out = tmp_path / "ddp"
    spawn(make(make_ft_config, out, finetune=LORA, parallel={"dp_replicate": 2, "dp_shard": 1},
               train={"micro_batch_size": 4}))
    assert_same_curve(out, lora_reference, range(1, STEPS + 1))


QLORA = {**LORA, "method": "qlora"}


@pytest.fixture(scope="module")
def qlora_reference(make_ft_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora_one")
    run_finetune(make(make_ft_config, out, finetune=QLORA))
    return out


def test_qlora_under_torchrun_fsdp_matches_one_process(make_ft_config, qlora_reference, tmp_path):
    """`torchrun ... finetune --method qlora --parallel.dp_shard 2`: FSDP shards the float parameters (the
    adapters, norms, embedding and output layer) and leaves the int4 blocks whole on each rank, which
    quantises the same weights to the same blocks; then one process resumes the distributed checkpoint.
    TOL as for LoRA: the int4 base is the same integers on every rank, so the two runs differ only by the
    order fp32 sums are taken in (the gradients' reduction over 2 ranks), as fp32 LoRA does."""
    out = tmp_path / "fsdp"
    config = tmp_path / "job.toml"
    config.write_text(dumps(make(make_ft_config, out, finetune=QLORA, train={"max_steps": 2, "micro_batch_size": 4})))
    proc = torchrun(["finetune", "--config", str(config), "--parallel.dp_shard", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "applied FSDP" in proc.stderr and "training 0.0471M of the parameters" in proc.stderr, proc.stderr[-2000:]
    assert_same_curve(out, qlora_reference, range(1, 3))
    ckpt = latest_checkpoint(out)
    assert is_dcp_checkpoint(ckpt)
    keys = FileSystemReader(str(ckpt / DCP_DIR)).read_metadata().state_dict_metadata.keys()
    # the adapters and AdamW's state for them: not the int4 base (buffers, which ignore_frozen_params keeps)
    model_keys = {k for k in keys if k.startswith("model.")}
    assert len(model_keys) == 2 * 7 * 2 and all(".lora_A" in k or ".lora_B" in k for k in model_keys), model_keys
    assert all(".lora_" in k for k in keys if k.startswith("optim.state.")), keys
    run_finetune(make(make_ft_config, out, finetune=QLORA), resume=True)
    assert_same_curve(out, qlora_reference, range(1, STEPS + 1))
    a = read_safetensors(out / "adapter" / "adapter_model.safetensors")
    b = read_safetensors(qlora_reference / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


def test_qlora_under_ddp_matches_one_process(make_ft_config, qlora_reference, tmp_path):
    """DDP (parallel.dp_replicate 2) over the adapters: the quantised base is buffers, which DDP
    neither all-reduces nor broadcasts."""
    out = tmp_path / "ddp"
    spawn(make(make_ft_config, out, finetune=QLORA, parallel={"dp_replicate": 2, "dp_shard": 1},
               train={"micro_batch_size": 4}))
    assert_same_curve(out, qlora_reference, range(1, STEPS + 1))
    a = read_safetensors(out / "adapter" / "adapter_model.safetensors")
    b = read_safetensors(qlora_reference / "adapter" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
