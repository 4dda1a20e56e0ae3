"""LLaMA-I: instruction fine-tuning (section 4) with the pretraining Trainer.

    llamaworks finetune --checkpoint MODEL --data data.jsonl --method full --out runs/sft

The same Trainer as `pretrain` (train/trainer.py), handed another data source and another
model start: the examples of an instruction file (data/sft.py: Alpaca, messages or
prompt/completion JSONL) rendered with a chat template, their loss on the assistant's tokens only
(train/sft.py loads them: one example per row, or packed with document masking under
finetune.pack), and the weights of a checkpoint in any format `load_model` reads, with its
tokenizer. The run folder is a pretraining run's: config.toml, metrics.jsonl, the loss curve,
atomic checkpoints that `--resume` continues exactly, and OUT/model, a model directory that
carries the chat template (chat_template.jinja), so that `generate` and `serve` talk to the
model in the format it learnt.

Defaults (FinetuneJobConfig; configs/finetune_default.toml lists them). The paper fine-tunes
LLaMA-I "following the protocol of Chung et al. (2022)" and states no hyper-parameters. Chung et
al. fine-tune with Adafactor at a constant learning rate, whose rates do not carry over to AdamW;
the published AdamW recipe for fine-tuning a model of this family is Llama 2's supervised
fine-tuning (Touvron et al. 2023b, section 3.1), so the defaults are:

- AdamW betas 0.9/0.95, weight decay 0.1, gradient clipping 1.0: the paper's optimizer (section
  2.3), which Llama 2's fine-tuning keeps (weight decay 0.1 there too).
- learning rate 2e-5 with a cosine decay, 64 examples per step, 2 epochs: Llama 2 section 3.1.
- the cosine ends at 10% of the peak: the paper's schedule (2.3); Llama 2 does not give its end.
- warm-up over the first 3% of the steps: Stanford Alpaca's training script (warmup_ratio 0.03),
  as Llama 2 gives no warm-up for fine-tuning.
- the loss on assistant tokens only: Llama 2 section 3.1 ("we zero-out the loss on tokens from the
  user prompt"), as Chung et al. train on targets only.
- train.seq_len: the checkpoint's context (LLaMA's 2048, Table 2; Llama 2 fine-tuned at its 4096);
  longer examples are dropped (data/sft.py says why).
- chat template: the checkpoint's own, else the built-in "llama2": the paper gives no format for
  LLaMA-I; Llama 2-chat's is Meta's format for this model family, and its assistant turns end
  with the tokenizer's eos, which the model learns to write, so generation stops where a reply
  ends. ("plain", the base-model dialogue, ends a turn with a newline only.)
- 5% of the examples held out for the validation loss, chosen by a hash of their content.

LoRA (--method lora: adapters on a frozen base, Hu et al. 2021) and QLoRA (--method qlora: the
frozen base quantised, Dettmers et al. 2023) take QLoRA's recipe for LLaMA: adapters of rank 64,
alpha 16, dropout 0.1 (their value up to 13B; 0.05 above) on every attention and MLP projection,
learning rate 2e-4 (their 7B/13B value; 1e-4 for 33B/65B). The rest stays the paper's AdamW. The
run leaves OUT/adapter, a PEFT adapter directory (inference/lora.py) with the chat template beside
it; `llamaworks merge` folds it into the base, `generate --adapter` runs it unmerged. QLoRA
quantises the blocks' projections (int4 by default: llamaworks' group-wise int4, where QLoRA has
NF4) and keeps the output layer in float, as transformers keeps lm_head when it loads in 4 bits.
Their checkpoints hold the adapters, not the frozen base (train/checkpoint.py), with a record of
the base (`base_fingerprint`) that resume checks. Under torchrun, full, LoRA and QLoRA fine-tuning
run with FSDP or DDP: LoRA layers are added before the model is split (`lora_prepare`), for QLoRA
over empty quantised layers, which the checkpoint's weights fill one projection at a time
(`quantize_state`: never a float copy of the whole base). FSDP and DDP split and synchronise
parameters only, so the quantised base (buffers) is replicated whole on every rank, each rank
quantising the same weights to the same blocks, and only the adapters' gradients are averaged.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.distributed as dist

from llamaworks.args import Arg
from llamaworks.atomic import atomic_write_text
from llamaworks.configfile import load_config, merge, parse_overrides, resolve_config_path
from llamaworks.convert.formats import load_any
from llamaworks.data.sft import read_examples, split_examples, tokenize_examples
from llamaworks.inference.lora import (
    DEFAULT_TARGETS,
    LoraConfig,
    apply_lora,
    cast_frozen_base,
    lora_layers,
    save_adapter,
)
from llamaworks.inference.quant import QuantizedLinear, get_mode, swap_empty
from llamaworks.model import Transformer
from llamaworks.modeldir import CHAT_TEMPLATE
from llamaworks.parallel.distributed import is_distributed, is_main
from llamaworks.tokenizer.chat import ChatTemplate, builtin_chat_template, control_token_ids, resolve_chat_template
from llamaworks.train.config import (
    CheckpointConfig,
    EvalConfig,
    HardwareConfig,
    LogConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
)
from llamaworks.train.init import parameter_seed
from llamaworks.train.init_from import copy_state
from llamaworks.train.sft import SFTLoader
from llamaworks.train.trainer import (
    DataSource,
    ModelSpec,
    check_job,
    check_out_dir,
    launch,
    report_run,
    resolve_amp,
)

log = logging.getLogger("llamaworks")

FULL_LR = 2.0e-5  # Llama 2 section 3.1
ADAPTER_LR = 2.0e-4  # QLoRA (Dettmers et al. 2023) for 7B and 13B
DEFAULT_TEMPLATE = "llama2"  # for checkpoints without a chat template of their own (module docstring)
QLORA_GROUP_SIZE = 128  # int4 columns per scale and zero for qlora's base: quantize's default


@dataclass
class FinetuneConfig:
    checkpoint: str = ""  # the model to start from: model directory, Hugging Face or Meta folder, .gguf file
    data: str = ""  # instruction JSONL: Alpaca, messages or prompt/completion (one layout per file)
    method: Literal["full", "lora", "qlora"] = "full"  # all weights, or adapters on a frozen base
    chat_template: str = ""  # a built-in name or a template file/folder; "": the checkpoint's, else "llama2"
    val_fraction: float = 0.05  # examples held out (by content hash) for the validation loss
    pack: bool = False  # several examples per row, each attending to itself only (train/sft.py); same loss
    # method lora / qlora: QLoRA's values for LLaMA (module docstring)
    lora_r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # every projection
    qlora_mode: Literal["int4", "int8"] = "int4"  # how qlora stores the frozen base's projections


@dataclass
class FinetuneOptimConfig(OptimConfig):
    lr: float | None = None  # unset: 2e-5 for full (Llama 2 section 3.1), 2e-4 for lora/qlora (QLoRA)


@dataclass
class FinetuneTrainConfig:
    seed: int = 0
    epochs: int = 2  # Llama 2 section 3.1
    max_steps: int | None = None  # unset: epochs x (training examples // batch_size)
    max_minutes: float | None = None  # stop (and checkpoint) after this wall-clock time
    batch_size: int = 64  # examples per optimizer step (Llama 2 section 3.1)
    micro_batch_size: int = 4  # examples per forward pass on each data-parallel rank
    seq_len: int | None = None  # the longest example kept, in tokens; unset: the checkpoint's context
    device: str = "auto"  # cpu, cuda, cuda:N; auto = cuda when present
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # autocast; auto = bf16 on GPU, fp32 on CPU
    compile: bool = False
    activation_checkpointing: Literal["none", "full", "selective"] = "selective"  # section 2.4
    # CPU: glibc keeps freed activations' pages for the next step (speed) or returns them as they are
    # freed (memory: resident = live); unset: true, false for --method qlora (train/heap.py)
    keep_freed_memory: bool | None = None


@dataclass
class FinetuneScheduleConfig:
    warmup_ratio: float = 0.03  # of the run's steps: Stanford Alpaca's train.py
    warmup_steps: int | None = None  # set: this many, whatever warmup_ratio says
    min_lr_ratio: float = 0.1  # section 2.3's cosine end (Llama 2's fine-tuning does not give one)
    decay_steps: int | None = None  # cosine length, default the run's steps


@dataclass
class FinetuneJobConfig:
    """The `finetune` job: one dataclass per TOML section, the Trainer's sections with fine-tuning's
    defaults (module docstring) and [finetune] for the model, data and method."""

    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/finetune"))
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    schedule: FinetuneScheduleConfig = field(default_factory=FinetuneScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=250, keep_last=2))
    # Validation on all held-out examples (batches 0) every 100 steps: about a tenth of the
    # training time at a 5% held-out share.
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(every=100, batches=0))
    log: LogConfig = field(default_factory=LogConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)

    def __post_init__(self):
        t, s = self.train, self.schedule
        for name in ("epochs", "batch_size", "micro_batch_size", "seq_len"):
            if getattr(t, name) is not None and getattr(t, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(t, name)}")
        if t.max_steps is not None and t.max_steps < 1:
            raise ValueError(f"train.max_steps must be >= 1, got {t.max_steps}; remove it to train "
                             "train.epochs epochs")
        if not 0 <= self.finetune.val_fraction < 1:
            raise ValueError(f"finetune.val_fraction must be in [0, 1), got {self.finetune.val_fraction}")
        if not 0 <= s.warmup_ratio <= 1 or (s.warmup_steps is not None and s.warmup_steps < 0):
            raise ValueError("schedule.warmup_ratio must be in [0, 1] and schedule.warmup_steps >= 0")
        if not 0 <= s.min_lr_ratio <= 1:
            raise ValueError(f"schedule.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
        if self.checkpoint.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.checkpoint.keep_last}")
        if t.keep_freed_memory is None:  # QLoRA is chosen for memory: 2.5 GiB at config B, 7.4 with the heap kept
            t.keep_freed_memory = self.finetune.method != "qlora"
        if self.optim.lr is None:
            self.optim.lr = FULL_LR if self.finetune.method == "full" else ADAPTER_LR
        if self.finetune.method != "full":
            self.lora_config()  # bad adapter settings are errors now, naming the key

    def lora_config(self) -> LoraConfig:
        f = self.finetune
        try:
            return LoraConfig(r=f.lora_r, alpha=f.lora_alpha, dropout=f.lora_dropout,
                              target_modules=tuple(f.lora_targets))
        except ValueError as e:
            raise ValueError(f"[finetune] lora_*: {e}") from None

    def grad_accum_steps(self, dp_world: int = 1) -> int:
        """Micro-batches per optimizer step so that a step sees exactly train.batch_size examples."""
        t = self.train
        per_micro = t.micro_batch_size * dp_world
        if t.batch_size % per_micro:
            raise ValueError(f"train.batch_size={t.batch_size} examples is not a whole number of micro-batches of "
                             f"train.micro_batch_size={t.micro_batch_size} x {dp_world} data-parallel rank(s) = "
                             f"{per_micro}; choose a batch_size that is a multiple of {per_micro}, or a "
                             "micro_batch_size that divides it")
        return t.batch_size // per_micro


def steps_for(cfg: FinetuneJobConfig, train_examples: int) -> tuple[int, int]:
    """(max_steps, warmup_steps) of the run: train.max_steps, else the epochs over the training
    examples; schedule.warmup_steps, else warmup_ratio of them, rounded up (as transformers does)."""
    t, s = cfg.train, cfg.schedule
    per_epoch = train_examples // t.batch_size
    if per_epoch == 0 and t.max_steps is None:
        raise ValueError(f"{cfg.finetune.data}: {train_examples} training examples are fewer than one batch of "
                         f"train.batch_size={t.batch_size}; lower train.batch_size or add examples")
    max_steps = t.max_steps if t.max_steps is not None else t.epochs * per_epoch
    warmup = s.warmup_steps if s.warmup_steps is not None else math.ceil(s.warmup_ratio * max_steps)
    return max_steps, warmup


def chat_template_for(spec: str, tokenizer) -> ChatTemplate:
    """The template the examples are rendered with: `spec` (a template the checkpoint carries by
    name, a built-in name or a file) when given, else the checkpoint's own, else the built-in
    "llama2"; checked against the tokenizer (a template that writes control tokens the tokenizer
    lacks belongs to another model)."""
    if spec:
        template = resolve_chat_template(tokenizer, spec)
    else:
        template = getattr(tokenizer, "chat_template", None) or builtin_chat_template(DEFAULT_TEMPLATE, tokenizer)
    control_token_ids(tokenizer, template)
    return template


def instruction_source(cfg: FinetuneJobConfig, tokenizer, template: ChatTemplate,
                       pad_multiple: int) -> tuple[DataSource, int]:
    """The Trainer's data: the instruction file's examples split, tokenised and loaded; and the
    number of training examples (which sets the run's steps)."""
    f, t = cfg.finetune, cfg.train
    layout, examples = read_examples(f.data)
    train_ex, val_ex = split_examples(examples, f.val_fraction)
    train_tok = tokenize_examples(train_ex, tokenizer, template, t.seq_len, f.data)
    val_tok = tokenize_examples(val_ex, tokenizer, template, t.seq_len, f.data)
    log.info("%s: %d examples (%s layout), %d for training and %d held out; chat template %s", f.data,
             len(examples), layout.name, len(train_tok.examples), len(val_tok.examples), template.where)
    dropped = train_tok.dropped + val_tok.dropped
    if dropped:
        log.warning("%d of %d examples are longer than train.seq_len=%d tokens (the longest: %d) and were dropped; "
                    "raise train.seq_len (up to the model's context) to keep them", dropped, len(examples),
                    t.seq_len, max(train_tok.longest, val_tok.longest))
    if not train_tok.examples:
        raise ValueError(f"{f.data}: no training example left (all {len(examples)} held out or longer than "
                         f"train.seq_len={t.seq_len}); lower finetune.val_fraction or raise train.seq_len")
    # The padding's value never counts (its targets are ignored, and causal attention keeps it out
    # of the example's logits); the tokenizer's own pad id where it has one.
    pad_id = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None and 0 <= i < tokenizer.vocab_size)

    def train_loader(rank: int, world: int) -> SFTLoader:
        return SFTLoader(train_tok.examples, batch_size=t.micro_batch_size, seq_len=t.seq_len, pad_id=pad_id,
                         rank=rank, world_size=world, seed=t.seed, pad_multiple=pad_multiple, pack=f.pack)

    val_loader = None
    if cfg.eval.every > 0 and val_tok.examples:
        val_loader = SFTLoader(val_tok.examples, batch_size=t.micro_batch_size, seq_len=t.seq_len, pad_id=pad_id,
                               train=False, pad_multiple=pad_multiple, name="held-out", pack=f.pack)
    elif cfg.eval.every > 0:
        log.warning("no validation loss: finetune.val_fraction=%g of %d examples held out none; raise it",
                    f.val_fraction, len(examples))
    return DataSource(tokenizer, train_loader, val_loader, masked=True), len(train_tok.examples)


