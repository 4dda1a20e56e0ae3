"""Sharded initialisation: the trainer builds the model on the meta device, splits it (tensor
parallel, FSDP), allocates only this rank's shards (`to_empty`) and then fills them here.

The weights must not depend on how the model is split, so that N processes start from the
very weights of one process (and their loss curves match). Each parameter is therefore drawn
from its own generator, seeded by (seed, parameter name), as one full tensor; a rank keeps
the part it holds and drops the rest before the next parameter is drawn. A one-process run
goes through the same function, so it gets the same numbers.

Peak memory on a rank: its shards (what training keeps anyway) plus one full parameter and
its local slice while that parameter is being drawn: for LLaMA-65B, whose largest tensors are
the 32,000 x 8,192 embedding and output matrices, 1 GB in fp32, against 260 GB for the whole
model. No rank ever holds the full model. (DTensor's own random ops draw shards in place
and would save that one parameter, but they do not promise one process's numbers for every
mesh and device.)
"""

from __future__ import annotations

import hashlib

import torch


def parameter_seed(seed: int, name: str) -> int:
    """A 63-bit seed for parameter `name` of a run seeded with `seed` (the same in every
    process: Python's hash() is salted per process, sha256 is not)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def init_weights(model, seed: int, device: torch.device) -> None:
    """Fill every parameter of `model` (materialised on `device`, possibly split into DTensor
    shards by parallelize()) with Transformer.init_parameter's scheme, and the RoPE table."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, p in model.named_parameters():
        gen = torch.Generator(device=device).manual_seed(parameter_seed(seed, name))
        if not isinstance(p, DTensor):
            model.init_parameter(name, p, gen)  # the whole parameter lives here: fill it in place
            continue
        full = torch.empty(p.shape, dtype=p.dtype, device=device)
        model.init_parameter(name, full, gen)
        # src_data_rank=None: every rank drew the same full tensor, so each slices its own part
        # (any placement, FSDP x TP's strided shards included) without communication.
        local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
        p.to_local().copy_(local)
        del full, local
    model.init_rope(device)
