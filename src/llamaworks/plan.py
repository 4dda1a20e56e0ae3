"""FLOPs, memory and time of a training run: what the paper's section 2.4 figures rest on.

The FLOP counts here are also the trainer's MFU numerator, so they follow the standard
model-FLOPs convention (PaLM, Chowdhery et al. 2022, appendix B) rather than counting
what a particular kernel executes.

Memory follows what llamaworks runs: FSDP2 with a MixedPrecisionPolicy (fp32 sharded
parameters, which are the optimizer's master copy, all-gathered in bf16 for compute; fp32
gradients), tensor + sequence parallelism and pipeline parallelism (1F1B or interleaved 1F1B,
whose bubble idles (p-1)/(v*m+p-1) of a step). `recommend` searches the layouts (tp, pp, dp,
micro-batch, activation checkpointing) with a simple step-time model and says why it picks one.
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
           "forward_flops_per_token", "activation_bytes", "pipeline_bubble", "pipeline_activation_bytes",
           "stage_parameters", "step_time", "plan", "recommend", "explain_recommendation", "plan_command"]

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # dense bf16 (fp16 for V100) tensor-core FLOP/s, no structured sparsity
    memory_gib: float  # nominal "GB" read as GiB (exact for A100; H100/H200 expose ~0.5% less)
    tdp_w: float  # board power, what section 6 multiplies GPU-hours by
    # Per GPU and direction, nominal (so communication estimates are optimistic): NVLink inside a
    # node (half the datasheet's bidirectional figure) and the network between nodes (one
    # InfiniBand NIC per GPU, as in DGX nodes and Meta's RSC, where the paper trained).
    nvlink_gb_s: float = 0.0
    network_gb_s: float = 0.0


# Vendor datasheets. A100: 312 TFLOP/s bf16, 400 W (SXM; section 6 uses 400 W for A100-80GB),
# NVLink 3 600 GB/s, one 200 Gb/s HDR NIC per GPU.
GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("v100", 125e12, 32, 300, 150, 12.5),  # SXM2 32GB, fp16 (no bf16 on Volta); 100 Gb/s EDR
    GPU("a100-40gb", 312e12, 40, 400, 300, 25),
    GPU("a100-80gb", 312e12, 80, 400, 300, 25),
    GPU("h100-sxm", 989e12, 80, 700, 450, 50),  # NVLink 4 900 GB/s, 400 Gb/s NDR
    GPU("h100-pcie", 756e12, 80, 350, 300, 50),  # NVLink bridge 600 GB/s
    GPU("h200", 989e12, 141, 700, 450, 50),  # H100 compute with 141 GB of HBM3e
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
# Mixed-precision AdamW bytes per parameter as FSDP2's MixedPrecisionPolicy keeps them: the
# sharded parameter is fp32 and is the master copy, gradients are reduced and kept in fp32,
# Adam's m and v are fp32: 4 + 4 + 8 = 16 (the 16 of ZeRO, Rajbhandari et al. 2020, section 3.1,
# which splits them 2 + 2 + 12 because its model keeps bf16 weights beside the fp32 master).
# The bf16 copies are transient: each layer's weights all-gathered for its forward and backward.
MASTER_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 4, 4, 8
DTYPE_BYTES = {"bf16": 2, "fp32": 4}  # parallel.mp_param_dtype: what weights and activations compute in
REDUCE_BYTES = 4  # parallel.mp_reduce_dtype = float32
CHECKPOINTING = ("none", "selective", "full")
PP_SCHEDULES = ("1f1b", "interleaved1f1b")


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


def pipeline_bubble(pp: int, microbatches: int, stages_per_rank: int = 1) -> float:
    """The idle fraction of a pipeline-parallel step: (p-1)/(v*m+p-1) for p stages (ranks), m
    micro-batches and v stages per rank (Narayanan et al. 2021, "Efficient Large-Scale Language
    Model Training on GPU Clusters", section 2.2: the bubble is (p-1) micro-batch times of fill
    and drain against m of work; interleaving v chunks per rank shrinks each of those by v).
    1F1B is v = 1; 1F1B and GPipe have the same bubble, 1F1B stores fewer activations."""
    assert pp >= 1 and microbatches >= 1 and stages_per_rank >= 1, (pp, microbatches, stages_per_rank)
    return (pp - 1) / (stages_per_rank * microbatches + pp - 1)


def layer_parameters(args: ModelArgs) -> float:
    """One transformer block's matmul weights (q, k, v, o and w1, w2, w3)."""
    return (matmul_parameters(args) - args.vocab_size * args.dim) / args.n_layers


