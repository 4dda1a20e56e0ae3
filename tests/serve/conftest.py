"""A real server on 127.0.0.1 (a free port), in a background thread of the test process."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest

MODEL = "tiny"


class SlowModel:
    """Delays every forward pass: makes a short generation last long enough to interrupt."""

    def __init__(self, model, delay: float):
        self.model, self.delay = model, delay

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.model(*args, **kwargs)


@contextmanager
def running_server(model_dir, max_batch: int = 4, max_queue: int = 64, delay: float = 0.0,
                   shutdown_timeout: float = 10.0, limits=None, chat_template=None, wrap=None, engine_kw=None,
                   **server_kw):
    """`wrap(model)` stands in for the model directory's model (e.g. to steer or record it);
    `server_kw` go to make_server (api_key, request_timeout), `engine_kw` to the Engine (prefix_cache, ...)."""
    from llamaworks.inference.load import load_model

    model, tokenizer = load_model(model_dir)  # a model of its own: the engine owns its KV cache
    model.eval()
    if wrap is not None:
        model = wrap(model)
    with serving(SlowModel(model, delay) if delay else model, tokenizer, max_batch, max_queue, shutdown_timeout,
                 limits, chat_template, engine_kw, **server_kw) as handle:
        yield handle


@contextmanager
def serving(model, tokenizer, max_batch: int = 4, max_queue: int = 64, shutdown_timeout: float = 10.0, limits=None,
            chat_template=None, engine_kw=None, **server_kw):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from llamaworks.serve.command import make_server
    from llamaworks.serve.engine import Engine

    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, **(engine_kw or {}))
    server, sock = make_server(engine, MODEL, "127.0.0.1", 0, shutdown_timeout=shutdown_timeout, limits=limits,
                               chat_template=chat_template, **server_kw)
    engine.start()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    handle = type("Served", (), {})()
    handle.port = sock.getsockname()[1]
    handle.url = f"http://127.0.0.1:{handle.port}"
    handle.engine, handle.server, handle.thread, handle.tokenizer = engine, server, thread, tokenizer
    try:
        yield handle
    finally:
        server.should_exit = True
        thread.join(30)
        engine.stop(cancel=True, timeout=30)
        sock.close()


class EosSoonModel:
    """A stand-in model for fuzzing the HTTP layer: no weights, microseconds a step. It favours
    one token, and eos at every fourth position, so most requests end after a few tokens
    whatever their sampling options."""

    def __init__(self, vocab_size: int, eos_id: int, favourite: int, context: int = 256):
        import torch

        self.args = type("Args", (), {"max_seq_len": context})()
        self.output = type("Output", (), {"weight": torch.zeros(1)})()
        self.vocab_size, self.eos_id, self.favourite = vocab_size, eos_id, favourite

    def setup_caches(self, max_batch: int, max_seq_len: int) -> None:
        pass

    def __call__(self, tokens, pos=None, rows=None):
        import torch

        bsz, n = tokens.shape
        if pos is None:
            pos = torch.arange(n).expand(bsz, n)
        logits = torch.zeros(bsz, n, self.vocab_size)
        logits[..., self.favourite] = 20.0
        logits[..., self.eos_id] = torch.where(pos % 4 == 3, 25.0, 0.0)
        return logits


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    with running_server(tiny_model_dir, max_batch=4, max_queue=64) as s:
        yield s


@pytest.fixture()
def client(served):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60)
