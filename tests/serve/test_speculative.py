"""Speculative decoding inside the serving engine (Engine(draft=...), `serve --draft`): greedy
requests get exactly the tokens they get without a draft, whatever the draft, the batch or
the stops; sampled ones run the rejection rule; the acceptance rate reaches stats() and /metrics."""

from __future__ import annotations

import pytest
import torch

from llamaworks.model import ModelArgs, Transformer
from llamaworks.serve.engine import Engine, Request

from .conftest import serving
from .test_paged import _run_all

PROMPTS = [[1, 5, 77, 300, 12], [1, 400], [1, 9, 8, 7, 6, 5, 4, 3, 2, 10, 11], [1, 22, 33, 44, 55, 66, 77, 88, 99]]


def _target(args: ModelArgs) -> Transformer:
    # Weights larger than at init: peaked logits, so that greedy comparisons test the code, not
    # near-ties between logits computed in batches of other shapes.
    model = Transformer(args).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if not name.endswith("norm.weight"):
                w.copy_(torch.randn(w.shape, generator=g) * 0.12)
    return model


@pytest.fixture(scope="module")
def make(tiny_tokenizer):
    """make(kind): a fresh instance (each engine owns its caches) of the target ("target"), a
    draft that often agrees with it (its first layer, "shallow"), or an unrelated smaller
    random model of the same vocabulary ("small")."""
    vocab = tiny_tokenizer.vocab_size

    def build(kind: str) -> Transformer:
        target = _target(ModelArgs.from_name("tiny", vocab_size=vocab, n_layers=2))
        if kind == "target":
            return target
        if kind == "small":
            return Transformer(ModelArgs.from_name("tiny", vocab_size=vocab, n_layers=1, dim=32, n_heads=2)).eval()
        shallow = Transformer(ModelArgs.from_name("tiny", vocab_size=vocab, n_layers=1)).eval()
        shallow.load_state_dict({k: v for k, v in target.state_dict().items() if not k.startswith("layers.1.")})
        return shallow

    return build


def _mixed(tok):
    """A batch of mixed greedy requests: lengths, limits, one with a stop string, one with
    logit_bias (it falls back to one token per step), one that logs probabilities."""
    return [Request(list(PROMPTS[0]), 20), Request(list(PROMPTS[1]), 7, stop_ids=()),
            Request(list(PROMPTS[2]), 13, logprobs=2), Request(list(PROMPTS[3]), 16, logit_bias={7: 5.0}),
            Request(list(PROMPTS[0]) + [9, 9], 1), Request(list(PROMPTS[2][:4]), 25, stop=["zz"])]


def _serve(model, tok, reqs, **kw):
    eng = Engine(model, tok, max_batch=3, block_size=4, **kw).start()
    try:
        _run_all(eng, reqs)
        return reqs, eng.stats()
    finally:
        eng.stop(cancel=True, timeout=30)


@pytest.fixture(scope="module")
def plain(make, tiny_tokenizer):
    reqs, _ = _serve(make("target"), tiny_tokenizer, _mixed(tiny_tokenizer))
    return reqs


@pytest.mark.parametrize("kind,k", [("target", 4), ("shallow", 3), ("small", 2), ("shallow", 1)])
def test_greedy_with_a_draft_equals_without(make, tiny_tokenizer, plain, kind, k):
    reqs, stats = _serve(make("target"), tiny_tokenizer, _mixed(tiny_tokenizer), draft=make(kind), draft_tokens=k,
                         prefill_chunk=5)
    for want, got in zip(plain, reqs):
        assert (got.tokens, got.text, got.finish_reason) == (want.tokens, want.text, want.finish_reason)
    for want, got in zip(plain[2].token_logprobs, reqs[2].token_logprobs):  # the model's, at each kept position
        assert got[0] == pytest.approx(want[0], abs=1e-4)
        assert [t for t, _ in got[1]] == [t for t, _ in want[1]]
    assert stats["spec_draft_tokens"] == k and stats["spec_rounds"] > 0 and stats["spec_fallback_steps"] > 0
    assert stats["spec_drafted"] > 0 and 0 <= stats["spec_accepted"] <= stats["spec_drafted"]
    if kind == "target":  # the draft is the model: every draft is the model's own choice
        assert stats["spec_acceptance_rate"] == 1.0
    # Rejected drafts rolled back: nothing left allocated or promised.
    assert stats["kv_blocks_used"] == 0 and stats["kv_blocks_reserved"] == 0


