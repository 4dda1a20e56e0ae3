"""load_any / the public load_model read every checkpoint format from its path alone."""

from __future__ import annotations

import pytest
import torch

from llamaworks.convert.formats import detect_format, load_any, save_checkpoint
from llamaworks.inference.load import load_model
from llamaworks.model import ModelArgs, build_model


@pytest.fixture(scope="module")
def formats(tmp_path_factory, tiny_tokenizer):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tiny_tokenizer.vocab_size,
                     max_seq_len=64)
    model = build_model(args, seed=0).eval()
    root = tmp_path_factory.mktemp("formats")
    paths = {fmt: save_checkpoint(fmt, model, tiny_tokenizer, root / fmt) for fmt in ("native", "meta", "hf")}
    pytest.importorskip("gguf", reason="the gguf package is an optional extra")
    paths["gguf"] = save_checkpoint("gguf", model, tiny_tokenizer, root / "model.gguf")
    return model, paths


def _logits(model):
    return model(torch.tensor([[1, 5, 9, 13, 2]]))


@pytest.mark.parametrize("fmt", ["native", "meta", "hf", "gguf"])
def test_every_format_is_detected_and_loads_the_same_model(formats, fmt):
    model, paths = formats
    assert detect_format(paths[fmt]) == fmt
    loaded, tok = load_any(paths[fmt])
    assert not loaded.training and tok is not None and tok.vocab_size == model.args.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-5, rtol=0)
    public, _ = load_model(paths[fmt], tokenizer=False)  # the package's load_model reads them too
    with torch.no_grad():
        torch.testing.assert_close(_logits(public), _logits(model), atol=1e-5, rtol=0)


def test_a_missing_path_names_the_model_directory_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="params.json"):
        load_any(tmp_path / "nowhere")
