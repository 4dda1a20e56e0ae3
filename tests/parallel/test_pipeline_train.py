"""Pipeline-parallel training on gloo processes (CPU): pp=2 with 1F1B and with interleaved 1F1B,
and pp=2 x FSDP dp=2, give one process's loss curve with the same global batch (fp32, 1e-5)
over 8 steps, its gradient norms and validation losses, and its final model; a PP run stopped
at a checkpoint resumes exactly, and its checkpoint resumes a run without a pipeline."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from torchrun import spawn as spawn_fn

from llamaworks.train.metrics_log import read_metrics
from llamaworks.train.trainer import train
from llamaworks.weights import read_safetensors

pytestmark = pytest.mark.slow

STEPS, HALF = 8, 4
GLOBAL_BATCH = 8  # sequences of 32 tokens per optimizer step
TOL = 1e-5  # fp32; the bound


def _worker(rank: int, world: int, cfg, resume: bool) -> None:
    train(cfg, resume=resume)


def spawn(cfg, world: int, resume: bool = False) -> None:
    spawn_fn(_worker, cfg, resume, world=world)


def _counting_worker(rank: int, world: int, cfg, counts: Path) -> None:
    """train(cfg), counting the reduce-scatters FSDP2 issues (torch.distributed.reduce_scatter_single)."""
    import torch.distributed as dist

    calls, original = [0], dist.reduce_scatter_single

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    dist.reduce_scatter_single = counted
    train(cfg)
    (counts / f"{rank}.txt").write_text(str(calls[0]))


def metric(out: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(out / "metrics.jsonl") if key in r}


def assert_same(got: dict[int, float], want: dict[int, float], steps, tol: float = TOL) -> None:
    assert sorted(got) == list(steps), sorted(got)
    worst = max(abs(got[s] - want[s]) for s in steps)
    assert worst < tol, {s: (got[s], want[s]) for s in steps}


@pytest.fixture(scope="module")
def setup(make_config, tmp_path_factory):
    """make(out, micro, **sections): 8 steps of a 4-layer tiny model, 8 x 32 tokens a step,
    validation every 4 steps; and the single-process reference run."""
    os.environ["OMP_NUM_THREADS"] = "1"

    def make(out: Path, micro: int = 2, **sections):
        base = {"model": {"n_layers": 4},
                "train": {"max_steps": STEPS, "batch_tokens": GLOBAL_BATCH * 32, "micro_batch_size": micro},
                "schedule": {"warmup_steps": 2, "decay_steps": STEPS},
                "eval": {"every": HALF, "batches": 4}, "checkpoint": {"every": HALF, "keep_last": 2}}
        for name, values in sections.items():
            base[name] = {**base.get(name, {}), **values}
        return make_config(out, **base)

    ref = tmp_path_factory.mktemp("single")
    train(make(ref))
    return make, ref


def assert_matches_reference(out: Path, ref: Path) -> None:
    assert_same(metric(out), metric(ref), range(1, STEPS + 1))
    assert any(n > 1.0 for n in metric(ref, "grad_norm").values())  # clipping is active: the norm matters
    assert_same(metric(out, "grad_norm"), metric(ref, "grad_norm"), range(1, STEPS + 1), tol=1e-4)
    assert_same(metric(out, "val_loss"), metric(ref, "val_loss"), [HALF, STEPS])
    a, b = read_safetensors(out / "model" / "model.safetensors"), read_safetensors(ref / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=k)


@pytest.mark.parametrize("name, world, micro, parallel", [
    ("1f1b", 2, 2, {"pp": 2, "pp_schedule": "1F1B"}),  # 4 microbatches in one schedule step
    # 2 stages per rank; 2 microbatches per schedule step, 2 schedule steps per optimizer step
    ("interleaved", 2, 2, {"pp": 2, "pp_schedule": "interleaved1f1b", "pp_microbatches": 2}),
    ("1f1b_x_fsdp", 4, 2, {"pp": 2, "dp_shard": 2}),  # the 3-D mesh: 2 stages x 2 FSDP shards
    # GPipe, 2 micro-batches per data-parallel rank in 2 schedule steps of 1: gradients accumulate
    # unreduced over the first schedule step and are reduce-scattered once, after the second
    ("gpipe_x_fsdp_2_rounds", 4, 2, {"pp": 2, "dp_shard": 2, "pp_schedule": "GPipe", "pp_microbatches": 1}),
    # tensor + sequence parallel stages with loss parallelism: the hidden states sent between
    # stages are split along the sequence
    ("1f1b_x_tp", 4, 2, {"pp": 2, "tp": 2, "dp_shard": 1}),
    # all three: 2 stages x 2 FSDP shards x 2 tensor-parallel ranks on 8 processes
    ("1f1b_x_fsdp_x_tp", 8, 2, {"pp": 2, "dp_shard": 2, "tp": 2}),
])
def test_pipeline_matches_one_process(setup, tmp_path, name, world, micro, parallel):
    make, ref = setup
    # selective AC on the stages' blocks: recomputation gives the same numbers as the reference's none
    spawn(make(tmp_path, micro=micro, parallel=parallel, train={"activation_checkpointing": "selective"}), world)
    assert_matches_reference(tmp_path, ref)


def test_pipeline_with_fsdp_reduces_gradients_once_per_optimizer_step(setup, tmp_path):
    """2 schedule steps per optimizer step: one reduce-scatter per FSDP group a step, half as many
    as with parallel.sync_every_microbatch (which reduces after each schedule step), same losses."""
    make, _ = setup
    runs = {}
    for every in (False, True):
        out = tmp_path / str(every)
        counts = tmp_path / f"counts_{every}"
        counts.mkdir()
        cfg = make(out, micro=1, train={"max_steps": 2}, eval={"every": 0}, checkpoint={"every": 100},
                   parallel={"pp": 2, "dp_shard": 2, "pp_microbatches": 2, "sync_every_microbatch": every})
        spawn_fn(_counting_worker, cfg, counts, world=4)
        runs[every] = ([int((counts / f"{r}.txt").read_text()) for r in range(4)], metric(out))
    (once, loss_once), (each, loss_each) = runs[False], runs[True]
    assert min(once) > 0 and each == [2 * n for n in once], (once, each)
    assert_same(loss_once, loss_each, [1, 2])


def test_pipeline_resumes_exactly_and_its_checkpoint_loads_without_pipeline(setup, tmp_path):
    make, ref = setup
    pp = {"pp": 2, "pp_schedule": "interleaved1f1b", "pp_microbatches": 2}
    half = tmp_path / "pp"
    # written in the background (checkpoint.async_mode): DCP's async_save of the stages' shards
    spawn(make(half, parallel=pp, train={"max_steps": HALF}, checkpoint={"async_mode": "async"}), 2)
    assert_same(metric(half), metric(ref), range(1, HALF + 1))
    # another copy of the step-4 checkpoint, resumed by one process without a pipeline
    single = tmp_path / "single"
    shutil.copytree(half / "checkpoints", single / "checkpoints")
    train(make(single), resume=True)
    assert_same(metric(single), metric(ref), range(HALF + 1, STEPS + 1))
    # the PP run resumed by a PP run (1F1B now: the stages' layers differ, the checkpoint is the model's)
    spawn(make(half, parallel={"pp": 2}), 2, resume=True)
    assert_same(metric(half), metric(ref), range(1, STEPS + 1))
