"""--request-timeout: a request past its wall time is cancelled, its slot freed, and answered
with a 504 in OpenAI's shape (code request_timeout); a stream ends with that error event."""

from __future__ import annotations

import json
import time

import pytest

from .conftest import MODEL, running_server

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def slow(tiny_model_dir):
    # 50 ms a forward: 200 tokens take ~10 s, far past the 1 s limit.
    with running_server(tiny_model_dir, max_batch=1, delay=0.05, request_timeout=1.0) as s:
        yield s


def wait_idle(engine, seconds=10):
    deadline = time.monotonic() + seconds
    while engine.active or engine.queue_length:
        assert time.monotonic() < deadline, "the timed-out request kept its slot"
        time.sleep(0.02)


def test_timeout_is_a_504_and_frees_the_slot(slow):
    client = openai.OpenAI(base_url=slow.url + "/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=MODEL, prompt="The king", max_tokens=200, temperature=0)
    assert e.value.status_code == 504 and e.value.code == "request_timeout"
    assert "--request-timeout" in e.value.message
    wait_idle(slow.engine)
    assert slow.engine.metrics.timeouts >= 1
    # A short request still fits in the limit.
    ok = client.completions.create(model=MODEL, prompt="The king", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_stream_ends_with_the_error_event(slow):
    with httpx.stream("POST", slow.url + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200,
                            "stream": True, "temperature": 0}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["error"]["code"] == "request_timeout"
    wait_idle(slow.engine)


def test_bad_timeout_is_refused():
    from llamaworks.serve.api import create_app

    with pytest.raises(ValueError, match="--request-timeout"):
        create_app(None, MODEL, request_timeout=0)
