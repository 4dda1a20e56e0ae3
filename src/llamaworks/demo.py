"""The main job, end to end on one machine: a real corpus -> a SentencePiece BPE
tokenizer -> packed token shards -> pretraining the `small` preset with the paper's
recipe (scaled down) -> a saved model -> generated samples.

The default corpus is the standard library of the running Python (its code and
docstrings, tests excluded): real text that every machine with Python has.

With --instruct, a second part follows (or, when OUT/model already holds a trained demo model,
replaces the first): LLaMA-I's step (section 4) at demo scale. An instruction set about that same
standard library (data/stdlib_instruct.py: signatures, docstring summaries, defining modules; whole
packages held out for validation) -> LoRA tuning of the demo model through `finetune`'s code
(train/finetune.py, the same Trainer) -> the held-out prompts answered greedily before and after,
with the held-out validation loss -> OUT/instruct/adapter and OUT/instruct/model (merged).
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import torch

from llamaworks.args import Arg
from llamaworks.atomic import atomic_write_json
from llamaworks.configfile import load_config
from llamaworks.data.sft import read_examples, tokenize_examples
from llamaworks.data.shards import open_token_dataset, prepare
from llamaworks.data.stdlib_instruct import (
    Instruction,
    build_instruction_set,
    showcase,
    stdlib_files,
    write_jsonl,
)
from llamaworks.device import resolve_device
from llamaworks.inference.generate import CompletionBuilder, generate, generate_ids
from llamaworks.inference.load import load_model
from llamaworks.inference.lora import apply_lora, merge_adapter
from llamaworks.model import ModelArgs, build_model
from llamaworks.modeldir import save_model
from llamaworks.parallel.parallelize import apply_ac
from llamaworks.tokenizer import Tokenizer, load_tokenizer
from llamaworks.tokenizer.base import stop_ids as tokenizer_stop_ids
from llamaworks.tokenizer.chat import ChatTemplate, encode_chat, stop_token_ids
from llamaworks.train.checkpoint import list_checkpoints
from llamaworks.train.config import JobConfig
from llamaworks.train.finetune import FinetuneJobConfig, chat_template_for, run_finetune
from llamaworks.train.optim import build_optimizer
from llamaworks.train.sft import SFTLoader
from llamaworks.train.trainer import (
    accumulate_masked_gradients,
    cross_entropy,
    evaluate,
    format_summary,
    resolve_amp,
    train,
)

log = logging.getLogger("llamaworks")

DEFAULT_PROMPTS = {"stdlib": ["def ", "import os\n\n", "class Parser:\n    \"\"\""],
                   "text": ["The ", "KING.\n", "O, "]}
def corpus_files(corpus: str | None) -> tuple[list[Path], str]:
    if corpus is None:
        return stdlib_files(), "stdlib"
    root = Path(corpus)
    if not root.exists():
        raise FileNotFoundError(f"--corpus {root} does not exist")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()
                                                 and not any(part.startswith(".") for part in p.parts))
    if not files:
        raise ValueError(f"--corpus {root} holds no files; give a folder of text files")
    return files, "text"


def probe_step_time(cfg, vocab_size: int) -> float:
    """Seconds per optimizer step of this config on this machine (two timed steps after one
    warm-up), so a time-bounded run can size its cosine schedule to the steps it will get."""
    import torch

    device, _ = resolve_device(cfg.train.device)
    args = cfg.model.build_args(vocab_size)
    model = build_model(args, device=device, seed=0)
    apply_ac(model, cfg.train.activation_checkpointing)
    opt = build_optimizer(model, cfg.optim)
    x = torch.randint(0, vocab_size, (cfg.train.micro_batch_size, cfg.train.seq_len), device=device)
    accum = cfg.grad_accum_steps()

    def gradients() -> None:
        for _ in range(accum):
            cross_entropy(model(x), x).div(accum).backward()

    return best_step_time(gradients, opt, device)


def best_step_time(gradients, opt, device: torch.device) -> float:
    """Seconds of one optimizer step (`gradients()` then the update): the best of 3, the first
    (allocations, warm-up) not counted."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        gradients()
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def demo(
    corpus: Annotated[str | None, Arg("folder (or file) of text; default: Python's standard library")] = None,
    out: Annotated[str, Arg("run folder")] = "runs/demo",
    minutes: Annotated[float, Arg("training time budget in minutes")] = 10.0,
    steps: Annotated[int | None, Arg("run exactly N optimizer steps, logging each, instead of --minutes "
                                     "(and in the --instruct tuning, unless --instruct-steps says)")] = None,
    preset: Annotated[str, Arg("model preset (tiny, small, base, ...)")] = "small",
    seed: Annotated[int, Arg("random seed (tokenizer sampling, init, data order)")] = 0,
    resume: Annotated[bool, Arg("continue the run in --out from its latest checkpoint")] = False,
    vocab_size: Annotated[int | None, Arg("tokenizer vocabulary (default: the preset's)")] = None,
    max_corpus_mb: Annotated[float, Arg("use at most this many MB of the corpus")] = 64.0,
    instruct: Annotated[bool, Arg("then LoRA-tune the model on questions about the standard library and show "
                                  "held-out answers before and after (skips pretraining when --out holds a "
                                  "trained model)")] = False,
    instruct_minutes: Annotated[float, Arg("--instruct: tuning time budget in minutes")] = 3.0,
    instruct_steps: Annotated[int | None, Arg("--instruct: exactly N tuning steps instead of "
                                              "--instruct-minutes")] = None,
    instruct_examples: Annotated[int | None, Arg("--instruct: tune on at most N questions (a seeded sample; "
                                                 "default all)")] = None,
) -> int:
    """The main job: build a corpus, train a tokenizer, pretrain a small LLaMA, sample from it;
    with --instruct, then instruction-tune it with LoRA and compare answers before and after."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if minutes <= 0 and steps is None:
        raise ValueError("--minutes must be positive (or give --steps N)")
    if instruct and instruct_minutes <= 0 and instruct_steps is None and steps is None:
        raise ValueError("--instruct-minutes must be positive (or give --instruct-steps N)")
    out_dir = Path(out)
    trained = (out_dir / "model" / "model.safetensors").is_file()
    if instruct and trained and not resume:
        print(f"pretraining skipped: {out_dir / 'model'} holds a trained demo model (another --out, or "
              "deleting it, pretrains anew)", file=sys.stderr)
    else:
        pretrain_demo(corpus, out_dir, minutes, steps, preset, seed, resume, vocab_size, max_corpus_mb)
    if instruct:
        instruct_demo(out_dir, instruct_minutes, instruct_steps if instruct_steps is not None else steps, seed,
                      resume, instruct_examples)
    return 0


def pretrain_demo(corpus: str | None, out_dir: Path, minutes: float, steps: int | None, preset: str, seed: int,
                  resume: bool, vocab_size: int | None, max_corpus_mb: float) -> None:
    """Stages 1-4: corpus, tokenizer, token shards, pretraining; then samples from OUT/model."""
    files, kind = corpus_files(corpus)
    budget = int(max_corpus_mb * 1e6)
    chosen, size = [], 0
    for f in files:
        if size >= budget:
            break
        chosen.append(f)
        size += f.stat().st_size
    source = "Python standard library" if kind == "stdlib" else corpus
    print(f"[1/4] corpus: {len(chosen)} files, {size / 1e6:.1f} MB ({source})", file=sys.stderr)

    args = ModelArgs.from_name(preset)
    vocab = vocab_size or args.vocab_size
    tok_path = out_dir / "tokenizer.model"
    t0 = time.perf_counter()
    if not tok_path.exists():
        Tokenizer.train(tok_path, files=chosen, vocab_size=vocab, seed=seed)
    tokenizer = load_tokenizer(tok_path)
    print(f"[2/4] tokenizer: {tokenizer.vocab_size} pieces (BPE, split digits, byte fallback) "
          f"in {time.perf_counter() - t0:.0f}s -> {tok_path}", file=sys.stderr)

    data_dir = out_dir / "data"
    t0 = time.perf_counter()
    if not (data_dir / "manifest.json").exists():
        prepare([str(f) for f in chosen], tokenizer, data_dir, val_fraction=0.02, seed=seed)
    manifest = open_token_dataset(data_dir)
    print(f"[3/4] token shards: {manifest['tokens']:,} tokens from {manifest['documents']:,} documents "
          f"in {time.perf_counter() - t0:.0f}s -> {data_dir}", file=sys.stderr)

    # The paper's recipe scaled to a CPU: batch 4096 tokens (16 x 256) instead of 4M, a short
    # warm-up instead of 2,000 steps, and a higher peak rate, as small models tolerate.
    seq_len = min(256, args.max_seq_len)
    overrides = {
        "run": {"out_dir": str(out_dir), "description": f"llamaworks demo on {kind}"},
        "model": {"preset": preset},
        "data": {"dir": str(data_dir), "tokenizer": str(tok_path)},
        "train": {"seed": seed, "seq_len": seq_len, "micro_batch_size": 16, "batch_tokens": 16 * seq_len,
                  "activation_checkpointing": "none"},
        "optim": {"lr": 1e-3},
        "checkpoint": {"every": 100, "keep_last": 2},
        "log": {"every": 1 if steps is not None else 5},
        "eval": {"every": 100, "batches": 8},
    }
    cfg = load_config(JobConfig, None, overrides)
    if steps is not None:
        max_steps = steps
    else:
        per_step = probe_step_time(cfg, tokenizer.vocab_size)
        max_steps = max(10, int(minutes * 60 / per_step))
        overrides["train"]["max_minutes"] = minutes
        print(f"      {per_step:.2f}s per step measured: {minutes:g} min is about {max_steps} steps", file=sys.stderr)
    overrides["train"]["max_steps"] = max_steps
    overrides["schedule"] = {"warmup_steps": max(1, min(100, max_steps // 10))}
    overrides["eval"]["every"] = max(1, min(100, max_steps // 5))
    overrides["checkpoint"]["every"] = max(1, min(200, max_steps // 4))
    cfg = load_config(JobConfig, None, overrides)
    print(f"[4/4] pretraining `{preset}` for {max_steps} steps of {cfg.train.batch_tokens} tokens "
          f"(AdamW 0.9/0.95, wd 0.1, clip 1.0, cosine to 10%)", file=sys.stderr)
    summary = train(cfg, resume=resume)
    print(format_summary(summary))

    model, tok = load_model(out_dir / "model")
    prompts = DEFAULT_PROMPTS[kind]
    results = generate(model, tok, prompts, max_new_tokens=96, temperature=0.8, top_p=0.95, seed=seed)
    print("\nsamples (temperature 0.8, top-p 0.95):")
    for p, r in zip(prompts, results):
        print(f"--- prompt {p!r}\n{p}{r.text}")
    print(f"\nloss curve: {summary['loss_curve']}\ntry: llamaworks generate --checkpoint {out_dir / 'model'} "
          f"--prompt {prompts[0]!r}")


# --instruct. LoRA settings for a 14M-parameter model tuned for a few hundred steps, not finetune's
# QLoRA recipe for 7B+ models over thousands (r 64, alpha 16, lr 2e-4): at that rate and scale
# (alpha/r = 0.25) the adapters barely move in a CPU budget. r 16 with alpha 32 (scale 2) and lr 1e-3,
# the demo pretraining's own peak rate, learn the answer format within the first hundred steps.
INSTRUCT_LORA = {"lora_r": 16, "lora_alpha": 32.0, "lora_dropout": 0.05}
INSTRUCT_LR = 1e-3
INSTRUCT_BATCH = 32  # examples per step: more steps in the budget than finetune's 64
INSTRUCT_MICRO_BATCH = 16
INSTRUCT_VAL_FRACTION = 0.1  # of the examples, in whole held-out packages
INSTRUCT_VAL_EXAMPLES = 256  # a seeded sample of the held-out split: its loss in seconds, before and after
INSTRUCT_SHOWN = 6  # held-out prompts answered before and after
INSTRUCT_MAX_NEW_TOKENS = 48  # the longest 1% of answers are longer (in the demo tokenizer; <= 160 characters)


def instruct_demo(out_dir: Path, minutes: float, steps: int | None, seed: int, resume: bool,
                  max_examples: int | None = None) -> None:
    """--instruct's four stages: the instruction set, the base model on held-out prompts, LoRA
    tuning through `finetune`, the tuned model on the same prompts; OUT/instruct/before_after.json."""
    run, base_dir = out_dir / "instruct", out_dir / "model"
    if not resume and list_checkpoints(run):  # said now, not after minutes of preparation
        raise ValueError(f"{run} holds an earlier --instruct run; pass --resume to continue it, or delete {run} to "
                         "tune anew")
    t0 = time.perf_counter()
    data = build_instruction_set(val_fraction=INSTRUCT_VAL_FRACTION, seed=seed, max_train=max_examples,
                                 max_val=INSTRUCT_VAL_EXAMPLES)
    train_file, val_file = write_jsonl(data.train, run / "train.jsonl"), write_jsonl(data.val, run / "val.jsonl")
    print(f"[instruct 1/4] instruction set: {len(data.train):,} questions on {len(data.train_packages)} packages to "
          f"tune on, {len(data.val)} on {len(data.val_packages)} held-out packages "
          f"({', '.join(data.val_packages[:5])}, ...) in {time.perf_counter() - t0:.0f}s -> {train_file}",
          file=sys.stderr)

    overrides = {
        "run": {"out_dir": str(run), "description": "llamaworks demo --instruct: LoRA on stdlib questions"},
        # val_fraction 0: finetune's own split holds out examples by content hash; the demo holds out
        # whole packages instead (val.jsonl), and measures them itself before and after.
        "finetune": {"checkpoint": str(base_dir), "data": str(train_file), "method": "lora", "val_fraction": 0.0,
                     **INSTRUCT_LORA},
        "train": {"seed": seed, "batch_size": INSTRUCT_BATCH, "micro_batch_size": INSTRUCT_MICRO_BATCH,
                  "activation_checkpointing": "none"},
        "optim": {"lr": INSTRUCT_LR},
        "eval": {"every": 0},
        "log": {"every": 1 if steps is not None else 5},
    }
    cfg = load_config(FinetuneJobConfig, None, overrides)
    device, _ = resolve_device(cfg.train.device)
    model, tokenizer = load_model(base_dir, device=device, dtype=torch.float32)
    template = chat_template_for(cfg.finetune.chat_template, tokenizer)  # what finetune renders the examples with
    seq_len = model.args.max_seq_len
    held_out = held_out_loader(val_file, tokenizer, template, seq_len)
    amp_dtype = resolve_amp(device, cfg.train.dtype)
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype != torch.float32 else nullcontext()
    shown = showcase(data.val, INSTRUCT_SHOWN, seed)
    before_loss = evaluate(model, held_out, 0, device, amp)
    before = answer(model, tokenizer, template, [i.prompt for i in shown], INSTRUCT_MAX_NEW_TOKENS)
    print(f"[instruct 2/4] before tuning: held-out loss {before_loss:.4f} ({template.where})", file=sys.stderr)

    if steps is not None:
        max_steps = steps
    else:
        per_step = probe_lora_step_time(model, cfg, train_file, tokenizer, template, seq_len, amp)
        max_steps = max(10, int(minutes * 60 / per_step))
        overrides["train"]["max_minutes"] = minutes
        print(f"      {per_step:.2f}s per step measured: {minutes:g} min is about {max_steps} steps", file=sys.stderr)
    del model
    overrides["train"]["max_steps"] = max_steps
    overrides["schedule"] = {"warmup_steps": max(1, min(20, max_steps // 10))}
    overrides["checkpoint"] = {"every": max(1, min(200, max_steps // 2)), "keep_last": 1}
    cfg = load_config(FinetuneJobConfig, None, overrides)
    print(f"[instruct 3/4] LoRA tuning (r {INSTRUCT_LORA['lora_r']}, alpha {INSTRUCT_LORA['lora_alpha']:g}, "
          f"lr {INSTRUCT_LR:g}) for {max_steps} steps of {INSTRUCT_BATCH} examples through `finetune`",
          file=sys.stderr)
    summary = run_finetune(cfg, resume=resume)
    print(format_summary(summary))

    adapter = Path(summary["model_dir"])
    model, tokenizer = load_model(base_dir, device=device, dtype=torch.float32, adapter=adapter)
    merge_adapter(model)  # the merged weights give the adapter's logits (tests/inference/test_lora.py)
    tokenizer.chat_template = template  # the merged model answers in the format it was tuned on
    merged = save_model(model, tokenizer, run / "model")
    after_loss = evaluate(model, held_out, 0, device, amp)
    after = answer(model, tokenizer, template, [i.prompt for i in shown], INSTRUCT_MAX_NEW_TOKENS)
    print(f"[instruct 4/4] after tuning: held-out loss {after_loss:.4f}; adapter {adapter}, merged model {merged}",
          file=sys.stderr)

    report = {"held_out_packages": data.val_packages, "held_out_examples": len(held_out.examples),
              "val_loss_before": before_loss, "val_loss_after": after_loss, "steps": summary["steps"],
              "adapter": str(adapter), "merged_model": str(merged),
              "shown": [{"prompt": i.prompt, "expected": i.completion, "before": b, "after": a}
                        for i, b, a in zip(shown, before, after)]}
    atomic_write_json(run / "before_after.json", report)
    print(format_before_after(shown, before, after, before_loss, after_loss))
    print(f"\ntry: llamaworks chat --checkpoint {merged} --temperature 0")


def held_out_loader(path: Path, tokenizer, template: ChatTemplate, seq_len: int) -> SFTLoader:
    """The held-out examples read, rendered and masked exactly as finetune reads its own (data/sft.py),
    in a finite validation loader for trainer.evaluate: the loss per assistant token."""
    _, examples = read_examples(path)
    split = tokenize_examples(examples, tokenizer, template, seq_len, path)
    # pad_id 0: padding's targets are ignored and causal attention keeps it out of the logits
    return SFTLoader(split.examples, batch_size=16, seq_len=seq_len, pad_id=0, train=False, name="held-out")


@torch.no_grad()
def answer(model, tokenizer, template: ChatTemplate, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy replies to single-turn prompts rendered with the chat template, as `chat` renders them;
    each stops at the template's end of turn (or eos), one batch for all."""
    ids = [encode_chat(tokenizer, template, [{"role": "user", "content": p}]) for p in prompts]
    stops = tokenizer_stop_ids(tokenizer) | frozenset(stop_token_ids(tokenizer, template))
    rows = CompletionBuilder(tokenizer, ids, (), None, stop_ids=stops)
    for chunk, _ in generate_ids(model, ids, max_new_tokens, temperature=0.0, stop_ids=stops, logprobs=False):
        for i, row in enumerate(chunk.tolist()):
            rows.take(i, row)
    return [rows.completion(i).text.strip() for i in range(len(prompts))]


