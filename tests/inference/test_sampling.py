"""Temperatures near 0: sampling is greedy, never NaN (which used to pick token 0, <unk>)."""

from __future__ import annotations

import pytest
import torch

from llamaworks.inference.generate import generate
from llamaworks.inference.sampling import GREEDY_BELOW, is_greedy, probabilities, sample

TINY = [1e-30, 1e-37, 2e-38, 1.1e-38, 1e-38, 1e-40, 1e-45, 5e-324, 1e-300]


@pytest.mark.parametrize("temperature", TINY)
def test_tiny_temperatures_sample_the_argmax(temperature):
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(0)) * 30
    want = logits.argmax(-1)
    noise = torch.empty(8, 300).exponential_(1, generator=torch.Generator().manual_seed(1))
    for top_k, top_p in [(None, 1.0), (5, 0.9)]:
        assert torch.equal(sample(logits, temperature, top_k, top_p, noise), want)
        probs = probabilities(logits, temperature, top_k, top_p)
        assert not probs.isnan().any()
        assert torch.equal(probs.argmax(-1), want) and torch.allclose(probs.max(-1).values, torch.ones(8))


def test_the_greedy_threshold_is_float32s_smallest_normal():
    assert GREEDY_BELOW == torch.finfo(torch.float32).tiny
    assert is_greedy(0.0) and is_greedy(-1.0) and is_greedy(1e-38) and not is_greedy(1.2e-38)


def test_ordinary_temperatures_are_unchanged():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    for t in (0.5, 1.0, 2.0):
        assert torch.allclose(probabilities(logits, t, None, 1.0), torch.softmax(logits / t, -1), atol=1e-7)


@pytest.mark.parametrize("temperature", [1e-38, 1e-300])
def test_generate_at_a_tiny_temperature_is_greedy(tiny_model, tiny_tokenizer, temperature):
    want = generate(tiny_model, tiny_tokenizer, "The king", 8, temperature=0)[0]
    got = generate(tiny_model, tiny_tokenizer, "The king", 8, temperature=temperature, seed=0)[0]
    assert got.tokens == want.tokens and got.text == want.text
    assert tiny_tokenizer.unk_id not in got.tokens


def test_generate_cli_at_a_tiny_temperature_is_greedy(tiny_model_dir, capsys):
    from llamaworks.cli import main

    outs = []
    for t in ("0", "1e-38"):
        assert main(["generate", "--checkpoint", str(tiny_model_dir), "--prompt", "The king", "--max-new-tokens", "8",
                     "--temperature", t, "--seed", "1"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and "\u2047" not in outs[1]  # " ⁇ " is how <unk> decodes