def pretrained_init(state: dict[str, torch.Tensor], lora: bool = False, qlora_mode: str | None = None,
                    compute_dtype: str = "float32"):
    """ModelSpec.init that copies a checkpoint's weights into the run's (materialised, possibly
    sharded) model; the state is released once copied. lora: the model carries LoRA layers
    (ModelSpec.prepare, `lora_prepare`): the checkpoint's projections become their frozen base
    layers and the adapters start as `adapter_start` draws them. qlora_mode: the blocks'
    projections are quantised layers (`lora_prepare`), filled by `quantize_state`. compute_dtype
    (train.dtype): a LoRA run under bf16/fp16 autocast in one process stores its frozen projections
    in that dtype (lora.cast_frozen_base: what autocast computes with, without the fp32 copies; FSDP
    shards a block's parameters in one dtype, so not under torchrun)."""

    @torch.no_grad()
    def init(model, seed: int, device: torch.device) -> None:
        if lora:
            state.update(adapter_start(model, state, seed))
        if qlora_mode is not None:
            quantize_state(model, state, qlora_mode)
        copy_state(model, state, device)
        amp = resolve_amp(device, compute_dtype)
        if lora and qlora_mode is None and amp != torch.float32 and not is_distributed():
            n = cast_frozen_base(model, amp)
            log.info("stored the %d frozen projections under the adapters in %s (the autocast dtype)", n, amp)

    return init