def stage_parameters(args: ModelArgs, pp: int) -> float:
    """Parameters on the most loaded pipeline rank: ceil(L/p) blocks, plus the output projection
    and final norm (the last stage) or the embedding (the first), whichever is larger; all of
    them with pp = 1."""
    if pp == 1:
        return float(total_parameters(args))
    block = layer_parameters(args) + 2 * args.dim  # + attention_norm and ffn_norm gains
    return math.ceil(args.n_layers / pp) * block + args.vocab_size * args.dim + args.dim


def pipeline_activation_bytes(args: ModelArgs, seq_len: int, micro_batch: int, tp: int, checkpointing: str,
                              pp: int = 1, microbatches: int = 1, stages_per_rank: int = 1,
                              dtype_bytes: int = 2) -> float:
    """Activations on the most loaded GPU under 1F1B (Korthikanti et al. 2022, section 4.2.3): the
    first stage holds min(m, p) micro-batches in flight through its L/p layers, which is L layers'
    worth once m >= p, whatever p is; interleaving v chunks per rank raises that by a factor
    1 + (p-1)/(p*v). The last stage holds one micro-batch through its layers plus the logits.
    With pp = 1 this is activation_bytes. dtype_bytes: 2 with bf16 compute, 4 in fp32."""
    one_layer = (activation_bytes(args, seq_len, micro_batch, tp, checkpointing)
                 - 4 * seq_len * micro_batch * args.vocab_size / tp) / args.n_layers
    logits = 4 * seq_len * micro_batch * args.vocab_size / tp  # fp32 for the cross entropy, any dtype
    scale = dtype_bytes / 2  # Korthikanti counts 16-bit activations
    if pp == 1:
        return args.n_layers * one_layer * scale + logits
    layers = args.n_layers / pp
    in_flight = min(microbatches, pp) * (1 + (pp - 1) / (pp * stages_per_rank) if stages_per_rank > 1 else 1)
    first = layers * in_flight * one_layer * scale
    last = layers * one_layer * scale + logits
    return max(first, last)


