"""Packed examples (Transformer.forward's doc_ids) under tensor + sequence parallelism and FSDP on
2 gloo processes: the mask and per-example positions reach every rank's attention, and the packed
logits and loss equal one process's."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from llamaworks.model import ModelArgs, build_model
from llamaworks.parallel.parallelize import ParallelDims, parallelize
from llamaworks.train.init import init_weights
from llamaworks.train.loss import lm_loss

pytestmark = pytest.mark.slow

SEED = 5
ARGS = dict(n_layers=2, n_kv_heads=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 512, (2, 32), generator=g)
    y = torch.randint(0, 512, (2, 32), generator=g)
    y[:, ::5] = -100  # masked targets, as prompts are
    doc_ids = torch.tensor([[0] * 7 + [1] * 13 + [2] * 12, [0] * 20 + [1] * 5 + [2] * 7])
    return x, y, doc_ids


def _worker(rank: int, world: int, port: int, parallel: dict, result: Path) -> None:
    from torch.distributed.tensor.parallel import loss_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dims = ParallelDims(world_size=world, **parallel)
    model = build_model(ModelArgs.from_name("tiny", **ARGS), device="meta")
    parallelize(model, dims, "selective", mesh=dims.build_mesh("cpu"), loss_parallel=dims.tp > 1)
    model.to_empty(device="cpu")
    init_weights(model, SEED, torch.device("cpu"))
    x, y, doc_ids = batch()
    with loss_parallel() if dims.tp > 1 else torch.enable_grad():
        loss = lm_loss(model, x, y, fused=dims.tp == 1, doc_ids=doc_ids)
        loss.backward()
    grad = model.layers[0].attention.wq.weight.grad
    grad = grad.full_tensor() if isinstance(grad, DTensor) else grad
    model.eval()
    with torch.no_grad():
        logits = model(x, doc_ids=doc_ids)
    logits = logits.full_tensor() if isinstance(logits, DTensor) else logits
    if rank == 0:
        torch.save({"loss": loss.detach(), "logits": logits, "grad": grad}, result)
    dist.destroy_process_group()


@pytest.mark.parametrize("parallel", [{"tp": 2}, {"dp_shard": 2}], ids=["tp_sp", "fsdp"])
def test_packed_batches_split_across_processes_match_one_process(tmp_path, parallel):
    one = build_model(ModelArgs.from_name("tiny", **ARGS), device="meta")
    one.to_empty(device="cpu")
    init_weights(one, SEED, torch.device("cpu"))
    x, y, doc_ids = batch()
    loss = lm_loss(one, x, y, fused=False, doc_ids=doc_ids)
    loss.backward()
    with torch.no_grad():
        logits = one.eval()(x, doc_ids=doc_ids)
        assert (logits - one(x)).abs().max() > 1e-4  # the packing changes the logits: the mask is in use
    result = tmp_path / "rank0.pt"
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_worker, args=(2, _free_port(), parallel, result), nprocs=2, join=True)
    got = torch.load(result)
    torch.testing.assert_close(got["loss"], loss.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(got["logits"], logits, rtol=0, atol=1e-5)
    # FSDP averages the gradients of its 2 ranks, which read the same batch here: the same gradient.
    torch.testing.assert_close(got["grad"], one.layers[0].attention.wq.weight.grad, rtol=1e-4, atol=1e-6)
