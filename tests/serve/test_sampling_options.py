"""Per-request sampling options in the engine and through the HTTP API: penalties against a
hand-written reference of their formulas, logit_bias, min_p, stop token ids,
max_completion_tokens, n choices (seeded per choice, streamed with index), and rows with
different options in one batch giving each the tokens it gets alone."""

from __future__ import annotations

import threading

import pytest
import torch

from llamaworks.serve.engine import Engine, Request

from .conftest import MODEL, serving


class FixedLogits:
    """A stand-in model whose logits are the same vector at every position: what a penalty
    does to the choice of the next token is then a small calculation."""

    def __init__(self, logits: list[float], context: int = 256):
        self.args = type("Args", (), {"max_seq_len": context})()
        self.output = type("Output", (), {"weight": torch.zeros(1)})()
        self.logits = torch.tensor(logits)

    def setup_caches(self, max_batch: int, max_seq_len: int) -> None:
        pass

    def __call__(self, tokens, pos=None, rows=None):
        bsz, n = tokens.shape
        return self.logits.expand(bsz, n, -1).clone()


# Token 0 is <unk>, 1 <s>, 2 </s> in the tiny tokenizer: eos far below the others.
LOGITS = [0.0, 0.0, -50.0, 10.0, 9.53, 9.21, 9.07, -3.0, 4.0, 0.5] + [0.0] * 502


def reference_greedy(logits: list[float], prompt: list[int], n: int, presence=0.0, frequency=0.0,
                     repetition=1.0, bias=None) -> list[int]:
    """Greedy tokens under OpenAI's penalties (output counts), CTRL's repetition penalty (prompt
    and output) and a logit bias, written out per token."""
    out: list[int] = []
    for _ in range(n):
        scores = []
        for t, x in enumerate(logits):
            if t in prompt or t in out:
                x = x / repetition if x > 0 else x * repetition
            c = out.count(t)
            x -= presence * (c > 0) + frequency * c
            x += (bias or {}).get(t, 0.0)
            scores.append(x)
        best, second = sorted(scores, reverse=True)[:2]
        assert best - second > 1e-3, (out, best, second)  # no near-tie that float32 could break either way
        out.append(scores.index(best))
    return out


@pytest.fixture(scope="module")
def fixed_engine(tiny_tokenizer):
    eng = Engine(FixedLogits(LOGITS), tiny_tokenizer, max_batch=4).start()
    yield eng
    eng.stop(cancel=True, timeout=30)


@pytest.mark.parametrize("opts", [
    {}, {"presence_penalty": 1.0}, {"frequency_penalty": 0.71}, {"presence_penalty": 0.31, "frequency_penalty": 0.43},
    {"repetition_penalty": 1.3}, {"repetition_penalty": 1.7, "frequency_penalty": 0.23},
    {"presence_penalty": -0.5}, {"logit_bias": {7: 14.0}}, {"logit_bias": {3: -100}, "presence_penalty": 2.0},
])
def test_penalties_follow_their_formulas(fixed_engine, opts):
    prompt = [1, 5, 8]
    got = fixed_engine.complete(Request(prompt, 12, **opts)).tokens
    want = reference_greedy(LOGITS, prompt, 12, opts.get("presence_penalty", 0.0), opts.get("frequency_penalty", 0.0),
                            opts.get("repetition_penalty", 1.0), opts.get("logit_bias"))
    assert got == want
    if opts.get("presence_penalty", 0) > 0 or opts.get("frequency_penalty", 0) > 0:
        assert len(set(got)) > 1  # penalised: not the same top token every time
    if not opts:
        assert got == [3] * 12


def test_min_p_drops_unlikely_tokens(fixed_engine):
    # Relative to token 3's probability: token 4 e^-0.47 = 0.63, 5 e^-0.79 = 0.45, 6 e^-0.93 = 0.39.
    seen = set()
    for seed in range(40):
        seen.update(fixed_engine.complete(Request([1], 4, temperature=1.0, seed=seed, min_p=0.42)).tokens)
    assert seen == {3, 4, 5}


def _run_all(engine, reqs):
    done = threading.Semaphore(0)
    for r in reqs:
        r.on_event = lambda ev: done.release() if ev.kind in ("done", "error") else None
        engine.submit(r)
    for _ in reqs:
        assert done.acquire(timeout=300)
    return reqs


