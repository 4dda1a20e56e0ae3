"""`llamaworks serve` as a user runs it: a subprocess on a free port, stopped by SIGINT."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")


@pytest.mark.slow
def test_serve_command_end_to_end(tiny_model_dir, tiny_model, tiny_tokenizer):
    from llamaworks.inference.generate import generate

    cmd = [sys.executable, "-m", "llamaworks", "serve", "--checkpoint", str(tiny_model_dir), "--port", "0",
           "--max-batch", "2", "--max-queue", "4", "--model-name", "tiny-cli", "--device", "cpu",
           "--kv-cache-gb", "0.01", "--prefill-chunk", "3", "--no-prefix-cache"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None:
            assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
            m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", proc.stderr.readline())
            url = m and m.group(1)
        while True:  # the port is bound before uvicorn's loop starts
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny-cli"]
        metrics = httpx.get(url + "/metrics", timeout=5).text  # the engine's stats, as the flags set them
        assert re.search(r"^llamaworks_engine_kv_blocks_total \d+", metrics, re.M)
        assert re.search(r"^llamaworks_engine_kv_block_size 16", metrics, re.M)
        ref = generate(tiny_model, tiny_tokenizer, "The king", 30, temperature=0)[0]
        body = {"model": "tiny-cli", "prompt": "The king", "max_tokens": 30, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = (ln for ln in r.iter_lines() if ln)
            first = next(lines)
            proc.send_signal(signal.SIGINT)  # graceful: the stream in flight still completes
            events = [first, *lines]
        assert events[-1] == "data: [DONE]"
        text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
        assert text == ref.text
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_compile_by_default_only_for_quantised_models(tiny_model):
    import copy

    from llamaworks.inference.quant import quantize_model
    from llamaworks.serve.command import default_compile

    assert default_compile(tiny_model) is False
    assert default_compile(quantize_model(copy.deepcopy(tiny_model), "int8")) is True
    assert default_compile(quantize_model(copy.deepcopy(tiny_model), "int4", 32)) is True
