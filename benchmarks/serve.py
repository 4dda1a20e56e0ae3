"""Serving: `llamaworks serve` against llama.cpp's own `llama-server` (continuous batching,
--parallel 8) on the same weights, same context, same threads, same requests, same run (issue 18).

    .venv/bin/python benchmarks/serve.py --build-llama-server        # once: builds llama-server (minutes)
    .venv/bin/python benchmarks/serve.py --checkpoint DIR             # both servers, both workloads
    .venv/bin/python benchmarks/serve.py --random small                # random weights of a preset
    .venv/bin/python benchmarks/serve.py --smoke                       # a tiny model, a few requests, ours only
    .venv/bin/python benchmarks/serve.py --url http://127.0.0.1:8000 --model NAME   # any running server

Workloads (closed loop: each of --users clients sends --requests streaming completions one
after another, greedy, exactly --max-tokens new tokens: eos is biased away with logit_bias -100):
  chat   a shared ~1k-token system prompt (--system-tokens) and a different ~64-token user turn
         per request: what prefix caching is for;
  mixed  short ~128-token prompts, every --long-every'th request a distinct 2k-token one
         (--long-tokens): what chunked prefill is for.
Prompts are token ids (the checkpoint's tokenizer on the Shakespeare corpus of ../shared, BOS
first), sent as ids to both servers, so both process exactly the same tokens. Reported per
server and workload: requests/s, generated tokens/s, time to first token (TTFT) and time
between tokens (TBT: gaps between streamed chunks, one token each on both servers) p50/p99,
request latency p50/p99; then our figures over llama-server's. JSON: benchmarks/results/serve.json
(the machine recorded: benchmarks/machine.py; --label "quiet machine" for figures to quote).

llama-server: built from the llama.cpp sources vendored in the llama-cpp-python sdist of the
installed version (pip download --no-binary :all:), cmake -DLLAMA_CURL=OFF, target llama-server
(and llama-batched-bench, which benchmarks/decode.py uses), cached under
~/.cache/llamaworks/llama-server/build-<version>/bin. --build-llama-server does that; $LLAMA_SERVER
or a llama-server on PATH are used first. It serves the checkpoint's GGUF export (--dtype below)
with -c = --parallel x the context our server gets per sequence, --parallel = our --max-batch,
-t/-tb = the same threads; without the binary that side is skipped with a note saying how to
build it.

Precision (--dtype): both servers run the same precision class from the same weights. fp32 (the
default): ours in float32 (what `serve` loads on CPU), llama-server on an f32 GGUF. bf16: ours
`serve --dtype bfloat16`, llama-server on an f16 GGUF (llama.cpp's usual 16-bit export; the
weights of a bf16 model fit f16's range). --gguf-dtype overrides llama-server's side. The JSON
records both ("dtype", "llamaworks_dtype", "gguf_dtype").

The engine before issue 18 ("the current engine" of its TTFT target): --before COMMIT (default
3a16adf, the last commit whose engine has the static max_batch x context cache, no prefix
caching, each prompt prefilled whole; the commit benchmarks/prefix_ttft.py's "before" row runs
too) adds a third column: `llamaworks serve` from that commit's src/ (git archive into the
temporary folder, first on PYTHONPATH), same checkpoint, options and requests, without
--llamaworks-args (its CLI predates them). It refuses logit_bias, so its requests may end at
eos early (TTFT is unaffected: it is the first token). --before none skips it (--smoke: off).
The JSON's "targets" block holds the issue's figures: tokens/s and p99 TBT over llama-server's
per workload (target >= 1.5x and >= 1x) and the chat workload's TTFT p50/p99, the before
engine's over ours (target >= 3x).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from machine import add_label_argument, loadavg, machine_record  # benchmarks/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "corpora" / "shakespeare"
CACHE = Path(os.environ.get("LLAMAWORKS_CACHE", Path.home() / ".cache" / "llamaworks")) / "llama-server"
BEFORE = "3a16adf"  # the last commit whose engine has the static slot cache (benchmarks/prefix_ttft.py's too)
# --dtype: ours (`serve --dtype`) and llama-server's GGUF export (--gguf-dtype's default) per precision class.
OUR_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
GGUF_DTYPES = {"fp32": "f32", "bf16": "f16"}
EOS_BIAS = -100.0  # logit_bias on eos: every request generates exactly max_tokens tokens on both servers


# --- llama-server: found, or built once from llama-cpp-python's vendored llama.cpp -------------------

def llama_cpp_python_version() -> str | None:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None


def build_dir(version: str) -> Path:
    return CACHE / f"build-{version}"


def find_llama_server(tool: str = "llama-server") -> Path | None:
    """$LLAMA_SERVER (or the `tool` beside it), else the cached build for the installed
    llama-cpp-python, else PATH's."""
    if os.environ.get("LLAMA_SERVER"):
        path = Path(os.environ["LLAMA_SERVER"])
        return path if tool == "llama-server" else (path.parent / tool if (path.parent / tool).is_file() else None)
    version = llama_cpp_python_version()
    if version and (build_dir(version) / "bin" / tool).is_file():
        return build_dir(version) / "bin" / tool
    found = shutil.which(tool)
    return Path(found) if found else None


