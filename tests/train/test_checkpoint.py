from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from llamaworks.inference.load import load_model
from llamaworks.model import ModelArgs, build_model
from llamaworks.train import checkpoint as ckpt_io
from llamaworks.train.config import OptimConfig
from llamaworks.train.loader import TokenLoader
from llamaworks.train.optim import build_optimizer


@pytest.fixture
def parts(token_shards, tiny_tokenizer):
    """A tiny model, its optimizer after one step (so it has state) and a loader two batches in."""

    def make(seed: int):
        model = build_model(ModelArgs.from_name("tiny", n_layers=2, vocab_size=tiny_tokenizer.vocab_size),
                            seed=seed)
        opt = build_optimizer(model, OptimConfig(lr=1e-3))
        loader = TokenLoader(token_shards, "train", batch_size=4, seq_len=32, seed=seed)
        return model, opt, loader

    model, opt, loader = make(0)
    for _ in range(2):
        x, y = next(loader)
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
        opt.zero_grad()
    return model, opt, loader, make


def save(out, step, model, opt, loader, tokenizer, keep_last=2):
    return ckpt_io.save_checkpoint(out, step, model, tokenizer, opt, loader, {"tokens": step * 128,
                                   "config": "[run]\n"}, keep_last)


def test_round_trip_restores_model_optimizer_loader_and_rng(tmp_path, parts, tiny_tokenizer):
    model, opt, loader, make = parts
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    path = save(tmp_path, 2, model, opt, loader, tiny_tokenizer)
    expected = (torch.rand(3), random.random(), np.random.rand(), next(loader)[0])

    model2, opt2, loader2 = make(seed=1)  # different weights, loader order and RNG
    state = ckpt_io.load_checkpoint(path, model2, opt2, loader2)
    assert state["step"] == 2 and state["tokens"] == 256 and state["config"] == "[run]\n"
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:3]
    assert torch.equal(next(loader2)[0], expected[3])
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    for k, s in opt.state_dict()["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s[name], opt2.state_dict()["state"][k][name]), (k, name)


def test_checkpoint_is_a_model_directory(tmp_path, parts, tiny_tokenizer):
    model, opt, loader, _ = parts
    path = save(tmp_path, 2, model, opt, loader, tiny_tokenizer)
    loaded, tok = load_model(path)  # what `llamaworks generate --checkpoint` does
    assert tok.vocab_size == tiny_tokenizer.vocab_size
    x = torch.randint(0, tok.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_keeps_the_last_n(tmp_path, parts, tiny_tokenizer):
    model, opt, loader, _ = parts
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, opt, loader, tiny_tokenizer, keep_last=2)
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert ckpt_io.latest_checkpoint(tmp_path).name == "step_00000004"


def test_a_save_that_dies_midway_keeps_the_previous_ones(tmp_path, parts, tiny_tokenizer, monkeypatch):
    model, opt, loader, _ = parts
    first = save(tmp_path, 1, model, opt, loader, tiny_tokenizer)

    def crash(*args, **kwargs):  # the weights are written by now; the training state is not
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2, model, opt, loader, tiny_tokenizer)
    monkeypatch.undo()
    assert ckpt_io.list_checkpoints(tmp_path) == [first]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]

    # A SIGKILL leaves the temporary folder behind: never listed, removed by the next save.
    stale = tmp_path / "checkpoints" / ".step_00000002.abc.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert ckpt_io.latest_checkpoint(tmp_path) == first
    save(tmp_path, 3, model, opt, loader, tiny_tokenizer)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001", "step_00000003"]


def test_loading_into_a_different_model_names_the_problem(tmp_path, parts, tiny_tokenizer):
    model, opt, loader, _ = parts
    path = save(tmp_path, 1, model, opt, loader, tiny_tokenizer)
    wider = build_model(ModelArgs.from_name("tiny", n_layers=2, dim=64, vocab_size=tiny_tokenizer.vocab_size))
    with pytest.raises(ValueError, match="model config changed"):
        ckpt_io.load_checkpoint(path, wider, build_optimizer(wider, OptimConfig()), loader)
