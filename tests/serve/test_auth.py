"""--api-key: /v1 routes need the bearer key (401 in OpenAI's shape, through the official
client too); /, /health and /metrics stay open; the key comparison is hmac's."""

from __future__ import annotations

import pytest

from llamaworks.serve.auth import bearer_ok, check_api_key

from .conftest import MODEL, running_server

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def guarded(tiny_model_dir):
    with running_server(tiny_model_dir, max_batch=2, api_key=KEY) as s:
        yield s


def test_bearer_parsing():
    key = KEY.encode()
    assert bearer_ok(b"Bearer " + key, key) and bearer_ok(b"bearer " + key, key)
    for bad in (None, b"", key, b"Basic " + key, b"Bearer " + key[:-1], b"Bearer " + key + b"x", b"Bearer"):
        assert not bearer_ok(bad, key), bad


@pytest.mark.parametrize("bad", ["", " key", "key ", "k\ney", "ключ"])
def test_bad_keys_are_refused_at_start(bad):
    with pytest.raises(ValueError, match="--api-key"):
        check_api_key(bad)


def test_openai_client_needs_the_key(guarded):
    good = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in good.models.list().data] == [MODEL]
    out = good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert out.choices[0].finish_reason in ("stop", "length")
    wrong = openai.OpenAI(base_url=guarded.url + "/v1", api_key="sk-wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/tiny", "/v1/chat/completions", "/v1/nothing", "/v1"])
def test_every_v1_route_is_guarded(guarded, path):
    r = httpx.post(guarded.url + path, json={"model": MODEL, "prompt": "x"}) if "completions" in path else \
        httpx.get(guarded.url + path)
    assert r.status_code == 401
    err = r.json()["error"]
    assert err["code"] == "invalid_api_key" and "--api-key" in err["message"]


def test_open_routes(guarded):
    for path in ("/", "/health", "/metrics", "/static/chat.js"):
        assert httpx.get(guarded.url + path).status_code == 200, path
    assert httpx.get(guarded.url + "/health").json()["auth"] is True
    text = httpx.get(guarded.url + "/metrics").text
    assert 'llamaworks_http_requests_total{endpoint="other",code="401"}' in text


def test_environment_variable_sets_the_key(monkeypatch, tmp_path):
    # serve_command reads LLAMAWORKS_API_KEY when --api-key is not given; a bad one fails before loading.
    from llamaworks.serve.command import serve_command

    monkeypatch.setenv("LLAMAWORKS_API_KEY", " spaced")
    with pytest.raises(ValueError, match="LLAMAWORKS_API_KEY"):
        serve_command(str(tmp_path / "missing"))
