"""Training fixtures: token shards of the test corpus (built once per session) and a config
factory for runs of a few seconds on the `tiny` preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamaworks.config import load_config
from llamaworks.train.config import JobConfig
from llamaworks.train.trainer import resolve_config_path


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # every module here: one intra-op thread (tests/conftest.py)
    yield


@pytest.fixture(scope="session")
def token_shards(tmp_path_factory, corpus_docs, tiny_tokenizer) -> Path:
    from llamaworks.train.shards import prepare

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