def build_llama_server(jobs: int | None = None) -> Path:
    """Download llama-cpp-python's sdist (the installed version), build llama-server and
    llama-batched-bench from the llama.cpp it vendors; returns llama-server's path."""
    version = llama_cpp_python_version()
    if version is None:
        raise SystemExit("llama-cpp-python is not installed: its version picks the llama.cpp sources (./dev.sh extras)")
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             f"llama-cpp-python=={version}", "-d", str(CACHE)])
    src = CACHE / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not src.is_dir():
        with tarfile.open(sdist) as tar:
            tar.extractall(CACHE, filter="data")
    out = build_dir(version)
    # Static, no network at build or run time (no curl, no OpenSSL, no web UI download), tuned
    # for this CPU as llama-cpp-python's own build is (GGML_NATIVE).
    run(["cmake", "-S", str(src), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
         "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF",
         "-DLLAMA_BUILD_EXAMPLES=OFF", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF"]
        + (["-G", "Ninja"] if shutil.which("ninja") else []))
    run(["cmake", "--build", str(out), "--target", "llama-server", "llama-batched-bench",
         "-j", str(jobs or os.cpu_count() or 1)])
    print(f"built {out / 'bin' / 'llama-server'}")
    return out / "bin" / "llama-server"


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def how_to_build() -> str:
    return ("llama-server not found: build it once with `.venv/bin/python benchmarks/serve.py --build-llama-server` "
            "(minutes; needs cmake and a C++ compiler), or point $LLAMA_SERVER at a binary")


# --- the requests -------------------------------------------------------------------------------

def token_pool(tokenizer, n: int, vocab_size: int, seed: int = 0) -> list[int]:
    """At least n token ids: the Shakespeare corpus through the tokenizer, else random ids."""
    ids: list[int] = []
    if tokenizer is not None and SHAKESPEARE.is_dir():
        for f in sorted(SHAKESPEARE.glob("*.txt")):
            ids += tokenizer.encode(f.read_text(encoding="utf-8", errors="replace"), bos=False, eos=False)
            if len(ids) >= n:
                return ids
    rng = random.Random(seed)
    low = min(3 + 256, vocab_size // 2)  # past the special and byte pieces
    return ids + [rng.randrange(low, vocab_size) for _ in range(n - len(ids))]


def workloads(a, pool: list[int], bos: int) -> dict[str, list[list[list[int]]]]:
    """Per workload, per user, the prompts (token ids) that user sends in turn."""
    cursor = [0]

    def take(k: int) -> list[int]:
        start = cursor[0] % max(1, len(pool) - k)
        cursor[0] += k
        return pool[start:start + k]

    system = take(a.system_tokens)
    chat = [[[bos] + system + take(a.user_tokens) for _ in range(a.requests)] for _ in range(a.users)]
    mixed = [[[bos] + take(a.long_tokens if (u * a.requests + j) % a.long_every == 0 else a.short_tokens)
              for j in range(a.requests)] for u in range(a.users)]
    return {"chat": chat, "mixed": mixed}


# --- one server under load ----------------------------------------------------------------------

def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (NaN for no data)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs)) - 1))] if xs else float("nan")


