"""Shared fixtures: a tiny tokenizer and model directory, built once per test session."""

from __future__ import annotations

import random
from pathlib import Path

import pytest


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
    from llamaworks.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return Tokenizer.train(path, documents=corpus_docs, vocab_size=512, seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    from llamaworks.model import ModelArgs, build_model

    args = ModelArgs.from_name("tiny", vocab_size=tiny_tokenizer.vocab_size, n_layers=2)
    return build_model(args, seed=0).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, tiny_tokenizer) -> Path:
    from llamaworks.modeldir import save_model

    return save_model(tiny_model, tiny_tokenizer, tmp_path_factory.mktemp("models") / "tiny")
