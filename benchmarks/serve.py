"""Serving throughput: N concurrent streaming clients against `llamaworks serve`.

    .venv/bin/python benchmarks/serve.py --checkpoint DIR            # starts the server itself
    .venv/bin/python benchmarks/serve.py --url http://127.0.0.1:8000 --model NAME   # any OpenAI server
                                                                     # (llama.cpp's llama-server too)

Each client sends --requests streaming completions one after another (greedy, fixed
max_tokens, eos may end one early). Prints requests/s, generated tokens/s, and p50/p99
of request latency and time to first token; writes JSON (--output).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPTS = ["The king", "Once upon a time", "To be, or not to be", "My lord, the queen", "O fair lady of the night",
           "Speak, and", "The sword", "Good morrow"]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs)) - 1))] if xs else float("nan")


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "llamaworks", "serve", "--checkpoint", args.checkpoint, "--port", "0",
           "--max-batch", str(args.max_batch), "--max-queue", str(max(64, args.clients)), "--model-name", args.model]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        m = re.search(r"on (http://[^ ]+?)/v1", proc.stderr.readline())
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, m.group(1)
    proc.kill()
    raise SystemExit("the server did not start")


def one_request(client, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if "error" in msg:
                raise RuntimeError(msg["error"]["message"])
            if msg.get("choices") and ttft is None:
                ttft = time.perf_counter() - t0
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
    return time.perf_counter() - t0, ttft or float("nan"), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="model directory: start `llamaworks serve` on it")
    ap.add_argument("--url", help="an already running server instead")
    ap.add_argument("--model", default="bench", help="model name to request")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=8, help="slots, when this script starts the server")
    ap.add_argument("--output", default="benchmarks/results/serve.json")
    args = ap.parse_args()
    if not (args.checkpoint or args.url):
        ap.error("give --checkpoint DIR (start a server) or --url URL (use a running one)")
    import httpx

    proc = None
    url = args.url
    if args.checkpoint:
        proc, url = start_server(args)
    try:
        with httpx.Client(base_url=url, timeout=600) as warm:
            while True:
                try:
                    warm.get("/v1/models").raise_for_status()
                    break
                except httpx.TransportError:
                    time.sleep(0.2)
            one_request(warm, args.model, PROMPTS[0], 4)  # warm-up
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
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    result = {
        "url": url, "model": args.model, "clients": args.clients, "requests": len(latencies), "errors": len(errors),
        "max_tokens": args.max_tokens, "wall_s": wall, "requests_per_s": len(latencies) / wall,
        "tokens_per_s": sum(tokens) / wall, "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_p99_s": percentile(latencies, 99), "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
        "ttft_p99_s": percentile(ttfts, 99), "machine": platform.processor() or platform.machine(),
    }
    print(f"{args.clients} clients x {args.requests} requests, max_tokens {args.max_tokens}: "
          f"{result['requests_per_s']:.2f} requests/s, {result['tokens_per_s']:.1f} tokens/s, latency p50 "
          f"{result['latency_p50_s']:.3f}s p99 {result['latency_p99_s']:.3f}s, first token p50 "
          f"{result['ttft_p50_s']:.3f}s p99 {result['ttft_p99_s']:.3f}s, {len(errors)} errors")
    if errors:
        print("first errors:", errors[:3], file=sys.stderr)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