def lora_prepare(config: LoraConfig, qlora_mode: str | None = None):
    """ModelSpec.prepare for --method lora / qlora: LoRA layers on the meta-device model, before FSDP
    or DDP splits it, so that each block is sharded with its frozen projections and its adapters
    together. qlora_mode: the blocks' projections become empty quantised layers first (the output
    layer stays float), which FSDP and DDP leave whole on every rank (buffers, not parameters)."""

    def prepare(model) -> None:
        if qlora_mode is not None:
            for block in model.layers:
                swap_empty(block, qlora_mode, group_size=QLORA_GROUP_SIZE)
                for m in block.modules():
                    if isinstance(m, QuantizedLinear):
                        # Training's many-row products dequantise the portable weight: no decode
                        # kernel copies of it (they would double int4's memory).
                        m.decode_layouts = False
        apply_lora(model, config)

    return prepare


def quantize_state(model, state: dict[str, torch.Tensor], mode: str) -> None:
    """Replace, in `state` (in place), the float weight of each of the model's quantised layers by
    its quantised tensors (quantize_model's, as the layer's state dict names them), one projection
    at a time: a float copy of the whole base never exists beside the quantised one. Every rank of
    a distributed run computes the same blocks from the same weights."""
    spec = get_mode(mode, group_size=QLORA_GROUP_SIZE)
    for name, m in model.named_modules():
        if not isinstance(m, QuantizedLinear):
            continue
        w = state.pop(f"{name}.weight")
        with torch.device("meta"):
            linear = torch.nn.Linear(m.in_features, m.out_features, bias=False)
        linear.weight = torch.nn.Parameter(w, requires_grad=False)
        spec.check_layer(name, linear)
        state.update({f"{name}.{k}": t for k, t in spec.quantize(linear).state_dict().items()})


