from __future__ import annotations

import math

import pytest
import torch

from llamaworks.cli import main as cli_main
from llamaworks.inference.generate import generate, generate_ids
from llamaworks.inference.speculative import (
    accept,
    generate_speculative,
    greedy_accepted,
    speculative_batch,
)
from llamaworks.model import ModelArgs, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def speculative_ids(target, draft, prompt, max_new_tokens, **kw):
    """One prompt through speculative_batch: (tokens, stats without the per-row part)."""
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token")
    outs, stats = speculative_batch(target, draft, [prompt], max_new_tokens, **kw)
    stats.pop("rows")
    return outs[0], stats


def _peaked(args: ModelArgs, seed: int) -> Transformer:
    # Larger-than-init weights: peaked logits, so greedy comparisons test the code, not ties.
    torch.manual_seed(seed)
    m = Transformer(args).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.12)
    return m


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    args = ModelArgs.from_name("tiny", vocab_size=tiny_tokenizer.vocab_size, n_layers=2)
    target = _peaked(args, 1)
    # A draft that often agrees: the target's first layer (embeddings, norm and output shared).
    shallow = Transformer(ModelArgs.from_name("tiny", vocab_size=tiny_tokenizer.vocab_size, n_layers=1)).eval()
    shallow.load_state_dict({k: v for k, v in target.state_dict().items() if not k.startswith("layers.1.")})
    unrelated = _peaked(args, 7)
    return target, {"self": target, "shallow": shallow, "unrelated": unrelated}


PROMPTS = [[1, 5, 77, 300, 12], [1, 400], [1, 9, 8, 7, 6, 5, 4, 3, 2, 10, 11]]


def reference(model, prompt, n):
    chunks = list(generate_ids(model, [prompt], n, temperature=0.0))
    return torch.cat([c[0] for c in chunks], 1)[0].tolist()


@pytest.mark.parametrize("which", ["self", "shallow", "unrelated"])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_is_exactly_the_target(models, which, k):
    target, drafts = models
    for prompt, n in zip(PROMPTS, (13, 20, 7)):
        got, stats = speculative_ids(target, drafts[which], prompt, n, k=k)
        assert got == reference(target, prompt, n), (which, k, prompt)
        assert stats["new_tokens"] == n and stats["drafted"] >= stats["accepted"]
    if which == "self":
        assert stats["acceptance_rate"] == 1.0 and stats["tokens_per_target_forward"] > k / 2


def test_acceptance_tracks_the_draft(models):
    target, drafts = models
    rate = {w: speculative_ids(target, d, PROMPTS[0], 40, k=4)[1]["acceptance_rate"] for w, d in drafts.items()}
    assert rate["self"] == 1.0 and rate["unrelated"] < rate["self"]


def test_stops_at_eos_and_at_the_context(models):
    target, drafts = models
    ref = reference(target, PROMPTS[0], 12)
    eos = ref[6]
    got, _ = speculative_ids(target, drafts["shallow"], PROMPTS[0], 12, k=3, eos_id=eos)
    assert got == ref[: ref.index(eos) + 1]
    long = [1] + list(range(3, 250))  # 248 tokens of a 256-token context
    got, _ = speculative_ids(target, drafts["self"], long, 50, k=4)
    assert got == reference(target, long, 8) and len(got) == 8


def test_rejection_rule_preserves_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.2, 0.05, 0.05], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.1, 0.1, 0.2, 0.3, 0.3]])
    n = 20_000
    drafts = torch.multinomial(q[0], n, replacement=True, generator=g).tolist()
    first = torch.tensor([accept(p, q, [d], g)[0][0] for d in drafts])
    freq = torch.bincount(first, minlength=5).double() / n
    assert torch.allclose(freq, p[0].double(), atol=4 * math.sqrt(0.25 / n)), freq


def test_sampling_with_the_target_as_draft_accepts_everything(models, tiny_tokenizer):
    target, drafts = models
    a, s = speculative_ids(target, drafts["self"], PROMPTS[0], 16, k=4, temperature=0.8, top_p=0.95, seed=3)
    b, _ = speculative_ids(target, drafts["self"], PROMPTS[0], 16, k=4, temperature=0.8, top_p=0.95, seed=3)
    assert a == b and len(a) == 16 and s["acceptance_rate"] == 1.0
    c = generate_speculative(target, drafts["shallow"], tiny_tokenizer, "the king", 10, k=3, temperature=1.0, seed=0)
    assert len(c.tokens) <= 10 and c.stats["rounds"] >= 1


def test_text_api_matches_generate(models, tiny_tokenizer):
    target, drafts = models
    want = generate(target, tiny_tokenizer, "the king", 15, temperature=0.0)[0]
    pieces = []
    got = generate_speculative(target, drafts["shallow"], tiny_tokenizer, "the king", 15, k=3,
                               on_text=lambda i, d: pieces.append(d))
    assert got.text == want.text == "".join(pieces) and got.tokens == want.tokens
    texts = ["the king", "O fair lady of the night, speak", "a"]
    want = generate(target, tiny_tokenizer, texts, 15, temperature=0.0)
    got = generate_speculative(target, drafts["shallow"], tiny_tokenizer, texts, 15, k=3)
    assert [g.text for g in got] == [w.text for w in want] and [g.tokens for g in got] == [w.tokens for w in want]
    assert got[1].stats["row"]["new_tokens"] >= len(got[1].tokens)


