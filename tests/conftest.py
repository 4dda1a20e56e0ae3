"""Shared fixtures: a tiny tokenizer and model directory, token shards of the test corpus and a
config factory for training runs of a few seconds, built once per test session."""

from __future__ import annotations

import importlib
import json
import os
import random
from pathlib import Path

import pytest

from llamaworks.configfile import load_config, resolve_config_path
from llamaworks.data.shards import prepare
from llamaworks.model import ModelArgs, build_model
from llamaworks.modeldir import save_model
from llamaworks.tokenizer import Tokenizer
from llamaworks.train.config import JobConfig

# The trainer has glibc keep freed memory for the next step (train/heap.py): in one pytest process that
# runs hundreds of trainings it would keep every test's peak. tests/train/test_heap.py tests the setting.
os.environ.setdefault("LLAMAWORKS_KEEP_FREED_MEMORY", "0")


def pytest_sessionstart(session):
    # CI (.ci/run) sets LLAMAWORKS_REQUIRE_LLAMA_CPP=1: there the llama.cpp parity tests must run, so
    # a missing llama_cpp stops the session instead of letting them skip (as they do for users
    # without the extra). The tests need gguf as well.
    if os.environ.get("LLAMAWORKS_REQUIRE_LLAMA_CPP") != "1":
        return
    for name in ("llama_cpp", "gguf"):
        try:
            importlib.import_module(name)
        except Exception as e:  # not installed, or a broken build whose library fails to load
            pytest.exit(f"LLAMAWORKS_REQUIRE_LLAMA_CPP=1 but {name} cannot be imported ({type(e).__name__}: {e}): "
                        "install it with ./dev.sh extras, or unset the variable to skip the llama.cpp tests",
                        returncode=1)


@pytest.fixture(scope="module")
def one_thread():
    # The test machines have 2 cores shared with other jobs; with 2 intra-op threads the tiny
    # matmuls spin-wait for a busy core and run 10-50x slower. Results do not depend on it.
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "shakespeare"


def synthetic_documents(n: int = 300, seed: int = 0) -> list[str]:
    """English-like text with digits, punctuation and newlines, for when no corpus is at hand."""
    rng = random.Random(seed)
    words = ("the king queen lord lady speak love night day sword crown heart blood fair foul good "
             "ill thou thee thy art hath doth shall will would come go stay fly see hear know").split()
    docs = []
    for i in range(n):
        lines = []
        for _ in range(rng.randint(3, 12)):
            line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
            lines.append(line.capitalize() + rng.choice([".", "!", "?", ","]) + f" {rng.randint(0, 2000)}")
        docs.append(f"Scene {i}.\n" + "\n".join(lines) + "\n")
    return docs


@pytest.fixture(scope="session")
def corpus_docs() -> list[str]:
    if SHAKESPEARE.is_dir():
        files = sorted(SHAKESPEARE.glob("*_gut.txt"))[:6]
        return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    return synthetic_documents()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, corpus_docs):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return Tokenizer.train(path, documents=corpus_docs, vocab_size=512, seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    args = ModelArgs.from_name("tiny", vocab_size=tiny_tokenizer.vocab_size, n_layers=2)
    return build_model(args, seed=0).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, tiny_tokenizer) -> Path:
    return save_model(tiny_model, tiny_tokenizer, tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def token_shards(tmp_path_factory, corpus_docs, tiny_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("shards")
    # ~4 KB documents with fixed ids: the hash-based val split depends on the ids only, and
    # a tenth of ~190 documents gives a validation split of many windows.
    chunks = [doc[i : i + 4000] for doc in corpus_docs for i in range(0, len(doc), 4000)]
    with open(root / "corpus.jsonl", "w") as f:
        for i, text in enumerate(chunks):
            f.write(json.dumps({"id": f"doc{i}", "text": text}) + "\n")
    manifest = prepare([str(root / "corpus.jsonl")], str(tiny_tokenizer.path), root / "data",
                       val_fraction=0.1, workers=1)
    assert manifest["splits"]["val"]["tokens"] > 20 * 4 * 32, manifest["splits"]
    return root / "data"


@pytest.fixture(scope="session")
def make_config(token_shards):
    """The shipped tiny_cpu.toml shrunk to 8 steps of 4 x 32 tokens on a 2-layer model."""

    def make(out_dir: Path, **sections: dict) -> JobConfig:
        over = {
            "run": {"out_dir": str(out_dir)},
            "data": {"dir": str(token_shards)},
            "model": {"n_layers": 2},
            "train": {"max_steps": 8, "batch_tokens": 128, "micro_batch_size": 4, "seq_len": 32,
                      "device": "cpu", "dtype": "float32", "activation_checkpointing": "none"},
            "schedule": {"warmup_steps": 2},  # so that the cosine part of the schedule runs too
            "checkpoint": {"every": 3, "keep_last": 2},
            "eval": {"every": 4, "batches": 2},
            "log": {"every": 1, "progress": False},
            "hardware": {"peak_flops": 1e12},  # skip the start-up matmul benchmark
        }
        for name, values in sections.items():
            over[name] = {**over.get(name, {}), **values}
        return load_config(JobConfig, resolve_config_path("tiny_cpu"), over)

    return make