def adapter_start(model, state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The starting tensors of a model's LoRA layers under its own names, for a base `state` in the
    plain model's names (whose projections it renames, in place, to their `.base_layer.`): B = 0 and
    A Kaiming-uniform as LoRALinear draws it, each A from its own generator seeded by (seed, name)
    as train/init.py draws weights, so that any split of the model starts from the same adapters."""
    out = {}
    for name, m in lora_layers(model):
        for leaf in ("weight", "bias"):
            if f"{name}.{leaf}" in state:
                state[f"{name}.base_layer.{leaf}"] = state.pop(f"{name}.{leaf}")
        gen = torch.Generator().manual_seed(parameter_seed(seed, f"{name}.lora_A"))
        a = torch.empty(m.r, m.in_features)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = a, torch.zeros(m.out_features, m.r)
    return out


def base_fingerprint(path: str, args, state: dict[str, torch.Tensor], samples: int = 1024) -> dict:
    """What a LoRA/QLoRA run's checkpoints record of the frozen base, for resume to check (train/
    checkpoint.py check_base): its path (for the message), its parameters and a digest of its
    weights. The digest hashes every tensor's name, dtype and shape and `samples` evenly spaced
    values of it: a few MB of a memory-mapped file, where hashing all of a 7B model's 27 GB would
    take minutes, and another base (another model, or a fine-tune of this one) differs in
    practically every value."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        flat = t.reshape(-1)
        step = max(1, flat.numel() // samples)
        picked = flat[::step][:samples].contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(picked.view(torch.uint8).numpy().tobytes() if picked.numel() else b"")
    params = {k: v for k, v in args.to_params().items() if v is not None}
    return {"path": str(Path(path).resolve()), "params": params, "digest": h.hexdigest()}


def adapter_saver(cfg: FinetuneJobConfig):
    """ModelSpec.save_final for --method lora / qlora (OUT/adapter, PEFT's layout); None for full."""
    f = cfg.finetune
    if f.method == "full":
        return None
    config = cfg.lora_config()

    def save_final(model, tokenizer, out: Path) -> Path:
        path = out / "adapter"
        if is_distributed():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            # The adapters alone, gathered onto rank 0 (the frozen base is the checkpoint's files).
            sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                      ignore_frozen_params=True))
            if is_main():
                save_adapter(adapter_model(model.args, config, sd), config, path, base_model=f.checkpoint)
        else:
            save_adapter(model, config, path, base_model=f.checkpoint)
        template = getattr(tokenizer, "chat_template", None)
        if template is not None and is_main():  # the format the adapter learnt, for whoever serves it
            atomic_write_text(path / CHAT_TEMPLATE, template.source)
        if is_distributed():
            dist.barrier()
        return path

    return save_final


