"""Turn a single-device Transformer into the training model: `parallelize()` calls the
`apply_*` transforms in one fixed order (torchtitan's layout). The model file knows
nothing of any of this.

Order: pipeline split -> tensor/sequence parallel -> activation checkpointing -> compile ->
FSDP/DDP. The pipeline split (parallel/pipeline.py) keeps this rank's stages; each stage is
then transformed like a whole model. AC wraps the (possibly TP-sharded) blocks; compile sees
the AC-wrapped blocks; data parallelism wraps last so its hooks surround everything else.

Everything distributed is PyTorch's own: DTensor's `parallelize_module` for tensor and
sequence parallelism (Megatron-LM's column/row split, Korthikanti et al. 2022 for the
norms), FSDP2's `fully_shard` and the composable `replicate` (DDP) for data parallelism,
on a DeviceMesh with the named dimensions ("pp", "dp_replicate", "dp_shard", "tp"). The trainer
applies all of it on the meta device and materialises the shards afterwards (train/init.py).

`load_tensor_parallel` is the inference side: a model directory split with `apply_tp` over
the processes of `torchrun ... -m llamaworks generate`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from llamaworks.device import DTYPES
from llamaworks.parallel.pipeline import PipelinePlan, apply_pp

log = logging.getLogger("llamaworks")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    world_size: int = 1
    pp: int = 1  # pipeline-parallel ranks (parallel/pipeline.py)

    @classmethod
    def resolve(cls, dp_replicate: int, dp_shard: int, tp: int, world_size: int,
                n_heads: int, pp: int = 1) -> ParallelDims:
        for name, v in (("parallel.dp_replicate", dp_replicate), ("parallel.tp", tp), ("parallel.pp", pp)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if dp_shard == -1:
            if world_size % (pp * dp_replicate * tp):
                names = ("parallel.pp * " if pp > 1 else "") + "parallel.dp_replicate * parallel.tp"
                raise ValueError(f"world size {world_size} is not divisible by {names} = {pp * dp_replicate * tp}")
            dp_shard = world_size // (pp * dp_replicate * tp)
        if pp * dp_replicate * dp_shard * tp != world_size:
            raise ValueError(f"parallel degrees pp={pp} x dp_replicate={dp_replicate} x dp_shard={dp_shard} x "
                             f"tp={tp} = {pp * dp_replicate * dp_shard * tp} but the world size is {world_size}; "
                             "make their product equal the number of processes (dp_shard=-1 fills the rest)")
        if n_heads % tp:
            raise ValueError(f"parallel.tp={tp} does not divide the model's n_heads={n_heads}")
        if pp > 1 and dp_replicate > 1 and dp_shard == 1:
            raise ValueError(f"parallel.pp={pp} with DDP (parallel.dp_replicate={dp_replicate}, dp_shard=1) is not "
                             "supported: shard the data-parallel ranks with FSDP instead (parallel.dp_shard)")
        return cls(dp_replicate, dp_shard, tp, world_size, pp)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def dp_rank(self, rank: int) -> int:
        """The data-parallel rank of global `rank`: the ranks of one tensor-parallel group and of
        one pipeline read the same batch (the mesh's layout, build_mesh)."""
        return (rank // self.tp) % self.dp

    def build_mesh(self, device_type: str):
        """The world as a (pp, dp_replicate, dp_shard, tp) DeviceMesh; tp innermost so that a
        tensor-parallel group is the ranks of one node (tp needs the fastest links), pp outermost
        (a pipeline sends one activation per microbatch between neighbours: the slowest links do)."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard, self.tp),
                                mesh_dim_names=("pp", "dp_replicate", "dp_shard", "tp"))


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


def _blocks(model) -> list[nn.Module]:
    """The TransformerBlocks of a Transformer (a ModuleList) or of a pipeline stage (a ModuleDict
    keyed by global layer id, parallel/pipeline.py), in order."""
    return list(model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers)


def apply_ac(model, mode: str) -> None:
    """Activation checkpointing per TransformerBlock: 'none', 'full' (keep only the block's
    input, recompute the whole block in backward) or 'selective' (see _SAVE_OPS)."""
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"train.activation_checkpointing must be none, full or selective, got {mode!r}")
    for block in _blocks(model):
        kwargs = {"use_reentrant": False}
        if mode == "selective":
            kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
        # Replacing the instance's forward (rather than wrapping the module) keeps the
        # state-dict keys exactly Meta's.
        block.forward = functools.partial(checkpoint, block.forward, **kwargs)
    log.info("applied %s activation checkpointing to %d blocks", mode, len(_blocks(model)))


def apply_compile(model) -> None:
    """torch.compile each block separately: one small graph reused n_layers times compiles
    fast and keeps the Python loop (and AC wrappers) outside the graph."""
    for block in _blocks(model):
        block.compile()
    log.info("compiled %d blocks with torch.compile", len(_blocks(model)))


def apply_tp(model, tp_mesh, sequence_parallel: bool = True, loss_parallel: bool = False) -> None:
    """Tensor parallelism (Megatron-LM) with sequence parallelism (Korthikanti et al. 2022).

    Inside a block, wq/wk/wv/w1/w3 are split by output features (column-parallel: each rank
    computes n_heads/tp heads and hidden/tp SwiGLU units with no communication) and wo/w2
    by input features (row-parallel: partial sums, reduced once per sub-layer). Between the
    sub-layers the residual stream is split along the sequence (Shard(1)), so the norms and
    residual adds run on seq/tp tokens per rank and the activation memory the paper's
    section 2.4 worries about shrinks by tp: the row-parallel outputs are reduce-scattered
    into sequence shards and all-gathered back before the next column-parallel input,
    the same bytes as Megatron's all-reduce. The embedding is split by vocabulary rows and
    the output layer by vocabulary columns (its weight's rows): a tied output layer
    (tie_word_embeddings, Llama 3.2 1B/3B) shares the embedding's shards.

    sequence_parallel=False (inference: one new token per step has no sequence to split)
    keeps the residual stream and the norms replicated; wo/w2 all-reduce instead.
    loss_parallel: in training mode the logits stay split by vocabulary (a DTensor, Shard(-1))
    for a cross-entropy under torch's `loss_parallel()` context, so the (tokens, vocab) logits
    are never gathered; in eval mode they are gathered (plain tensors, for evaluation and
    generation code). Without it the logits are always gathered.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp = tp_mesh.size()
    args = model.args
    for name, n in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads)):
        if n % tp:
            raise ValueError(f"parallel.tp={tp} does not divide the model's {name}={n}; choose a tp "
                             f"that divides {n}")
    stream = Shard(1) if sequence_parallel else Replicate()  # the residual stream between sub-layers
    root = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=stream),
        "output": ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                  use_local_output=not loss_parallel),
    }
    if sequence_parallel:
        root["norm"] = SequenceParallel()
    # A pipeline stage holds some of these (the first the embedding, the last norm and output).
    root = {name: style for name, style in root.items() if getattr(model, name, None) is not None}
    parallelize_module(model, tp_mesh, root)
    if args.tie_word_embeddings:
        # parallelize_module distributed the one tied tensor twice, as the embedding's and as
        # the output layer's own DTensor. Both are split by vocabulary rows (Shard(0): rowwise
        # for an Embedding, colwise for a Linear), so one DTensor serves both layers: tie them
        # again, and both gradients accumulate into it, as in one process.
        emb, out = model.tok_embeddings.weight, model.output.weight
        assert emb.placements == out.placements and emb.shape == out.shape, (emb.placements, out.placements)
        model.tie_output()
    if loss_parallel and getattr(model, "output", None) is not None:
        model.output.register_forward_hook(_gather_logits_in_eval)
    for block in _blocks(model):
        plan = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=stream),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=stream),
            "feed_forward.w3": ColwiseParallel(),
        }
        if sequence_parallel:
            plan.update({
                "attention_norm": SequenceParallel(),
                # Attention takes (x, freqs, input_pos, mask, rows): only x is gathered.
                "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None),
                                                desired_input_layouts=(Replicate(), None, None, None, None)),
                "ffn_norm": SequenceParallel(),
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            })
        parallelize_module(block, tp_mesh, plan)
        # This rank's heads: the KV cache (setup_caches) holds only them, and grouped-query
        # attention keeps its ratio (the views in model.py already use -1 heads).
        att = block.attention
        att.n_heads, att.n_kv_heads = att.n_heads // tp, att.n_kv_heads // tp
    log.info("applied tensor%s parallelism (tp=%d) to the model%s", " and sequence" if sequence_parallel else "",
             tp, ", loss parallel" if loss_parallel else "")


