"""Distributed training on 2 gloo processes (CPU): DDP, FSDP and TP+SP (with loss parallel) give
the loss curve of one process with the same global batch, sharded initialisation gives one
process's weights, distributed checkpoints reshard between world sizes (FSDP on 2 processes ->
1 process, and back) without changing a single loss, and `llamaworks generate` under torchrun
splits the model over the processes and completes as one process does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torchrun import spawn as spawn_fn
from torchrun import torchrun

from llamaworks.cli import main
from llamaworks.configfile import dumps
from llamaworks.inference.generate import generate_ids
from llamaworks.inference.load import load_model
from llamaworks.model import ModelArgs, build_model
from llamaworks.parallel.parallelize import ParallelDims, parallelize
from llamaworks.parallel.tp_load import load_tensor_parallel
from llamaworks.plan import flops_per_token
from llamaworks.train import checkpoint as ckpt_io
from llamaworks.train.init import init_weights
from llamaworks.train.metrics_log import read_metrics
from llamaworks.train.trainer import train
from llamaworks.weights import read_safetensors

pytestmark = pytest.mark.slow

STEPS, HALF = 20, 10
GLOBAL_BATCH = 8  # sequences of 32 tokens per optimizer step, whatever the world size
TOL = 1e-5  # fp32; the bound


def _worker(rank: int, world: int, cfg, resume: bool) -> None:
    train(cfg, resume=resume)


def spawn(cfg, world: int = 2, resume: bool = False) -> None:
    spawn_fn(_worker, cfg, resume, world=world)


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
    proc = torchrun(["pretrain", "--config", str(config)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "applied tensor and sequence parallelism (tp=2) to the model, loss parallel" in proc.stderr
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


class PeakAllocations(TorchDispatchMode):
    """The most bytes that tensors created under the mode held at once (each storage counted
    while alive): what a step costs in memory beyond the `preexisting` tensors."""

    def __init__(self, preexisting):
        super().__init__()
        self.made: dict[StorageWeakRef, int] = {StorageWeakRef(t.untyped_storage()): 0 for t in preexisting}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self.made.setdefault(StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes())
        self.peak = max(self.peak, sum(n for ref, n in self.made.items() if not ref.expired()))
        return out


INIT_SEED = 5


def _init_worker(rank: int, world: int, parallel: dict, result: Path) -> None:
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import loss_parallel

    from llamaworks.train.loss import lm_loss

    dist.init_process_group("gloo", rank=rank, world_size=world)
    dims = ParallelDims(world_size=world, **parallel)
    # The trainer's sequence: build on meta, split, allocate this rank's shards, fill them.
    model = build_model(ModelArgs.from_name("tiny", n_layers=2), device="meta")
    parallelize(model, dims, "selective", mesh=dims.build_mesh("cpu"), loss_parallel=dims.tp > 1)
    model.to_empty(device="cpu")
    local = {k: (v.to_local() if isinstance(v, DTensor) else v) for k, v in model.named_parameters()}
    tracker = PeakAllocations([*local.values(), *model.buffers()])
    with tracker:
        init_weights(model, INIT_SEED, torch.device("cpu"))
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.named_parameters()}
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    logits_kind, loss = None, None
    if dims.tp > 1:
        logits = model(x)  # train mode: split by vocabulary, never gathered
        logits_kind = (type(logits).__name__, logits.placements, tuple(logits.to_local().shape))
        with loss_parallel():
            loss = lm_loss(model, x, x)
            loss.backward()
    if rank == 0:
        torch.save({"full": full, "peak": tracker.peak, "logits": logits_kind, "loss": loss,
                    "local_bytes": sum(t.numel() * t.element_size() for t in local.values()),
                    "largest_bytes": max(t.numel() * t.element_size() for t in full.values())}, result)
    assert logits_kind is None or logits_kind[1] == (Shard(2),), logits_kind
    dist.destroy_process_group()


@pytest.mark.parametrize("parallel", [{"dp_shard": 2}, {"tp": 2}], ids=["fsdp", "tp"])
def test_sharded_init_equals_one_process(tmp_path, parallel):
    from llamaworks.train.loss import lm_loss

    one = build_model(ModelArgs.from_name("tiny", n_layers=2), device="meta")
    one.to_empty(device="cpu")
    init_weights(one, INIT_SEED, torch.device("cpu"))
    result = tmp_path / "rank0.pt"
    spawn_fn(_init_worker, parallel, result)
    got = torch.load(result)
    want = dict(one.named_parameters())
    assert got["full"].keys() == want.keys()
    for k in want:  # bit for bit: each parameter is drawn whole, then sliced
        assert torch.equal(got["full"][k], want[k]), k
    total = sum(p.numel() * p.element_size() for p in want.values())
    # This rank allocated about half the model (norm weights are replicated under tp), and
    # filling it cost one full parameter at a time, never the model: 0.26 MB here, 2.2 MB in all.
    assert got["local_bytes"] < 0.55 * total, (got["local_bytes"], total)
    assert 0 < got["peak"] <= 1.5 * got["largest_bytes"] < total / 4, (got["peak"], got["largest_bytes"], total)
    if "tp" in parallel:
        name, _, shape = got["logits"]
        assert name == "DTensor" and shape == (2, 32, 256), got["logits"]
        x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(got["loss"], lm_loss(one, x, x, fused=False), rtol=0, atol=1e-5)


def _generate_worker(rank: int, world: int, model_dir: Path, result: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, _ = load_tensor_parallel(model_dir, init_device_mesh("cpu", (world,)), torch.device("cpu"))
    wq = model.layers[0].attention.wq.weight
    shards = {"wq": tuple(wq.to_local().shape), "w2": tuple(model.layers[0].feed_forward.w2.weight.to_local().shape),
              "output": tuple(model.output.weight.to_local().shape),
              # a placed shard is a view of the memory-mapped file, not a copy
              "wq_is_view": wq.to_local().untyped_storage().nbytes() > wq.to_local().numel() * 4}
    chunks = list(generate_ids(model, [[1, 40, 41], [1, 7]], 12, temperature=0.0))
    shards["cache"] = tuple(model.layers[0].attention.kv_cache.k.shape)
    if rank == 0:
        torch.save({"tokens": torch.cat([c[0] for c in chunks], 1), "shards": shards}, result)
    dist.destroy_process_group()


def test_tensor_parallel_generation_splits_the_model_and_matches_one_process(tiny_model_dir, tmp_path):
    result = tmp_path / "rank0.pt"
    spawn_fn(_generate_worker, tiny_model_dir, result)
    got = torch.load(result)
    model, _ = load_model(tiny_model_dir)
    want = torch.cat([c[0] for c in generate_ids(model, [[1, 40, 41], [1, 7]], 12, temperature=0.0)], 1)
    assert torch.equal(got["tokens"], want), (got["tokens"], want)
    # 2 ranks: half of the heads, half of the SwiGLU units, half of the vocabulary each
    assert got["shards"]["wq"] == (64, 128) and got["shards"]["w2"] == (128, 256)
    assert got["shards"]["output"] == (256, 128) and got["shards"]["wq_is_view"]
    assert got["shards"]["cache"][1] == 2  # of the model's 4 key/value heads


def test_generate_under_torchrun_prints_one_completion_like_one_process(tiny_model_dir, capsys):
    argv = ["generate", "--checkpoint", str(tiny_model_dir), "--prompt", "The king", "Thou", "--max-new-tokens",
            "10", "--temperature", "0", "--device", "cpu"]
    assert main(argv) == 0
    want = capsys.readouterr().out
    proc = torchrun(argv, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == want  # rank 0 alone prints, the same completions
    assert proc.stderr.count("prefill:") == 1 and "2 x cpu, tensor parallel" in proc.stderr, proc.stderr[-2000:]