def adapter_model(args, config: LoraConfig, adapters_sd: dict[str, torch.Tensor]):
    """A Transformer on the meta device whose LoRA layers hold `adapters_sd`'s tensors: what
    save_adapter reads (the adapters and the model's shape), without the base's weights."""
    with torch.device("meta"):
        model = Transformer(args)
    apply_lora(model, config)
    for name, m in lora_layers(model):
        m.lora_A = torch.nn.Parameter(adapters_sd[f"{name}.lora_A"], requires_grad=False)
        m.lora_B = torch.nn.Parameter(adapters_sd[f"{name}.lora_B"], requires_grad=False)
    return model


def run_finetune(cfg: FinetuneJobConfig, resume: bool = False) -> dict:
    """Fine-tune (or continue fine-tuning) as cfg says; the run summary (also OUT/summary.json)."""
    f, t = cfg.finetune, cfg.train
    if not f.checkpoint:
        raise ValueError("finetune.checkpoint is not set: give the model to start from with --checkpoint DIR (a "
                         "model directory, Hugging Face or Meta folder, or .gguf file)")
    if not f.data:
        raise ValueError("finetune.data is not set: give the instruction examples with --data FILE (JSONL: Alpaca, "
                         "messages or prompt/completion)")
    # fp32 weights to train (autocast computes in train.dtype); memory-mapped where the format allows.
    base, tokenizer = load_any(f.checkpoint, device="cpu", dtype=torch.float32)
    args = base.args
    if t.seq_len is None:  # resolved here, so the run's config.toml says what was used
        cfg = replace(cfg, train=replace(t, seq_len=args.max_seq_len))
        t = cfg.train
    dims = check_job(cfg, args.n_heads)
    if f.method != "full" and dims.tp > 1:
        raise ValueError(f"--method {f.method} does not run with parallel.tp={dims.tp}: tensor parallelism splits "
                         "plain linear layers, not LoRA or quantised layers; use data parallelism "
                         "(parallel.dp_shard, FSDP, or parallel.dp_replicate, DDP) instead")
    if t.seq_len > args.max_seq_len:
        raise ValueError(f"train.seq_len={t.seq_len} exceeds the context of {f.checkpoint} (max_seq_len="
                         f"{args.max_seq_len}); lower train.seq_len to at most {args.max_seq_len}")
    template = chat_template_for(f.chat_template, tokenizer)
    tokenizer.chat_template = template  # saved with every checkpoint and the final model
    data, n_train = instruction_source(cfg, tokenizer, template, math.lcm(8, dims.tp))
    max_steps, warmup = steps_for(cfg, n_train)
    check_out_dir(Path(cfg.run.out_dir))
    state = base.state_dict()
    spec = model_spec(cfg, args, state, f"{f.method} fine-tuning of {Path(f.checkpoint).name}")
    del base
    return launch(cfg, resume, dims, data, spec, max_steps, warmup)


