"""Turn a single-device Transformer into the training model: `parallelize()` calls the
`apply_*` transforms in one fixed order (torchtitan's layout). The model file knows
nothing of any of this.

Order: tensor/sequence parallel -> activation checkpointing -> compile -> FSDP/DDP.
AC wraps the (possibly TP-sharded) blocks; compile sees the AC-wrapped blocks; data
parallelism wraps last so its hooks surround everything else.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

log = logging.getLogger("llamaworks")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    world_size: int = 1

    @classmethod
    def resolve(cls, dp_replicate: int, dp_shard: int, tp: int, world_size: int,
                n_heads: int) -> ParallelDims:
        for name, v in (("parallel.dp_replicate", dp_replicate), ("parallel.tp", tp)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if dp_shard == -1:
            if world_size % (dp_replicate * tp):
                raise ValueError(f"world size {world_size} is not divisible by parallel.dp_replicate * "
                                 f"parallel.tp = {dp_replicate * tp}")
            dp_shard = world_size // (dp_replicate * tp)
        if dp_replicate * dp_shard * tp != world_size:
            raise ValueError(f"parallel degrees dp_replicate={dp_replicate} x dp_shard={dp_shard} x tp={tp} "
                             f"= {dp_replicate * dp_shard * tp} but the world size is {world_size}; make "
                             "their product equal the number of processes (dp_shard=-1 fills the rest)")
        if n_heads % tp:
            raise ValueError(f"parallel.tp={tp} does not divide the model's n_heads={n_heads}")
        return cls(dp_replicate, dp_shard, tp, world_size)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard


# Ops whose outputs selective AC keeps: the matmuls (linear layers) and attention, which
# are expensive to recompute; norms, activations, RoPE and residual adds are recomputed.
# This is the paper's policy (section 2.4: "save the activations that are expensive to
# compute, such as the outputs of linear layers").
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}
for _name in ("_scaled_dot_product_cudnn_attention",):
    if hasattr(torch.ops.aten, _name):
        _SAVE_OPS.add(getattr(torch.ops.aten, _name).default)


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(model, mode: str) -> None:
    """Activation checkpointing per TransformerBlock: 'none', 'full' (keep only the block's
    input, recompute the whole block in backward) or 'selective' (see _SAVE_OPS)."""
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"train.activation_checkpointing must be none, full or selective, got {mode!r}")
    for block in model.layers:
        kwargs = {"use_reentrant": False}
        if mode == "selective":
            kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
        # Replacing the instance's forward (rather than wrapping the module) keeps the
        # state-dict keys exactly Meta's.
        block.forward = functools.partial(checkpoint, block.forward, **kwargs)
    log.info("applied %s activation checkpointing to %d blocks", mode, len(model.layers))


def apply_compile(model) -> None:
    """torch.compile each block separately: one small graph reused n_layers times compiles
    fast and keeps the Python loop (and AC wrappers) outside the graph."""
    for block in model.layers:
        block.compile()
    log.info("compiled %d blocks with torch.compile", len(model.layers))


def parallelize(model, dims: ParallelDims, ac_mode: str = "none", compile: bool = False):
    if dims.tp > 1 or dims.dp > 1:
        raise NotImplementedError(
            f"distributed training (parallel degrees {dims}) is not available yet in this version: "
            "run on one process (parallel.tp=1, parallel.dp_shard=-1, one process)")
    apply_ac(model, ac_mode)
    if compile:
        apply_compile(model)
    return model