def _gather_logits_in_eval(module, inputs, output):
    return output if module.training else output.full_tensor()


def resolve_mp_dtypes(param_dtype: str, reduce_dtype: str, device_type: str) -> tuple[torch.dtype, torch.dtype]:
    """FSDP2's mixed-precision dtypes from parallel.mp_param_dtype / parallel.mp_reduce_dtype.

    param_dtype "auto" is bf16 on CUDA (torchtitan's default: all-gathers and compute in bf16,
    half the bytes of fp32) and fp32 elsewhere (CPU matmuls in bf16 are slow and gloo gains
    little); the sharded parameters and the optimizer always stay fp32. reduce_dtype is the
    dtype gradients are reduce-scattered (summed over ranks) in: fp32 by default, because a
    sum of many bf16 gradients loses their low bits.
    """
    def parse(option: str, name: str) -> torch.dtype:
        # any case, like parallel.pp_schedule: "BF16" is no less clear than "bf16"
        key = name.lower() if isinstance(name, str) else name
        if key not in DTYPES:
            raise ValueError(f"parallel.{option}={name!r} is not a dtype; choose one of {', '.join(DTYPES)}"
                             f"{' or auto' if option == 'mp_param_dtype' else ''} (any case)")
        return DTYPES[key]

    auto = isinstance(param_dtype, str) and param_dtype.lower() == "auto"
    param = ("bfloat16" if device_type == "cuda" else "float32") if auto else param_dtype
    return parse("mp_param_dtype", param), parse("mp_reduce_dtype", reduce_dtype)