def one_request(client, model: str, prompt: list[int], max_tokens: int, bias: dict | None) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if bias:
        body["logit_bias"] = bias
    t0 = time.perf_counter()
    stamps, usage = [], None
    with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if "error" in msg:
                raise RuntimeError(msg["error"].get("message", msg["error"]))
            choice = (msg.get("choices") or [{}])[0]
            if choice.get("text") or (choice.get("text") is not None and not choice.get("finish_reason")):
                stamps.append(time.perf_counter())  # a token (a chunk that only ends the stream is not one)
            if msg.get("usage"):
                usage = msg["usage"].get("completion_tokens")
    end = time.perf_counter()
    return {"latency": end - t0, "ttft": (stamps[0] - t0) if stamps else float("nan"),
            "gaps": [b - a for a, b in zip(stamps, stamps[1:])], "chunks": len(stamps),
            "tokens": usage if usage is not None else len(stamps), "prompt_tokens": len(prompt)}


def run_workload(url: str, model: str, users: list[list[list[int]]], a, bias: dict | None) -> dict:
    """Every user's prompts in turn, all users at once; the figures of one column of the table."""
    import httpx

    done, errors = [], []
    lock = threading.Lock()

    def user(prompts: list[list[int]]) -> None:
        # A connection per request, on both servers: llama-server's HTTP library closes idle
        # keep-alive connections on its own schedule, and a request sent on one it just closed fails.
        with httpx.Client(base_url=url, timeout=a.request_timeout, headers={"Connection": "close"}) as c:
            for p in prompts:
                try:
                    r = one_request(c, model, p, a.max_tokens, bias)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(repr(e)[:300])
                    continue
                with lock:
                    done.append(r)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(users)) as pool:
        list(pool.map(user, users))
    wall = time.perf_counter() - t0
    if errors:
        print(f"{url}: {len(errors)} errors, the first: {errors[:2]}", file=sys.stderr)
    ttfts = [r["ttft"] for r in done]
    gaps = [g for r in done for g in r["gaps"]]
    lat = [r["latency"] for r in done]
    tokens = sum(r["tokens"] for r in done)
    return {"requests": len(done), "errors": len(errors), "first_errors": errors[:3], "wall_s": wall,
            "requests_per_s": len(done) / wall, "tokens_per_s": tokens / wall,
            "prompt_tokens_per_s": sum(r["prompt_tokens"] for r in done) / wall,
            "generated_tokens": tokens, "chunks_per_token": sum(r["chunks"] for r in done) / max(1, tokens),
            "ttft_p50_s": statistics.median(ttfts) if ttfts else float("nan"), "ttft_p99_s": percentile(ttfts, 99),
            "tbt_p50_s": statistics.median(gaps) if gaps else float("nan"), "tbt_p99_s": percentile(gaps, 99),
            "latency_p50_s": statistics.median(lat) if lat else float("nan"), "latency_p99_s": percentile(lat, 99)}


def wait_ready(url: str, proc: subprocess.Popen | None, log: Path | None, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.is_file() else ""
            raise SystemExit(f"the server at {url} exited with status {proc.returncode}\n{tail}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server at {url} did not answer within {timeout:.0f} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def source_at(commit: str, folder: Path) -> Path | None:
    """The src/ folder of `commit`, extracted under `folder` (git archive); None where git
    does not have the commit (a shallow clone, a source tree without .git)."""
    try:
        tar_bytes = subprocess.run(["git", "archive", "--format=tar", commit, "src"], cwd=ROOT,
                                   capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        tar.extractall(folder, filter="data")
    return folder / "src"


def start_llamaworks(a, checkpoint: Path, context: int, log: Path,
                     src: Path | None = None) -> tuple[subprocess.Popen, str]:
    """This checkout's server, or (src) the package in an older commit's src/ folder."""
    port = free_port()
    cmd = [sys.executable, "-m", "llamaworks", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
           "--max-batch", str(a.parallel), "--max-queue", str(max(64, a.users)), "--model-name", a.model,
           "--max-seq-len", str(context),
           # fp32 is serve's own default on CPU (and a quantised checkpoint keeps its layers): no flag
           *(["--dtype", OUR_DTYPES[a.dtype]] if a.dtype != "fp32" else []), *([] if src else a.llamaworks_args)]
    if a.compile is not None:
        cmd.append("--compile" if a.compile else "--no-compile")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    if src is not None:  # PYTHONPATH comes before the editable install's path entry
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])])
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}"