def test_the_drafting_step_verifies_every_row_in_one_forward(make, tiny_tokenizer):
    calls = []
    target = make("target")
    forward = target.forward
    target.forward = lambda tokens, *a, **kw: (calls.append(tuple(tokens.shape)), forward(tokens, *a, **kw))[1]
    eng = Engine(target, tiny_tokenizer, max_batch=3, block_size=4, draft=make("target"), draft_tokens=4).start()
    try:
        reqs = _run_all(eng, [Request(list(p), 12, stop_ids=()) for p in PROMPTS[:3]])
    finally:
        eng.stop(cancel=True, timeout=30)
    steps = [e for e in eng.step_log if e[0] == "speculate"]
    # One (max_batch, k+1) pass per step, never a plain decode (max_batch, 1); prefills are
    # (1, prompt) or, short prompts together, (3, 11) here.
    assert calls.count((3, 5)) == len(steps) and (3, 1) not in calls, calls
    # Every draft accepted: a row gains k+1 tokens per step (its first token came from its prefill).
    assert all(len(r.tokens) == 12 for r in reqs) and len(steps) <= 3 + 2


def test_a_stop_string_inside_an_accepted_run_ends_the_reply_there(make, tiny_tokenizer):
    prompt = PROMPTS[2]
    (ref,), _ = _serve(make("target"), tiny_tokenizer, [Request(list(prompt), 24, stop_ids=())])
    # A stop string from the middle of the reply (tokens 6..7): with k=8 and every draft kept,
    # the round that reaches it keeps tokens past it, which must be dropped.
    stop = tiny_tokenizer.decode(ref.tokens[6:8]).strip()
    assert stop and stop in ref.text
    (want,), _ = _serve(make("target"), tiny_tokenizer, [Request(list(prompt), 24, stop=[stop], stop_ids=())])
    (got,), stats = _serve(make("target"), tiny_tokenizer, [Request(list(prompt), 24, stop=[stop], stop_ids=())],
                           draft=make("target"), draft_tokens=8)
    assert got.finish_reason == "stop" and stop not in got.text
    assert (got.tokens, got.text) == (want.tokens, want.text)
    assert len(got.tokens) < 24 and stats["spec_accepted"] > 0


def test_sampling_with_the_model_as_draft_keeps_nearly_every_draft(make, tiny_tokenizer):
    reqs = [Request(list(p), 16, temperature=0.8, top_p=0.95, seed=3, stop_ids=()) for p in PROMPTS[:3]]
    again = [Request(list(p), 16, temperature=0.8, top_p=0.95, seed=3, stop_ids=()) for p in PROMPTS[:3]]
    reqs, stats = _serve(make("target"), tiny_tokenizer, reqs, draft=make("target"), draft_tokens=4)
    again, _ = _serve(make("target"), tiny_tokenizer, again, draft=make("target"), draft_tokens=4)
    assert [r.tokens for r in reqs] == [r.tokens for r in again]  # seeded: reproducible
    assert all(len(r.tokens) == 16 for r in reqs)
    # p and q are the same distribution (up to float rounding between batch shapes): accepted.
    assert stats["spec_acceptance_rate"] > 0.95


def test_sampled_tokens_follow_the_models_distribution(make, tiny_tokenizer):
    """The token of a sampled request's first speculative step (one draft, from an unrelated
    draft model: rejected often, so the residual is drawn from), over many seeds, against the
    model's own distribution at that position: sum over the first token t of p(t) p(. | t)."""
    model, prompt, n, temperature = make("target"), PROMPTS[1], 400, 1.3
    vocab = tiny_tokenizer.vocab_size
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt]))[0, -1] / temperature, -1)  # (vocab,)
        rows = torch.cat([torch.tensor([prompt]).expand(vocab, -1), torch.arange(vocab).unsqueeze(1)], 1)
        p2 = torch.softmax(model(rows)[:, -1] / temperature, -1)  # (vocab, vocab): given each first token
    want = p1 @ p2
    eng = Engine(make("target"), tiny_tokenizer, max_batch=8, max_queue=n, block_size=4, draft=make("small"),
                 draft_tokens=2)
    eng.start()
    try:
        reqs = _run_all(eng, [Request(list(prompt), 3, temperature=temperature, seed=s, stop_ids=())
                              for s in range(n)], timeout=600)
        stats = eng.stats()
    finally:
        eng.stop(cancel=True, timeout=30)
    assert stats["spec_drafted"] >= n and stats["spec_accepted"] < stats["spec_drafted"]  # rejections happened
    second = torch.tensor([r.tokens[1] for r in reqs])
    for t in want.topk(4).indices.tolist():
        freq, q = (second == t).float().mean().item(), want[t].item()
        assert abs(freq - q) < 4 * (q * (1 - q) / n) ** 0.5 + 0.005, (t, freq, q)


