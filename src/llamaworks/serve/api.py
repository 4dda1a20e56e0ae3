"""OpenAI-compatible HTTP API over the engine (FastAPI; the optional `serve` extra).

Endpoints: POST /v1/completions, POST /v1/chat/completions (both stream by server-sent
events with "stream": true; log-probabilities in both forms, echo without streaming), GET /v1/models,
GET /health, GET /metrics (Prometheus), POST /v1/embeddings (each input's final hidden states,
after the final norm, mean-pooled over its tokens; Engine.embed), and the chat page at /
(static files in serve/static).
The protocol itself (parsing, validation, the chat template, response shapes) is protocol.py;
this module wires it to HTTP and the engine.

One request cannot hold up others for long: bodies are bounded and timed (limits.py), a
prompt too long for the context window is refused by its length before it is tokenised,
tokenisation runs off the event loop, and a client that goes away, streaming or not,
gives its slot back at once.

Operations: with `api_key` every /v1 route needs `Authorization: Bearer KEY` (auth.py; a 401
in OpenAI's shape otherwise). With `request_timeout` a request has that many seconds of wall
time from its arrival, queueing included; at expiry it is cancelled (its slot freed at the
engine's next step) and answered with a 504 in OpenAI's error shape (type "server_error",
code "request_timeout"); a stream already under way ends with that error object as its last
event, then "data: [DONE]". A reply cut short is never passed off as a finished one.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from importlib import resources

from llamaworks.serve.auth import APIKeyAuth
from llamaworks.serve.engine import Engine, EngineStopped, Event, QueueFull, Request
from llamaworks.serve.limits import BodyLimit, Limits
from llamaworks.serve.protocol import (
    APIError,
    GenerationRequest,
    Responder,
    check_prompt_tokens,
    choice_seed,
    embeddings_response,
    encode_embedding_input,
    encode_prompt,
    merge_choices,
    model_info,
    parse_chat,
    parse_completion,
    parse_embeddings,
    parse_json,
    sse,
)
from llamaworks.serve.tools import ReplyReader, read_reply, with_calls
from llamaworks.tokenizer.chat import ChatTemplate

ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/v1/embeddings": "embeddings"}
_DISCONNECTED = Event("disconnected")  # put in a request's event queue when its client goes away


def _timed_out(seconds: float) -> APIError:
    return APIError(504, f"the request did not finish within this server's limit of {seconds:g} s "
                         "(llamaworks serve --request-timeout); ask for fewer tokens or retry later",
                    type="server_error", code="request_timeout")


def create_app(engine: Engine, model_name: str, shutdown_cancels: bool = False, limits: Limits | None = None,
               chat_template: ChatTemplate | None = None, api_key: str | None = None,
               request_timeout: float | None = None):
    """The app serving `engine`; chat uses `chat_template` (default: the checkpoint's own,
    `engine.tokenizer.chat_template`, else the "plain" built-in; protocol.resolve_chat_template).
    `api_key`: the bearer key /v1 routes need (None: open); `request_timeout`: seconds of wall
    time per request (None: unbounded); see the module's doc."""
    if request_timeout is not None and not (isinstance(request_timeout, (int, float))
                                            and 0 < request_timeout < float("inf")):
        raise ValueError(f"request_timeout (--request-timeout) must be a positive number of seconds, "
                         f"got {request_timeout!r}")
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException

    limits = limits or Limits()

    def loop_time() -> float:
        return asyncio.get_running_loop().time()

    info = model_info(model_name, engine.context, engine.tokenizer, chat_template)
    models_body = {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                               "owned_by": "llamaworks", "max_model_len": engine.context}]}
    state = {"shutting_down": False}

    async def lifespan(app):
        yield
        # uvicorn runs this after in-flight requests finished or its graceful-shutdown timeout
        # cancelled them; the engine then drains (or cancels) whatever is left and stops.
        state["shutting_down"] = True
        await asyncio.to_thread(engine.stop, shutdown_cancels)

    app = FastAPI(title="llamaworks", lifespan=lifespan)

    def count(endpoint: str, status: int) -> None:
        engine.metrics.http[(endpoint, status)] += 1

    def error(e: APIError, endpoint: str) -> JSONResponse:
        count(endpoint, e.status)
        return JSONResponse(e.body(), status_code=e.status)

    async def prompt_ids(req: GenerationRequest) -> list[int]:
        # Tokenising takes milliseconds per 10k characters (the length check bounds it): a
        # worker thread keeps the event loop answering other clients meanwhile.
        ids = await asyncio.to_thread(encode_prompt, engine.tokenizer, req, info.chat)
        check_prompt_tokens(len(ids), req.prompt_param, engine.context)
        return ids

    async def run(http, endpoint: str, req: GenerationRequest, arrived: float):
        loop = asyncio.get_running_loop()
        deadline = None if request_timeout is None else arrived + request_timeout
        ids = await prompt_ids(req)
        max_tokens = req.budget(len(ids), engine.context)
        # Events of choice k go in the queue as (k, event).
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        def on_event_of(k: int):
            gaps = {"tokens": 0, "at": 0.0}

            def on_event(ev: Event):
                # The engine thread: time between tokens, from the request's token count at each
                # event (a text event may carry several tokens' text, held back for a stop string).
                n, now = len(jobs[k].tokens), time.perf_counter()
                if n > gaps["tokens"]:
                    if gaps["tokens"]:
                        gap = (now - gaps["at"]) / (n - gaps["tokens"])
                        for _ in range(n - gaps["tokens"]):
                            engine.metrics.tbt.observe(gap)
                    gaps["tokens"], gaps["at"] = n, now
                loop.call_soon_threadsafe(events.put_nowait, (k, ev))

            return on_event

        # n choices: n sequences of the same prompt in the engine, each with its own seed.
        stop_ids = req.stop_ids
        if req.stop_token_ids:
            stop_ids = (engine.stop_ids if stop_ids is None else stop_ids) | req.stop_token_ids
        jobs = [Request(ids, max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                        stop=req.stop, stop_ids=stop_ids, seed=choice_seed(req.seed, k), on_event=on_event_of(k),
                        logprobs=req.logprobs, prompt_logprobs=req.echo and req.logprobs is not None,
                        min_p=req.min_p, presence_penalty=req.presence_penalty,
                        frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
                        logit_bias=dict(req.logit_bias) or None, constraint=req.constraint)
                for k in range(req.n)]

        def cancel_all():
            for job in jobs:
                job.cancel()

        try:
            for job in jobs:
                engine.submit(job)
        except QueueFull as e:
            cancel_all()
            raise APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded") from None
        except EngineStopped as e:
            cancel_all()
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        except ValueError as e:  # the engine's own checks; the protocol's should have caught it first
            cancel_all()
            raise APIError(400, str(e), code="invalid_value") from None
        out = Responder(req, model_name, engine.tokenizer, ids)
        outs = [out] + [Responder(req, model_name, engine.tokenizer, ids, index=k, id=out.id) for k in range(1, req.n)]
        if req.stream:
            count(endpoint, 200)
            # The generator's own cleanup does not run if the client left before it started;
            # the background task, run once the response ends either way, covers that.
            return StreamingResponse(stream(jobs, outs, events, deadline), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(cancel_all))

        async def watch_disconnect():
            # The body has been read, so the next message is the disconnect (or the end of
            # the response, after this task is cancelled).
            while (await http.receive())["type"] != "http.disconnect":
                pass
            cancel_all()
            events.put_nowait(_DISCONNECTED)

        watcher = asyncio.ensure_future(watch_disconnect())
        try:
            left = len(jobs)
            while left:
                item = await next_event(events, deadline)
                if item is None:
                    cancel_all()
                    engine.metrics.timeouts += 1
                    raise _timed_out(request_timeout)
                if item is _DISCONNECTED:
                    count(endpoint, 499)
                    return Response(status_code=499)  # nobody reads it
                ev = item[1]
                if ev.kind == "error":
                    raise APIError(500, ev.text, type="server_error", code="generation_failed")
                if ev.kind == "done":
                    left -= 1
        finally:
            watcher.cancel()
            cancel_all()
        if any(job.finish_reason == "cancelled" for job in jobs):
            raise APIError(503, "the request was cancelled because the server is shutting down",
                           type="server_error", code="shutting_down")
        count(endpoint, 200)
        responses = [o.response(job.text, job.finish_reason, job.tokens, job.token_logprobs, job.prompt_token_logprobs)
                     for o, job in zip(outs, jobs)]
        if req.tools is not None:
            for o, job, r in zip(outs, jobs, responses):
                content, calls = read_reply(req.tools, job.text.lstrip())
                if calls:
                    with_calls(r, o.index, calls)
                else:
                    r["choices"][0]["message"]["content"] = content
        return JSONResponse(merge_choices(responses))

    async def next_event(events: asyncio.Queue[Event], deadline: float | None) -> Event | None:
        """The request's next event, or None when its deadline passes first."""
        if deadline is None:
            return await events.get()
        try:
            return await asyncio.wait_for(events.get(), max(deadline - loop_time(), 0))
        except asyncio.TimeoutError:
            return None

    def delta_chunk(out: Responder, job: Request, delta: dict) -> dict:
        """A chat stream chunk of `delta` (text, or tool call deltas: tools.ReplyReader's)."""
        if "content" in delta:
            return out.chunk(delta["content"], None, job.tokens, job.token_logprobs)
        chunk = out.chunk(None, None, job.tokens, job.token_logprobs)
        chunk["choices"][0]["delta"] = delta
        return chunk

    async def stream(jobs: list[Request], outs: list[Responder], events: asyncio.Queue[tuple[int, Event]],
                     deadline: float | None):
        try:
            if outs[0].req.chat:
                for out in outs:
                    yield sse(out.role_chunk())
            left = len(jobs)
            # Tool calls: each choice's reply is read for them (tools.py); text that may be a
            # call is held until the choice ends.
            readers = [ReplyReader(out.req.tools) if out.req.tools is not None else None for out in outs]
            while left:
                item = await next_event(events, deadline)
                if item is None:
                    for job in jobs:
                        job.cancel()
                    engine.metrics.timeouts += 1
                    yield sse(_timed_out(request_timeout).body())
                    break
                k, ev = item
                job, out = jobs[k], outs[k]
                if ev.kind == "text":
                    text = out.reply_text(ev.text)
                    if readers[k] is not None:
                        for delta in readers[k].push(text):
                            yield sse(delta_chunk(out, job, delta))
                    elif text:
                        yield sse(out.chunk(text, None, job.tokens, job.token_logprobs))
                elif ev.kind == "error":
                    yield sse(APIError(500, ev.text, type="server_error", code="generation_failed").body())
                    break
                else:
                    reason = ev.finish_reason
                    if readers[k] is not None:
                        deltas, called = readers[k].finish()
                        for delta in deltas:
                            yield sse(delta_chunk(out, job, delta))
                        if called:
                            reason = "tool_calls"
                    yield sse(out.chunk(None, reason, job.tokens, job.token_logprobs))
                    left -= 1
                    if not left and out.req.include_usage:
                        yield sse(out.usage_chunk(sum(len(j.tokens) for j in jobs)))
            yield sse("[DONE]")
        finally:
            # Normal end, client disconnect (Starlette cancels this generator) or server
            # shutdown: a request still running gives its slot back.
            for job in jobs:
                job.cancel()

    # Plain Starlette routes: the handlers parse and validate the body themselves, so every
    # error gets OpenAI's shape (FastAPI's would be a 422 with its own), and the string
    # annotations of this module (postponed evaluation) do not meet FastAPI's introspection.
    def route(endpoint: str, parse):
        async def handle(http):
            arrived = loop_time()
            try:
                req = parse(parse_json(await http.body(), model_name), info)
                return await run(http, endpoint, req, arrived)
            except APIError as e:
                return error(e, endpoint)
            except Exception as e:  # noqa: BLE001 - a bug must still answer in OpenAI's shape
                traceback.print_exc()
                return error(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error",
                                      code="internal_error"), endpoint)

        return handle

    app.add_route("/v1/completions", route("completions", parse_completion), methods=["POST"])
    width = getattr(getattr(engine.model, "args", None), "dim", None)

    async def embeddings(http):
        arrived = loop_time()
        try:
            req = parse_embeddings(parse_json(await http.body(), model_name), info, width)
            # Tokenising off the event loop, as prompts are; the engine thread runs the model.
            ids = await asyncio.to_thread(lambda: [encode_embedding_input(engine.tokenizer, x, engine.context)
                                                   for x in req.inputs])
            left = None if request_timeout is None else max(arrived + request_timeout - loop_time(), 0)
            try:
                vectors = await asyncio.to_thread(engine.embed, ids, left)
            except TimeoutError:
                engine.metrics.timeouts += 1
                raise _timed_out(request_timeout) from None
            except EngineStopped as e:
                raise APIError(503, str(e), type="server_error", code="shutting_down") from None
            except ValueError as e:  # the engine's own checks (under --tp: not available)
                raise APIError(400, str(e), param="input", code="invalid_value") from None
            count("embeddings", 200)
            return JSONResponse(embeddings_response(vectors, model_name, req.encoding_format, sum(map(len, ids))))
        except APIError as e:
            return error(e, "embeddings")
        except Exception as e:  # noqa: BLE001 - a bug must still answer in OpenAI's shape
            traceback.print_exc()
            return error(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error",
                                  code="internal_error"), "embeddings")

    app.add_route("/v1/embeddings", embeddings, methods=["POST"])
    app.add_route("/v1/chat/completions", route("chat", parse_chat), methods=["POST"])

    @app.get("/v1/models")
    async def models():
        return models_body

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            e = APIError(404, f"the model {model_id!r} does not exist; this server serves {model_name!r}",
                         param="model", code="model_not_found")
            return JSONResponse(e.body(), status_code=404)
        return models_body["data"][0]

    @app.get("/health")
    async def health():
        body = {"status": "shutting_down" if state["shutting_down"] else "ok", "model": model_name,
                "slots": engine.max_batch, "active": engine.active, "queued": engine.queue_length,
                "auth": api_key is not None}
        return JSONResponse(body, status_code=503 if state["shutting_down"] else 200)

    @app.get("/metrics")
    async def metrics():
        stats = getattr(engine, "stats", None)
        try:
            stats = stats() if callable(stats) else None
        except Exception:  # noqa: BLE001 - a failing stats() must not take /metrics down
            traceback.print_exc()
            stats = None
        return PlainTextResponse(engine.metrics.render(engine.queue_length, engine.active,
                                                       stats if isinstance(stats, dict) else None),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.exception_handler(HTTPException)
    async def http_error(http, exc: HTTPException):
        # 404 for unknown paths, 405 for wrong methods: in OpenAI's shape too.
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    static = resources.files("llamaworks.serve") / "static"

    def static_file(name: str, media_type: str):
        body = (static / name).read_bytes()  # read once: the files are part of the package

        async def serve_file(http):
            return Response(body, media_type=media_type, headers={"Cache-Control": "no-cache"})

        return serve_file

    app.add_route("/", static_file("index.html", "text/html; charset=utf-8"), methods=["GET"])
    app.add_route("/static/chat.js", static_file("chat.js", "text/javascript; charset=utf-8"), methods=["GET"])
    app.add_route("/static/chat.css", static_file("chat.css", "text/css; charset=utf-8"), methods=["GET"])

    on_reject = lambda path, status: count(ENDPOINTS.get(path, "other"), status)  # noqa: E731
    app.add_middleware(BodyLimit, limits=limits, on_reject=on_reject)
    if api_key is not None:  # added last, so outermost: a request without the key is refused before its body is read
        app.add_middleware(APIKeyAuth, key=api_key, on_reject=on_reject)
    return app
