"""Meta's release format: params.json + consolidated.NN.pth model-parallel shards + tokenizer.model.

Meta trained with Megatron-style tensor parallelism (fairscale), and each shard holds
one rank's slice: column-parallel projections (wq, wk, wv, w1, w3, output) are split on
their output dimension (dim 0), row-parallel ones (wo, w2) and the parallel embedding on
their input dimension (dim 1); norms are replicated on every rank. Merging concatenates
the slices; resharding cuts them again.

Memory: shards are opened with torch.load(mmap=True), so their bytes stay in the page
cache (file-backed, reclaimable) and are read on demand. A one-shard folder (7B) is used
without any copy: the mapped tensors become the parameters. With several shards each
tensor is concatenated on its own, so the process holds the merged model (1x) plus the
mapped pages of the one tensor being merged; peak resident memory stays about 1x the
model, never the 2x of loading every shard and then merging.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from llamaworks.atomic import atomic_write_json
from llamaworks.model import LLAMA31_ROPE_SCALING, ModelArgs, Transformer
from llamaworks.modeldir import PARAMS, TOKENIZER, read_params, read_tokenizer, write_tokenizer_files
from llamaworks.paths import require_dir, require_file
from llamaworks.weights import StateLayout, check_finite

# Per-layer Meta suffix -> the dimension fairscale split it on; None: replicated.
LAYER_SPLIT: dict[str, int | None] = {
    "attention.wq.weight": 0,  # ColumnParallelLinear
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,  # RowParallelLinear
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
}
TOP_SPLIT: dict[str, int | None] = {
    # LLaMA 1 and 2's ParallelEmbedding splits the embedding dimension; Llama 3's code uses
    # VocabParallelEmbedding, which splits the vocabulary (dim 0): merging tells them apart by
    # shape, writing follows vocab_parallel().
    "tok_embeddings.weight": 1,
    "norm.weight": None,
    "output.weight": 0,
}
# Every Llama 3 params.json has rope_theta 500000: Meta's llama3 code loads them.
LLAMA3_THETA = 500000.0
LLAMA31_CONTEXT = 131072
# LLaMA 1 checkpoints carry the RoPE table as a tensor; it is recomputed from params.
IGNORED = {"rope.freqs"}
SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")
# What Meta's own params.json holds. max_seq_len is deliberately absent: Meta's
# Llama.build passes it as a keyword next to **params, so writing it breaks their loader.
# The later keys appear only where set; Meta's llama3 code skips keys it does not know (it reads
# use_scaled_rope and runs Llama 3.1's scaling with its fixed 8/1/4/8192).
META_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
             "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor", "rope_low_freq_factor",
             "rope_high_freq_factor", "rope_old_context_len", "tie_word_embeddings")
KV_KEYS = ("attention.wk.weight", "attention.wv.weight")


def split_dim(key: str) -> int | None:
    if key in TOP_SPLIT:
        return TOP_SPLIT[key]
    m = re.fullmatch(r"layers\.\d+\.(.+)", key)
    if m is None or m[1] not in LAYER_SPLIT:
        raise KeyError(key)
    return LAYER_SPLIT[m[1]]


def vocab_parallel(args: ModelArgs) -> bool:
    """Whether Meta's shards of this model split tok_embeddings by vocabulary: Llama 3's code
    (VocabParallelEmbedding), which every Llama 3 params.json selects with its rope_theta."""
    return args.rope_theta == LLAMA3_THETA or args.use_scaled_rope


def kv_replicas(args: ModelArgs, shards: int) -> int:
    """How many consecutive shards hold each key/value head: 1, or shards / n_kv_heads when there
    are more shards than heads (Meta's resharding repeats a head on each rank that needs it,
    as in Llama 3.1 405B's 16 shards of 8 heads)."""
    return shards // args.n_kv_heads if shards > args.n_kv_heads and shards % args.n_kv_heads == 0 else 1


def shard_paths(folder: Path) -> list[Path]:
    """consolidated.00.pth .. consolidated.NN.pth, checked to be contiguous from 00."""
    found = {}
    for p in folder.iterdir():
        m = SHARD.match(p.name)
        if m:
            found[int(m[1])] = p
    if not found:
        raise ValueError(f"{folder}: no consolidated.NN.pth shards; is this a Meta checkpoint folder "
                         "(params.json, consolidated.00.pth, tokenizer.model)?")
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing:
        names = ", ".join(f"consolidated.{i:02d}.pth" for i in missing)
        raise ValueError(f"{folder}: missing shard(s) {names} of {max(found) + 1}; every model-parallel "
                         "shard is needed, copy the complete folder")
    return [require_file(found[i], "a model-parallel shard of a Meta checkpoint") for i in range(len(found))]


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    # weights_only: torch's restricted unpickler, which builds tensors and plain containers and
    # refuses every other global (no code runs from the file). mmap: nothing is read yet.
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: truncated or corrupt checkpoint shard ({why}); re-download or re-copy "
                         "this file") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f"{path}: not a state dict of tensors; expected a Meta consolidated.NN.pth shard")
    return sd


