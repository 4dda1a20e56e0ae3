"""Tensor-parallel loading of a model directory for inference (`llamaworks generate` under
torchrun): each rank maps the file and keeps only its slices."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from llamaworks.modeldir import QUANT_FILE, WEIGHTS, load_model
from llamaworks.parallel.parallelize import apply_tp
from llamaworks.weights import read_safetensors


def load_tensor_parallel(path, tp_mesh, device: torch.device, dtype: torch.dtype | None = None):
    """(model, tokenizer) of a model directory split over tp_mesh for inference (`llamaworks
    generate` under torchrun): apply_tp without sequence parallelism on the meta device, then
    each rank places only its slices of the memory-mapped weights (the column-parallel rows,
    the row-parallel columns; norms whole), so a rank holds 1/tp of the projections and
    never the full model beyond the file pages the mmap maps. Its KV cache holds its heads.
    """
    path = Path(path)
    if (path / QUANT_FILE).is_file():
        raise ValueError(f"{path} holds a quantized model, which tensor parallelism does not split; run it in "
                         "one process, or launch the unquantized model under torchrun")
    model, tokenizer = load_model(path, device="meta")  # checks params, tokenizer and shapes; reads no weights
    tp, args = tp_mesh.size(), model.args
    if args.n_kv_heads % tp:
        raise ValueError(f"{tp} processes cannot split {path}'s {args.n_kv_heads} key/value heads (and "
                         f"{args.n_heads} query heads): launch torchrun with an --nproc_per_node that divides "
                         f"{args.n_kv_heads}")
    apply_tp(model, tp_mesh, sequence_parallel=False)
    weights = read_safetensors(path / WEIGHTS)
    for name, p in list(model.named_parameters()):
        local = weights[name]
        if isinstance(p, DTensor):
            # This rank's block of the full tensor: narrow() views of the mapped file, no copy.
            shape, offset = compute_local_shape_and_global_offset(local.shape, p.device_mesh, p.placements)
            for dim, (n, start) in enumerate(zip(shape, offset)):
                local = local.narrow(dim, start, n)
        local = local.to(device=device, dtype=dtype if dtype is not None and local.is_floating_point() else None)
        if isinstance(p, DTensor):
            local = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                       stride=p.stride())
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, nn.Parameter(local, requires_grad=False))
    # A tied output layer (apply_tp tied the two DTensors; the file names the tensor once, as
    # tok_embeddings.weight) reads the embedding's new shards.
    model.tie_output()
    model.init_rope(device)
    return model.eval(), tokenizer