def apply_fsdp(model, dp_mesh, reshard_after_forward: str = "default", param_dtype: torch.dtype = torch.float32,
               reduce_dtype: torch.dtype = torch.float32) -> None:
    """FSDP2: each block's parameters (and the rest at the root) are sharded over dp_mesh,
    all-gathered just before the block runs and freed after; gradients are reduce-scattered
    (averaged) so each rank keeps only its shard, and the optimizer steps on shards.

    Mixed precision (MixedPrecisionPolicy): the fp32 shards are cast to param_dtype before the
    all-gather, so the gathered weights, the forward and backward run in param_dtype and
    communication of parameters costs param_dtype's bytes; gradients are cast to reduce_dtype
    for the reduce-scatter and land on the fp32 shards the optimizer updates.

    reshard_after_forward: 'always' frees every block's gathered weights after its forward
    (least memory, one extra all-gather per block in backward); 'never' keeps them (ZeRO-2
    memory, less communication); 'default' reshards all but the last block, whose weights
    backward needs first anyway.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if reshard_after_forward not in ("default", "always", "never"):
        raise ValueError(f"parallel.fsdp_reshard_after_forward must be default, always or never, "
                         f"got {reshard_after_forward!r}")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        reshard = {"always": True, "never": False}.get(reshard_after_forward, i < len(blocks) - 1)
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp)
    # The root takes the embedding, final norm and output layer; it is never resharded after
    # forward (backward starts with it).
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward == "always", mp_policy=mp)
    # Explicit prefetching: while block i computes, block i+1's all-gather is already in
    # flight (and in backward, block i-1's), so communication overlaps computation beyond
    # the one block FSDP2 prefetches implicitly.
    for prev, nxt in zip(blocks, blocks[1:]):
        prev.set_modules_to_forward_prefetch([nxt])
        nxt.set_modules_to_backward_prefetch([prev])
    log.info("applied FSDP (fully_shard, reshard_after_forward=%s, mesh %s, params in %s, gradients reduced "
             "in %s) to the model", reshard_after_forward, dict(zip(dp_mesh.mesh_dim_names, dp_mesh.shape)),
             param_dtype, reduce_dtype)


def apply_ddp(model, dp_mesh) -> None:
    """DDP (the composable `replicate`, which keeps the module and its state-dict keys): every
    rank holds the whole model, gradients are all-reduced (averaged) in buckets while
    backward is still running, overlapping communication with computation."""
    from torch.distributed._composable.replicate import replicate

    replicate(model, device_mesh=dp_mesh, bucket_cap_mb=100)
    log.info("applied DDP (replicate over %d ranks) to the model", dp_mesh.size())


def parallelize(model, dims: ParallelDims, ac_mode: str = "none", compile: bool = False, mesh=None,
                fsdp_reshard_after_forward: str = "default", loss_parallel: bool = False,
                mp_param_dtype: torch.dtype = torch.float32, mp_reduce_dtype: torch.dtype = torch.float32,
                pipeline: PipelinePlan | None = None):
    """Apply the pipeline split, then TP, AC, compile, then FSDP or DDP, in that order, and return
    the model to train: `model` itself, or with dims.pp > 1 this rank's PipelineModel (its stages,
    each transformed like a whole model). `mesh` is dims.build_mesh(...) when dims.distributed;
    with one process none of the distributed steps runs.

    The model may be on the meta device (the trainer's sharded initialisation: to_empty and
    train/init.py's init_weights afterwards). loss_parallel (with tp > 1): see apply_tp.

    Data parallelism: dp_shard > 1 shards with FSDP (HSDP, sharded within and replicated
    across groups, when dp_replicate > 1 too); dp_replicate > 1 alone is DDP. mp_param_dtype and
    mp_reduce_dtype: FSDP's mixed precision (apply_fsdp; resolve_mp_dtypes reads the config).
    pipeline: the stages (parallel/pipeline.py resolve_pipeline), needed when dims.pp > 1.
    """
    if dims.distributed and mesh is None:
        raise ValueError(f"parallel degrees {dims} need a DeviceMesh: pass mesh=dims.build_mesh(device_type) "
                         "after torch.distributed is initialised (launch with torchrun)")
    if dims.dp_replicate > 1 and dims.dp_shard == 1 and dims.tp > 1:
        raise ValueError(f"DDP (parallel.dp_replicate={dims.dp_replicate}, dp_shard=1) cannot be combined "
                         f"with parallel.tp={dims.tp}: set parallel.dp_shard instead of dp_replicate (FSDP x TP)")
    parts = [model]
    if dims.pp > 1:
        assert pipeline is not None and pipeline.pp == dims.pp, (pipeline, dims)
        model = apply_pp(model, mesh["pp"], pipeline)
        parts = model.stages
        # Each microbatch runs forward and backward through the stage; resharding after forward
        # would all-gather every block's weights once more per microbatch.
        if fsdp_reshard_after_forward == "default":
            fsdp_reshard_after_forward = "never"
    for part in parts:
        if dims.tp > 1:
            apply_tp(part, mesh["tp"], loss_parallel=loss_parallel)
            if dims.pp > 1:
                part.seq_shards = dims.tp  # the hidden states between stages are split along the sequence
        apply_ac(part, ac_mode)
        if compile:
            apply_compile(part)
        if dims.dp_shard > 1:
            dp_mesh = mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]
            apply_fsdp(part, dp_mesh, fsdp_reshard_after_forward, mp_param_dtype, mp_reduce_dtype)
        elif dims.dp_replicate > 1:
            apply_ddp(part, mesh["dp_replicate"])
    return model