def start_llama_server(a, binary: Path, gguf: Path, context: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--alias", a.model,
           "-c", str(a.parallel * context), "--parallel", str(a.parallel), "--cont-batching",
           "-t", str(a.threads), "-tb", str(a.threads), "--no-webui", *a.llama_server_args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def measure_server(name: str, start, loads: dict, a, bias: dict | None, warm_prompt: list[int]) -> dict:
    """Start a server, warm it up (a prompt sharing nothing with the workloads), run every workload."""
    import httpx

    proc, url = start()
    try:
        wait_ready(url, proc, getattr(proc, "log", None))
        with httpx.Client(base_url=url, timeout=a.request_timeout) as c:
            try:
                one_request(c, a.model, warm_prompt, 4, bias)
            except RuntimeError as e:
                if bias and "logit_bias" in str(e):
                    print(f"({name} refuses logit_bias: eos is left on for it, so requests may end early)")
                    bias = None
                    one_request(c, a.model, warm_prompt, 4, bias)
                else:
                    raise
        out = {"server": name, "eos_biased_away": bias is not None}
        for wl, users in loads.items():
            print(f"{name}: {wl} workload ...", file=sys.stderr, flush=True)
            load = loadavg()
            out[wl] = run_workload(url, a.model, users, a, bias)
            out[wl]["loadavg_before_after"] = [load, loadavg()]  # other jobs during the run (it adds its own)
        return out
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


# --- the table ----------------------------------------------------------------------------------

ROWS = [("requests/s", "requests_per_s", "{:.2f}", True), ("tokens/s", "tokens_per_s", "{:.1f}", True),
        ("TTFT p50 (s)", "ttft_p50_s", "{:.3f}", False), ("TTFT p99 (s)", "ttft_p99_s", "{:.3f}", False),
        ("TBT p50 (ms)", "tbt_p50_s", "{:.1f}", False), ("TBT p99 (ms)", "tbt_p99_s", "{:.1f}", False),
        ("latency p50 (s)", "latency_p50_s", "{:.2f}", False), ("latency p99 (s)", "latency_p99_s", "{:.2f}", False),
        ("requests done", "requests", "{}", None), ("errors", "errors", "{}", None)]


def ratios(ours: dict, theirs: dict) -> dict:
    """Ours over theirs; for times, theirs over ours: above 1 is better for us in every row."""
    out = {}
    for _, key, _, higher_better in ROWS:
        if higher_better is None or not ours.get(key) or not theirs.get(key):
            continue
        out[key] = ours[key] / theirs[key] if higher_better else theirs[key] / ours[key]
    return out


def print_tables(results: list[dict], a, workload_info: dict) -> tuple[dict, dict]:
    """The tables; returns ours over llama-server's and ours over the before engine's ratios."""
    all_ratios, before_ratios = {}, {}
    for wl, info in workload_info.items():
        print(f"\n{wl}: {info}; {a.users} users x {a.requests} requests, {a.max_tokens} new tokens each, greedy, "
              f"{a.parallel} sequences at once, {a.threads} threads; llamaworks {OUR_DTYPES[a.dtype]}, "
              f"llama-server GGUF {a.gguf_dtype}")
        cols = [r for r in results if wl in r]
        theirs = next((r for r in cols if r["server"].startswith("llama-server")), None)
        before = next((r for r in cols if r["server"].startswith("llamaworks before")), None)
        rat = ratios(cols[0][wl], theirs[wl]) if theirs and cols[0] is not theirs else {}
        brat = ratios(cols[0][wl], before[wl]) if before and cols[0] is not before else {}
        head = f"{'':<18}" + "".join(f"{r['server'][:22]:>24}" for r in cols)
        print(head + (f"{'ours/llama-server':>20}" if rat else "") + (f"{'ours/before':>14}" if brat else ""))
        for label, key, fmt, _ in ROWS:
            scale = 1000 if "(ms)" in label else 1
            line = f"{label:<18}" + "".join(f"{fmt.format(r[wl][key] * scale):>24}" for r in cols)
            if rat:
                line += f"{rat[key]:>19.2f}x" if key in rat else " " * 20
            if key in brat:
                line += f"{brat[key]:>13.2f}x"
            print(line)
        if rat or brat:
            print("(ratios: above 1 is better for llamaworks; for times it is the other server's over ours)")
        all_ratios[wl], before_ratios[wl] = rat, brat
    return all_ratios, before_ratios


def targets(rat: dict, brat: dict) -> dict:
    """Issue 18's benchmark targets from the ratios (above 1 better for llamaworks)."""
    out = {}
    for wl, r in rat.items():
        if r:
            out[f"{wl}_tokens_per_s_over_llama_server"] = {"value": r.get("tokens_per_s"), "target": 1.5}
            out[f"{wl}_tbt_p99_llama_server_over_ours"] = {"value": r.get("tbt_p99_s"), "target": 1.0}
    if brat.get("chat"):
        out["chat_ttft_p50_before_over_ours"] = {"value": brat["chat"].get("ttft_p50_s"), "target": 3.0}
        out["chat_ttft_p99_before_over_ours"] = {"value": brat["chat"].get("ttft_p99_s"), "target": 3.0}
    for t in out.values():
        t["met"] = t["value"] is not None and t["value"] >= t["target"]
    return out


# --- models -------------------------------------------------------------------------------------

def random_checkpoint(preset: str, folder: Path, context: int, vocab: int | None = None) -> Path:
    """A model directory of random weights in `preset`'s shape (n_layers 2 for the tiny smoke
    model), with a tokenizer trained on the Shakespeare corpus (or made-up words)."""
    from llamaworks.model import ModelArgs, build_model
    from llamaworks.modeldir import save_model
    from llamaworks.tokenizer import Tokenizer

    if SHAKESPEARE.is_dir():
        docs = [f.read_text(encoding="utf-8", errors="replace") for f in sorted(SHAKESPEARE.glob("*.txt"))[:6]]
    else:
        rng = random.Random(0)
        words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
                 for _ in range(3000)]
        docs = [" ".join(rng.choice(words) for _ in range(4000)) + "." for _ in range(40)]
    args = ModelArgs.from_name(preset)
    tok = Tokenizer.train(folder / "tokenizer.model", documents=docs, vocab_size=vocab or args.vocab_size, seed=0)
    extra = {"n_layers": 2} if preset == "tiny" else {}
    args = ModelArgs.from_name(preset, vocab_size=tok.vocab_size, max_seq_len=context, **extra)
    return save_model(build_model(args, seed=0).eval(), tok, folder / preset)