@dataclass
class Plan:
    preset: str
    args: ModelArgs
    gpu: GPU
    gpus: int
    tp: int
    pp: int
    dp: int
    dp_shard: int
    seq_len: int
    batch_tokens: int
    micro_batch: int
    grad_accum: int  # micro-batches per optimizer step on each data-parallel rank (= per pipeline)
    activation_checkpointing: str
    pp_schedule: str
    stages_per_rank: int
    mp_param_dtype: str
    params: int
    matmul_params: int
    stage_params: float  # on the most loaded pipeline rank, before tp and FSDP split them
    weight_bytes: float  # per GPU, like every *_bytes field: fp32 sharded parameters (the master copy)
    grad_bytes: float  # fp32 sharded gradients
    optimizer_bytes: float  # Adam m and v
    gathered_bytes: float  # the compute-dtype copies of the layers FSDP has all-gathered
    accumulated_grad_bytes: float  # unsharded fp32 gradients kept across micro-batches (no sync until the last)
    activation_bytes: float
    bubble: float  # the pipeline's idle fraction of a step
    flops_per_token: float
    tokens: float
    tokens_per_gpu_s: float
    mfu: float
    mfu_implied: bool  # True when mfu was derived from a given throughput

    @property
    def total_bytes(self) -> float:
        states = self.weight_bytes + self.grad_bytes + self.optimizer_bytes
        return states + self.gathered_bytes + self.accumulated_grad_bytes + self.activation_bytes

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

    @property
    def layout(self) -> str:
        pp = f" x pp {self.pp}" + (f" ({self.pp_schedule}, {self.stages_per_rank} stages per rank)"
                                   if self.stages_per_rank > 1 else "") if self.pp > 1 else ""
        return f"tp {self.tp}{pp} x dp {self.dp}"

    def format(self) -> str:
        gib = lambda x: f"{x / GIB:8.2f} GiB"
        attn = 12.0 * self.args.n_layers * self.args.dim * self.seq_len
        mfu = f"(given): MFU {self.mfu:.1%} implied" if self.mfu_implied else f"at MFU {self.mfu:.1%} assumed"
        if self.pp > 1 and not self.mfu_implied:
            mfu += ", less the pipeline bubble"
        dt = self.mp_param_dtype
        rows = [
            (f"{'LLaMA-' if self.preset in TABLE_2_TOKENS else ''}{self.preset} on {self.gpus} x {self.gpu.name}",
             ""),
            ("parallelism", f"{self.layout}{' (+ sequence parallel)' if self.tp > 1 else ''}; "
                            f"states sharded over tp x pp x dp_shard = {self.tp} x {self.pp} x {self.dp_shard}"),
            ("parameters", f"{self.params:,} ({self.matmul_params:,} in matmuls)"),
            ("batch", f"{self.batch_tokens:,} tokens = {self.batch_tokens // self.seq_len} x {self.seq_len}; "
                      f"micro-batch {self.micro_batch} x {self.grad_accum} "
                      f"{'micro-batches per pipeline' if self.pp > 1 else 'accumulation steps'}"),
        ]
        if self.pp > 1:
            rows.append(("pipeline bubble", f"{self.bubble:.1%} = (p-1)/(v*m+p-1) with p {self.pp}, "
                                            f"v {self.stages_per_rank}, m {self.grad_accum}"))
        rows += [
            (f"memory per GPU (FSDP2 mixed precision: {dt} compute, fp32 master and gradients)", ""),
            ("  parameters (fp32, sharded)", gib(self.weight_bytes)),
            ("  gradients (fp32, sharded)", gib(self.grad_bytes)),
            ("  optimizer (fp32 m, v)", gib(self.optimizer_bytes)),
            (f"  gathered layers ({dt}, FSDP)", gib(self.gathered_bytes)),
            ("  accumulated gradients (fp32)", gib(self.accumulated_grad_bytes)),
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
         activation_checkpointing: str = "selective", micro_batch: int = 1, pp: int = 1,
         pp_schedule: str = "1f1b", stages_per_rank: int | None = None, mp_param_dtype: str = "bf16") -> Plan:
    args = ModelArgs.from_name(preset)  # ValueError lists the presets
    spec = gpu_spec(gpu)
    if seq_len is None:  # Table 2: 2048 for the paper's sizes; Llama 3.1 pretrained at 8192, then extended
        seq_len = args.rope_old_context_len if args.use_scaled_rope else args.max_seq_len
    given = dict(gpus=gpus, tp=tp, pp=pp, seq_len=seq_len, batch_tokens=batch_tokens, micro_batch=micro_batch,
                 mfu=mfu, tokens=tokens, tokens_per_gpu_s=tokens_per_gpu_s, stages_per_rank=stages_per_rank)
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
    if pp_schedule.lower() not in PP_SCHEDULES:
        raise ValueError(f"unknown pp_schedule {pp_schedule!r}; choose one of {', '.join(PP_SCHEDULES)} "
                         "(--pp-schedule)")
    pp_schedule = pp_schedule.lower()
    if mp_param_dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown mp_param_dtype {mp_param_dtype!r}; choose one of {', '.join(DTYPE_BYTES)} "
                         "(--mp-param-dtype)")
    v = stages_per_rank or (2 if pp_schedule == "interleaved1f1b" else 1)
    if v > 1 and pp_schedule == "1f1b":
        raise ValueError(f"stages_per_rank={v} needs pp_schedule = interleaved1f1b (--pp-schedule)")
    if gpus % (tp * pp):
        raise ValueError(f"gpus={gpus} is not divisible by tp x pp = {tp} x {pp}; choose a tp and pp whose "
                         "product divides --gpus")
    for what, size in (("n_heads", args.n_heads), ("SwiGLU hidden size", args.hidden_dim),
                       ("vocab_size", args.vocab_size)):
        if size % tp:  # Megatron splits heads, FFN columns and the vocabulary over tp ranks
            raise ValueError(f"tp={tp} does not divide {preset}'s {what} {size}; choose a divisor (--tp)")
    if pp * v > args.n_layers:
        raise ValueError(f"pp x stages_per_rank = {pp} x {v} stages exceed {preset}'s {args.n_layers} layers "
                         "(--pp, --stages-per-rank)")
    dp = gpus // (tp * pp)
    dp_shard = dp if dp_shard is None else dp_shard  # default: FSDP full shard / ZeRO-3
    if dp_shard < 1 or dp % dp_shard:
        raise ValueError(f"dp_shard={dp_shard} must divide the data-parallel size gpus/(tp x pp)={dp} (--dp-shard)")
    if batch_tokens % seq_len:
        raise ValueError(f"batch_tokens={batch_tokens} must be a multiple of seq_len {seq_len} "
                         "(--batch-tokens)")
    sequences = batch_tokens // seq_len
    if sequences % (dp * micro_batch):
        raise ValueError(f"{sequences} sequences per batch do not split over dp={dp} ranks x micro_batch="
                         f"{micro_batch}; change --batch-tokens, --micro-batch, --gpus, --tp or --pp")
    if tokens is None:
        budgets = {**TABLE_2_TOKENS, **FAMILY_TOKENS}
        if preset not in budgets:
            raise ValueError(f"preset {preset!r} has no published token budget; pass tokens (--tokens)")
        tokens = budgets[preset]

    params, matmul = total_parameters(args), matmul_parameters(args)
    m = sequences // (dp * micro_batch)
    bubble = pipeline_bubble(pp, m, v)
    fpt = flops_per_token(args, seq_len)
    implied = tokens_per_gpu_s is not None
    if not implied:
        mfu = DEFAULT_MFU if mfu is None else mfu
        # the assumed MFU is the compute's; the pipeline's GPUs idle for the bubble
        tokens_per_gpu_s = mfu * spec.peak_flops / fpt * (1 - bubble)
    else:
        mfu = tokens_per_gpu_s * fpt / spec.peak_flops
        if mfu > 1:
            raise ValueError(f"tokens_per_gpu_s={tokens_per_gpu_s:g} implies MFU {mfu:.0%} > 100% on "
                             f"{spec.name}; check --tokens-per-gpu-s and --gpu")
    stage = stage_parameters(args, pp)
    shards = tp * dp_shard
    compute = DTYPE_BYTES[mp_param_dtype]
    # FSDP all-gathers one layer's weights in the compute dtype and prefetches the next (Zhao et
    # al. 2023, PyTorch FSDP); each tp rank gathers only its own 1/tp slice.
    gathered = 2 * layer_parameters(args) * compute / tp if dp_shard > 1 else 0.0
    # Micro-batches before the last skip the reduce-scatter (parallel.sync_every_microbatch = false),
    # so FSDP2 keeps their gradients unsharded, in the reduce dtype, until the step's last one.
    accumulated = REDUCE_BYTES * stage / tp if dp_shard > 1 and m > 1 else 0.0
    return Plan(
        preset=preset, args=args, gpu=spec, gpus=gpus, tp=tp, pp=pp, dp=dp, dp_shard=dp_shard, seq_len=seq_len,
        batch_tokens=batch_tokens, micro_batch=micro_batch, grad_accum=m,
        activation_checkpointing=activation_checkpointing, pp_schedule=pp_schedule, stages_per_rank=v,
        mp_param_dtype=mp_param_dtype, params=params, matmul_params=matmul, stage_params=stage,
        weight_bytes=stage * MASTER_BYTES / shards, grad_bytes=stage * GRAD_BYTES / shards,
        optimizer_bytes=stage * OPTIMIZER_BYTES / shards, gathered_bytes=gathered,
        accumulated_grad_bytes=accumulated,
        activation_bytes=pipeline_activation_bytes(args, seq_len, micro_batch, tp, activation_checkpointing, pp,
                                                   m, v, compute),
        bubble=bubble, flops_per_token=fpt, tokens=tokens, tokens_per_gpu_s=tokens_per_gpu_s, mfu=mfu,
        mfu_implied=implied,
    )