def read_meta_params(folder: Path, tokenizer=None, max_seq_len: int | None = None) -> ModelArgs:
    path = require_file(folder / PARAMS, "a Meta folder holds params.json, consolidated.NN.pth and tokenizer.model")
    params = read_params(path)
    if params.get("vocab_size", -1) == -1:
        if tokenizer is None:
            raise ValueError(f"{path}: vocab_size is -1 (\"from the tokenizer\") and no tokenizer.model "
                             "is next to it; add the tokenizer or set vocab_size")
        params["vocab_size"] = tokenizer.vocab_size
    if max_seq_len is not None:
        params["max_seq_len"] = max_seq_len
    elif "max_seq_len" not in params and params.get("rope_theta") == LLAMA3_THETA:
        # Meta passes the context at run time; Llama 3's is 8192, 3.1's and 3.2's 131072 (their
        # config.json's max_position_embeddings). LLaMA 1 and 2 keep ModelArgs' 2048.
        params["max_seq_len"] = LLAMA31_CONTEXT if params.get("use_scaled_rope") is True else 8192
    try:
        return ModelArgs.from_params(params)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def iter_merged(folder: Path, args: ModelArgs, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(Meta key, merged tensor) one at a time, validated against `args`."""
    paths = shard_paths(folder)
    shards = [_load_shard(p) for p in paths]  # mmap: nothing is read yet
    for sd in shards:
        for k in IGNORED:
            sd.pop(k, None)
    keys = list(shards[0])
    for p, sd in zip(paths[1:], shards[1:]):
        if set(sd) != set(keys):
            diff = sorted(set(sd) ^ set(keys))[:3]
            raise ValueError(f"{p}: its tensors differ from {paths[0].name}'s (e.g. {diff}); the shards come "
                             "from different checkpoints, re-download the folder")
    # Meta's shards hold the output layer even for a tied model (load_meta ties it).
    full = dataclasses.replace(args, tie_word_embeddings=False) if "output.weight" in keys else args
    layout = StateLayout(full, source=folder / PARAMS)  # not Transformer(args): n_layers is checked first
    missing, unknown = layout.mismatch(keys)
    if unknown or missing:
        raise ValueError(f"{folder / PARAMS} disagrees with the shards: tensors missing {missing[:4]}, "
                         f"unexpected {unknown[:4]}; fix n_layers in params.json or use the matching params")
    dtypes = {(sd[k].dtype, p) for p, sd in zip(paths, shards) for k in keys}
    if len({d for d, _ in dtypes}) > 1:
        seen = sorted({f"{d} in {p.name}" for d, p in dtypes})
        raise ValueError(f"{folder}: mixed dtypes across tensors ({', '.join(seen[:4])}); every tensor of a "
                         "checkpoint should share one dtype, re-export it")
    bar = _progress(len(keys), f"merging {len(paths)} shard(s)", progress)
    try:
        replicas = kv_replicas(args, len(paths))
        for k in keys:
            dim = split_dim(k)
            parts = [sd[k] for sd in shards]
            if not parts[0].is_floating_point():
                raise ValueError(f"{paths[0]}: tensor {k} is {parts[0].dtype}; Meta checkpoints hold float weights")
            want_shape = tuple(layout.expected(k).shape)
            if k == "tok_embeddings.weight" and len(parts) > 1 and parts[0].dim() == 2 \
                    and parts[0].shape[1] == want_shape[1]:
                dim = 0  # Llama 3's VocabParallelEmbedding: a slice of the vocabulary per shard
            if replicas > 1 and k.endswith(KV_KEYS) and parts[0].shape[0] == args.head_dim:
                # Each head on `replicas` consecutive shards: keep one copy, if the copies agree.
                for i, p in enumerate(parts):
                    if p.shape != parts[i - i % replicas].shape or not torch.equal(p, parts[i - i % replicas]):
                        raise ValueError(f"{paths[i]}: {k} should repeat key/value head {i // replicas} of "
                                         f"{paths[i - i % replicas].name} ({len(paths)} shards, n_kv_heads="
                                         f"{args.n_kv_heads}) but differs; the shards come from different checkpoints")
                parts = parts[::replicas]
            # The merged shape, worked out before torch.cat (which would fail on disagreeing shards).
            shape = list(parts[0].shape)
            if dim is not None and len(parts) > 1:
                rest = [s[:dim] + s[dim + 1:] for s in (list(p.shape) for p in parts)]
                if len(shape) <= dim or any(r != rest[0] for r in rest):
                    raise ValueError(f"{folder}: the shards hold {k} in shapes {[tuple(p.shape) for p in parts]}, "
                                     "which do not concatenate; the shards come from different checkpoints")
                shape[dim] = sum(p.shape[dim] for p in parts)
            elif any(p.shape != parts[0].shape for p in parts):
                raise ValueError(f"{folder}: the shards hold {k} in different shapes; the shards come from "
                                 "different checkpoints")
            if tuple(shape) != want_shape:
                want = want_shape[dim] if dim is not None else 0
                if dim is not None and len(shape) == len(want_shape) and shape[dim] and want % shape[dim] == 0 \
                        and want // shape[dim] > 1:
                    total = want // shape[dim] * len(paths)
                    raise ValueError(f"{folder}: {k} merges to {tuple(shape)} from {len(paths)} shard(s), "
                                     f"1/{want // shape[dim]} of what params.json implies: the checkpoint "
                                     f"seems to have {total} shards, so consolidated.{len(paths):02d}.pth and up "
                                     "are missing; copy the complete folder")
                raise ValueError(f"{folder / PARAMS} disagrees with the shards: {k} merges to "
                                 f"{tuple(shape)} but params.json implies {want_shape}; use the params.json "
                                 "that came with these weights")
            # replicated, or one shard: the mapped tensor itself
            t = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
            check_finite({k: t}, paths[0] if len(paths) == 1 else folder)
            bar.update(1)
            yield k, t
    finally:
        bar.close()


def load_meta(folder: str | os.PathLike, dtype: torch.dtype | None = None, max_seq_len: int | None = None,
              progress: bool = False):
    """(model, tokenizer) from a Meta folder of any shard count; the model is in eval mode."""
    folder = require_dir(folder, "expected a Meta checkpoint folder (params.json, consolidated.NN.pth)")
    tok = read_tokenizer(folder) if (folder / TOKENIZER).is_file() else None  # + chat templates, eos
    args = read_meta_params(folder, tok, max_seq_len)
    if tok is not None and tok.vocab_size != args.vocab_size:
        raise ValueError(f"vocabulary mismatch: {folder / PARAMS} says vocab_size={args.vocab_size} but "
                         f"{folder / TOKENIZER} has {tok.vocab_size} pieces; use the tokenizer released with "
                         "these weights")
    state = {}
    for k, t in iter_merged(folder, args, progress):
        state[k] = t.to(dtype) if dtype is not None and t.dtype != dtype else t
    if args.tie_word_embeddings and "output.weight" in state:
        if not torch.equal(state.pop("output.weight"), state["tok_embeddings.weight"]):
            raise ValueError(f"{folder / PARAMS}: tie_word_embeddings is true but the shards' output.weight differs "
                             "from tok_embeddings.weight; set it to false (the model has its own output layer)")
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state, strict=True, assign=True)
    model.init_rope(torch.device("cpu"))
    return model.eval(), tok


def meta_params(args: ModelArgs) -> dict:
    # Llama 2 keys only where they differ from LLaMA 1, so a LLaMA 1 model's params.json
    # reads exactly like the released ones.
    p = args.to_params()
    out = {k: p[k] for k in META_KEYS if k in p}
    if out["n_kv_heads"] == args.n_heads:
        del out["n_kv_heads"]
    if out["ffn_dim_multiplier"] is None:
        del out["ffn_dim_multiplier"]
    if out["rope_theta"] == 10000.0:
        del out["rope_theta"]
    if args.use_scaled_rope:  # Meta's 3.1 params.json: use_scaled_rope alone, for its fixed values
        for k, fixed in zip(("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                             "rope_old_context_len"), LLAMA31_ROPE_SCALING):
            if out[k] == fixed:
                del out[k]
    return out


def check_shardable(args: ModelArgs, shards: int) -> None:
    if shards < 1:
        raise ValueError(f"--shards {shards}: need at least 1 shard")
    # Each rank holds whole heads and an equal slice of every split dimension.
    # More shards than key/value heads: each head repeated on shards/n_kv_heads shards (Meta's way).
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads * kv_replicas(args, shards), "dim": args.dim,
             "hidden_dim (FFN width)": args.hidden_dim, "vocab_size": args.vocab_size}
    bad = [f"{name}={v}" for name, v in sizes.items() if v % shards]
    if bad:
        raise ValueError(f"--shards {shards} does not divide {', '.join(bad)}; choose a shard count that does "
                         f"(e.g. 1, a divisor of n_kv_heads={args.n_kv_heads} or a multiple of it)")


def write_meta_files(state: dict[str, torch.Tensor], args: ModelArgs, tokenizer, folder: Path, shards: int = 1,
                     dtype: torch.dtype | None = None, progress: bool = False) -> None:
    """Meta's files, written into an existing (temporary) folder.

    One shard's slices are materialised at a time (clone: torch.save of a view would
    write the whole underlying storage), so extra memory is about 1/shards of the model.
    """
    check_shardable(args, shards)
    if tokenizer is not None and tokenizer.vocab_size != args.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but vocab_size is {args.vocab_size}")
    atomic_write_json(folder / PARAMS, meta_params(args))
    if args.tie_word_embeddings and "output.weight" not in state:
        state = {**state, "output.weight": state["tok_embeddings.weight"]}  # Meta's code has no tied output
    replicas = kv_replicas(args, shards)
    bar = _progress(shards * len(state), f"writing {shards} shard(s)", progress)
    try:
        for rank in range(shards):
            out = {}
            for k, t in state.items():
                dim = 0 if k == "tok_embeddings.weight" and vocab_parallel(args) else split_dim(k)
                if replicas > 1 and k.endswith(KV_KEYS):
                    part = t.chunk(args.n_kv_heads, dim=0)[rank // replicas]
                else:
                    part = t if dim is None else t.chunk(shards, dim=dim)[rank]
                out[k] = part.to(dtype or part.dtype).detach().contiguous().clone()
                bar.update(1)
            torch.save(out, folder / f"consolidated.{rank:02d}.pth")
            del out
    finally:
        bar.close()
    if tokenizer is not None:
        write_tokenizer_files(tokenizer, folder)  # tokenizer.model (+ chat templates, eos) as a model directory


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, leave=False)