def model_spec(cfg: FinetuneJobConfig, args, state: dict[str, torch.Tensor], name: str) -> ModelSpec:
    """The Trainer's model for cfg.finetune.method, starting from the base weights `state` (plain
    model names): all of them trained (full), or LoRA layers added before the model is split, over
    the float base (lora) or over its blocks quantised as they are filled (qlora); adapter runs
    record the base in checkpoints."""
    f = cfg.finetune
    lora = cfg.lora_config() if f.method != "full" else None
    qlora_mode = f.qlora_mode if f.method == "qlora" else None
    return ModelSpec(args, name, init=pretrained_init(state, lora=lora is not None, qlora_mode=qlora_mode,
                                                      compute_dtype=cfg.train.dtype),
                     prepare=lora_prepare(lora, qlora_mode) if lora else None, save_final=adapter_saver(cfg),
                     # checkpoints of adapters hold them alone; resume checks they go over this base
                     base=base_fingerprint(f.checkpoint, args, state) if f.method != "full" else None)


def finetune_command(
    checkpoint: Annotated[str | None, Arg("the model to start from: a model directory, Hugging Face or Meta "
                                          "folder, or .gguf file (finetune.checkpoint)")] = None,
    data: Annotated[str | None, Arg("instruction examples, JSONL: Alpaca (instruction, input, output), messages, or "
                                    "prompt/completion (finetune.data)")] = None,
    method: Annotated[Literal["full", "lora", "qlora"] | None, Arg("train all weights, or adapters on a frozen "
                                                                   "base (finetune.method; default full)")] = None,
    out: Annotated[str | None, Arg("the run folder (run.out_dir)")] = None,
    chat_template: Annotated[str | None, Arg("a built-in chat template (llama2, llama3, plain) or a template "
                                             "file; default the checkpoint's own, else llama2 "
                                             "(finetune.chat_template)")] = None,
    config: Annotated[str | None, Arg("TOML config file (e.g. finetune_tiny; default: the defaults "
                                      "listed in configs/finetune_default.toml)")] = None,
    resume: Annotated[bool, Arg("continue from the run's latest complete checkpoint")] = False,
    overrides: list[str] | None = None,
) -> int:
    """Instruction fine-tuning (LLaMA-I, section 4) with the pretraining recipe's Trainer. The options
    above set their config keys; any config field can be set as --section.key VALUE, e.g.
    --train.epochs 3 --optim.lr 1e-5 --train.seq_len 1024."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    flags = {"finetune": {k: v for k, v in (("checkpoint", checkpoint), ("data", data), ("method", method),
                                            ("chat_template", chat_template)) if v is not None}}
    if out is not None:
        flags["run"] = {"out_dir": out}
    cfg = load_config(FinetuneJobConfig, resolve_config_path(config), merge(parse_overrides(overrides or []), flags))
    return report_run("finetune", lambda: run_finetune(cfg, resume=resume))


finetune_command.config_class = FinetuneJobConfig