def test_rows_with_different_options_in_one_batch_get_their_own_tokens(tiny_model_dir):
    from llamaworks.inference.load import load_model

    model, tok = load_model(tiny_model_dir)
    eng = Engine(model.eval(), tok, max_batch=6).start()
    try:
        prompt = tok.encode("The king said")
        kinds = [dict(temperature=0.8, top_p=0.9, seed=1), dict(temperature=1.0, min_p=0.1, seed=2),
                 dict(temperature=0.0, presence_penalty=1.5), dict(temperature=1.0, repetition_penalty=1.3, seed=3,
                                                                   logit_bias={5: 3.0}),
                 dict(temperature=0.7, top_k=20, frequency_penalty=0.5, seed=4), dict(temperature=0.0)]
        alone = [eng.complete(Request(prompt, 24, **k)).tokens for k in kinds]
        together = _run_all(eng, [Request(prompt, 24, **k) for k in kinds])
        assert [r.tokens for r in together] == alone
        assert alone[2] != alone[5]  # the penalty changed the greedy reply
    finally:
        eng.stop(cancel=True, timeout=30)


def test_bad_options_are_refused_at_submit(fixed_engine):
    for opts in ({"min_p": 1.5}, {"presence_penalty": 3}, {"repetition_penalty": 0}, {"logit_bias": {10**6: 1}},
                 {"logit_bias": {3: 200}}):
        with pytest.raises(ValueError):
            fixed_engine.submit(Request([1], 4, **opts))


# --- HTTP -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def http(tiny_model_dir):
    openai = pytest.importorskip("openai")
    from llamaworks.inference.load import load_model

    model, tok = load_model(tiny_model_dir)
    with serving(model.eval(), tok, max_batch=4) as s:
        s.client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        yield s


def test_n_choices_are_seeded_per_choice(http):
    kw = dict(model=MODEL, prompt="The king", max_tokens=12, temperature=1.0, seed=5, n=3)
    a, b = http.client.completions.create(**kw), http.client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) == 3
    one = http.client.completions.create(**{**kw, "n": 1})
    assert one.choices[0].text == a.choices[0].text  # choice 0 has the request's own seed
    assert a.usage.completion_tokens == 36 and a.usage.prompt_tokens == one.usage.prompt_tokens


def test_n_choices_stream_with_their_index(http):
    stream = http.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=8, temperature=1.0, seed=3, n=2, stream=True,
                                                 stream_options={"include_usage": True})
    texts, finish, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert set(finish) == {0, 1} and usage is not None and usage.completion_tokens <= 16
    whole = http.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=8, temperature=1.0, seed=3, n=2)
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]


def test_logit_bias_and_stop_token_ids(http):
    tok = http.tokenizer
    c = http.client
    x = tok.encode("king", bos=False)[-1]
    out = c.completions.create(model=MODEL, prompt="The", max_tokens=6, temperature=0, logit_bias={str(x): 100})
    assert out.choices[0].text == tok.decode([x] * 6)
    plain = c.completions.create(model=MODEL, prompt="The", max_tokens=8, temperature=0)
    ids = http.engine.complete(Request(tok.encode("The"), 8)).tokens  # the same greedy reply's ids
    assert tok.decode(ids) == plain.choices[0].text
    banned = c.completions.create(model=MODEL, prompt="The", max_tokens=8, temperature=0,
                                  logit_bias={str(ids[0]): -100})
    assert banned.choices[0].text != plain.choices[0].text
    stopped = c.completions.create(model=MODEL, prompt="The", max_tokens=8, temperature=0,
                                   extra_body={"stop_token_ids": [ids[0]]})
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 0


def test_penalties_and_max_completion_tokens_through_chat(http):
    c = http.client
    msgs = [{"role": "user", "content": "Say something"}]
    plain = c.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=20, temperature=0)
    assert plain.usage.completion_tokens == 20 and plain.choices[0].finish_reason == "length"
    pen = c.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=20, temperature=0,
                                    frequency_penalty=2.0, presence_penalty=2.0,
                                    extra_body={"repetition_penalty": 1.5, "min_p": 0.05})
    assert pen.choices[0].message.content != plain.choices[0].message.content


@pytest.mark.parametrize("extra,param", [
    ({"n": 17}, "n"), ({"n": 0}, "n"), ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"3": 200}}, "logit_bias"), ({"logit_bias": {"100000": 1}}, "logit_bias"),
    ({"stop_token_ids": [100000]}, "stop_token_ids"), ({"stop_token_ids": "x"}, "stop_token_ids"),
    ({"min_p": 2}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "grammar"),
])
def test_bad_options_are_400s(http, extra, param):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        http.client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body=extra)
    assert e.value.body["param"] == param