# ---------------------------------------------------------------------------- choosing a layout


@dataclass(frozen=True)
class StepTime:
    """One optimizer step on one GPU, in seconds, by the model `step_time` states."""

    compute: float  # the matmuls at the assumed MFU, recomputation included
    tp_comm: float  # tensor/sequence-parallel collectives, on the critical path
    bubble: float  # the pipeline's idle time
    dp_comm: float  # FSDP all-gathers and reduce-scatters, overlapped with compute by prefetching
    total: float

    @property
    def exposed_dp(self) -> float:
        return max(0.0, self.total - self.compute - self.tp_comm - self.bubble)


def step_time(p: Plan, mfu: float = DEFAULT_MFU) -> StepTime:
    """A simple model of a step's time on one GPU, to rank layouts (not to predict to the percent):

    - compute: the GPU's share of the batch's model FLOPs at `mfu` of peak; full activation
      checkpointing runs each forward twice (8N instead of 6N FLOPs per token: x4/3); selective
      recomputes only attention scores, which the memory-efficient kernel never stores anyway.
    - tp_comm: sequence parallelism's all-gather and reduce-scatter of the (s, b, dim) activations
      twice per block in the forward and twice in the backward, each moving (t-1)/t of them per GPU
      over NVLink, not overlapped (tp stays inside a node: across nodes this would dominate).
    - bubble: (compute + tp_comm) * bubble / (1 - bubble) of idling.
    - dp_comm: FSDP2 all-gathers the GPU's slice of its stage in the compute dtype for every micro-
      batch's forward and again for its backward (reshard after forward), and reduce-scatters the
      fp32 gradients once per step, each moving (d-1)/d of it over the network; prefetching hides it
      behind the compute, so a step takes the longer of the two.
    """
    a = p.args
    recompute = 4 / 3 if p.activation_checkpointing == "full" else 1.0
    tokens_per_gpu = p.batch_tokens / p.gpus
    compute = tokens_per_gpu * p.flops_per_token * recompute / (p.gpu.peak_flops * mfu)
    dt = DTYPE_BYTES[p.mp_param_dtype]
    tp_bytes = 8 * (p.tp - 1) / p.tp * p.seq_len * p.micro_batch * a.dim * dt  # per block and micro-batch
    tp_comm = a.n_layers / p.pp * p.grad_accum * tp_bytes / (p.gpu.nvlink_gb_s * 1e9) if p.tp > 1 else 0.0
    busy = compute + tp_comm
    bubble = busy * p.bubble / (1 - p.bubble)
    d = p.dp_shard
    slice_ = p.stage_params / p.tp
    dp_bytes = (p.grad_accum * 2 * dt + REDUCE_BYTES) * slice_ * (d - 1) / d if d > 1 else 0.0
    dp_comm = dp_bytes / (p.gpu.network_gb_s * 1e9)
    return StepTime(compute, tp_comm, bubble, dp_comm, max(busy + bubble, dp_comm))


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def recommend(preset: str, gpus: int, gpu: str = "a100-80gb", node_gpus: int = 8, mfu: float = DEFAULT_MFU,
              seq_len: int | None = None, batch_tokens: int = BATCH_TOKENS,
              tokens: float | None = None) -> list[tuple[Plan, StepTime]]:
    """Every layout that fits, fastest first by `step_time`: tp within a node (a divisor of
    node_gpus), pp dividing the layers evenly (1F1B, and interleaved with 2 stages per rank),
    FSDP over all data-parallel ranks, micro-batches of 1-8 sequences, selective or full
    activation checkpointing. Ties go to the layout with fewer model-parallel GPUs (tp x pp)."""
    args = ModelArgs.from_name(preset)
    found = []
    for tp in [t for t in _divisors(node_gpus) if args.n_heads % t == 0 and args.hidden_dim % t == 0
               and args.vocab_size % t == 0]:
        for pp in [q for q in _divisors(args.n_layers) if q <= 32 and gpus % (tp * q) == 0]:
            for schedule, v in [("1f1b", 1)] + ([("interleaved1f1b", 2)] if pp > 1 and args.n_layers % (2 * pp)
                                                  == 0 else []):
                for micro in (1, 2, 4, 8):
                    for ckpt in ("selective", "full"):
                        try:
                            p = plan(preset, gpus, gpu, mfu=mfu, tokens=tokens, seq_len=seq_len,
                                     batch_tokens=batch_tokens, tp=tp, pp=pp, pp_schedule=schedule,
                                     stages_per_rank=v, micro_batch=micro, activation_checkpointing=ckpt)
                        except ValueError:  # the batch does not split over this layout
                            continue
                        if p.fits:
                            found.append((p, step_time(p, mfu)))
    found.sort(key=lambda ps: (round(ps[1].total, 9), ps[0].tp * ps[0].pp, ps[0].micro_batch,
                               ps[0].stages_per_rank))
    return found


