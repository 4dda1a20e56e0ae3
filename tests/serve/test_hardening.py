"""Issue 17: one client cannot take the server, or other clients' requests, down with it.

Each attack of the issue is a test here (loopback only, bounded in time and count): numbers
out of range, long stop strings, abandoned requests, huge and slow bodies, half-open
connections, deep JSON and tiny temperatures; then all of them at once while a normal client
is served, and a fuzzer of request bodies that must never see a 5xx.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamaworks.serve.limits import Limits

from .conftest import MODEL, EosSoonModel, running_server, serving
from .test_protocol import chat_bodies, completion_bodies, json_values

httpx = pytest.importorskip("httpx")

SMALL = Limits(max_body_bytes=64 * 1024, header_timeout=0.5, body_timeout=0.5)


def _post(url, path, body, timeout=60):
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={"Content-Type": "application/json"}, timeout=timeout)


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _head(path: str, length: int | None = None, chunked: bool = False) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: localhost", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_response(s: socket.socket, timeout: float = 10) -> tuple[int, bytes]:
    """(status, body) of one response; (0, b"") when the server closed without one."""
    s.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                return (0, b"") if not data else (int(data.split()[1]), b"")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), None)
        while length is not None and len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(head.split()[1]), body
    except ConnectionResetError:
        return (int(data.split()[1]), b"") if data else (0, b"")


def _closed_by_server(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        while s.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _error(r) -> dict:
    assert r.status_code < 500, r.text
    return r.json()["error"]


# --- 2. numbers out of range: a 400, not an exception in the engine --------------------------


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("extra, param", [
    ('"seed": 18446744073709551616', "seed"),  # 2**64: used to fail every running request
    ('"seed": -9223372036854775809', "seed"),
    ('"temperature": 1' + "0" * 400, "temperature"),  # a 400-digit integer: used to be a 500
    ('"top_p": 1' + "0" * 400, "top_p"),
    ('"max_tokens": 1' + "0" * 400, "max_tokens"),
    ('"seed": 1' + "0" * 5000, None),  # beyond Python's int parsing limit: a JSON error, used to be a 500
])
def test_numbers_out_of_range_are_400(served, path, extra, param):
    what = '"prompt": "x"' if path == "/v1/completions" else '"messages": [{"role": "user", "content": "x"}]'
    r = _post(served.url, path, '{"model": "' + MODEL + '", ' + what + ", " + extra + "}")
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_top_k_past_the_vocabulary_keeps_every_token(served):
    # top_k of 10**400 is a valid integer: it means no limit, as any top_k past the vocabulary does (it
    # used to overflow the float of the engine's per-row options: a 500, found by the fuzz test below).
    body = {"model": MODEL, "prompt": "The king", "max_tokens": 8, "temperature": 1.0, "seed": 3}
    want = _post(served.url, "/v1/completions", body).json()["choices"][0]["text"]
    for top_k in (10**400, 2**70, 2**31, 100_000):
        for stream in (False, True):
            r = _post(served.url, "/v1/completions", {**body, "top_k": top_k, "stream": stream})
            assert r.status_code == 200 and '"error"' not in r.text, (top_k, r.text)
            if not stream:
                assert r.json()["choices"][0]["text"] == want, top_k


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_deeply_nested_json_is_400(served, path):
    r = _post(served.url, path, "[" * 100_000 + "]" * 100_000)  # used to be a RecursionError: 500
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


# --- 6. temperatures near 0 ---------------------------------------------------------------


def test_tiny_temperatures_are_greedy(served):
    body = {"model": MODEL, "prompt": "The king", "max_tokens": 8}
    want = _post(served.url, "/v1/completions", {**body, "temperature": 0}).json()["choices"][0]["text"]
    for t in (1e-38, 1e-45, 5e-324):  # used to give <unk> (" ⁇ ") at every step
        r = _post(served.url, "/v1/completions", {**body, "temperature": t, "seed": 1})
        assert r.json()["choices"][0]["text"] == want, t


# --- 3. stop strings ----------------------------------------------------------------------


def test_stop_strings_are_capped(served):
    for stop in (["x" * 1001], ["x"] * 17):
        r = _post(served.url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2, "stop": stop})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    # The attack: 16 stop strings of 250k characters (4 MB, just under the body limit).
    t0 = time.perf_counter()
    r = _post(served.url, "/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["ab" * 125_000] * 16})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    assert len(r.text) < 1000 and time.perf_counter() - t0 < 5


def test_stop_strings_at_the_cap_do_not_stall_other_requests(served):
    body = {"model": MODEL, "prompt": "The king", "max_tokens": 8, "temperature": 0}
    alone = []
    for _ in range(3):
        t0 = time.perf_counter()
        assert _post(served.url, "/v1/completions", body).status_code == 200
        alone.append(time.perf_counter() - t0)
    # 16 stop strings of 1,000 characters that the text keeps almost matching.
    stop = [("the " * 250)[:999] + chr(0x4E00 + i) for i in range(16)]
    heavy = {"model": MODEL, "prompt": "the the the", "max_tokens": 60, "temperature": 0.9, "seed": 1, "stop": stop}
    with ThreadPoolExecutor(4) as pool:
        attacks = [pool.submit(_post, served.url, "/v1/completions", heavy) for _ in range(4)]
        time.sleep(0.2)
        t0 = time.perf_counter()
        assert _post(served.url, "/v1/completions", body).status_code == 200
        beside = time.perf_counter() - t0
        assert all(a.result().status_code == 200 for a in attacks)
    assert beside < 5 * min(alone) + 1.0, (beside, alone)  # was 0.26 s -> 13.7 s


# --- 4. abandoned non-streaming requests give their slots back ----------------------------


def test_abandoned_non_streaming_requests_free_their_slots(tiny_model_dir):
    with running_server(tiny_model_dir, max_batch=1, delay=0.04) as s:
        payload = json.dumps({"model": MODEL, "prompt": "The king", "max_tokens": 200, "temperature": 0}).encode()
        socks = []
        for _ in range(8):
            c = _connect(s.port)
            c.sendall(_head("/v1/completions", len(payload)) + payload)
            socks.append(c)
        deadline = time.monotonic() + 10
        while not (s.engine.active == 1 and s.engine.queue_length == 7):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.3)  # the running one is generating: an event every step, never a quiet 0.5 s
        for c in socks:
            c.close()
        t0 = time.monotonic()
        while s.engine.active or s.engine.queue_length:
            # Used to hold the slot until max_tokens: 200 steps of 40 ms, for each of the eight.
            assert time.monotonic() - t0 < 2, "slot not freed after the client went away"
            time.sleep(0.02)
        assert s.engine.metrics.generation_tokens < 100
        t0 = time.perf_counter()
        r = _post(s.url, "/v1/completions", {"model": MODEL, "prompt": "The king", "max_tokens": 8})
        assert r.status_code == 200 and time.perf_counter() - t0 < 3  # was 5.19 s in the issue
        assert s.engine.metrics.http[("completions", 499)] == 8


# --- 5. bodies, prompts, connections ------------------------------------------------------


def test_a_body_over_the_limit_is_413_before_it_is_read(served):
    c = _connect(served.port)
    c.sendall(_head("/v1/completions", 20 * 1024 * 1024))  # announces 20 MB, sends none of it
    status, body = _read_response(c)
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    assert _closed_by_server(c, 5)
    c.close()


def test_a_chunked_body_over_the_limit_is_413(tiny_model_dir):
    with running_server(tiny_model_dir, max_batch=1, limits=SMALL) as s:
        c = _connect(s.port)
        c.sendall(_head("/v1/completions", chunked=True))
        for _ in range(2):  # 80 KB, without the final chunk: only the count can stop it
            c.sendall(b"%x\r\n" % 40_000 + b"x" * 40_000 + b"\r\n")
        status, _ = _read_response(c)
        assert status == 413 and _closed_by_server(c, 5)
        c.close()
        assert s.engine.metrics.http[("completions", 413)] == 1


def test_a_slow_body_is_408_and_half_open_connections_are_closed(tiny_model_dir):
    with running_server(tiny_model_dir, max_batch=1, limits=SMALL) as s:
        slow = _connect(s.port)
        slow.sendall(_head("/v1/completions", 100) + b'{"model": ')
        idle = _connect(s.port)  # sends nothing
        partial = _connect(s.port)
        partial.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # headers never end
        t0 = time.monotonic()
        status, body = _read_response(slow)
        assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
        assert _closed_by_server(idle, 5) and _closed_by_server(partial, 5)
        assert time.monotonic() - t0 < 5  # used to stay open indefinitely (40 s in the issue)
        for c in (slow, idle, partial):
            c.close()


def test_an_idle_kept_alive_connection_outlives_the_header_timeout(tiny_model_dir):
    # Between requests the keep-alive timeout applies (uvicorn's 5 s), not the header timeout.
    with running_server(tiny_model_dir, max_batch=1, limits=SMALL) as s:
        c = _connect(s.port)
        for _ in range(2):
            c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(c)[0] == 200
            time.sleep(1.0)
        c.close()


def test_long_prompts_are_refused_by_length_and_encoding_runs_off_the_event_loop(served, monkeypatch):
    calls = []
    encode = served.tokenizer.encode

    def spy(text, *args, **kwargs):
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        calls.append((len(text), on_loop))
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(served.tokenizer, "encode", spy)
    for path, body in [("/v1/completions", {"prompt": "word " * 200_000}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 200_000}]})]:
        r = _post(served.url, path, {"model": MODEL, **body})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "context window" in r.json()["error"]["message"]
    assert calls == []  # refused by its length: a megabyte of text is never tokenised
    assert _post(served.url, "/v1/completions", {"model": MODEL, "prompt": "The king", "max_tokens": 2}).status_code \
        == 200
    assert calls == [(len("The king"), False)]


def test_limits_are_checked():
    for bad in (dict(max_body_bytes=0), dict(header_timeout=0), dict(body_timeout=float("inf"))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Limits(**bad)


# --- all at once: the server keeps answering ------------------------------------------------


def test_the_server_keeps_answering_other_clients_under_attack(tiny_model_dir, capfd):
    limits = Limits(max_body_bytes=256 * 1024, header_timeout=1.0, body_timeout=1.0)
    with running_server(tiny_model_dir, max_batch=4, limits=limits) as s:
        normal = {"model": MODEL, "prompt": "The king", "max_tokens": 8, "temperature": 0}
        ref = _post(s.url, "/v1/completions", {**normal, "max_tokens": 40}).json()["choices"][0]["text"]
        stop_attack = {"model": MODEL, "prompt": "the the", "max_tokens": 40, "temperature": 0.9,
                       "stop": [("the " * 250)[:999] + chr(0x4E00 + i) for i in range(16)]}
        bad_bodies = ['{"model": "tiny", "prompt": "x", "seed": 18446744073709551616}',
                      '{"model": "tiny", "prompt": "x", "temperature": 1' + "0" * 400 + "}",
                      '{"model": "tiny", "prompt": "x", "seed": 1' + "0" * 5000 + "}",
                      "[" * 100_000, json.dumps({"model": MODEL, "prompt": "word " * 40_000})]
        held, stop_flag = [], threading.Event()
        streamed: list[str] = []

        def neighbour():  # a streaming client that must be served to the end, as if alone
            body = {**normal, "max_tokens": 40, "stream": True}
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        streamed.append(json.loads(line[6:])["choices"][0]["text"])

        def half_open(n):
            for i in range(n):
                c = _connect(s.port)
                c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"")
                held.append(c)

        def slow_bodies(n):
            for _ in range(n):
                c = _connect(s.port)
                c.sendall(_head("/v1/completions", 1000) + b'{"model"')
                held.append(c)

        def big_body():
            c = _connect(s.port)
            try:
                c.sendall(_head("/v1/completions", 20 * 1024 * 1024) + b"x" * (4 * 1024 * 1024))
            except OSError:
                pass  # the server answered 413 and closed while we were still sending
            c.close()

        def abandoned():
            c = _connect(s.port)
            payload = json.dumps({**normal, "max_tokens": 200}).encode()
            c.sendall(_head("/v1/completions", len(payload)) + payload)
            time.sleep(0.3)
            c.close()

        def attack():
            with ThreadPoolExecutor(8) as pool:
                jobs = [pool.submit(half_open, 100), pool.submit(slow_bodies, 20), pool.submit(big_body),
                        pool.submit(abandoned), pool.submit(abandoned)]
                jobs += [pool.submit(_post, s.url, "/v1/completions", stop_attack) for _ in range(3)]
                jobs += [pool.submit(_post, s.url, "/v1/completions", b) for b in bad_bodies]
                for j in jobs:
                    r = j.result()
                    assert r is None or r.status_code < 500, r.text
            stop_flag.set()

        threads = [threading.Thread(target=neighbour), threading.Thread(target=attack)]
        for t in threads:
            t.start()
        latencies = []
        try:
            for _ in range(6):
                t0 = time.perf_counter()
                assert httpx.get(s.url + "/health", timeout=10).status_code == 200
                r = _post(s.url, "/v1/completions", normal, timeout=10)
                assert r.status_code == 200 and ref.startswith(r.json()["choices"][0]["text"])
                latencies.append(time.perf_counter() - t0)
        finally:
            for t in threads:
                t.join(60)
        assert stop_flag.is_set()
        assert max(latencies) < 5, latencies  # ~0.1 s alone on 2 CPU cores
        assert "".join(streamed) == ref  # the seed attack used to end it with an error
        # Every half-open connection is closed by the server within its timeouts.
        deadline = time.monotonic() + 5
        assert all(_closed_by_server(c, max(deadline - time.monotonic(), 0.01)) for c in held)
        for c in held:
            c.close()
        assert s.engine.active == 0
    assert "Traceback" not in capfd.readouterr().err


# --- fuzzing the HTTP schema: never a 5xx ---------------------------------------------------


@pytest.fixture(scope="module")
def stub_served(tiny_tokenizer):
    favourite = tiny_tokenizer.encode("the", bos=False)[-1]
    model = EosSoonModel(tiny_tokenizer.vocab_size, tiny_tokenizer.eos_id, favourite)
    with serving(model, tiny_tokenizer, max_batch=4, limits=SMALL) as s:
        with httpx.Client(base_url=s.url, timeout=30) as client:
            s.client = client
            yield s


def _never_5xx(s, path: str, body) -> None:
    r = s.client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (body, r.text)
    if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text, r.text
    else:
        r.json()


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(body=completion_bodies | json_values)
def test_fuzz_completions_never_5xx(stub_served, body):
    _never_5xx(stub_served, "/v1/completions", body)


@FUZZ
@given(body=chat_bodies | json_values)
def test_fuzz_chat_completions_never_5xx(stub_served, body):
    _never_5xx(stub_served, "/v1/chat/completions", body)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200), path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzz_raw_bodies_never_5xx(stub_served, raw, path):
    r = stub_served.client.post(path, content=raw)
    assert r.status_code < 500 and "error" in r.json()