def test_a_draft_must_share_the_vocabulary(make, tiny_tokenizer):
    other = Transformer(ModelArgs.from_name("tiny", vocab_size=tiny_tokenizer.vocab_size + 8, n_layers=1))
    with pytest.raises(ValueError, match="--draft.*vocab_size"):
        Engine(make("target"), tiny_tokenizer, draft=other)
    with pytest.raises(ValueError, match="--draft-tokens"):
        Engine(make("target"), tiny_tokenizer, draft=make("small"), draft_tokens=0)
    target = make("target")
    with pytest.raises(ValueError, match="instance of its own"):
        Engine(target, tiny_tokenizer, draft=target)


def test_metrics_expose_the_acceptance_rate(make, tiny_tokenizer):
    httpx = pytest.importorskip("httpx")
    with serving(make("target"), tiny_tokenizer, engine_kw={"draft": make("target"), "draft_tokens": 3}) as s:
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "The king", "max_tokens": 8,
                                                         "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        text = httpx.get(s.url + "/metrics", timeout=30).text
    lines = dict(line.split(" ", 1) for line in text.splitlines() if line.startswith("llamaworks_engine_spec"))
    assert float(lines["llamaworks_engine_spec_acceptance_rate"]) == 1.0
    assert float(lines["llamaworks_engine_spec_drafted"]) > 0


def test_serve_command_loads_the_draft_and_refuses_another_tokenizer(tiny_model_dir, tmp_path, corpus_docs,
                                                                      monkeypatch):
    from llamaworks.model import build_model
    from llamaworks.modeldir import save_model
    from llamaworks.serve import command
    from llamaworks.tokenizer import Tokenizer

    served = []
    monkeypatch.setattr(command, "_serve", lambda engine, *a, **kw: served.append(engine))
    assert command.serve_command(str(tiny_model_dir), port=0, device="cpu", draft=str(tiny_model_dir),
                                 draft_tokens=3, draft_max_batch=2) == 0
    (engine,) = served
    assert engine.draft is not None and engine.draft is not engine.model
    assert (engine.draft_tokens, engine.draft_max_batch) == (3, 2)
    tok = Tokenizer.train(tmp_path / "tok.model", documents=corpus_docs[:30], vocab_size=400, seed=0)
    other = save_model(build_model(ModelArgs.from_name("tiny", vocab_size=400, n_layers=1), seed=0), tok,
                       tmp_path / "other")
    with pytest.raises(ValueError, match="does not share the tokenizer.*--draft"):
        command.serve_command(str(tiny_model_dir), port=0, device="cpu", draft=str(other))


def test_above_draft_max_batch_steps_decode_plainly_and_the_draft_catches_up(make, tiny_tokenizer, plain):
    # Six requests in three rows: full batches decode one token per step, and as requests end
    # the last ones speculate, their draft first fed the tokens decoded without it.
    reqs, stats = _serve(make("target"), tiny_tokenizer, _mixed(tiny_tokenizer), draft=make("target"),
                         draft_tokens=3, draft_max_batch=1)
    for want, got in zip(plain, reqs):
        assert (got.tokens, got.text, got.finish_reason) == (want.tokens, want.text, want.finish_reason)
    assert stats["spec_rounds"] > 0
    # The draft is the model and caught up: every draft accepted, as if it had run every step.
    assert stats["spec_acceptance_rate"] == 1.0
    with pytest.raises(ValueError, match="--draft-max-batch"):
        Engine(make("target"), tiny_tokenizer, draft=make("small"), draft_max_batch=0)