def explain_recommendation(found: list[tuple[Plan, StepTime]], node_gpus: int = 8) -> str:
    """The best layout of `recommend` and, with the figures of the model, why not the others."""
    if not found:
        return "no layout fits: more GPUs, a GPU with more memory or a shorter sequence"
    best, t = found[0]
    rate = lambda s: best.batch_tokens / best.gpus / s.total
    lines = [f"recommended layout for {best.gpus} x {best.gpu.name}: {best.layout}, FSDP over the {best.dp_shard} "
             f"data-parallel ranks; micro-batches of {best.micro_batch} sequences, {best.grad_accum} per step, "
             f"{best.activation_checkpointing} activation checkpointing",
             f"  {best.total_bytes / GIB:.1f} of {best.gpu.memory_gib:g} GiB per GPU; a step of ~{t.total:.2f} s, "
             f"~{rate(t):,.0f} tokens/s/GPU at the assumed MFU (a model to rank layouts, not a prediction: "
             "llamaworks.plan.step_time)",
             "why:"]

    def best_where(cond):
        return next(((p, s) for p, s in found if cond(p)), None)

    if best.tp > 1:
        lines.append(f"- tp {best.tp} stays inside a node of {node_gpus} GPUs (NVLink): it divides weights, "
                     f"gradients and activations by {best.tp}; its activation collectives cost "
                     f"{t.tp_comm / t.total:.0%} of the step")
    if best.pp == 1:
        alt = best_where(lambda p: p.pp > 1)
        why = "the model fits without pipelining, so no GPU idles in a bubble"
        if alt:
            why += (f"; the best pipelined layout ({alt[0].layout}, {alt[0].grad_accum} micro-batches) idles "
                    f"{alt[0].bubble:.1%} of its step and reaches ~{rate(alt[1]):,.0f} tokens/s/GPU")
        lines.append(f"- pp 1: {why}")
    else:
        alt = best_where(lambda p: p.pp == 1)
        why = (f"its bubble is {best.bubble:.1%} with {best.grad_accum} micro-batches per pipeline "
               f"(p-1)/(v*m+p-1)")
        why += (f"; without pipelining the best layout ({alt[0].layout}) reaches ~{rate(alt[1]):,.0f} "
                "tokens/s/GPU" if alt else "; without pipelining no layout fits")
        lines.append(f"- pp {best.pp}: {why}")
    lines.append(f"- dp {best.dp} with FSDP: per step each GPU moves {t.dp_comm * best.gpu.network_gb_s:,.1f} GB "
                 f"of all-gathers and reduce-scatters, {t.dp_comm:.2f} s on its {best.gpu.network_gb_s:g} GB/s "
                 f"link, {'hidden behind' if t.dp_comm <= t.compute + t.tp_comm + t.bubble else 'longer than'} "
                 f"{t.compute:.2f} s of compute")
    small = best_where(lambda p: p.micro_batch < best.micro_batch and p.tp == best.tp and p.pp == best.pp)
    if small:
        sp, ss = small
        lines.append(f"- micro-batch {best.micro_batch}: fewer micro-batches mean fewer all-gathers; with "
                     f"{sp.micro_batch} the all-gathers take {ss.dp_comm:.2f} s and the step {ss.total:.2f} s")
    elif best.micro_batch == 1:
        lines.append("- micro-batch 1: the least activation memory; a larger one does not speed the step")
    runner = next(((p, s) for p, s in found[1:] if p.layout != best.layout), None)
    if runner:
        lines.append(f"- the runner-up, {runner[0].layout} (micro-batch {runner[0].micro_batch}), is "
                     f"{runner[1].total / t.total - 1:.1%} slower in this model: within its error, so measure both")
    if best.activation_checkpointing == "selective":
        lines.append("- selective checkpointing: it fits; full recomputation would add a third to the compute")
    else:
        lines.append("- full checkpointing: selective does not fit in this layout, or is slower elsewhere")
    return "\n".join(lines)


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
    pp: Annotated[int, Arg("pipeline parallel size (stages over ranks)")] = 1,
    pp_schedule: Annotated[str, Arg("pipeline schedule: 1f1b or interleaved1f1b (torch's names, any case, "
                                    "as parallel.pp_schedule)")] = "1f1b",
    stages_per_rank: Annotated[int | None, Arg("pipeline stages per rank (default 1; 2 interleaved)")] = None,
    mp_param_dtype: Annotated[Literal["bf16", "fp32"], Arg("the dtype FSDP gathers weights and computes in")]
    = "bf16",
) -> int:
    """Memory per GPU, FLOPs, time and carbon of pretraining a preset on a GPU cluster, and the
    layout (tp, pp, dp, micro-batch, checkpointing) it recommends for that many GPUs, with why."""
    p = plan(preset, gpus, gpu, mfu, tokens_per_gpu_s, tokens, seq_len, batch_tokens, tp, dp_shard,
             activation_checkpointing, micro_batch, pp, pp_schedule, stages_per_rank, mp_param_dtype)
    print(p.format())
    print(f"carbon (section 6, at the {p.gpu.name}'s {p.gpu.tdp_w:g} W)")
    print(format_summary(run_summary(p.gpu_hours, p.gpu.tdp_w)))
    if gpus > 1:
        print(explain_recommendation(recommend(preset, gpus, gpu, mfu=mfu or DEFAULT_MFU, seq_len=seq_len,
                                               batch_tokens=batch_tokens, tokens=tokens)))
    return 0