def test_errors(models, tiny_tokenizer):
    target, drafts = models
    with pytest.raises(ValueError, match="k must be >= 1"):
        speculative_ids(target, drafts["self"], PROMPTS[0], 5, k=0)
    other = Transformer(ModelArgs.from_name("tiny", vocab_size=256, n_layers=1)).eval()
    with pytest.raises(ValueError, match="vocab_size"):
        speculative_ids(target, other, PROMPTS[0], 5)


def test_generate_cli_with_draft(tiny_model_dir, capsys):
    base = ["generate", "--checkpoint", str(tiny_model_dir), "--prompt", "the", "--max-new-tokens", "12",
            "--temperature", "0"]
    assert cli_main(base) == 0
    plain = capsys.readouterr().out
    assert cli_main(base + ["--draft", str(tiny_model_dir), "--draft-k", "3"]) == 0
    out, err = capsys.readouterr()
    assert out == plain and "accepted (100.0%)" in err
    several = base[:4] + ["the", "a king", "O"] + base[5:]
    assert cli_main(several) == 0
    plain = capsys.readouterr().out
    assert cli_main(several + ["--draft", str(tiny_model_dir), "--draft-k", "2"]) == 0
    out, err = capsys.readouterr()
    assert out == plain
    assert [line.split(":")[0] for line in err.splitlines()[:3]] == ["prompt 0", "prompt 1", "prompt 2"]
    assert "accepted (100.0%)" in err.splitlines()[3]


BATCH = [[1, 5, 77, 300, 12], [1, 400], [1, 9, 8, 7, 6, 5, 4, 3, 2, 10, 11], [1, 3, 3, 3, 3, 3, 3, 3]]


@pytest.mark.parametrize("which", ["self", "shallow", "unrelated"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_batched_greedy_is_each_prompt_alone(models, which, k):
    # Rows of different lengths accept different numbers of drafts each round; every row must
    # still be exactly what the target gives for that prompt alone.
    target, drafts = models
    n = 17
    got, stats = speculative_batch(target, drafts[which], BATCH, n, k=k)
    for prompt, row, s in zip(BATCH, got, stats["rows"]):
        assert row == reference(target, prompt, n), (which, k, prompt)
        assert s["new_tokens"] == n and 0 <= s["accepted"] <= s["drafted"]
    assert stats["drafted"] == sum(s["drafted"] for s in stats["rows"])
    assert stats["new_tokens"] == n * len(BATCH)
    if which == "self":  # a draft that always agrees
        assert stats["acceptance_rate"] == 1.0
        assert all(s["rounds"] == -(-(n - 1) // (k + 1)) for s in stats["rows"])
    if which == "unrelated" and k > 1:  # nearly always disagrees: about one token per round
        assert stats["acceptance_rate"] < 0.5


def test_batched_rows_finish_at_their_own_eos_and_context(models):
    target, drafts = models
    ref = reference(target, BATCH[0], 12)
    eos = ref[4]
    want = []
    for p in BATCH:
        r = reference(target, p, 12)
        want.append(r[: r.index(eos) + 1] if eos in r else r)
    got, stats = speculative_batch(target, drafts["shallow"], BATCH, 12, k=3, eos_id=eos)
    assert got == want and len(got[0]) == 5
    assert stats["rows"][0]["rounds"] < max(s["rounds"] for s in stats["rows"])
    # One prompt close to the end of the 256-token context: it stops there, the other runs on.
    long = [1] + list(range(3, 250))
    streamed = {0: [], 1: []}
    got, _ = speculative_batch(target, drafts["self"], [long, BATCH[1]], 20, k=4,
                               on_tokens=lambda i, new: streamed[i].extend(new))
    assert got == [reference(target, long, 8), reference(target, BATCH[1], 20)]
    assert [streamed[0], streamed[1]] == got


def test_greedy_accepted_counts_the_agreeing_prefix():
    best = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [9, 2, 3, 4]])
    drafted = torch.tensor([[1, 2, 3], [1, 5, 3], [1, 2, 3], [1, 2, 3]])
    usable = torch.tensor([3, 3, 1, 3])
    assert greedy_accepted(best, drafted, usable).tolist() == [3, 1, 1, 0]


def test_batched_sampling_with_the_target_as_draft_accepts_everything(models):
    target, drafts = models
    a, s = speculative_batch(target, drafts["self"], BATCH, 9, k=3, temperature=0.8, top_p=0.95, seed=3)
    b, _ = speculative_batch(target, drafts["self"], BATCH, 9, k=3, temperature=0.8, top_p=0.95, seed=3)
    assert a == b and all(len(r) == 9 for r in a) and s["acceptance_rate"] == 1.0
