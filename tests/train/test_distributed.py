"""Distributed training on 2 gloo processes (CPU): DDP, FSDP and TP+SP give the loss curve of
one process with the same global batch, and distributed checkpoints reshard between world
sizes (FSDP on 2 processes -> 1 process, and back) without changing a single loss."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llamaworks.config import dumps
from llamaworks.modeldir import load_model, read_safetensors
from llamaworks.plan import flops_per_token
from llamaworks.train import checkpoint as ckpt_io
from llamaworks.train.metrics import read_metrics
from llamaworks.train.trainer import train

pytestmark = pytest.mark.slow

STEPS, HALF = 20, 10
GLOBAL_BATCH = 8  # sequences of 32 tokens per optimizer step, whatever the world size
TOL = 1e-5  # fp32; the bound


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg, resume: bool) -> None:
    # What torchrun would set for this process.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # 2 shared cores: one thread per process
    train(cfg, resume=resume)


def spawn(cfg, world: int = 2, resume: bool = False) -> None:
    mp.spawn(_worker, args=(world, _free_port(), cfg, resume), nprocs=world, join=True)


def losses(out: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(out / "metrics.jsonl") if key in r}


def assert_same_curve(got: dict[int, float], want: dict[int, float], steps) -> None:
    assert sorted(got) == list(steps), sorted(got)
    worst = max(abs(got[s] - want[s]) for s in steps)
    assert worst < TOL, {s: (got[s], want[s]) for s in steps}


@pytest.fixture(scope="module")
def setup(make_config, tmp_path_factory):
    """make(out, world, micro, **sections) -> a config with the same global batch of 8 x 32;
    and the single-process reference run of 20 steps (checkpoints every 10)."""
    os.environ["OMP_NUM_THREADS"] = "1"

    def make(out: Path, micro: int = GLOBAL_BATCH, **sections):
        base = {"train": {"max_steps": STEPS, "batch_tokens": GLOBAL_BATCH * 32, "micro_batch_size": micro,
                          "activation_checkpointing": "selective"},
                # decay_steps fixed so that a run stopped at step 10 and resumed to 20 follows
                # the schedule of the uninterrupted 20-step run
                "schedule": {"warmup_steps": 2, "decay_steps": STEPS},
                "eval": {"every": 0}, "checkpoint": {"every": HALF, "keep_last": 2}}
        for name, values in sections.items():
            base[name] = {**base.get(name, {}), **values}
        return make_config(out, **base)

    ref_out = tmp_path_factory.mktemp("single")
    train(make(ref_out))
    return make, ref_out


@pytest.mark.parametrize("strategy, world", [("ddp", 2), ("fsdp", 2), ("fsdp_x_tp", 4)])
def test_data_parallel_matches_one_process(setup, tmp_path, strategy, world):
    make, ref = setup
    parallel = {"ddp": {"dp_replicate": 2, "dp_shard": 1}, "fsdp": {"dp_shard": -1},
                "fsdp_x_tp": {"dp_shard": 2, "tp": 2}}[strategy]  # the 2-D mesh: 4 processes
    cfg = make(tmp_path, micro=GLOBAL_BATCH // 2, parallel=parallel)
    spawn(cfg, world)
    want = losses(ref)
    assert_same_curve(losses(tmp_path), want, range(1, STEPS + 1))
    # the clipping norm is the global one (clipping is active in these steps)
    norms, want_norms = losses(tmp_path, "grad_norm"), losses(ref, "grad_norm")
    assert any(n > 1.0 for n in want_norms.values())
    for s in want_norms:
        assert norms[s] == pytest.approx(want_norms[s], rel=1e-4)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    fpt = flops_per_token(cfg.model.build_args(512), 32)
    for r in rows:  # all ranks' tokens, over all processes' peak
        assert r["tokens"] == r["step"] * GLOBAL_BATCH * 32
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt / (world * 1e12))
    # the final model directory is whole (gathered from the shards) and loads
    a, b = read_safetensors(tmp_path / "model" / "model.safetensors"), read_safetensors(
        ref / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=k)


def test_tensor_and_sequence_parallel_under_torchrun_matches_one_process(setup, tmp_path):
    """TP=2 with sequence parallelism, launched the documented way: torchrun -m llamaworks."""
    make, ref = setup
    cfg = make(tmp_path, parallel={"tp": 2, "dp_shard": -1})
    config = tmp_path / "job.toml"
    config.write_text(dumps(cfg))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "llamaworks", "pretrain",
                           "--config", str(config)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "applied tensor and sequence parallelism (tp=2)" in proc.stderr
    assert_same_curve(losses(tmp_path), losses(ref), range(1, STEPS + 1))


def test_fsdp_checkpoint_resumes_on_one_process_and_back(setup, tmp_path):
    make, ref = setup
    want = losses(ref)

    # FSDP on 2 processes to step 10 (a distributed checkpoint) -> 1 process to step 20
    a = tmp_path / "fsdp_then_one"
    spawn(make(a, micro=GLOBAL_BATCH // 2, train={"max_steps": HALF}))
    ckpt = ckpt_io.latest_checkpoint(a)
    assert ckpt.name == f"step_{HALF:08d}" and ckpt_io.is_dcp_checkpoint(ckpt)
    assert not (ckpt / "model.safetensors").exists()
    train(make(a), resume=True)
    assert_same_curve(losses(a), want, range(1, STEPS + 1))

    # its distributed checkpoint converts to a model directory with the reference's weights
    converted = ckpt_io.dcp_to_model_dir(ckpt, tmp_path / "converted")
    model, tok = load_model(converted)
    assert tok is not None and model.args.n_layers == 2
    ref_weights = read_safetensors(ref / "checkpoints" / f"step_{HALF:08d}" / "model.safetensors")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ref_weights[k], rtol=0, atol=1e-4, msg=k)

    # 1 process to step 10 (a single-file checkpoint) -> FSDP on 2 processes to step 20
    b = tmp_path / "one_then_fsdp"
    train(make(b, train={"max_steps": HALF}))
    assert not ckpt_io.is_dcp_checkpoint(ckpt_io.latest_checkpoint(b))
    spawn(make(b, micro=GLOBAL_BATCH // 2), resume=True)
    assert_same_curve(losses(b), want, range(1, STEPS + 1))
    # ... whose step-20 checkpoint is distributed again, and loads back into 1 process
    assert ckpt_io.is_dcp_checkpoint(ckpt_io.latest_checkpoint(b))


@pytest.mark.parametrize("world, parallel, match", [
    (2, {"tp": 3}, "world size 2 is not divisible by parallel.dp_replicate \\* parallel.tp = 3"),
    (3, {"tp": 3}, "parallel.tp=3 does not divide the model's n_heads=4"),
    (4, {"dp_replicate": 3, "dp_shard": 1}, "world size is 4"),
])
def test_bad_mesh_is_an_error_before_any_work(make_config, tmp_path, monkeypatch, world, parallel, match):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        train(make_config(out, parallel=parallel))
    assert not dist.is_initialized() and not out.exists()
