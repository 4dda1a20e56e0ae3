"""Serving throughput: N concurrent streaming clients against `llamaworks serve`, and
against llama.cpp's server (llama-cpp-python's `llama_cpp.server`) on the same weights.

    .venv/bin/python benchmarks/serve.py --checkpoint DIR            # both servers, side by side
    .venv/bin/python benchmarks/serve.py --checkpoint DIR --no-llama-cpp
    .venv/bin/python benchmarks/serve.py --url http://127.0.0.1:8000 --model NAME   # any OpenAI server

Each client sends --requests streaming completions one after another (greedy, fixed
max_tokens, eos may end one early). Prints requests/s, generated tokens/s, and p50/p99
of request latency and time to first token per server; writes JSON (--output).

The llama.cpp side exports the checkpoint to GGUF (--gguf-dtype f32 by default, the
precision llamaworks serves on CPU) and starts `python -m llama_cpp.server` on it with
the same threads and context. It needs llama-cpp-python with its server extra
(pip install 'llama-cpp-python[server]'); without it that side is skipped with a note.
llama-cpp-python's server runs one request at a time (no continuous batching): the other
clients queue, which is what this comparison shows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPTS = ["The king", "Once upon a time", "To be, or not to be", "My lord, the queen", "O fair lady of the night",
           "Speak, and", "The sword", "Good morrow"]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs)) - 1))] if xs else float("nan")


def start_llamaworks(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "llamaworks", "serve", "--checkpoint", args.checkpoint, "--port", "0",
           "--max-batch", str(args.max_batch), "--max-queue", str(max(64, args.clients)), "--model-name", args.model]
    if args.compile is not None:
        cmd.append("--compile" if args.compile else "--no-compile")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        m = re.search(r"on (http://[^ ]+?)/v1", proc.stderr.readline())
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, m.group(1)
    proc.kill()
    raise SystemExit("the llamaworks server did not start")


def llama_cpp_missing() -> str | None:
    """Why the llama.cpp server cannot run here, or None."""
    try:
        import llama_cpp.server.app  # noqa: F401 - imports the server extra's dependencies too
    except ImportError as e:
        return (f"llama-cpp-python's server is not importable ({e}); install it with "
                "pip install 'llama-cpp-python[server]' to compare")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_cpp(args, folder: Path) -> tuple[subprocess.Popen, str]:
    """Export the checkpoint to GGUF in `folder` and start llama_cpp.server on it."""
    import torch

    from llamaworks.convert.formats import save_checkpoint
    from llamaworks.inference.load import load_model

    model, tok = load_model(args.checkpoint)
    gguf = save_checkpoint("gguf", model, tok, folder / f"model-{args.gguf_dtype}.gguf",
                           dtype=torch.float32 if args.gguf_dtype == "f32" else torch.float16)
    context = model.args.max_seq_len
    del model
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", args.model,
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(context),
           "--n_threads", str(args.threads or os.cpu_count()), "--interrupt_requests", "False", "--verbose", "False"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server at {url} exited with status {proc.returncode}")
        try:
            httpx.get(url + "/v1/models", timeout=5).raise_for_status()
            return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise SystemExit(f"the server at {url} did not answer within {timeout:.0f} s")


def one_request(client, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if "error" in msg:
                raise RuntimeError(msg["error"]["message"])
            if msg.get("choices") and msg["choices"][0].get("text"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
            if msg.get("usage"):
                usage = msg["usage"]["completion_tokens"]
    # A server without stream usage (llama-cpp-python) sends one chunk per token.
    return time.perf_counter() - t0, ttft or float("nan"), chunks if usage is None else usage


def run_load(url: str, args) -> dict:
    """All clients against one server; the figures of one column of the table."""
    import httpx

    with httpx.Client(base_url=url, timeout=600) as warm:
        one_request(warm, args.model, PROMPTS[0], 4)  # warm-up (and compilation)
    latencies, ttfts, tokens, errors = [], [], [], []
    lock = threading.Lock()

    def client_loop(k: int):
        with httpx.Client(base_url=url, timeout=600) as c:
            for j in range(args.requests):
                try:
                    lat, ttft, n = one_request(c, args.model, PROMPTS[(k + j) % len(PROMPTS)], args.max_tokens)
                    with lock:
                        latencies.append(lat), ttfts.append(ttft), tokens.append(n)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(repr(e))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(client_loop, range(args.clients)))
    wall = time.perf_counter() - t0
    if errors:
        print(f"{url}: first errors: {errors[:3]}", file=sys.stderr)
    return {"url": url, "requests": len(latencies), "errors": len(errors), "wall_s": wall,
            "requests_per_s": len(latencies) / wall, "tokens_per_s": sum(tokens) / wall,
            "latency_p50_s": statistics.median(latencies) if latencies else float("nan"),
            "latency_p99_s": percentile(latencies, 99),
            "ttft_p50_s": statistics.median(ttfts) if ttfts else float("nan"), "ttft_p99_s": percentile(ttfts, 99)}


def serve_and_load(name: str, start, args) -> dict | None:
    proc, url = start()
    try:
        wait_ready(url, proc)
        return {"server": name, **run_load(url, args)}
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def print_table(results: list[dict], args) -> None:
    print(f"\n{args.clients} concurrent streaming clients x {args.requests} requests, max_tokens {args.max_tokens}, "
          f"greedy")
    rows = [("requests/s", "requests_per_s", "{:.2f}"), ("tokens/s", "tokens_per_s", "{:.1f}"),
            ("latency p50 (s)", "latency_p50_s", "{:.3f}"), ("latency p99 (s)", "latency_p99_s", "{:.3f}"),
            ("first token p50 (s)", "ttft_p50_s", "{:.3f}"), ("first token p99 (s)", "ttft_p99_s", "{:.3f}"),
            ("requests done", "requests", "{}"), ("errors", "errors", "{}")]
    print(f"{'':<22}" + "".join(f"{r['server']:>20}" for r in results))
    for label, key, fmt in rows:
        print(f"{label:<22}" + "".join(f"{fmt.format(r[key]):>20}" for r in results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="model directory: start `llamaworks serve` (and llama.cpp's server) on it")
    ap.add_argument("--url", help="an already running server instead")
    ap.add_argument("--model", default="bench", help="model name to request")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=8, help="slots, when this script starts the server")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="pass --compile/--no-compile to llamaworks serve (default: the server's default)")
    ap.add_argument("--llama-cpp", action=argparse.BooleanOptionalAction, default=True,
                    help="with --checkpoint, also serve its GGUF export with llama.cpp's server (when installed)")
    ap.add_argument("--gguf-dtype", choices=["f32", "f16"], default="f32")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    ap.add_argument("--output", default="benchmarks/results/serve.json")
    args = ap.parse_args()
    if not (args.checkpoint or args.url):
        ap.error("give --checkpoint DIR (start a server) or --url URL (use a running one)")

    results = []
    if args.url:
        results.append(serve_and_load(args.url, lambda: (None, args.url.rstrip("/")), args))
    else:
        results.append(serve_and_load("llamaworks", lambda: start_llamaworks(args), args))
    note = None
    if args.checkpoint and args.llama_cpp:
        from llamaworks.inference.quant import read_quantization

        note = llama_cpp_missing()
        if note is None and read_quantization(args.checkpoint) is not None:
            note = "the checkpoint is quantised; GGUF export needs float weights (give the original model)"
        if note is None:
            with tempfile.TemporaryDirectory(prefix="serve_bench_") as tmp:
                results.append(serve_and_load(f"llama.cpp {args.gguf_dtype}",
                                              lambda: start_llama_cpp(args, Path(tmp)), args))
        else:
            print(f"(llama.cpp server skipped: {note})")
    print_table(results, args)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "clients": args.clients, "requests_per_client": args.requests,
                               "max_tokens": args.max_tokens, "machine": platform.processor() or platform.machine(),
                               "cpu_count": os.cpu_count(), "llama_cpp_note": note, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
