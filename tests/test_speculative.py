from __future__ import annotations

import math

import pytest
import torch

from llamaworks.cli import main as cli_main
from llamaworks.generate import generate, generate_ids
from llamaworks.model import ModelArgs, Transformer
from llamaworks.speculative import accept, generate_speculative, speculative_ids


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls: a second thread only adds synchronisation (10x slower on a busy machine).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    got = generate_speculative(target, drafts["shallow"], tiny_tokenizer, "the king", 15, k=3, on_text=pieces.append)
    assert got.text == want.text == "".join(pieces) and got.tokens == want.tokens


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
    assert cli_main(base + ["--prompt", "a", "b", "--draft", str(tiny_model_dir)]) == 2
    assert "one prompt" in capsys.readouterr().err
