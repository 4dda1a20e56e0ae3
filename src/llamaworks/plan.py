"""FLOPs, memory and time of a training run: what the paper's section 2.4 figures rest on.

The FLOP counts here are also the trainer's MFU numerator, so they follow the standard
model-FLOPs convention (PaLM, Chowdhery et al. 2022, appendix B) rather than counting
what a particular kernel executes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Annotated, Literal

from llamaworks.args import Arg
from llamaworks.carbon import format_summary, run_summary
from llamaworks.model import ModelArgs, count_parameters

__all__ = ["GPU", "GPUS", "Plan", "gpu_spec", "total_parameters", "matmul_parameters", "flops_per_token",
           "forward_flops_per_token", "activation_bytes", "plan", "plan_command"]

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # dense bf16 (fp16 for V100) tensor-core FLOP/s, no structured sparsity
    memory_gib: float  # nominal "GB" read as GiB (exact for A100; H100/H200 expose ~0.5% less)
    tdp_w: float  # board power, what section 6 multiplies GPU-hours by


# Vendor datasheets. A100: 312 TFLOP/s bf16, 400 W (SXM; section 6 uses 400 W for A100-80GB).
GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("v100", 125e12, 32, 300),  # SXM2 32GB, fp16 (no bf16 on Volta)
    GPU("a100-40gb", 312e12, 40, 400),
    GPU("a100-80gb", 312e12, 80, 400),
    GPU("h100-sxm", 989e12, 80, 700),
    GPU("h100-pcie", 756e12, 80, 350),
    GPU("h200", 989e12, 141, 700),  # H100 compute with 141 GB of HBM3e
)}

TABLE_2_TOKENS = {"7B": 1.0e12, "13B": 1.0e12, "33B": 1.4e12, "65B": 1.4e12}  # Table 2
# The later families' published budgets: Llama 2 paper, Table 1 (2.0T); Code Llama paper
# (500B tokens on top of Llama 2 7B); Llama 3 model card (15T+) and paper (405B: 15.6T);
# Llama 3.2 model card (up to 9T for 1B and 3B).
FAMILY_TOKENS = {"llama2-7b": 2.0e12, "llama2-13b": 2.0e12, "llama2-70b": 2.0e12, "codellama-7b": 0.5e12,
                 "llama3-8b": 15e12, "llama3-70b": 15e12, "llama3.1-8b": 15e12, "llama3.1-70b": 15e12,
                 "llama3.1-405b": 15.6e12, "llama3.2-1b": 9e12, "llama3.2-3b": 9e12}
# "4M tokens" (Table 2) over 2048-token sequences: 2048 sequences = 2^22 tokens, the only
# reading that gives whole sequences.
BATCH_TOKENS = 4 * 2**20
# Without a measured throughput assume 40%: below the ~49% the paper's 380 tokens/s/GPU
# implies for 65B and PaLM's 46%, what a well-tuned but not record-setting run reaches.
DEFAULT_MFU = 0.4
# Mixed-precision AdamW bytes per parameter (ZeRO, Rajbhandari et al. 2020, section 3.1):
# bf16 weights 2 + bf16 gradients 2 + fp32 master weights, Adam m and v 4 + 4 + 4 = 16.
WEIGHT_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2, 2, 12
CHECKPOINTING = ("none", "selective", "full")


def gpu_spec(name: str) -> GPU:
    if name.lower() not in GPUS:
        raise ValueError(f"unknown gpu {name!r}; choose one of {', '.join(GPUS)} (--gpu)")
    return GPUS[name.lower()]


@functools.lru_cache(maxsize=32)
def _count(fields: tuple) -> int:
    return count_parameters(ModelArgs(**dict(fields)))  # ~1 s for 65B on meta: count once


def total_parameters(args: ModelArgs) -> int:
    return _count(tuple(asdict(args).items()))


def matmul_parameters(args: ModelArgs) -> int:
    # Everything but the token embedding (a lookup, no FLOPs) and the RMSNorm gains;
    # the output projection is a matmul and counts, also when it is the embedding's tensor
    # (tie_word_embeddings), which total_parameters counts once.
    lookup = 0 if args.tie_word_embeddings else args.vocab_size * args.dim
    return total_parameters(args) - lookup - (2 * args.n_layers + 1) * args.dim


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    # 6N: a matmul with N weights costs 2N FLOPs per token forward and 4N backward (gradients
    # of inputs and of weights). Attention scores, per layer and token, forward: QK^T is
    # 2*d*T and AV another 2*d*T (all heads together, T = seq_len keys), so 4*L*d*T; x3 with
    # the backward gives 12*L*d*T. Like PaLM (appendix B) we do NOT halve it for the causal
    # mask, although the paper's kernel skips the masked half (section 2.4): MFU stays
    # comparable across papers. Recomputation is not counted either: these are model FLOPs.
    return 6.0 * matmul_parameters(args) + 12.0 * args.n_layers * args.dim * seq_len


def forward_flops_per_token(args: ModelArgs, seq_len: int) -> float:
    return flops_per_token(args, seq_len) / 3.0  # 2N + 4*L*d*T: inference, no backward


def activation_bytes(args: ModelArgs, seq_len: int, micro_batch: int, tp: int, checkpointing: str) -> float:
    # Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
    # Models"), 16-bit activations, per layer with s, b, h, a = seq, micro-batch, dim, heads;
    # we assume sequence parallelism whenever tp > 1, as the paper does (section 2.4):
    #   none:      s*b*h*(34 + 5*a*s/h) / t   (attention scores stored: no fused kernel)
    #   selective: s*b*h*34 / t               (scores recomputed / never stored, which is what
    #                                          the paper's memory-efficient attention gives)
    #   full:      2*s*b*h / t                (only each layer's input kept)
    # The 34 is derived for GPT (4h GeLU MLP, dropout); LLaMA has no dropout, so it errs high.
    # Plus the fp32 logits the cross entropy keeps: 4*s*b*v/t (same paper, section 4).
    s, b, h, a, t = seq_len, micro_batch, args.dim, args.n_heads, tp
    per_layer = {"none": s * b * h * (34 + 5 * a * s / h), "selective": 34 * s * b * h, "full": 2 * s * b * h}
    return (args.n_layers * per_layer[checkpointing] + 4 * s * b * args.vocab_size) / t


@dataclass
class Plan:
    preset: str
    args: ModelArgs
    gpu: GPU
    gpus: int
    tp: int
    dp: int
    dp_shard: int
    seq_len: int
    batch_tokens: int
    micro_batch: int
    grad_accum: int
    activation_checkpointing: str
    params: int
    matmul_params: int
    weight_bytes: float  # per GPU, like every *_bytes field
    grad_bytes: float
    optimizer_bytes: float
    gathered_bytes: float
    activation_bytes: float
    flops_per_token: float
    tokens: float
    tokens_per_gpu_s: float
    mfu: float
    mfu_implied: bool  # True when mfu was derived from a given throughput

    @property
    def total_bytes(self) -> float:
        states = self.weight_bytes + self.grad_bytes + self.optimizer_bytes
        return states + self.gathered_bytes + self.activation_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.gpu.memory_gib * GIB

    @property
    def total_flops(self) -> float:
        return self.flops_per_token * self.tokens

    @property
    def gpu_hours(self) -> float:
        return self.tokens / self.tokens_per_gpu_s / 3600

    @property
    def days(self) -> float:
        return self.gpu_hours / self.gpus / 24

    def format(self) -> str:
        gib = lambda x: f"{x / GIB:8.2f} GiB"
        attn = 12.0 * self.args.n_layers * self.args.dim * self.seq_len
        mfu = f"(given): MFU {self.mfu:.1%} implied" if self.mfu_implied else f"at MFU {self.mfu:.1%} assumed"
        rows = [
            (f"{'LLaMA-' if self.preset in TABLE_2_TOKENS else ''}{self.preset} on {self.gpus} x {self.gpu.name}",
             ""),
            ("parallelism", f"tp {self.tp}{' + sequence parallel' if self.tp > 1 else ''} x dp {self.dp}; "
                            f"states sharded over tp x dp_shard = {self.tp} x {self.dp_shard}"),
            ("parameters", f"{self.params:,} ({self.matmul_params:,} in matmuls)"),
            ("batch", f"{self.batch_tokens:,} tokens = {self.batch_tokens // self.seq_len} x {self.seq_len}; "
                      f"micro-batch {self.micro_batch} x {self.grad_accum} accumulation steps"),
            ("memory per GPU", ""),
            ("  weights (bf16)", gib(self.weight_bytes)),
            ("  gradients (bf16)", gib(self.grad_bytes)),
            ("  optimizer (fp32 master, m, v)", gib(self.optimizer_bytes)),
            ("  gathered layers (FSDP)", gib(self.gathered_bytes)),
            (f"  activations ({self.activation_checkpointing})", gib(self.activation_bytes)),
            ("  total", f"{gib(self.total_bytes)} of {self.gpu.memory_gib:g} -> "
                        f"{'fits' if self.fits else 'DOES NOT FIT'}"),
            ("FLOPs per token", f"{self.flops_per_token:.4g} (6N {6.0 * self.matmul_params:.4g} "
                                f"+ attention {attn:.4g})"),
            ("tokens", f"{self.tokens:.4g} ({math.ceil(self.tokens / self.batch_tokens):,} steps)"),
            ("total FLOPs", f"{self.total_flops:.4g}"),
            ("throughput", f"{self.tokens_per_gpu_s:,.0f} tokens/s/GPU {mfu}"),
            ("time", f"{self.days:.1f} days, {self.gpu_hours:,.0f} GPU-hours"),
        ]
        return "\n".join(f"{k:<32}{v}" if v else k for k, v in rows)


def plan(preset: str, gpus: int, gpu: str = "a100-80gb", mfu: float | None = None,
         tokens_per_gpu_s: float | None = None, tokens: float | None = None, seq_len: int | None = None,
         batch_tokens: int = BATCH_TOKENS, tp: int = 1, dp_shard: int | None = None,
         activation_checkpointing: str = "selective", micro_batch: int = 1) -> Plan:
    args = ModelArgs.from_name(preset)  # ValueError lists the presets
    spec = gpu_spec(gpu)
    if seq_len is None:  # Table 2: 2048 for the paper's sizes; Llama 3.1 pretrained at 8192, then extended
        seq_len = args.rope_old_context_len if args.use_scaled_rope else args.max_seq_len
    given = dict(gpus=gpus, tp=tp, seq_len=seq_len, batch_tokens=batch_tokens, micro_batch=micro_batch,
                 mfu=mfu, tokens=tokens, tokens_per_gpu_s=tokens_per_gpu_s)
    for name, value in given.items():
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value} (--{name.replace('_', '-')})")
    if mfu is not None and tokens_per_gpu_s is not None:
        raise ValueError("give either mfu (--mfu) or a measured throughput (--tokens-per-gpu-s), not both")
    if mfu is not None and mfu > 1:
        raise ValueError(f"mfu is a fraction of peak, got {mfu}; pass e.g. 0.4 for 40% (--mfu)")
    if activation_checkpointing not in CHECKPOINTING:
        raise ValueError(f"unknown activation_checkpointing {activation_checkpointing!r}; "
                         f"choose one of {', '.join(CHECKPOINTING)} (--activation-checkpointing)")
    if gpus % tp:
        raise ValueError(f"gpus={gpus} is not divisible by tp={tp}; choose a tp that divides --gpus")
    for what, size in (("n_heads", args.n_heads), ("SwiGLU hidden size", args.hidden_dim),
                       ("vocab_size", args.vocab_size)):
        if size % tp:  # Megatron splits heads, FFN columns and the vocabulary over tp ranks
            raise ValueError(f"tp={tp} does not divide {preset}'s {what} {size}; choose a divisor (--tp)")
    dp = gpus // tp
    dp_shard = dp if dp_shard is None else dp_shard  # default: FSDP full shard / ZeRO-3
    if dp_shard < 1 or dp % dp_shard:
        raise ValueError(f"dp_shard={dp_shard} must divide the data-parallel size gpus/tp={dp} (--dp-shard)")
    if batch_tokens % seq_len:
        raise ValueError(f"batch_tokens={batch_tokens} must be a multiple of seq_len {seq_len} "
                         "(--batch-tokens)")
    sequences = batch_tokens // seq_len
    if sequences % (dp * micro_batch):
        raise ValueError(f"{sequences} sequences per batch do not split over dp={dp} ranks x micro_batch="
                         f"{micro_batch}; change --batch-tokens, --micro-batch, --gpus or --tp")
    if tokens is None:
        budgets = {**TABLE_2_TOKENS, **FAMILY_TOKENS}
        if preset not in budgets:
            raise ValueError(f"preset {preset!r} has no published token budget; pass tokens (--tokens)")
        tokens = budgets[preset]

    params, matmul = total_parameters(args), matmul_parameters(args)
    fpt = flops_per_token(args, seq_len)
    implied = tokens_per_gpu_s is not None
    if not implied:
        mfu = DEFAULT_MFU if mfu is None else mfu
        tokens_per_gpu_s = mfu * spec.peak_flops / fpt
    else:
        mfu = tokens_per_gpu_s * fpt / spec.peak_flops
        if mfu > 1:
            raise ValueError(f"tokens_per_gpu_s={tokens_per_gpu_s:g} implies MFU {mfu:.0%} > 100% on "
                             f"{spec.name}; check --tokens-per-gpu-s and --gpu")
    shards = tp * dp_shard
    # FSDP all-gathers one layer's bf16 weights for compute and prefetches the next (Zhao
    # et al. 2023, PyTorch FSDP); each tp rank gathers only its own 1/tp slice.
    layer_params = (matmul - args.vocab_size * args.dim) / args.n_layers
    gathered = 2 * layer_params * WEIGHT_BYTES / tp if dp_shard > 1 else 0.0
    return Plan(
        preset=preset, args=args, gpu=spec, gpus=gpus, tp=tp, dp=dp, dp_shard=dp_shard, seq_len=seq_len,
        batch_tokens=batch_tokens, micro_batch=micro_batch, grad_accum=sequences // (dp * micro_batch),
        activation_checkpointing=activation_checkpointing, params=params, matmul_params=matmul,
        weight_bytes=params * WEIGHT_BYTES / shards, grad_bytes=params * GRAD_BYTES / shards,
        optimizer_bytes=params * OPTIMIZER_BYTES / shards, gathered_bytes=gathered,
        activation_bytes=activation_bytes(args, seq_len, micro_batch, tp, activation_checkpointing),
        flops_per_token=fpt, tokens=tokens, tokens_per_gpu_s=tokens_per_gpu_s, mfu=mfu, mfu_implied=implied,
    )


def plan_command(
    preset: Annotated[str, Arg("model size: 7B, 13B, 33B, 65B (Table 2), llama2-7b ... llama3.2-3b (the "
                               "released families) or tiny, small, base")],
    gpus: Annotated[int, Arg("number of GPUs")],
    gpu: Annotated[str, Arg(f"GPU type: {', '.join(GPUS)}")] = "a100-80gb",
    mfu: Annotated[float | None, Arg(f"assumed model FLOPs utilisation (default {DEFAULT_MFU})")] = None,
    tokens_per_gpu_s: Annotated[float | None, Arg("measured throughput, instead of --mfu")] = None,
    tokens: Annotated[float | None, Arg("training tokens (default: Table 2, 1.0T or 1.4T; the families' "
                                        "published budgets)")] = None,
    seq_len: Annotated[int | None, Arg("sequence length (default: the preset's pretraining context, 2048 for "
                                       "Table 2)")] = None,
    batch_tokens: Annotated[int, Arg("global batch in tokens (Table 2: 4M)")] = BATCH_TOKENS,
    tp: Annotated[int, Arg("tensor (model) parallel size, with sequence parallelism")] = 1,
    dp_shard: Annotated[int | None, Arg("FSDP shard group size (default: all data-parallel ranks)")] = None,
    activation_checkpointing: Annotated[Literal["none", "selective", "full"], Arg("what to recompute")]
    = "selective",
    micro_batch: Annotated[int, Arg("sequences per GPU per forward pass")] = 1,
) -> int:
    """Memory per GPU, FLOPs, time and carbon of pretraining a preset on a GPU cluster."""
    p = plan(preset, gpus, gpu, mfu, tokens_per_gpu_s, tokens, seq_len, batch_tokens, tp, dp_shard,
             activation_checkpointing, micro_batch)
    print(p.format())
    print(f"carbon (section 6, at the {p.gpu.name}'s {p.gpu.tdp_w:g} W)")
    print(format_summary(run_summary(p.gpu_hours, p.gpu.tdp_w)))
    return 0
