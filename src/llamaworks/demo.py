"""The main job, end to end on one machine: a real corpus -> a SentencePiece BPE
tokenizer -> packed token shards -> pretraining the `small` preset with the paper's
recipe (scaled down) -> a saved model -> generated samples.

The default corpus is the standard library of the running Python (its code and
docstrings, tests excluded): real text that every machine with Python has.
"""

from __future__ import annotations

import logging
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Annotated

from llamaworks.args import Arg
from llamaworks.configfile import load_config
from llamaworks.data.shards import open_token_dataset, prepare
from llamaworks.device import resolve_device
from llamaworks.inference.generate import generate
from llamaworks.inference.load import load_model
from llamaworks.model import ModelArgs, build_model
from llamaworks.parallel.parallelize import apply_ac
from llamaworks.tokenizer import Tokenizer, load_tokenizer
from llamaworks.train.config import JobConfig
from llamaworks.train.optim import build_optimizer
from llamaworks.train.trainer import cross_entropy, format_summary, train

log = logging.getLogger("llamaworks")

DEFAULT_PROMPTS = {"stdlib": ["def ", "import os\n\n", "class Parser:\n    \"\"\""],
                   "text": ["The ", "KING.\n", "O, "]}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "lib2to3"}


def stdlib_files() -> list[Path]:
    """The interpreter's standard-library sources, test suites excluded, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    if not files:
        raise ValueError(f"found no Python sources under {root}; pass --corpus DIR with text files instead")
    return files


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
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(accum):
            cross_entropy(model(x), x).div(accum).backward()
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
    steps: Annotated[int | None, Arg("run exactly N optimizer steps, logging each, instead of --minutes")] = None,
    preset: Annotated[str, Arg("model preset (tiny, small, base, ...)")] = "small",
    seed: Annotated[int, Arg("random seed (tokenizer sampling, init, data order)")] = 0,
    resume: Annotated[bool, Arg("continue the run in --out from its latest checkpoint")] = False,
    vocab_size: Annotated[int | None, Arg("tokenizer vocabulary (default: the preset's)")] = None,
    max_corpus_mb: Annotated[float, Arg("use at most this many MB of the corpus")] = 64.0,
) -> int:
    """The main job: build a corpus, train a tokenizer, pretrain a small LLaMA, sample from it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if minutes <= 0 and steps is None:
        raise ValueError("--minutes must be positive (or give --steps N)")
    out_dir = Path(out)
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
    return 0
