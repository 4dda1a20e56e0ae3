"""The pretraining job's configuration: one dataclass per TOML section.

Defaults are the paper's recipe (sections 2.3-2.4, Table 2); small runs change them in
their config file or with `--section.key VALUE`. Derived values (gradient accumulation,
the model's arguments) are computed here, once, from the resolved config.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass
from typing import Literal, get_type_hints

from llamaworks.model import ModelArgs


@dataclass
class RunConfig:
    out_dir: str = "runs/llamaworks"  # checkpoints, metrics.jsonl, config.toml, loss curve, model/
    description: str = ""


def _build_args(self, vocab_size: int | None = None) -> ModelArgs:
    """The preset's ModelArgs with this section's set fields; `vocab_size`: the tokenizer's size."""
    changes = {name: getattr(self, name) for name in MODEL_ARG_NAMES if getattr(self, name) is not None}
    if vocab_size is not None:
        if self.vocab_size is not None and self.vocab_size != vocab_size:
            raise ValueError(f"model.vocab_size={self.vocab_size} but the tokenizer has {vocab_size} pieces; "
                             "remove model.vocab_size (it is taken from the tokenizer) or use a matching tokenizer")
        changes["vocab_size"] = vocab_size
    return ModelArgs.from_name(self.preset, **changes)


def _checkpoint_args(self, args: ModelArgs, source: str) -> ModelArgs:
    """With init_from: the checkpoint's ModelArgs, which every field this section sets must equal
    (the preset is not used: the checkpoint's params are the model)."""
    for name in MODEL_ARG_NAMES:
        value = getattr(self, name)
        if value is not None and value != getattr(args, name):
            raise ValueError(f"model.{name}={value!r} but {source} has {name}={getattr(args, name)!r}; with "
                             "model.init_from (--init-from) the model's arguments are the checkpoint's: remove "
                             f"model.{name} from the config and the command line")
    return args


def _model_section() -> type:
    """[model]: a preset name plus every ModelArgs field (Meta's params.json keys), each optional,
    or `init_from`, a checkpoint to continue pretraining from (`pretrain --init-from DIR`).

    Derived from ModelArgs rather than re-declared, so a field added to the model is a config
    key at once, with the same name and type; None (unset) keeps the preset's value, and
    vocab_size, when unset, is taken from the tokenizer. With init_from the checkpoint's
    arguments are the model's and a field set here must agree with them (`checkpoint_args`).
    """
    hints = get_type_hints(ModelArgs)
    overrides = [(name, hints[name] | None, field(default=None)) for name in MODEL_ARG_NAMES]
    # init_from: any format `convert` reads (model directory, HF or Meta folder, .gguf); "" = the preset
    cls = make_dataclass("ModelConfig", [("preset", str, field(default="7B")),
                                         ("init_from", str, field(default="")), *overrides],
                         namespace={"build_args": _build_args, "checkpoint_args": _checkpoint_args,
                                    "__doc__": _model_section.__doc__})
    # make_dataclass names its own module; configs are pickled (torch.multiprocessing spawn)
    # and resolved by name, so the class must say where it lives.
    cls.__module__ = __name__
    return cls


MODEL_ARG_NAMES: tuple[str, ...] = tuple(f.name for f in fields(ModelArgs))
ModelConfig = _model_section()


@dataclass
class DataConfig:
    dir: str = ""  # token shards written by `llamaworks prepare` (train/ and val/ inside)
    tokenizer: str = ""  # default: the tokenizer recorded in the shards' manifest


@dataclass
class TrainConfig:
    seed: int = 0
    max_steps: int = 250_000  # ~1T tokens at 4M tokens/step (Table 2, 7B/13B)
    max_minutes: float | None = None  # stop (and checkpoint) after this wall-clock time
    batch_tokens: int = 4_194_304  # Table 2: "4M tokens" per step = 2048 sequences of 2048
    micro_batch_size: int = 1  # sequences per forward pass on each data-parallel rank
    seq_len: int = 2048  # Table 2: context length 2048
    device: str = "auto"  # cpu, cuda, cuda:N; auto = cuda when present
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # autocast; auto = bf16 on GPU, fp32 on CPU
    compile: bool = False
    activation_checkpointing: Literal["none", "full", "selective"] = "selective"  # section 2.4
    # CPU: glibc keeps freed activations' pages for the next step; false: returns them (train/heap.py)
    keep_freed_memory: bool = True


@dataclass
class OptimConfig:
    lr: float = 3.0e-4  # Table 2: 3.0e-4 for 7B/13B, 1.5e-4 for 33B/65B
    beta1: float = 0.9  # section 2.3
    beta2: float = 0.95  # section 2.3
    eps: float = 1e-8
    weight_decay: float = 0.1  # section 2.3
    grad_clip: float = 1.0  # section 2.3


@dataclass
class ScheduleConfig:
    warmup_steps: int = 2000  # section 2.3
    min_lr_ratio: float = 0.1  # section 2.3: the final learning rate is 10% of the maximum
    decay_steps: int | None = None  # cosine length, default train.max_steps


@dataclass
class CheckpointConfig:
    every: int = 1000  # optimizer steps between checkpoints (and one at the end)
    keep_last: int = 3
    # "async": training goes on while a checkpoint is written (a CPU snapshot written by a background
    # thread; DCP's async_save under torchrun), at most one in flight; "disabled": the step waits.
    # DCP's pinned-memory mode is not offered: it speeds up device-to-host copies, which CPU runs lack.
    async_mode: Literal["disabled", "async"] = "disabled"


