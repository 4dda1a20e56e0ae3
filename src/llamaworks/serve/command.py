"""`llamaworks serve`: the OpenAI-compatible server on one model directory."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Annotated

from torch.distributed.device_mesh import init_device_mesh

from llamaworks.args import Arg
from llamaworks.device import parse_dtype, resolve_device
from llamaworks.inference.kernels import bf16_matmul, use_bf16_prefill
from llamaworks.inference.load import load_model
from llamaworks.inference.quant import Int4Linear, Int8Linear
from llamaworks.inference.speculative import check_same_vocabulary
from llamaworks.inference.threads import run_in_own_thread
from llamaworks.parallel.distributed import close_distributed, env_world_size, init_distributed
from llamaworks.parallel.tp_load import load_tensor_parallel
from llamaworks.serve.api import create_app
from llamaworks.serve.auth import check_api_key
from llamaworks.serve.engine import Engine
from llamaworks.serve.limits import Limits, header_timeout_protocol
from llamaworks.serve.tp import TPRunner, control_group, serve_worker
from llamaworks.tokenizer.chat import resolve_chat_template


def make_server(engine, model_name: str, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0,
                log_level: str = "warning", limits: Limits | None = None, chat_template=None,
                api_key: str | None = None, request_timeout: float | None = None):
    """A uvicorn Server and its bound socket (port 0 picks a free port; read it from the socket).
    `chat_template` (a ChatTemplate) is the chat format served; default: create_app's. `api_key`
    and `request_timeout`: see api.py."""
    try:
        import uvicorn
    except ImportError:
        raise ValueError("serving needs fastapi and uvicorn: pip install 'llamaworks[serve]'") from None
    limits = limits or Limits()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    app = create_app(engine, model_name, limits=limits, chat_template=chat_template, api_key=api_key,
                     request_timeout=request_timeout)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout, access_log=False,
                            http=header_timeout_protocol(limits.header_timeout))
    return uvicorn.Server(config), sock


def default_compile(model) -> bool:
    """Whether `serve` compiles the decode step when not told: where it was measured to help.
    On 2 CPU cores (benchmarks/decode.py, config A, batch 1) compiling lifts int8 decoding
    1.96x and int4 1.60x, because their eager kernels dequantise call by call; fp32 gains
    1.21x at batch 1 and 1.11x at the server's batch 8 (benchmarks/serve.py), which does not
    repay 12-60 s of compilation at every start and greedy answers that may differ from
    `llamaworks generate` at near-ties (compiled logits differ by ~1e-6)."""
    return any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules())


def serve_command(
    checkpoint: Annotated[str, Arg("model directory (params.json, model.safetensors, tokenizer.model)")],
    host: Annotated[str, Arg("address to bind; keep the loopback default unless a proxy fronts the server")]
    = "127.0.0.1",
    port: Annotated[int, Arg("TCP port; 0 picks a free one (printed at start)")] = 8000,
    max_batch: Annotated[int, Arg("concurrent sequences (rows of the KV cache) in the running batch")] = 8,
    max_queue: Annotated[int, Arg("requests that may wait for a slot; beyond it the server answers 429")] = 64,
    kv_cache_gb: Annotated[float | None, Arg("memory of the paged KV cache in GiB; requests are admitted while its "
                                             "blocks can hold their prompt + max_tokens (default: room for "
                                             "--max-batch sequences of the whole context)")] = None,
    prefill_chunk: Annotated[int | None, Arg("prompt tokens prefilled per engine step, between decode steps of "
                                             "the running requests, so a long prompt does not stall them "
                                             "(default: whole prompts)")] = None,
    prefix_cache: Annotated[bool, Arg("share cached prompt blocks between requests: a repeated system prompt is "
                                      "prefilled once (--no-prefix-cache: every prompt prefilled whole)")] = True,
    prefill_bf16: Annotated[bool, Arg("fp32 models on CPUs with bf16 products (AVX512_BF16, AMX): prompts' "
                                      "matrix products in bf16, 2.2x faster, with half the weights' memory "
                                      "again; greedy answers may differ from fp32's at near-ties")] = False,
    max_seq_len: Annotated[int | None, Arg("context window served (default: the model's)")] = None,
    model_name: Annotated[str | None, Arg("the model id clients pass (default: the directory's name)")] = None,
    adapter: Annotated[str | None, Arg("a LoRA adapter directory (PEFT layout) applied unmerged")] = None,
    chat_template: Annotated[str | None, Arg("chat format of /v1/chat/completions: a template the checkpoint names "
                                             "(e.g. tool_use), a built-in (llama2, llama3, plain) or a .jinja file, "
                                             "tokenizer_config.json or model folder (default: the "
                                             "checkpoint's chat_template.jinja, else plain)")] = None,
    shutdown_timeout: Annotated[float, Arg("seconds in-flight requests get to finish on shutdown before they are "
                                           "cancelled")] = 30.0,
    device: Annotated[str, Arg("cpu, cuda, cuda:N or auto")] = "auto",
    dtype: Annotated[str | None, Arg("float32, bfloat16 or float16 (default: fp32 on CPU, bf16 on GPU)")] = None,
    kv_dtype: Annotated[str | None, Arg("the KV cache's dtype: the model's (default), or bfloat16 under a float32 "
                                        "model: half the cache's memory and the bytes each decode step reads from it "
                                        "(llama.cpp's default cache is f16); keys and values rounded to bf16, so "
                                        "replies may differ from fp32's at near-ties")] = None,
    compile: Annotated[bool | None, Arg("torch.compile the decode step at start (default: only for int8/int4 "
                                        "model directories, where it was measured to help; see default_compile)")]
    = None,
    max_body_bytes: Annotated[int, Arg("largest request body accepted; beyond it the server answers 413 without "
                                       "reading it")] = Limits.max_body_bytes,
    header_timeout: Annotated[float, Arg("seconds a connection may take to send a request's headers before it is "
                                         "closed")] = Limits.header_timeout,
    body_timeout: Annotated[float, Arg("seconds a request may take to send its body after its headers; beyond it "
                                       "the server answers 408")] = Limits.body_timeout,
    api_key: Annotated[str | None, Arg("a key every /v1 request must send as 'Authorization: Bearer KEY' (401 "
                                       "otherwise); default: $LLAMAWORKS_API_KEY, else none (open)")] = None,
    request_timeout: Annotated[float | None, Arg("seconds of wall time a request may take, queueing included; "
                                                 "beyond it it is cancelled and answered 504 (code request_timeout)"
                                                 " (default: no limit)")] = None,
    tp: Annotated[int, Arg("tensor-parallel processes: launch with torchrun --nproc-per-node N ... --tp N; rank 0 "
                           "serves HTTP, every rank holds 1/N of the model (and its heads of --kv-cache-gb)")] = 1,
    draft: Annotated[str | None, Arg("a smaller model directory with the same tokenizer: speculative decoding, "
                                     "its proposals verified by the model in one batched pass (greedy replies "
                                     "unchanged; requests with penalties, logit_bias or a grammar decode as usual)")]
    = None,
    draft_tokens: Annotated[int, Arg("tokens the --draft model proposes per request and step")] = 4,
    draft_max_batch: Annotated[int | None, Arg("--draft runs while at most this many requests decode; larger "
                                               "batches decode one token per step (default: always)")] = None,
) -> int:
    """Serve a model over an OpenAI-compatible HTTP API with continuous batching.

    Endpoints: /v1/completions, /v1/chat/completions (streaming with "stream": true),
    /v1/embeddings (mean-pooled final hidden states), /v1/models, /health, /metrics
    (Prometheus). Stop with Ctrl-C or SIGTERM: requests in flight finish (up to
    --shutdown-timeout) before the server exits. Each request is bounded
    (--max-body-bytes, --header-timeout, --body-timeout; prompts by the context window, stop
    strings to 16 of 1,000 characters) and fails alone. --api-key guards /v1; the chat page at /
    asks for the key. --request-timeout bounds a request's wall time (504 at expiry). --draft
    DIR decodes speculatively with a smaller model of the same tokenizer.
    """
    if api_key is None:
        api_key = os.environ.get("LLAMAWORKS_API_KEY") or None
    if api_key is not None:
        check_api_key(api_key)
    if request_timeout is not None and not 0 < request_timeout < float("inf"):
        raise ValueError(f"--request-timeout must be a positive number of seconds, got {request_timeout}")
    limits = Limits(max_body_bytes=max_body_bytes, header_timeout=header_timeout, body_timeout=body_timeout)
    dev, dt = resolve_device(device, dtype)
    env, runner = None, None
    if prefill_bf16 and tp > 1:
        raise ValueError("--prefill-bf16 runs in one process; serve with --tp without it")
    if _check_tp(tp, adapter, compile) > 1:
        env, dev, model, tokenizer, runner = _setup_tensor_parallel(checkpoint, dev, dt)
        if runner is None:  # not rank 0: run rank 0's forward passes until it stops
            return 0
    else:
        # Every set-up step that runs torch's parallel operators on CPU runs in a thread that
        # exits, so that the engine's thread holds the only OpenMP team (inference/threads.py).
        model, tokenizer = run_in_own_thread(load_model, checkpoint, device=dev, dtype=dt, adapter=adapter)
    if prefill_bf16:
        run_in_own_thread(_prefill_bf16, model)
    try:
        model.eval()
        template = resolve_chat_template(tokenizer, chat_template)  # a bad name or file fails here, before serving
        src = Path(checkpoint).resolve()
        name = model_name or (src.stem if src.is_file() else src.name)  # a directory, or a .gguf file
        if compile is None:
            compile = default_compile(model)
        draft_model = None
        if draft is not None:  # on rank 0 only under --tp: the draft is small and runs there
            draft_model, draft_tok = run_in_own_thread(load_model, draft, device=dev, dtype=dt)
            draft_model.eval()
            check_same_vocabulary(tokenizer, draft_tok, checkpoint, draft)  # ValueError naming --draft
        engine = run_in_own_thread(Engine, model, tokenizer, max_batch=max_batch, max_queue=max_queue,
                                   max_seq_len=max_seq_len, kv_cache_gb=kv_cache_gb, prefill_chunk=prefill_chunk,
                                   prefix_cache=prefix_cache, compile=compile, runner=runner, draft=draft_model,
                                   draft_tokens=draft_tokens, draft_max_batch=draft_max_batch,
                                   kv_dtype=_kv_dtype(kv_dtype))
        if draft is not None:
            print(f"llamaworks serve: speculative decoding with draft {draft} ({draft_tokens} tokens per step)",
                  file=sys.stderr, flush=True)
        _serve(engine, name, host, port, shutdown_timeout, limits, template, api_key, request_timeout, dev, dt,
               max_batch, compile, tp)
    finally:
        if runner is not None:  # under --tp the other ranks stop, whether the engine ran or not
            runner.close()
        if env is not None:
            close_distributed(env)
    print("llamaworks serve: stopped", file=sys.stderr)
    return 0


def _serve(engine, name, host, port, shutdown_timeout, limits, template, api_key, request_timeout, dev, dt, max_batch,
           compile, tp) -> None:
    server, sock = make_server(engine, name, host, port, shutdown_timeout, log_level="info", limits=limits,
                               chat_template=template, api_key=api_key, request_timeout=request_timeout)
    bound = sock.getsockname()[1]
    print(f"llamaworks serve: model {name!r} on http://{host}:{bound}/v1 ({dev}, {_name(dt)}, "
          f"{max_batch} slots{f', tensor parallel over {tp} processes' if tp > 1 else ''}, context "
          f"{engine.context}, KV cache {engine.pool.capacity} blocks of "
          f"{engine.block_size} tokens{'' if engine.kv_dtype == dt else ' in ' + _name(engine.kv_dtype)}"
          f"{', compiled decode' if compile else ''}; "
          f"chat template: {template.where}{'; API key required' if api_key else ''}); chat page: "
          f"http://{host}:{bound}/", file=sys.stderr, flush=True)
    engine.start()
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal for us;
    # both then mean a clean exit (status 0), not a KeyboardInterrupt traceback.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        engine.stop(cancel=True)
        sock.close()


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _kv_dtype(name: str | None):
    """--kv-dtype: None (the model's), or the dtype it names; the engine checks it against the model."""
    try:
        return parse_dtype(name)
    except ValueError as e:
        raise ValueError(f"--kv-dtype: {e}") from None


def _prefill_bf16(model) -> None:
    """--prefill-bf16: the fp32 products of prompts in bf16 (kernels.Bf16PrefillLinear)."""
    if not bf16_matmul():
        raise ValueError("--prefill-bf16 needs a CPU that multiplies bf16 in hardware (AVX512_BF16 or AMX); "
                         "elsewhere it is slower than fp32: serve without it")
    if not use_bf16_prefill(model):
        raise ValueError("--prefill-bf16 found no fp32 linear layer with the native kernels (an fp32 model on CPU, "
                         "the kernels built: python -m llamaworks.inference.native build); serve without it")


def _check_tp(tp: int, adapter: str | None, compile: bool | None) -> int:
    """--tp against the processes torchrun launched; what tensor-parallel serving cannot do."""
    world = env_world_size()
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"--tp must be an integer >= 1 (tensor-parallel processes), got {tp!r}")
    if tp != world:
        if world == 1:
            raise ValueError(f"--tp {tp} needs {tp} processes: launch with torchrun --nproc-per-node {tp} -m "
                             f"llamaworks serve ... --tp {tp}")
        raise ValueError(f"torchrun launched {world} processes but --tp is {tp}: pass --tp {world} (serve splits the "
                         "model over every process)")
    if tp > 1 and adapter is not None:
        raise ValueError("--adapter runs in one process; merge it into the model first (llamaworks merge) to serve "
                         "with --tp")
    if tp > 1 and compile:
        raise ValueError("--compile runs in one process; serve with --tp uncompiled (--no-compile)")
    return tp


def _setup_tensor_parallel(checkpoint: str, dev, dt):
    """Join torchrun's process group and load this rank's share of the model (parallel/tp_load.py).
    Rank 0 gets a TPRunner for its engine; the other ranks run serve_worker here, until rank 0
    stops them, and get None. -> (env, device, model, tokenizer, runner)"""
    env, dev = init_distributed(dev)
    try:
        mesh = init_device_mesh(dev.type, (env.world_size,), mesh_dim_names=("tp",))
        model, tokenizer = run_in_own_thread(load_tensor_parallel, checkpoint, mesh, dev, dt)  # inference/threads.py
        group = control_group()
        if env.is_main:
            return env, dev, model, tokenizer, TPRunner(model, group)
        passes = serve_worker(model, group)
        print(f"llamaworks serve: rank {env.rank} stopped after {passes} forward passes", file=sys.stderr)
    except BaseException:
        close_distributed(env)
        raise
    close_distributed(env)
    return env, dev, model, tokenizer, None
