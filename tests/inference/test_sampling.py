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


# --- per-row options, against Hugging Face's logits processors ----------------------------------

def _rows(seed: int, bsz: int = 6, vocab: int = 50) -> torch.Tensor:
    return torch.randn(bsz, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_repetition_penalty_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from llamaworks.inference.sampling import apply_repetition_penalty

    logits = _rows(0)
    ids = torch.randint(0, 50, (6, 12), generator=torch.Generator().manual_seed(1))
    seen = torch.zeros(6, 50, dtype=torch.bool).scatter_(1, ids, True)
    for penalty in (1.0, 1.3, 0.7):
        want = transformers.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        got = apply_repetition_penalty(logits, seen, torch.full((6,), penalty))
        assert torch.allclose(got, want), penalty
    # Per row: each row's own penalty.
    penalties = torch.tensor([1.0, 1.1, 1.5, 2.0, 0.9, 1.2])
    got = apply_repetition_penalty(logits, seen, penalties)
    for r, p in enumerate(penalties.tolist()):
        want = transformers.RepetitionPenaltyLogitsProcessor(p)(ids[r : r + 1], logits[r : r + 1].clone())
        assert torch.allclose(got[r : r + 1], want)


def test_presence_and_frequency_penalties_are_openais_formula():
    from llamaworks.inference.sampling import apply_presence_frequency

    logits = _rows(2, bsz=2, vocab=5)
    counts = torch.tensor([[0, 1, 3, 0, 2], [4, 0, 0, 1, 0]])
    got = apply_presence_frequency(logits, counts, torch.tensor([0.5, 0.0]), torch.tensor([0.25, 1.0]))
    want = logits.clone()
    for r, (pres, freq) in enumerate([(0.5, 0.25), (0.0, 1.0)]):
        for t in range(5):
            c = int(counts[r, t])
            want[r, t] -= pres * (c > 0) + freq * c
    assert torch.allclose(got, want)


def test_per_row_filters_match_transformers_warpers():
    transformers = pytest.importorskip("transformers")
    from llamaworks.inference.sampling import filtered_probabilities

    opts = [(1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.2), (0.5, 10, 0.9, 0.05),
            (2.0, 3, 0.5, 0.3)]
    for seed in range(20):
        logits = _rows(seed)
        t, k, p, m = (torch.tensor(col) for col in zip(*opts))
        got = filtered_probabilities(logits, t.float(), k, p.float(), m.float())
        for r, (temp, top_k, top_p, min_p) in enumerate(opts):
            chain = [transformers.TemperatureLogitsWarper(temp)]
            if top_k:
                chain.append(transformers.TopKLogitsWarper(top_k))
            if top_p < 1:
                chain.append(transformers.TopPLogitsWarper(top_p))
            if min_p:
                chain.append(transformers.MinPLogitsWarper(min_p))
            scores = logits[r : r + 1].clone()
            for w in chain:
                scores = w(None, scores)
            want = torch.softmax(scores, -1)
            assert torch.allclose(got[r : r + 1], want, atol=1e-6), (seed, r, (got[r] > 0).sum(), (want > 0).sum())


def test_rows_without_options_sample_as_sample_does():
    from llamaworks.inference.sampling import sample_rows

    logits = _rows(3, bsz=4, vocab=300) * 3
    noise = torch.empty(4, 300).exponential_(1, generator=torch.Generator().manual_seed(4))
    temps = [0.8, 1.0, 0.0, 1.5]
    got = sample_rows(logits, torch.tensor(temps), torch.tensor([0, 20, 0, 0]), torch.tensor([0.95, 1.0, 1.0, 0.9]),
                      torch.zeros(4), noise)
    for r, (temp, k, p) in enumerate(zip(temps, [None, 20, None, None], [0.95, 1.0, 1.0, 0.9])):
        assert int(got[r]) == int(sample(logits[r : r + 1], temp, k, p, noise[r : r + 1])[0])


def test_logit_bias_is_validated_and_added():
    from llamaworks.inference.sampling import SamplingState, apply_states, logit_bias_vector

    with pytest.raises(ValueError, match="token id 10"):
        logit_bias_vector({10: 1.0}, 10)
    with pytest.raises(ValueError, match="-100, 100"):
        logit_bias_vector({1: 101}, 10)
    logits = _rows(5, bsz=3, vocab=10)
    states = [None, SamplingState(10, [1, 2], bias={3: 100.0, 4: -100}), SamplingState(10, [], frequency=1.0)]
    states[2].update(7)
    states[2].update(7)
    got = apply_states(logits, states)
    assert torch.equal(got[0], logits[0])
    assert got[1, 3] == logits[1, 3] + 100 and got[1, 4] == logits[1, 4] - 100
    assert torch.equal(got[1, 5:], logits[1, 5:])
    assert torch.allclose(got[2, 7], logits[2, 7] - 2) and torch.equal(got[2, :7], logits[2, :7])
    assert int(got[1].argmax()) == 3


def test_penalties_steer_sampling_away_from_repeats():
    from llamaworks.inference.sampling import SamplingState, apply_states

    # A flat distribution over 8 tokens: a strong presence penalty forbids repeats.
    logits = torch.zeros(1, 8)
    state = SamplingState(8, [], presence=50.0)
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(8):
        noise = torch.empty(1, 8).exponential_(1, generator=gen)
        tok = int(sample(apply_states(logits, [state]), 1.0, None, 1.0, noise)[0])
        out.append(tok)
        state.update(tok)
    assert sorted(out) == list(range(8))


def test_updates_land_in_the_tensors_and_a_bias_alone_adds_exactly():
    from llamaworks.inference.sampling import SamplingState, apply_states, logit_bias_vector

    state = SamplingState(10, [2], bias={1: 5.0})
    state.update(4)
    state.update(4)
    assert state.counts.tolist() == [0, 0, 0, 0, 2, 0, 0, 0, 0, 0]
    assert state.seen.nonzero().flatten().tolist() == [2, 4]
    assert not state.penalised and SamplingState(10, [], repetition=1.3).penalised
    logits = _rows(6, bsz=2, vocab=10)
    got = apply_states(logits, [state, None])
    assert torch.equal(got[0], logits[0] + logit_bias_vector({1: 5.0}, 10)) and torch.equal(got[1], logits[1])
