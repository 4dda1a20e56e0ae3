"""OpenAI-compatible HTTP API over the engine (FastAPI; the optional `serve` extra).

Endpoints: POST /v1/completions, POST /v1/chat/completions (both stream by server-sent
events with "stream": true; log-probabilities in both forms, echo without streaming), GET /v1/models,
GET /health, GET /metrics (Prometheus).
Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, so the
official clients raise their usual exceptions (BadRequestError, NotFoundError,
RateLimitError, ...).

Chat template. LLaMA is a base model with no chat format of its own, so a conversation
is rendered as the plain dialogue a base model continues naturally:

    <bos>{system messages, joined by blank lines}\\n\\n      (only when there are any)
    User: {content}\\n
    Assistant: {content}\\n
    ...
    Assistant:

The reply is generated after the final "Assistant:", stops at eos or at "\\nUser:"
(besides the request's own stop strings) and is returned without its leading spaces.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import traceback
import uuid
from typing import Any

from llamaworks.serve.engine import Engine, EngineStopped, Event, QueueFull, Request

CHAT_STOP = "\nUser:"
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 16  # OpenAI allows 4; lm-evaluation-harness may send more (its until list and eos)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def render_chat(messages: list[dict[str, str]]) -> str:
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n"
             for m in messages if m["role"] != "system"]
    head = "\n\n".join(system) + "\n\n" if system else ""
    return head + "".join(turns) + "Assistant:"


# --- request validation --------------------------------------------------------------------


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    x = body.get(name)
    if x is None:
        return default
    if not _is_number(x) or x > hi or x < lo or (lo_open and x == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise APIError(400, f"{name} must be a number in {bound}, got {x!r}", param=name, code="invalid_value")
    return float(x)


def _sampling(body: dict) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
    }
    top_k = body.get("top_k")  # not OpenAI's, but vLLM's and llama.cpp's; -1 or null = off
    if top_k is not None and (not _is_int(top_k) or (top_k < 1 and top_k != -1)):
        raise APIError(400, f"top_k must be a positive integer (or -1 for no limit), got {top_k!r}", param="top_k",
                       code="invalid_value")
    opts["top_k"] = None if top_k in (None, -1) else top_k
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise APIError(400, f"seed must be an integer, got {seed!r}", param="seed", code="invalid_value")
    opts["seed"] = seed
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise APIError(400, f"n must be 1 (one choice per request; send several requests instead), got {n!r}",
                       param="n", code="invalid_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise APIError(400, f"{name} is not supported; leave it unset or 0", param=name, code="unsupported_value")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) for s in stop):
        raise APIError(400, f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings, got {stop!r}",
                       param="stop", code="invalid_value")
    opts["stop"] = stop
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise APIError(400, f"stream must be a boolean, got {stream!r}", param="stream", code="invalid_value")
    opts["stream"] = bool(stream)
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise APIError(400, "stream_options must be an object", param="stream_options", code="invalid_value")
    opts["include_usage"] = bool(so.get("include_usage", False))
    return opts


# OpenAI options this server does not implement: refused with a 400 that names them when set
# to anything but their "off" value, rather than silently answering without them.
_UNSUPPORTED = {
    "completions": {"best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {})},
    "chat": {"logit_bias": (None, {}), "tools": (None, []),
             "functions": (None, []), "tool_choice": (None, "none"), "function_call": (None, "none"),
             "response_format": (None, {"type": "text"}), "audio": (None,), "modalities": (None, ["text"])},
}


def _refuse_unsupported(body: dict, endpoint: str) -> None:
    for name, off in _UNSUPPORTED[endpoint].items():
        if name in body and not any(body[name] == v and type(body[name]) is type(v) for v in off):
            raise APIError(400, f"{name} is not supported by this server; leave it unset", param=name,
                           code="unsupported_parameter")


def _encode(engine: Engine, text: str, param: str) -> list[int]:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate ("\ud800"), which JSON allows and UTF-8 does not
        raise APIError(400, f"the {param} is not valid Unicode text: {e.reason} at character {e.start}",
                       param=param, code="invalid_value") from None
    return engine.tokenizer.encode(text, bos=True, eos=False)


MAX_TOP_LOGPROBS = 20


def _logprob_options(body: dict, chat: bool, stream: bool) -> tuple[int | None, bool]:
    """(alternatives per token, or None for no log-probs; echo the prompt) from OpenAI's
    completions `logprobs: N` / `echo`, or chat `logprobs: true` / `top_logprobs: N`."""
    def count(name):
        x = body.get(name)
        if x is not None and (not _is_int(x) or not 0 <= x <= MAX_TOP_LOGPROBS):
            raise APIError(400, f"{name} must be an integer in [0, {MAX_TOP_LOGPROBS}], got {x!r}", param=name,
                           code="invalid_value")
        return x

    if chat:
        on = body.get("logprobs")
        if on is not None and not isinstance(on, bool):
            raise APIError(400, f"logprobs must be a boolean, got {on!r}", param="logprobs", code="invalid_value")
        top = count("top_logprobs")
        if top is not None and not on:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        n, echo = (top or 0) if on else None, False
    else:
        n, echo = count("logprobs"), body.get("echo", False)
        if not isinstance(echo, bool):
            raise APIError(400, f"echo must be a boolean, got {echo!r}", param="echo", code="invalid_value")
    if stream and echo:
        raise APIError(400, "echo is served without streaming; set stream to false", param="echo",
                       code="unsupported_value")
    return n, echo


def _token_text(tokenizer, token_id: int) -> str:
    # The piece as text: "▁" is a space; a byte-fallback piece outside ASCII is "bytes:\xNN"
    # (OpenAI's convention for partial characters); control pieces keep their name ("<s>").
    piece = tokenizer.piece_table()[token_id]
    if piece is None:
        return tokenizer.id_to_piece(token_id)
    if isinstance(piece, int):
        return chr(piece) if piece < 0x80 else f"bytes:\\x{piece:02x}"
    return piece


def _completion_logprobs(tokenizer, decoder, ids: list[int], scored: list, first_unscored: bool = False,
                         base: int = 0) -> tuple[dict, int]:
    """OpenAI's completions `logprobs` object for `ids`, pushed through `decoder` (a stream
    decoder holding the text before them, which starts at character `base`); `scored` holds
    (log p, alternatives) per token, for all but the first when first_unscored (echo). Also
    returns the character offset after `ids`."""
    offsets, at = [], base
    for t in ids:
        offsets.append(at)
        at += len(decoder.push(t))
    scored = ([(None, None)] if first_unscored else []) + list(scored)
    return {"tokens": [_token_text(tokenizer, t) for t in ids],
            "token_logprobs": [lp for lp, _ in scored],
            "top_logprobs": [None if alts is None else {_token_text(tokenizer, a): v for a, v in alts}
                             for _, alts in scored],
            "text_offset": offsets}, at


def _chat_logprobs(tokenizer, ids: list[int], scored: list) -> dict:
    def entry(t, lp):
        text = _token_text(tokenizer, t)
        raw = tokenizer.piece_table()[t]
        return {"token": text, "logprob": lp, "bytes": [raw] if isinstance(raw, int) else list(text.encode())}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, v) for a, v in alts]}
                        for t, (lp, alts) in zip(ids, scored)]}


def _max_tokens(body: dict, prompt_len: int, context: int, default: int | None) -> int:
    room = context - prompt_len
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    x = body.get(name)
    if x is None:
        return min(default, room) if default is not None else room
    if not _is_int(x) or x < 1 or x > room:
        raise APIError(400, f"{name} must be an integer in [1, {room}] (the context window of {context} tokens "
                       f"less the prompt's {prompt_len}), got {x!r}", param=name, code="invalid_value")
    return x


def _prompt_ids(engine: Engine, body: dict) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    tok = engine.tokenizer
    if isinstance(prompt, str):
        ids = _encode(engine, prompt, "prompt")
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if not all(0 <= t < tok.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {tok.vocab_size})", param="prompt",
                           code="invalid_value")
        ids = list(prompt)
    else:
        raise APIError(400, "prompt must be a string or a list of token ids (one prompt per request; send several "
                       "requests for several prompts)", param="prompt", code="invalid_value")
    _check_length(engine, ids, "prompt")
    return ids


def _check_length(engine: Engine, ids: list[int], param: str) -> None:
    if len(ids) >= engine.context:
        raise APIError(400, f"the {param} has {len(ids)} tokens but the context window is {engine.context} tokens "
                       "and at least one new token must fit: shorten it", param=param, code="context_length_exceeded")


def _messages(body: dict) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages",
                       code="invalid_value")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"messages[{i}] must have a role of system, user or assistant", param="messages",
                           code="invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content parts must all be of type text", param="messages",
                               code="invalid_value")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", param="messages", code="invalid_value")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


# --- the app -------------------------------------------------------------------------------


def create_app(engine: Engine, model_name: str, shutdown_cancels: bool = False):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    created = int(time.time())
    state = {"shutting_down": False}

    async def lifespan(app):
        yield
        # uvicorn runs this after in-flight requests finished or its graceful-shutdown timeout
        # cancelled them; the engine then drains (or cancels) whatever is left and stops.
        state["shutting_down"] = True
        await asyncio.to_thread(engine.stop, shutdown_cancels)

    app = FastAPI(title="llamaworks", lifespan=lifespan)

    def error(e: APIError, endpoint: str) -> JSONResponse:
        engine.metrics.http[(endpoint, e.status)] += 1
        return JSONResponse(e.body(), status_code=e.status)

    async def read_body(http) -> dict:
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        model = body.get("model")
        if not isinstance(model, str):
            raise APIError(400, f"model is required; this server serves {model_name!r}", param="model",
                           code="invalid_value")
        if model != model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return body

    async def run(http, endpoint: str, ids: list[int], body: dict, chat: bool):
        opts = _sampling(body)
        max_tokens = _max_tokens(body, len(ids), engine.context, None if chat else DEFAULT_COMPLETION_MAX_TOKENS)
        stop = opts["stop"] + ([CHAT_STOP] if chat else [])
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def on_event(ev: Event):
            loop.call_soon_threadsafe(events.put_nowait, ev)

        n_logprobs, echo = _logprob_options(body, chat, opts["stream"])
        req = Request(ids, max_tokens, temperature=opts["temperature"], top_p=opts["top_p"], top_k=opts["top_k"],
                      stop=stop, seed=opts["seed"], on_event=on_event, logprobs=n_logprobs,
                      prompt_logprobs=echo and n_logprobs is not None)
        try:
            engine.submit(req)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded") from None
        except EngineStopped as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        now = int(time.time())
        usage = lambda: {"prompt_tokens": len(ids), "completion_tokens": len(req.tokens),  # noqa: E731
                         "total_tokens": len(ids) + len(req.tokens)}
        strip = [chat]  # chat replies lose their leading spaces (see the template above)

        def clean(text: str) -> str:
            if strip[0]:
                text = text.lstrip()
                strip[0] = not text
            return text

        def reason(r: str | None) -> str | None:
            return "stop" if r == "cancelled" else r

        if opts["stream"]:
            engine.metrics.http[(endpoint, 200)] += 1

            # Tokens whose log-probabilities went out, their text length, and a decoder holding that text.
            streamed = {"tokens": 0, "chars": 0, "decoder": engine.tokenizer.stream_decoder(ids)}

            def new_logprobs() -> dict | None:
                # The engine appends a token and its log-probabilities before it emits the token's
                # text, so every token behind a text event is here (text held back for a stop
                # string or a partial character has its log-probabilities sent already).
                if n_logprobs is None:
                    return None
                start, end = streamed["tokens"], len(req.token_logprobs)
                toks, scored = req.tokens[start:end], req.token_logprobs[start:end]
                streamed["tokens"] = end
                if not toks:
                    return None
                if chat:
                    return _chat_logprobs(engine.tokenizer, toks, scored)
                out, streamed["chars"] = _completion_logprobs(engine.tokenizer, streamed["decoder"], toks, scored,
                                                              base=streamed["chars"])
                return out

            def chunk(delta: str | None, finish: str | None) -> str:
                logprobs = new_logprobs()
                if chat:
                    d = {} if delta is None else {"content": delta}
                    choice = {"index": 0, "delta": d, "logprobs": logprobs, "finish_reason": finish}
                    obj = "chat.completion.chunk"
                else:
                    choice = {"index": 0, "text": delta or "", "logprobs": logprobs, "finish_reason": finish}
                    obj = "text_completion"
                msg = {"id": rid, "object": obj, "created": now, "model": model_name, "choices": [choice]}
                if opts["include_usage"]:
                    msg["usage"] = None
                return f"data: {json.dumps(msg)}\n\n"

            async def sse():
                try:
                    if chat:
                        first = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": None}]}
                        yield f"data: {json.dumps(first)}\n\n"
                    while True:
                        ev = await events.get()
                        if ev.kind == "text":
                            text = clean(ev.text)
                            if text:
                                yield chunk(text, None)
                        elif ev.kind == "error":
                            err = APIError(500, ev.text, type="server_error", code="generation_failed")
                            yield f"data: {json.dumps(err.body())}\n\n"
                            break
                        else:
                            yield chunk(None, reason(ev.finish_reason))
                            if opts["include_usage"]:
                                final = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                         "created": now, "model": model_name, "choices": [], "usage": usage()}
                                yield f"data: {json.dumps(final)}\n\n"
                            break
                    yield "data: [DONE]\n\n"
                finally:
                    # Normal end, client disconnect (the task is cancelled) or server shutdown:
                    # a request still running gives its slot back.
                    req.cancel()

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        req.cancel()
                        engine.metrics.http[(endpoint, 499)] += 1
                        return JSONResponse({}, status_code=499)
                    continue
                if ev.kind == "error":
                    raise APIError(500, ev.text, type="server_error", code="generation_failed")
                if ev.kind == "done":
                    break
        finally:
            req.cancel()
        if req.finish_reason == "cancelled":
            raise APIError(503, "the request was cancelled because the server is shutting down",
                           type="server_error", code="shutting_down")
        text = clean(req.text)
        tok = engine.tokenizer
        if chat:
            logprobs = None if n_logprobs is None else _chat_logprobs(tok, req.tokens, req.token_logprobs)
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": req.finish_reason}
        else:
            logprobs = None
            if n_logprobs is not None and echo:
                logprobs = _completion_logprobs(tok, tok.stream_decoder(), ids + req.tokens,
                                                req.prompt_token_logprobs + req.token_logprobs, first_unscored=True)[0]
            elif n_logprobs is not None:
                logprobs = _completion_logprobs(tok, tok.stream_decoder(ids), req.tokens, req.token_logprobs)[0]
            if echo:
                text = tok.decode(ids) + text
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": req.finish_reason}
        engine.metrics.http[(endpoint, 200)] += 1
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now,
                             "model": model_name, "choices": [choice], "usage": usage()})

    # Plain Starlette routes: the handlers parse and validate the body themselves, so every
    # error gets OpenAI's shape (FastAPI's would be a 422 with its own), and the string
    # annotations of this module (postponed evaluation) do not meet FastAPI's introspection.
    async def completions(http):
        try:
            body = await read_body(http)
            _refuse_unsupported(body, "completions")
            return await run(http, "completions", _prompt_ids(engine, body), body, chat=False)
        except APIError as e:
            return error(e, "completions")
        except Exception as e:  # noqa: BLE001 - a bug must still answer in OpenAI's shape
            return error(_internal(e), "completions")

    async def chat_completions(http):
        try:
            body = await read_body(http)
            _refuse_unsupported(body, "chat")
            ids = _encode(engine, render_chat(_messages(body)), "messages")
            _check_length(engine, ids, "messages")
            return await run(http, "chat", ids, body, chat=True)
        except APIError as e:
            return error(e, "chat")
        except Exception as e:  # noqa: BLE001
            return error(_internal(e), "chat")

    def _internal(e: Exception) -> APIError:
        traceback.print_exc()
        return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error", code="internal_error")

    app.add_route("/v1/completions", completions, methods=["POST"])
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "llamaworks", "max_model_len": engine.context}]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            e = APIError(404, f"the model {model_id!r} does not exist; this server serves {model_name!r}",
                         param="model", code="model_not_found")
            return JSONResponse(e.body(), status_code=404)
        return (await models())["data"][0]

    @app.get("/health")
    async def health():
        body = {"status": "shutting_down" if state["shutting_down"] else "ok", "model": model_name,
                "slots": engine.max_batch, "active": engine.active, "queued": engine.queue_length}
        return JSONResponse(body, status_code=503 if state["shutting_down"] else 200)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(engine.queue_length, engine.active),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(http, exc: HTTPException):
        # 404 for unknown paths, 405 for wrong methods: in OpenAI's shape too.
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    return app