def export_gguf(checkpoint: Path, folder: Path, dtype: str) -> Path:
    import torch

    from llamaworks.convert.formats import save_checkpoint
    from llamaworks.inference.load import load_model

    model, tok = load_model(checkpoint)
    return save_checkpoint("gguf", model, tok, folder / f"model-{dtype}.gguf",
                           dtype=torch.float32 if dtype == "f32" else torch.float16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_argument_group("what to serve")
    src.add_argument("--checkpoint", help="a llamaworks model directory (float weights: the GGUF export needs them)")
    src.add_argument("--random", metavar="PRESET", help="random weights in a preset's shape (e.g. small, base)")
    src.add_argument("--url", help="an already running OpenAI-compatible server instead (one column)")
    src.add_argument("--smoke", action="store_true", help="a tiny random model, 4 users x 2 short requests, "
                     "ours only (add --llama-server for both), no JSON unless --output is given")
    src.add_argument("--build-llama-server", action="store_true", help="build llama-server into the cache and exit")
    wl = ap.add_argument_group("workloads")
    wl.add_argument("--users", type=int, default=16, help="concurrent clients")
    wl.add_argument("--requests", type=int, default=4, help="requests per client")
    wl.add_argument("--max-tokens", type=int, default=64)
    wl.add_argument("--system-tokens", type=int, default=1024, help="the chat workload's shared system prompt")
    wl.add_argument("--user-tokens", type=int, default=64)
    wl.add_argument("--short-tokens", type=int, default=128, help="the mixed workload's short prompts")
    wl.add_argument("--long-tokens", type=int, default=2048, help="the mixed workload's long prompts")
    wl.add_argument("--long-every", type=int, default=8, help="every N-th request of the mixed workload is long")
    wl.add_argument("--workloads", nargs="+", default=["chat", "mixed"], choices=["chat", "mixed"])
    sv = ap.add_argument_group("servers")
    sv.add_argument("--model", default="bench", help="model name the requests carry")
    sv.add_argument("--parallel", type=int, default=8, help="sequences at once: our --max-batch, llama-server's "
                    "--parallel")
    sv.add_argument("--threads", type=int, default=os.cpu_count(), help="both servers' threads")
    sv.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="pass --compile/--no-compile to llamaworks serve (default: the server's default)")
    sv.add_argument("--llamaworks-args", nargs=argparse.REMAINDER, default=[],
                    help="extra `llamaworks serve` options (last on the line), e.g. --prefill-chunk 256")
    sv.add_argument("--llama-server-args", type=str, default="", help="extra llama-server options, one string")
    sv.add_argument("--llama-server", action=argparse.BooleanOptionalAction, default=None,
                    help="also run llama-server on the GGUF export, when built (default on; --smoke: off)")
    sv.add_argument("--dtype", choices=sorted(OUR_DTYPES), default="fp32",
                    help="precision class of both servers: fp32 (ours float32, llama-server f32 GGUF) or bf16 (ours "
                    "bfloat16, llama-server f16 GGUF)")
    sv.add_argument("--gguf-dtype", choices=["f32", "f16"], default=None,
                    help="llama-server's GGUF export (default: --dtype's, f32 or f16)")
    sv.add_argument("--before", default=None, help=f"a commit whose `llamaworks serve` is a column too: the engine "
                    f"before issue 18 (default {BEFORE}, the static slot cache; none: skip; --smoke: none)")
    sv.add_argument("--request-timeout", type=float, default=900)
    ap.add_argument("--output", default=None, help="JSON (default benchmarks/results/serve.json; --smoke: none)")
    add_label_argument(ap)
    a = ap.parse_args()
    a.llama_server_args = a.llama_server_args.split()
    a.gguf_dtype = a.gguf_dtype or GGUF_DTYPES[a.dtype]
    if a.build_llama_server:
        build_llama_server()
        return
    if sum(bool(x) for x in (a.checkpoint, a.random, a.url, a.smoke)) != 1:
        ap.error("give one of --checkpoint DIR, --random PRESET, --url URL or --smoke")
    if a.smoke:
        a.users, a.requests, a.max_tokens = 4, 2, 8
        a.llama_server = bool(a.llama_server)
        a.system_tokens, a.user_tokens, a.short_tokens, a.long_tokens, a.long_every = 64, 16, 32, 192, 4
        a.before = a.before or "none"
    else:
        a.llama_server = a.llama_server is not False
        a.output = a.output or str(ROOT / "benchmarks" / "results" / "serve.json")
    a.before = None if (a.before or BEFORE).lower() == "none" else (a.before or BEFORE)
    machine = machine_record(a.label, threads=a.threads)

    longest = max([a.system_tokens + a.user_tokens] * ("chat" in a.workloads)
                  + [a.long_tokens, a.short_tokens] * ("mixed" in a.workloads))
    context = 1 + longest + a.max_tokens + 8  # BOS, the prompt, the answer, a margin
    with tempfile.TemporaryDirectory(prefix="serve_bench_") as tmp:
        tmp = Path(tmp)
        checkpoint = None
        if a.smoke or a.random:
            checkpoint = random_checkpoint("tiny" if a.smoke else a.random, tmp, context, 512 if a.smoke else None)
        elif a.checkpoint:
            checkpoint = Path(a.checkpoint)
        tokenizer, vocab = None, 32000
        if checkpoint is not None:
            from llamaworks.modeldir import read_params, read_tokenizer

            params = read_params(checkpoint / "params.json")
            tokenizer, vocab = read_tokenizer(checkpoint), params["vocab_size"]
            if params.get("max_seq_len", context) < context:
                raise SystemExit(f"the model's context ({params['max_seq_len']}) is shorter than the workloads need "
                                 f"({context}): lower --long-tokens/--system-tokens/--max-tokens")
        bos = tokenizer.bos_id if tokenizer is not None else 1
        eos = tokenizer.eos_id if tokenizer is not None else 2
        need = a.system_tokens + a.users * a.requests * (a.user_tokens + max(a.short_tokens, a.long_tokens)) + 64
        pool = token_pool(tokenizer, need, vocab)
        loads = {k: v for k, v in workloads(a, pool, bos).items() if k in a.workloads}
        warm = [bos] + pool[-32:][::-1]  # shares no prefix with the workloads
        bias = {str(eos): EOS_BIAS}
        info = {"chat": f"shared system prompt of {a.system_tokens} tokens + {a.user_tokens}-token user turns",
                "mixed": f"{a.short_tokens}-token prompts, every {a.long_every}th one {a.long_tokens} tokens"}
        info = {k: v for k, v in info.items() if k in a.workloads}

        results, note = [], None
        if a.url:
            results.append(measure_server(a.url, lambda: (None, a.url.rstrip("/")), loads, a, bias, warm))
        else:
            def ours():
                proc, url = start_llamaworks(a, checkpoint, context, tmp / "llamaworks.log")
                proc.log = tmp / "llamaworks.log"
                return proc, url
            results.append(measure_server("llamaworks", ours, loads, a, bias, warm))
            before_src = source_at(a.before, tmp / "before") if a.before else None
            if a.before and before_src is None:
                print(f"(no commit {a.before!r} in git here: the before column is skipped)")
            if before_src is not None:
                def before():
                    proc, url = start_llamaworks(a, checkpoint, context, tmp / "before.log", src=before_src)
                    proc.log = tmp / "before.log"
                    return proc, url
                results.append(measure_server(f"llamaworks before {a.before}", before, loads, a, bias, warm))
            binary = find_llama_server() if a.llama_server else None
            if not a.llama_server:
                note = "llama-server not run (--no-llama-server or --smoke)"
            elif binary is None:
                note = how_to_build()
            else:
                from llamaworks.inference.quant import read_quantization

                if read_quantization(checkpoint) is not None:
                    note = "the checkpoint is quantised; the GGUF export needs float weights (give the original)"
                else:
                    gguf = export_gguf(checkpoint, tmp, a.gguf_dtype)

                    def theirs():
                        proc, url = start_llama_server(a, binary, gguf, context, tmp / "llama-server.log")
                        proc.log = tmp / "llama-server.log"
                        return proc, url
                    results.append(measure_server(f"llama-server {a.gguf_dtype}", theirs, loads, a, bias, warm))
            if note:
                print(f"(llama-server side skipped: {note})")
        rat, brat = print_tables(results, a, info)
        goals = targets(rat, brat)
        for name, t in goals.items():
            print(f"target {name}: {t['value'] if t['value'] is None else round(t['value'], 2)} "
                  f"(>= {t['target']}: {'met' if t['met'] else 'not met'})")
        if machine["label"] == "contended" and len(results) > 1:
            print("(contended machine: llama.cpp's threads spin-wait at their barriers, so a busy core slows it far "
                  "more than llamaworks (a shared 2-vCPU machine: 600 ms a token instead of 3 ms); quote quiet "
                  "runs only)")

    if a.output:
        out = Path(a.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": machine,
            "model": str(a.checkpoint or a.random or a.url or "smoke (tiny, random)"), "context_per_sequence": context,
            "users": a.users, "requests_per_user": a.requests, "max_tokens": a.max_tokens, "parallel": a.parallel,
            "threads": a.threads, "dtype": a.dtype, "llamaworks_dtype": OUR_DTYPES[a.dtype],
            "gguf_dtype": a.gguf_dtype, "workloads": info,
            "llama_server": str(find_llama_server()) if a.llama_server else None, "llama_server_note": note,
            "llama_cpp_python": llama_cpp_python_version(), "results": results,
            "ratios_ours_over_llama_server": rat, "before": a.before, "ratios_ours_over_before": brat,
            "targets": goals,
            "ratio_convention": "above 1 is better for llamaworks (for times: llama-server's over ours)",
        }, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