def probe_lora_step_time(model, cfg: FinetuneJobConfig, train_file: Path, tokenizer, template: ChatTemplate,
                         seq_len: int, amp) -> float:
    """Seconds per LoRA tuning step on this machine, as probe_step_time measures pretraining's: the
    trainer's masked step on a copy of the base with LoRA layers, over the first examples of the set."""
    t = cfg.train
    probe = apply_lora(copy.deepcopy(model), cfg.lora_config()).train()
    apply_ac(probe, t.activation_checkpointing)
    opt = build_optimizer(probe, cfg.optim)
    _, examples = read_examples(train_file)
    accum = cfg.grad_accum_steps()
    split = tokenize_examples(examples[:3 * t.batch_size], tokenizer, template, seq_len, train_file)
    loader = iter(SFTLoader(split.examples, batch_size=t.micro_batch_size, seq_len=seq_len, pad_id=0, seed=t.seed))
    device = next(probe.parameters()).device
    return best_step_time(lambda: accumulate_masked_gradients(probe, loader, accum, device, amp), opt, device)


def format_before_after(shown: list[Instruction], before: list[str], after: list[str], before_loss: float,
                        after_loss: float) -> str:
    lines = [f"\nheld-out packages, greedy answers (validation loss {before_loss:.3f} -> {after_loss:.3f} "
             "nats per answer token):"]
    for item, b, a in zip(shown, before, after):
        lines += [f"--- {item.prompt}", f"  expected: {item.completion}", f"  before:   {one_line(b)}",
                  f"  after:    {one_line(a)}"]
    return "\n".join(lines)


def one_line(text: str, width: int = 160) -> str:
    text = json.dumps(text, ensure_ascii=False)[1:-1]  # newlines and tabs shown, not printed
    return text if len(text) <= width else text[:width - 3] + "..."
