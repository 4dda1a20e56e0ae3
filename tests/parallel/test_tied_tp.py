"""Tensor parallelism over a model with tied embeddings (Llama 3.2 1B/3B, tie_word_embeddings) on 2
gloo processes: the embedding and the output layer share one DTensor split by vocabulary rows, so
generation loads the tensor once and greedy tokens and logits equal one process's, and a TP=2 training
run (its gradients accumulating into the one tensor) follows one process's loss curve and saves
the tensor once."""

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
from peaked import sharpen

from llamaworks.cli import main
from llamaworks.inference.generate import generate_ids
from llamaworks.model import ModelArgs, build_model
from llamaworks.modeldir import load_model, save_model
from llamaworks.parallel.tp_load import load_tensor_parallel
from llamaworks.train.metrics_log import read_metrics
from llamaworks.train.trainer import train
from llamaworks.weights import read_safetensors

pytestmark = pytest.mark.slow

PROMPTS = [[1, 40, 41], [1, 7]]
TOL = 1e-5  # fp32, as tests/parallel/test_distributed.py


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    args = ModelArgs.from_name("tiny", vocab_size=tiny_tokenizer.vocab_size, n_layers=2, n_kv_heads=2,
                               tie_word_embeddings=True)
    model = sharpen(build_model(args, seed=3), seed=3)  # peaked logits: greedy tokens do not hang on rounding
    return save_model(model, tiny_tokenizer, tmp_path_factory.mktemp("tied") / "model")


def _generate_worker(rank: int, world: int, port: int, model_dir: Path, result: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, _ = load_tensor_parallel(model_dir, init_device_mesh("cpu", (world,)), torch.device("cpu"))
    emb, out = model.tok_embeddings.weight, model.output.weight
    facts = {"tied": out is emb, "dtensor": isinstance(emb, DTensor), "local": tuple(emb.to_local().shape),
             "placements": tuple(repr(p) for p in emb.placements)}
    x = torch.tensor([[1, 40, 41, 9, 200, 17, 5, 3]])
    with torch.no_grad():
        logits = model(x)  # gathered: a plain tensor
    chunks = list(generate_ids(model, PROMPTS, 12, temperature=0.0))
    if rank == 0:
        torch.save({"facts": facts, "logits": logits, "tokens": torch.cat([c[0] for c in chunks], 1)}, result)
    dist.destroy_process_group()


def test_tensor_parallel_generation_of_a_tied_model_matches_one_process(tied_model_dir, tmp_path):
    assert "output.weight" not in read_safetensors(tied_model_dir / "model.safetensors")  # the file holds it once
    result = tmp_path / "rank0.pt"
    mp.spawn(_generate_worker, args=(2, _free_port(), tied_model_dir, result), nprocs=2, join=True)
    got = torch.load(result)
    assert got["facts"] == {"tied": True, "dtensor": True, "local": (256, 128), "placements": ("Shard(dim=0)",)}
    model, _ = load_model(tied_model_dir)
    assert model.output.weight is model.tok_embeddings.weight
    with torch.no_grad():
        want_logits = model(torch.tensor([[1, 40, 41, 9, 200, 17, 5, 3]]))
    torch.testing.assert_close(got["logits"], want_logits, rtol=0, atol=TOL)
    want = torch.cat([c[0] for c in generate_ids(model, PROMPTS, 12, temperature=0.0)], 1)
    assert torch.equal(got["tokens"], want), (got["tokens"], want)


def test_generate_under_torchrun_of_a_tied_model_prints_what_one_process_does(tied_model_dir, capsys):
    argv = ["generate", "--checkpoint", str(tied_model_dir), "--prompt", "The king", "--max-new-tokens", "8",
            "--temperature", "0", "--device", "cpu"]
    assert main(argv) == 0
    want = capsys.readouterr().out
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "llamaworks", *argv],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == want and "2 x cpu, tensor parallel" in proc.stderr, proc.stderr[-2000:]


def _train_worker(rank: int, world: int, port: int, cfg) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train(cfg)


def losses(out: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(out / "metrics.jsonl") if key in r}


@pytest.mark.parametrize("world, parallel", [
    (2, {"tp": 2}),
    (2, {"tp": 2, "loss_parallel": False}),
    (4, {"tp": 2, "dp_shard": 2}),  # FSDP x TP: the root's FSDP group holds the one tied DTensor
], ids=["tp", "tp_gathered_logits", "fsdp_x_tp"])
def test_tensor_parallel_training_of_a_tied_model_matches_one_process(make_config, tmp_path, world, parallel):
    """4 steps of 8 x 32 tokens: TP=2 with sequence parallelism (with loss parallel, and with gathered
    logits), and FSDP x TP on 4 processes, against one process. The tied tensor takes the gradients
    of both the embedding and the output layer on each rank's rows."""
    os.environ["OMP_NUM_THREADS"] = "1"

    def make(out: Path, micro: int = 8, **parallel):
        return make_config(out, model={"tie_word_embeddings": True},
                           train={"max_steps": 4, "batch_tokens": 8 * 32, "micro_batch_size": micro},
                           schedule={"warmup_steps": 1, "decay_steps": 4}, eval={"every": 0},
                           checkpoint={"every": 100}, parallel=parallel)

    ref = tmp_path / "one"
    train(make(ref))
    out = tmp_path / "tp"
    dp = parallel.get("dp_shard", 1)
    mp.spawn(_train_worker, args=(world, _free_port(), make(out, 8 // dp, **parallel)), nprocs=world, join=True)
    want, got = losses(ref), losses(out)
    assert sorted(got) == [1, 2, 3, 4] and max(abs(got[s] - want[s]) for s in want) < TOL, (got, want)
    norms, want_norms = losses(out, "grad_norm"), losses(ref, "grad_norm")
    for s in want_norms:  # the embedding's and the output layer's gradients, summed in one tensor
        assert norms[s] == pytest.approx(want_norms[s], rel=1e-4)
    # The final model (gathered from the shards) names the tied tensor once and is still tied.
    a, b = read_safetensors(out / "model" / "model.safetensors"), read_safetensors(ref / "model" / "model.safetensors")
    assert a.keys() == b.keys() and "output.weight" not in a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=k)
    model, _ = load_model(out / "model")
    assert model.output.weight is model.tok_embeddings.weight
