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


def _start_server(args: list[str]) -> tuple[subprocess.Popen, str]:
    """`llamaworks serve ARGS --port 0 --device cpu` in a subprocess; returns it and its base URL once /health
    answers (the port is bound before uvicorn's loop starts)."""
    cmd = [sys.executable, "-m", "llamaworks", "serve", *args, "--port", "0", "--device", "cpu"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None:
            assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
            m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", proc.stderr.readline())
            url = m and m.group(1)
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


@pytest.mark.slow
def test_serve_command_end_to_end(tiny_model_dir, tiny_model, tiny_tokenizer):
    from llamaworks.inference.generate import generate

    cmd = ["--checkpoint", str(tiny_model_dir), "--max-batch", "2", "--max-queue", "4", "--model-name", "tiny-cli",
           "--kv-cache-gb", "0.01", "--prefill-chunk", "3", "--no-prefix-cache"]
    proc, url = _start_server(cmd)
    try:
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


def test_set_up_runs_in_threads_that_end_before_serving(tiny_model_dir, monkeypatch):
    """The model is loaded and the engine built in threads that exit, so that the engine's thread
    holds the process's only OpenMP team (inference/threads.py: a second one throttles both)."""
    import threading

    import llamaworks.serve.command as command

    seen = {}
    real_load, real_engine = command.load_model, command.Engine

    def load(*args, **kwargs):
        seen["load"] = threading.current_thread()
        return real_load(*args, **kwargs)

    def engine(*args, **kwargs):
        seen["engine"] = threading.current_thread()
        return real_engine(*args, **kwargs)

    monkeypatch.setattr(command, "load_model", load)
    monkeypatch.setattr(command, "Engine", engine)
    monkeypatch.setattr(command, "_serve", lambda eng, *args: seen.setdefault("served", eng))
    assert command.serve_command(str(tiny_model_dir), device="cpu", kv_cache_gb=0.01) == 0
    assert isinstance(seen["served"], real_engine)
    for step in ("load", "engine"):
        assert seen[step] is not threading.main_thread() and not seen[step].is_alive(), step


def test_compile_by_default_only_for_quantised_models(tiny_model):
    import copy

    from llamaworks.inference.quant import quantize_model
    from llamaworks.serve.command import default_compile

    assert default_compile(tiny_model) is False
    assert default_compile(quantize_model(copy.deepcopy(tiny_model), "int8")) is True
    assert default_compile(quantize_model(copy.deepcopy(tiny_model), "int4", 32)) is True


@pytest.mark.slow
def test_serve_with_an_adapter_answers_as_the_merged_model(tiny_model_dir, tmp_path):
    """`serve --adapter DIR` applies the adapter unmerged: greedy completions equal `generate` on the
    model that `merge` writes, and differ from the base model's (the adapter moves the logits)."""
    import torch

    from llamaworks.inference.command import merge_command
    from llamaworks.inference.generate import generate
    from llamaworks.inference.load import load_model
    from llamaworks.inference.lora import LoraConfig, apply_lora, lora_parameters, save_adapter

    model, _ = load_model(tiny_model_dir)
    lm = apply_lora(model, LoraConfig(r=4, alpha=8))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # adapters as after training: B != 0
        for p in lora_parameters(lm):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    adapter = save_adapter(lm, None, tmp_path / "adapter", base_model=str(tiny_model_dir))
    assert merge_command(str(tiny_model_dir), str(adapter), str(tmp_path / "merged")) == 0
    merged, tok = load_model(tmp_path / "merged")
    base, _ = load_model(tiny_model_dir)
    want = generate(merged, tok, "The king", 24, temperature=0)[0].text
    assert want != generate(base, tok, "The king", 24, temperature=0)[0].text
    proc, url = _start_server(["--checkpoint", str(tiny_model_dir), "--adapter", str(adapter),
                               "--model-name", "tiny-lora", "--max-batch", "2"])
    try:
        r = httpx.post(url + "/v1/completions", timeout=60, json={
            "model": "tiny-lora", "prompt": "The king", "max_tokens": 24, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
