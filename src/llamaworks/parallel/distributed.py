"""The trainer's process-group plumbing under torchrun: which device this rank drives, the
global loss and gradient norm, and rank-0-only side effects.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (or rendezvous
through its c10d store across nodes); without WORLD_SIZE the trainer runs as one process
exactly as before and nothing here touches torch.distributed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("llamaworks")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True when init_distributed created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """The world size torchrun announces (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> tuple[DistEnv, torch.device]:
    """Join the process group torchrun set up the environment for; pick this rank's device.

    On CUDA each process drives the GPU of its LOCAL_RANK (node-local index, so the same
    config runs on any number of nodes) and talks NCCL; on CPU it talks gloo.
    """
    world = env_world_size()
    if world == 1:
        return DistEnv(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is not None and device.index != local_rank:
            log.warning("train.device=%s ignored under torchrun: rank %d uses cuda:%d (its LOCAL_RANK)",
                        device, rank, local_rank)
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                device_id=device if device.type == "cuda" else None)
    log.info("rank %d of %d (local rank %d) on %s, backend %s", rank, world, local_rank, device,
             dist.get_backend())
    return DistEnv(rank, world, local_rank, owns), device


def close_distributed(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    return not is_distributed() or dist.get_rank() == 0


def global_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a scalar over all ranks. Every data-parallel rank sees an equal share of the
    global batch, so the mean of their mean losses is the global batch's mean loss (ranks of
    one tensor-parallel group hold the same value, which the mean leaves unchanged). SUM then
    divide, because gloo has no AVG."""
    if not is_distributed():
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def clip_grad_norm_(parameters, max_norm: float, pp_group=None) -> torch.Tensor:
    """torch's clip_grad_norm_ on the global gradient norm, returned as a plain tensor.

    With FSDP or TP the gradients are DTensors holding shards: their norm is a DTensor
    whose full value is the norm over all shards (one all-reduce), the same number one
    process with the whole model computes. DDP's gradients are already all-reduced.
    pp_group: with pipeline parallelism each rank holds other layers' gradients; the squares
    of the ranks' norms are summed over the pipeline group (a second all-reduce).
    """
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if pp_group is not None:
        square = total.double() ** 2
        dist.all_reduce(square, group=pp_group)
        total = square.sqrt().to(total.dtype)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