@dataclass
class EvalConfig:
    every: int = 1000  # steps between validation-loss measurements; 0 disables
    batches: int = 20  # the val split's first N micro-batches: the same held-out data at every measurement; 0: all
    # Benchmark scores during training (Figure 2; llamaworks.eval.during_training): task names
    # (multiple choice, closed-book QA), a directory holding NAME.jsonl per task, examples per task.
    tasks: list[str] = field(default_factory=list)
    task_data: str = ""
    task_limit: int = 100
    task_every: int = 0  # steps between scorings; 0: every `every` steps


@dataclass
class LogConfig:
    every: int = 10  # steps between metrics.jsonl lines
    progress: bool = True  # progress bar on stderr
    # Live tracking (train/tracking.py), rank 0 only, besides metrics.jsonl and the PNG:
    tensorboard: bool = False  # TensorBoard event files in OUT/tensorboard (extra: tensorboard)
    wandb: bool = False  # Weights & Biases; offline unless WANDB_MODE is set (extra: wandb), OUT/wandb
    wandb_project: str = "llamaworks"
    wandb_name: str = ""  # the run's name; "" = run.out_dir's folder name


@dataclass
class ProfileConfig:
    # [a, b]: profile optimizer steps a..b (1-based, inclusive) with torch.profiler and write a
    # Chrome/Perfetto trace and a memory profile (CUDA: a memory snapshot) to OUT/profile; [] = off.
    steps: list[int] = field(default_factory=list)


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever the world size leaves after the other degrees
    tp: int = 1
    # FSDP: free each block's gathered weights after its forward? default: all blocks but the
    # last; always; never (more memory, one all-gather per block less in backward).
    fsdp_reshard_after_forward: Literal["default", "always", "never"] = "default"
    # With tp > 1: keep the logits split by vocabulary and compute the cross-entropy on the
    # shards (torch's loss_parallel), so no rank ever holds the (tokens, vocab) logits.
    loss_parallel: bool = True
    # FSDP mixed precision: the dtype parameters are all-gathered and computed in (auto: bfloat16
    # on CUDA, float32 on CPU; the optimizer's shards stay float32) and the dtype gradients are
    # reduce-scattered in. Names (any case): float32/fp32, bfloat16/bf16, float16/fp16.
    mp_param_dtype: str = "auto"
    mp_reduce_dtype: str = "float32"
    # Gradient accumulation: synchronise (reduce-scatter/all-reduce) gradients after every
    # micro-batch instead of only the last one. The default (False) skips the redundant syncs;
    # with FSDP the skipped micro-batches keep unsharded gradients (ZeRO-1 memory), which this restores.
    sync_every_microbatch: bool = False
    # Pipeline parallelism (parallel/pipeline.py): the layer stack split into stages over pp ranks.
    pp: int = 1
    # torch's schedule names, any case: 1F1B, Interleaved1F1B (several stages per rank), GPipe, LoopedBFS.
    pp_schedule: str = "1F1B"
    # Micro-batches (train.micro_batch_size sequences each) per schedule step; 0: all of a step's
    # micro-batches on a data-parallel rank (the smallest bubble). Must divide them.
    pp_microbatches: int = 0
    # Where stages start, e.g. ["layers.4", "layers.8"]; [] = the layers split evenly (the embedding
    # goes with the first stage, the final norm and output layer with the last).
    pp_split_points: list[str] = field(default_factory=list)
    # Stages on each pipeline rank; 0: 1, or 2 for the interleaved schedules.
    pp_stages_per_rank: int = 0


@dataclass
class HardwareConfig:
    peak_flops: float | None = None  # per device, for MFU; unset = measured with a matmul at start-up
    power_w: float | None = None  # per device, for the energy/CO2 report; unset = 400 W on GPU (A100, Table 15)


@dataclass
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def __post_init__(self):
        t = self.train
        for name in ("max_steps", "batch_tokens", "micro_batch_size", "seq_len"):
            if getattr(t, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(t, name)}")
        if self.schedule.warmup_steps < 0 or not 0 <= self.schedule.min_lr_ratio <= 1:
            raise ValueError("schedule.warmup_steps must be >= 0 and schedule.min_lr_ratio in [0, 1]")
        if self.checkpoint.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.checkpoint.keep_last}")

    def grad_accum_steps(self, dp_world: int = 1) -> int:
        """Micro-batches per optimizer step so that a step sees ~train.batch_tokens tokens.

        One micro-batch on each of the dp_world data-parallel ranks is the least a step can
        take; a batch_tokens below that would silently grow the global batch (and so change
        the loss curve against one process, section 2.3's batch size), so it is refused.
        """
        t = self.train
        per_micro = t.micro_batch_size * t.seq_len * dp_world
        if t.batch_tokens < per_micro:
            fits = t.batch_tokens // (t.seq_len * dp_world)  # sequences per rank that keep the batch
            fix = (f"set train.micro_batch_size = {fits} (micro-batches accumulate up to train.batch_tokens) "
                   if fits >= 1 else "")
            raise ValueError(
                f"train.batch_tokens={t.batch_tokens} is smaller than one micro-batch on every data-parallel "
                f"rank: train.micro_batch_size={t.micro_batch_size} x train.seq_len={t.seq_len} x "
                f"{dp_world} data-parallel rank(s) = {per_micro} tokens, so each step would train on "
                f"{per_micro} tokens, not {t.batch_tokens}; {fix}{'or ' if fix else ''}raise train.batch_tokens "
                f"to {per_micro} (or use fewer data-parallel ranks: parallel.dp_shard, parallel.dp_replicate)")
        return round(t.batch_tokens / per_micro)
