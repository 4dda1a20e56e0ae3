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
                   shutdown_timeout: float = 10.0):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from llamaworks.inference.load import load_model
    from llamaworks.serve.command import make_server
    from llamaworks.serve.engine import Engine

    model, tokenizer = load_model(model_dir)  # a model of its own: the engine owns its KV cache
    model.eval()
    engine = Engine(SlowModel(model, delay) if delay else model, tokenizer, max_batch=max_batch, max_queue=max_queue)
    server, sock = make_server(engine, MODEL, "127.0.0.1", 0, shutdown_timeout=shutdown_timeout)
    engine.start()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    handle = type("Served", (), {})()
    handle.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    handle.engine, handle.server, handle.thread, handle.tokenizer = engine, server, thread, tokenizer
    try:
        yield handle
    finally:
        server.should_exit = True
        thread.join(30)
        engine.stop(cancel=True, timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    with running_server(tiny_model_dir, max_batch=4, max_queue=64) as s:
        yield s


@pytest.fixture()
def client(served):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60)
