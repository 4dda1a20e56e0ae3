"""The HTTP API, end to end: the official openai client for the happy paths, raw HTTP for
bad inputs, and a bounded load test against the same requests served alone."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from llamaworks.inference.generate import generate

from .conftest import MODEL, running_server

httpx = pytest.importorskip("httpx")
pytest.importorskip("openai")


def _post(url, path, body, **kw):
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={"Content-Type": "application/json"}, timeout=60, **kw)


def _stream_text(client, prompt, max_tokens):
    chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True)
    parts, reasons = [], []
    for c in chunks:
        parts.append(c.choices[0].text)
        reasons.append(c.choices[0].finish_reason)
    return "".join(parts), reasons[-1]


def test_completion_equals_generate(client, tiny_model, tiny_tokenizer):
    for prompt in ["The king", "Love is"]:
        ref = generate(tiny_model, tiny_tokenizer, prompt, 12, temperature=0)[0]
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert out.choices[0].text == ref.text
        assert out.choices[0].finish_reason == ref.finish_reason
        assert out.usage.completion_tokens == len(ref.tokens)
        assert out.usage.prompt_tokens == len(tiny_tokenizer.encode(prompt))
        assert out.model == MODEL and out.object == "text_completion"
        assert _stream_text(client, prompt, 12) == (ref.text, ref.finish_reason)


def test_chat_uses_the_documented_template(client, tiny_model, tiny_tokenizer):
    from llamaworks.serve.protocol import CHAT_STOP, render_chat

    messages = [{"role": "system", "content": "Speak as a king."}, {"role": "user", "content": "Who art thou?"}]
    prompt = render_chat(messages)
    assert prompt == "Speak as a king.\n\nUser: Who art thou?\nAssistant:"
    ref = generate(tiny_model, tiny_tokenizer, prompt, 16, temperature=0, stop=[CHAT_STOP])[0]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text.lstrip()
    assert out.object == "chat.completion"
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text.lstrip()
    assert chunks[-2].choices[0].finish_reason == ref.finish_reason
    assert chunks[-1].usage.completion_tokens == len(ref.tokens)


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=MODEL, prompt="The queen", max_tokens=10, temperature=0.8, top_p=0.9, seed=3)
    a, b = (client.completions.create(**kw).choices[0].text for _ in range(2))
    assert a == b


def test_models_health_metrics(served, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(served.url + "/health").json()
    assert health["status"] == "ok" and health["slots"] == 4
    client.completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=0)
    text = httpx.get(served.url + "/metrics").text
    for name in ("llamaworks_http_requests_total{endpoint=\"completions\",code=\"200\"}",
                 "llamaworks_generation_tokens_total", "llamaworks_prompt_tokens_total",
                 "llamaworks_request_latency_seconds_bucket", "llamaworks_time_to_first_token_seconds_count",
                 "llamaworks_queue_length 0", "llamaworks_active_slots"):
        assert name in text, name


@pytest.mark.parametrize("body, status, param", [
    ("{not json", 400, None),
    ("[1, 2]", 400, None),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ({"model": MODEL, "prompt": "word " * 400}, 400, "prompt"),
    ({"model": MODEL, "prompt": 3}, 400, "prompt"),
    ({"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ({"model": MODEL, "prompt": [1, 99999]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "temperature": True}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "top_k": 0}, 400, "top_k"),
    ({"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "stop": [1]}, 400, "stop"),
    ({"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": MODEL, "prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ('{"model": "' + MODEL + '", "prompt": "\\ud800x"}', 400, "prompt"),  # a lone surrogate: not UTF-8
    ('{"model": "' + MODEL + '", "prompt": "x", "temperature": NaN}', 400, "temperature"),
    ('{"model": "' + MODEL + '", "prompt": "x", "max_tokens": 1e400}', 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "x", "echo": True, "stream": True}, 400, "echo"),
    ({"model": MODEL, "prompt": "x", "echo": "yes"}, 400, "echo"),
    ({"model": MODEL, "prompt": "x", "best_of": 3}, 400, "best_of"),  # not implemented: refused, not ignored
    ({"model": MODEL, "prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
])
def test_bad_completion_requests(served, body, status, param):
    r = _post(served.url, "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 400}]}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -3}, "max_tokens"),
    ('{"model": "' + MODEL + '", "messages": [{"role": "user", "content": "\\udfff"}]}', "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "xml"}}, "response_format"),
])
def test_bad_chat_requests(served, body, param):
    r = _post(served.url, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def _reference_logprobs(model, ids):
    import torch

    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).float()[0], dim=-1)  # row i predicts token i + 1
    return lp


def test_completion_logprobs_and_echo(client, tiny_model, tiny_tokenizer):
    ids = tiny_tokenizer.encode("To be, or not")
    out = client.completions.create(model=MODEL, prompt="To be, or not", max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    gen = generate(tiny_model, tiny_tokenizer, "To be, or not", 5, temperature=0)[0].tokens
    assert len(lp.tokens) == len(gen) and "".join(lp.tokens).strip() and lp.text_offset[0] == 0
    ref = _reference_logprobs(tiny_model, ids + gen)
    for k, t in enumerate(gen):
        row = ref[len(ids) - 1 + k]
        assert lp.token_logprobs[k] == pytest.approx(float(row[t]), abs=1e-4)
        top = sorted(lp.top_logprobs[k].values(), reverse=True)
        assert top[0] == pytest.approx(float(row.max()), abs=1e-4)  # greedy: the chosen token is the best
        assert len(lp.top_logprobs[k]) <= 3
    # echo: the prompt's tokens first, the first one unscored, every other one scored by the model
    echo = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, logprobs=0, echo=True)
    e = echo.choices[0]
    assert e.text.startswith(tiny_tokenizer.decode(ids))
    assert e.logprobs.token_logprobs[0] is None and len(e.logprobs.tokens) == len(ids) + 1
    ref = _reference_logprobs(tiny_model, ids + gen[:1])
    for i in range(1, len(ids) + 1):
        assert e.logprobs.token_logprobs[i] == pytest.approx(float(ref[i - 1, (ids + gen)[i]]), abs=1e-4)
    assert e.logprobs.top_logprobs[1] == {}  # logprobs=0: the chosen token's only
    one = client.completions.create(model=MODEL, prompt=ids[:1], max_tokens=2, temperature=0, logprobs=1, echo=True)
    assert one.choices[0].logprobs.token_logprobs[0] is None and len(one.choices[0].logprobs.tokens) == 3


def test_streamed_logprobs_equal_the_whole_response(client):
    kw = dict(model=MODEL, prompt="Now is the winter", max_tokens=8, temperature=0, logprobs=2)
    whole = client.completions.create(**kw).choices[0].logprobs
    tokens, lps, tops, offsets = [], [], [], []
    for c in client.completions.create(stream=True, **kw):
        lp = c.choices[0].logprobs
        if lp is not None:
            tokens += lp.tokens
            lps += lp.token_logprobs
            tops += lp.top_logprobs
            offsets += lp.text_offset
    assert tokens == whole.tokens and offsets == whole.text_offset and tops == whole.top_logprobs
    assert lps == pytest.approx(whole.token_logprobs, abs=1e-6)
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Speak"}], max_tokens=5, temperature=0,
                logprobs=True, top_logprobs=1)
    want = [c.token for c in client.chat.completions.create(**chat).choices[0].logprobs.content]
    got = [x.token for c in client.chat.completions.create(stream=True, **chat) if c.choices and c.choices[0].logprobs
           for x in c.choices[0].logprobs.content]
    assert got == want


def test_chat_logprobs(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Speak"}], max_tokens=4,
                                         temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert 1 <= len(content) <= 4
    for c in content:
        assert c.logprob <= 0 and len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-5)  # greedy
        assert isinstance(c.bytes, list)


def test_options_at_their_off_values_are_accepted(served, client):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "logprobs": None, "echo": False, "best_of": 1,
            "logit_bias": {}}
    assert _post(served.url, "/v1/completions", body).status_code == 200
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                          logprobs=False, response_format={"type": "text"})
    assert chat.choices[0].message.role == "assistant"
    assert client.models.retrieve(MODEL).id == MODEL


def test_openai_client_raises_its_errors(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context window"):
        client.completions.create(model=MODEL, prompt="word " * 400, max_tokens=2)


def test_unknown_path_is_an_openai_error(served):
    r = httpx.get(served.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_queue_bound_gives_429_and_disconnect_frees_the_slot(tiny_model_dir):
    # One slot, one queue place, and a model slowed to ~25 steps/s: the first request holds
    # the slot, the second waits, the third is refused. Closing the streams mid-way must
    # give the slot back (cancelled, not run to its 200 tokens).
    with running_server(tiny_model_dir, max_batch=1, max_queue=1, delay=0.04) as s:
        body = {"model": MODEL, "prompt": "The king", "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.Client(base_url=s.url, timeout=60) as a, httpx.Client(base_url=s.url, timeout=60) as b:
            with a.stream("POST", "/v1/completions", json=body) as ra:
                lines = ra.iter_lines()
                assert next(lines).startswith("data: ")  # the first is running
                with b.stream("POST", "/v1/completions", json=body) as rb:
                    assert rb.status_code == 200
                    deadline = time.monotonic() + 10
                    while s.engine.queue_length == 0:
                        assert time.monotonic() < deadline
                        time.sleep(0.01)
                    r = _post(s.url, "/v1/completions", {**body, "stream": False, "max_tokens": 2})
                    assert r.status_code == 429, r.text
                    assert r.json()["error"]["code"] == "rate_limit_exceeded"
        deadline = time.monotonic() + 10
        while s.engine.active or s.engine.queue_length:
            assert time.monotonic() < deadline, "slot not freed after the client went away"
            time.sleep(0.02)
        assert s.engine.metrics.finished["cancelled"] == 2
        assert s.engine.metrics.generation_tokens < 150
        # The freed slot serves the next request.
        r = _post(s.url, "/v1/completions", {**body, "stream": False, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_graceful_shutdown_finishes_in_flight_requests(tiny_model_dir):
    with running_server(tiny_model_dir, max_batch=2, delay=0.02, shutdown_timeout=30) as s:
        body = {"model": MODEL, "prompt": "The king", "max_tokens": 40, "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            s.server.should_exit = True  # what SIGINT / SIGTERM do
            rest = [ln for ln in lines if ln]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        s.thread.join(30)
        assert not s.thread.is_alive() and not s.engine._thread.is_alive()
        assert s.engine.metrics.finished["length"] == 1


def test_graceful_shutdown_cancels_after_the_timeout(tiny_model_dir):
    with running_server(tiny_model_dir, max_batch=2, delay=0.05, shutdown_timeout=0.5) as s:
        body = {"model": MODEL, "prompt": "The king", "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            t0 = time.monotonic()
            s.server.should_exit = True
            with pytest.raises(httpx.RemoteProtocolError):
                list(lines)  # the connection closes before the stream's end
        s.thread.join(30)
        assert time.monotonic() - t0 < 5
        assert not s.thread.is_alive() and not s.engine._thread.is_alive()
        assert s.engine.metrics.finished["cancelled"] == 1 and s.engine.active == 0


def test_load_32_streaming_clients_match_requests_served_alone(served, client):
    # 32 concurrent streaming clients, 3 requests each, on 4 slots (so up to 28 queue):
    # every response must equal the same request served alone (greedy).
    prompts = ["The king", "Love is", "O fair lady of the night", "Speak", "Thou art", "Good", "My lord,", "A"]
    specs = [(p, 4 + (i % 5) * 3) for i, p in enumerate(prompts)]
    alone = {}
    for p, n in specs:
        out = client.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0)
        alone[(p, n)] = (out.choices[0].text, out.choices[0].finish_reason)
    errors, results = [], []
    lock = threading.Lock()

    def worker(k):
        for j in range(3):
            spec = specs[(k + j) % len(specs)]
            try:
                got = _stream_text(client, *spec)
                with lock:
                    results.append((spec, got))
            except Exception as e:  # noqa: BLE001 - collected and reported below
                with lock:
                    errors.append(repr(e))

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(worker, range(32)))
    assert not errors, errors[:3]
    assert len(results) == 96
    for spec, got in results:
        assert got == alone[spec], spec
    assert served.engine.active == 0 and served.engine.queue_length == 0
