"""The OpenAI protocol: request bodies parsed and validated into typed requests, responses
and stream chunks built, errors in OpenAI's shape. No HTTP and no engine here; api.py
wires these to the web framework and the engine.

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, so the
official clients raise their usual exceptions (BadRequestError, NotFoundError,
RateLimitError, ...). Every field of a body is checked for type and range before any
work is done for it: a value outside its range is a 400 naming it, never an exception
further in (a seed beyond 64 bits, a temperature written as a 400-digit integer).

Chat template. A conversation is rendered with the served model's chat template
(tokenizer/chat.py: the model directory's chat_template.jinja, or `serve --chat-template`)
and tokenised with `encode_chat`, so control tokens come only from the template: a user
message that spells "<|eot_id|>" is encoded as text. The template's BOS is the prompt's
(none is added), and generation stops at the tokenizer's stop ids, the template's
end-of-turn tokens and its stop strings (besides the request's own). A template that
refuses the conversation (roles out of order, say) is a 400 naming `messages`.

A base model (LLaMA has no chat format of its own) gets the "plain" template, the dialogue
a base model continues naturally:

    <bos>{system messages, joined by blank lines}\\n\\n      (only when there are any)
    User: {content}\\n
    Assistant: {content}\\n
    ...
    Assistant:

which stops at "\\nUser:" too. The reply is returned without its leading spaces.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import re
import reprlib
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llamaworks.serve.structured import compile_constraint
from llamaworks.serve.tools import (
    Tools,
    ToolsError,
    assistant_calls,
    constrain,
    no_tool_template,
    parse_tools,
    tool_message,
    uses_tools,
)
from llamaworks.tokenizer import stop_ids as tokenizer_stop_ids
from llamaworks.tokenizer.chat import (
    ChatTemplate,
    control_token_ids,
    encode_chat,
    resolve_chat_template,
    stop_token_ids,
)

CHAT_STOP = "\nUser:"  # the "plain" template's stop string
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# OpenAI allows 4 stop strings; lm-evaluation-harness may send more (its until list and eos).
MAX_STOP_STRINGS = 16
# Longer stop strings serve no client we know of, and each costs its length in the engine
# thread when its matcher is built (stops.StopAutomaton); 16 of this length take ~2 ms.
MAX_STOP_CHARS = 1000
MAX_TOP_LOGPROBS = 20
MAX_N = 16  # choices per request (each a sequence in the engine)
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
MAX_STOP_TOKEN_IDS = 64
# The seeds torch.Generator.manual_seed takes.
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1

# What error messages echo of a client's value: bounded, so a megabyte string or a deeply
# nested list comes back as a short, shallow excerpt.
_excerpt = reprlib.Repr()
_excerpt.maxstring = _excerpt.maxother = 60
_excerpt.maxlong = 40
_excerpt.maxlevel = 2
_excerpt.maxlist = _excerpt.maxtuple = _excerpt.maxdict = 6


def shown(value: Any) -> str:
    return _excerpt.repr(value)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def render_chat(messages: list[dict[str, str]]) -> str:
    """The "plain" template's text of a conversation, without its BOS (see the module's doc)."""
    return ChatTemplate.builtin("plain", bos_token="").render(messages)


# --- chat formats --------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatFormat:
    """A chat template as the server uses it with one tokenizer."""

    template: ChatTemplate
    # Control-token text -> id, for encode_chat (None: no tokenizer known, only parsing).
    control_tokens: Mapping[str, int] | None
    # Ids a reply stops at: the tokenizer's stop ids and the template's end-of-turn tokens.
    stop_ids: frozenset[int] | None
    # The control tokens' text in a rendered conversation: each is one token however long its
    # text, so the character bound of the prompt does not count it.
    controls: re.Pattern | None


def chat_format(tokenizer, template: ChatTemplate | None = None) -> ChatFormat:
    """The template (default: resolve_chat_template's) checked against the tokenizer: every
    control token it writes must be one of the tokenizer's (ValueError naming the template
    otherwise, when the server starts rather than at the first request)."""
    template = resolve_chat_template(tokenizer) if template is None else template
    controls = control_token_ids(tokenizer, template)
    stops = tokenizer_stop_ids(tokenizer) | frozenset(stop_token_ids(tokenizer, template, control_tokens=controls))
    return ChatFormat(template, controls, stops, _controls_pattern(controls))


@functools.cache
def _plain_format() -> ChatFormat:
    # Parsing without a tokenizer (protocol tests, fuzzing): the plain template's own tokens.
    template = ChatTemplate.builtin("plain")
    literals = [t for t in (template.bos_token, template.eos_token, *template.control_literals) if t]
    return ChatFormat(template, None, None, _controls_pattern(literals))


def _controls_pattern(texts) -> re.Pattern | None:
    texts = sorted({t for t in texts if t}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None


# --- what the server serves ----------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    name: str
    context: int  # tokens
    vocab_size: int
    # Prompts longer than this many characters cannot fit the context window, so they are
    # refused before they are tokenised (None: no such bound is known for the tokenizer).
    max_prompt_chars: int | None
    chat: ChatFormat | None = None  # None: the plain template, for parsing without a tokenizer


def model_info(name: str, context: int, tokenizer, chat_template: ChatTemplate | None = None) -> ModelInfo:
    """The model as requests are checked against it. With byte fallback every character is
    covered by pieces of at most the longest piece's length, so a text of context x that
    many characters needs more tokens than the context holds. Without byte fallback a run
    of unknown characters may become a single token, and no such bound holds. (Byte-level
    BPE has every byte as a token: its table holds the lone bytes 0x80-0xFF as byte values.)
    `chat_template` is the chat format served (default: resolve_chat_template's)."""
    table = tokenizer.piece_table()
    longest = max((len(p) for p in table if isinstance(p, str)), default=1)
    byte_fallback = any(isinstance(p, int) for p in table)
    return ModelInfo(name, context, tokenizer.vocab_size, context * max(longest, 1) if byte_fallback else None,
                     chat_format(tokenizer, chat_template))


def parse_json(raw: bytes, model_name: str) -> dict:
    """The body as a JSON object naming the served model."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(400, "the request body nests JSON too deeply", code="invalid_json") from None
    except ValueError as e:  # bad JSON, bad UTF-8, or an integer past Python's 4300-digit limit
        raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str):
        raise APIError(400, f"model is required; this server serves {model_name!r}", param="model",
                       code="invalid_value")
    if model != model_name:
        raise APIError(404, f"the model {shown(model)} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    return body


# --- typed requests ------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    """A validated /v1/completions or /v1/chat/completions request."""

    chat: bool
    # Text to tokenise or token ids; for chat the rendered conversation, which bounds its length
    # (the ids come from `messages` through encode_chat, which keeps message text out of control tokens).
    prompt: str | tuple[int, ...]
    prompt_param: str  # where errors about the prompt point: "prompt" or "messages"
    max_tokens: int | None  # as asked; None: the endpoint's default
    max_tokens_param: str  # "max_tokens" or "max_completion_tokens", as the client named it
    temperature: float
    top_p: float
    top_k: int | None
    seed: int | None
    stop: tuple[str, ...]  # the client's, and for chat the template's
    stream: bool
    include_usage: bool
    logprobs: int | None  # alternatives per token; None: no log-probabilities
    echo: bool
    messages: tuple[dict[str, str], ...] = ()  # chat: the conversation, checked
    stop_ids: frozenset[int] | None = None  # ids that end the reply; None: the tokenizer's
    # Sampling options (_sampling_options; the engine's Request has their meaning).
    n: int = 1  # choices: n sequences of the same prompt, choice k seeded by choice_seed(seed, k)
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop_token_ids: frozenset[int] = frozenset()  # vLLM's: ids that end the reply besides stop_ids
    constraint: Any = None  # structured.Constraint from response_format or grammar; None: free text
    tools: Tools | None = None  # chat: the tools offered (serve/tools.py); None: a text reply

    def budget(self, prompt_tokens: int, context: int) -> int:
        """Tokens to generate: the asked max_tokens, which must fit beside the prompt, or
        the default (completions: OpenAI's 16; chat: the rest of the context window)."""
        room = context - prompt_tokens
        assert room >= 1, (prompt_tokens, context)  # check_prompt_tokens ran first
        if self.max_tokens is None:
            return room if self.chat else min(DEFAULT_COMPLETION_MAX_TOKENS, room)
        if self.max_tokens > room:
            raise invalid(self.max_tokens_param,
                          f"{self.max_tokens_param} must be an integer in [1, {room}] (the context window of "
                          f"{context} tokens less the prompt's {prompt_tokens}), got {shown(self.max_tokens)}")
        return self.max_tokens


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    # Compared with the bounds before any conversion: an integer of hundreds of digits is
    # a valid JSON number that float() and math.isfinite() refuse with OverflowError.
    return _is_int(x) or (isinstance(x, float) and math.isfinite(x))


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    x = body.get(name)
    if x is None:
        return default
    if not _is_real(x) or x > hi or x < lo or (lo_open and x == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise invalid(name, f"{name} must be a number in {bound}, got {shown(x)}")
    return float(x)


def _integer(body: dict, name: str, lo: int, hi: int | None, hint: str = "") -> int | None:
    x = body.get(name)
    if x is not None and (not _is_int(x) or x < lo or (hi is not None and x > hi)):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise invalid(name, f"{name} must be an integer {bound}{hint}, got {shown(x)}")
    return x


def _boolean(body: dict, name: str, default: bool) -> bool:
    x = body.get(name)
    if x is None:
        return default
    if not isinstance(x, bool):
        raise invalid(name, f"{name} must be a boolean, got {shown(x)}")
    return x


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) for s in stop)
            or any(len(s) > MAX_STOP_CHARS for s in stop)):
        raise invalid("stop", f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings of at most "
                              f"{MAX_STOP_CHARS} characters each, got {shown(stop)}")
    return tuple(stop)


# OpenAI options this server does not implement: refused with a 400 that names them when set
# to anything but their "off" value, rather than silently answering without them.
_UNSUPPORTED = {
    "completions": {"best_of": (None, 1), "suffix": (None, "")},
    "chat": {"functions": (None, []), "function_call": (None, "none"),
             "audio": (None,), "modalities": (None, ["text"])},
}


def _refuse_unsupported(body: dict, endpoint: str) -> None:
    for name, off in _UNSUPPORTED[endpoint].items():
        if name in body and not any(type(body[name]) is type(v) and body[name] == v for v in off):
            raise invalid(name, f"{name} is not supported by this server; leave it unset", "unsupported_parameter")


def _options(body: dict, chat: bool, template_stops: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields both endpoints share, checked in the order a client reads errors best:
    sampling, then stopping, then streaming and log-probabilities. `template_stops` are the
    chat template's stop strings, which follow the client's."""
    opts: dict[str, Any] = {
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
    }
    top_k = body.get("top_k")  # not OpenAI's, but vLLM's and llama.cpp's; -1 or null = off
    if top_k is not None and (not _is_int(top_k) or (top_k < 1 and top_k != -1)):
        raise invalid("top_k", f"top_k must be a positive integer (or -1 for no limit), got {shown(top_k)}")
    opts["top_k"] = None if top_k in (None, -1) else top_k
    opts["seed"] = _integer(body, "seed", MIN_SEED, MAX_SEED, hint=" (-2**63 to 2**64 - 1)")
    opts["n"] = _integer(body, "n", 1, MAX_N, hint=" (choices to generate)") or 1
    opts["min_p"] = _number(body, "min_p", 0.0, 0.0, 1.0)  # vLLM's and llama.cpp's
    opts["presence_penalty"] = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
    opts["frequency_penalty"] = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    opts["repetition_penalty"] = _number(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True)  # vLLM's
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    opts["max_tokens"] = _integer(body, name, 1, None, hint=" (tokens to generate)")
    opts["max_tokens_param"] = name
    opts["stop"] = _stop(body) + template_stops
    opts["stream"] = _boolean(body, "stream", False)
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise invalid("stream_options", f"stream_options must be an object, got {shown(so)}")
    opts["include_usage"] = bool((so or {}).get("include_usage", False))
    if chat:
        on = _boolean(body, "logprobs", False)
        top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top is not None and not on:
            raise invalid("top_logprobs", "top_logprobs needs logprobs: true")
        opts["logprobs"], opts["echo"] = (top or 0) if on else None, False
    else:
        opts["logprobs"] = _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)
        opts["echo"] = _boolean(body, "echo", False)
    if opts["stream"] and opts["echo"]:
        raise invalid("echo", "echo is served without streaming; set stream to false", "unsupported_value")
    return opts


def _token_options(body: dict, info: ModelInfo) -> dict[str, Any]:
    """logit_bias and stop_token_ids, whose ids are checked against the vocabulary."""
    vocab = info.vocab_size
    bias = body.get("logit_bias")
    pairs = []
    if bias is not None:
        if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
            raise invalid("logit_bias", f"logit_bias must be an object of at most {MAX_LOGIT_BIAS} token ids (as "
                                        f"strings) to biases in [-100, 100], got {shown(bias)}")
        for key, value in bias.items():
            token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 12 else -1
            if not 0 <= token < vocab:
                raise invalid("logit_bias", f"logit_bias keys must be token ids in [0, {vocab}), got {shown(key)}")
            if not _is_real(value) or not -100 <= value <= 100:
                raise invalid("logit_bias", f"logit_bias values must be numbers in [-100, 100], got {shown(value)} "
                                            f"for token {token}")
            pairs.append((token, float(value)))
    ids = body.get("stop_token_ids")
    if ids is not None and (not isinstance(ids, list) or len(ids) > MAX_STOP_TOKEN_IDS
                            or not all(_is_int(t) and 0 <= t < vocab for t in ids)):
        raise invalid("stop_token_ids", f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} token ids "
                                        f"in [0, {vocab}), got {shown(ids)}")
    return {"logit_bias": tuple(pairs), "stop_token_ids": frozenset(ids or ()), "constraint": _constraint(body)}


def _constraint(body: dict):
    """The structured.Constraint of response_format or grammar (only one), or None."""
    fmt, grammar = body.get("response_format"), body.get("grammar")
    if fmt is not None and grammar is not None:
        raise invalid("grammar", "set response_format or grammar, not both")
    if grammar is not None:
        kind, spec, param = "grammar", grammar, "grammar"
    elif fmt is None:
        return None
    else:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "text":
            return None
        param = "response_format"
        if kind == "json_schema":
            js = fmt.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema", {}), (dict, bool)):
                raise invalid(param, "response_format json_schema needs a json_schema object with a schema object, "
                                     f"got {shown(js)}")
            spec = js.get("schema", {})  # no schema: any JSON value (OpenAI requires one; vLLM does not)
        elif kind != "json_object":
            raise invalid(param, f"response_format type must be text, json_object or json_schema, got {shown(kind)}")
        else:
            spec = None
    try:
        return compile_constraint(kind, spec)
    except ValueError as e:
        raise invalid(param, f"{param}: {e}") from None


def choice_seed(seed: int | None, k: int) -> int | None:
    """Choice k's seed: the request's for the first, then distinct ones derived from it (None:
    unseeded), kept in the range torch.Generator takes."""
    if seed is None or k == 0:
        return seed
    return (seed + k * 0x9E3779B97F4A7C15) % 2**64


def check_prompt_tokens(n: int, param: str, context: int) -> None:
    if n >= context:
        raise APIError(400, f"the {param} has {n} tokens but the context window is {context} tokens and at least "
                       "one new token must fit: shorten it", param=param, code="context_length_exceeded")


def _check_prompt_chars(text: str, param: str, info: ModelInfo, controls: re.Pattern | None = None) -> None:
    if info.max_prompt_chars is None or len(text) < info.max_prompt_chars:
        return
    # A control token's text is one token however long: only the rest is bounded by the
    # longest piece (a rough count, which only errs towards accepting).
    n = len(text) - (sum(len(m) for m in controls.findall(text)) if controls is not None else 0)
    if n >= info.max_prompt_chars:
        raise APIError(400, f"the {param} has {n} characters, more than the context window of "
                       f"{info.context} tokens can hold: shorten it", param=param, code="context_length_exceeded")


def parse_completion(body: dict, info: ModelInfo) -> GenerationRequest:
    _refuse_unsupported(body, "completions")
    opts = _options(body, chat=False) | _token_options(body, info)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        _check_prompt_chars(prompt, "prompt", info)
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt[: info.context]):
        # The length first: a body of a few MB can hold millions of ids, each checked in Python.
        check_prompt_tokens(len(prompt), "prompt", info.context)
        if not all(0 <= t < info.vocab_size for t in prompt):
            raise invalid("prompt", f"prompt token ids must be in [0, {info.vocab_size})")
        prompt = tuple(prompt)
    else:
        raise invalid("prompt", "prompt must be a string or a list of token ids (one prompt per request; send "
                                "several requests for several prompts)")
    return GenerationRequest(chat=False, prompt=prompt, prompt_param="prompt", **opts)


def _messages(body: dict) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise invalid("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        if not isinstance(role, str) or role not in ("system", "developer", "user", "assistant", "tool"):
            raise invalid("messages", f"messages[{i}] must have a role of system, user, assistant or tool")
        try:
            if role == "tool":
                out.append(tool_message(m, i))
                continue
            if role == "assistant" and m.get("tool_calls") is not None:
                content = m.get("content")
                out.append({"role": "assistant", "content": content if isinstance(content, str) else "",
                            "tool_calls": assistant_calls(m, i)})
                continue
        except ToolsError as e:
            raise invalid(e.param, e.message, e.code) from None
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise invalid("messages", f"messages[{i}].content parts must all be of type text")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise invalid("messages", f"messages[{i}].content must be a string")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def parse_chat(body: dict, info: ModelInfo) -> GenerationRequest:
    _refuse_unsupported(body, "chat")
    fmt = info.chat or _plain_format()
    opts = _options(body, chat=True, template_stops=fmt.template.stop_strings) | _token_options(body, info)
    messages = _messages(body)
    try:
        tools = parse_tools(body, fmt.template.renders_tools, fmt.template.where)
    except ToolsError as e:
        raise invalid(e.param, e.message, e.code) from None
    if tools is not None and opts["constraint"] is not None:
        raise invalid("tools", "tools and response_format (or grammar) cannot be combined yet; send one of them",
                      "unsupported_value")
    tools, call_constraint = constrain(tools)  # required/named: the reply is held to a call's schema
    if call_constraint is not None:
        opts["constraint"] = call_constraint
    if not fmt.template.renders_tools and uses_tools(messages):
        raise invalid("messages", "messages hold tool calls or tool results, but " + no_tool_template(
            fmt.template.where), "unsupported_value")
    try:
        prompt = fmt.template.render(messages, **({"tools": tools.template_tools()} if tools else {}))
    except ValueError as e:  # the template refused the conversation, or failed on it
        raise invalid("messages", f"messages: {e}") from None
    _check_prompt_chars(prompt, "messages", info, fmt.controls)
    return GenerationRequest(chat=True, prompt=prompt, prompt_param="messages", messages=tuple(messages),
                             stop_ids=fmt.stop_ids, tools=tools, **opts)


def encode_prompt(tokenizer, req: GenerationRequest, chat: ChatFormat | None = None) -> list[int]:
    """The prompt's token ids (bos first; for chat, the template's), checked against the
    context window. `chat` is the served chat format (ModelInfo.chat). Slow for long text:
    api.py runs it off the event loop."""
    if isinstance(req.prompt, tuple):
        return list(req.prompt)
    try:
        req.prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate ("\ud800"), which JSON allows and UTF-8 does not
        raise invalid(req.prompt_param, f"the {req.prompt_param} is not valid Unicode text: {e.reason} at "
                                        f"character {e.start}") from None
    if not req.chat:
        return tokenizer.encode(req.prompt, bos=True, eos=False)
    fmt = chat if chat is not None else chat_format(tokenizer)
    try:
        ids = encode_chat(tokenizer, fmt.template, req.messages, add_generation_prompt=True,
                          control_tokens=fmt.control_tokens, **({"tools": req.tools.template_tools()} if req.tools
                                                                else {}))
        if req.tools is not None and req.tools.prefix:  # a required call: its start is the reply's start
            ids += tokenizer.encode(req.tools.prefix, bos=False, eos=False)
        return ids
    except ValueError as e:  # e.g. Llama 2's [INST] typed in a message, which its format cannot tell apart
        raise invalid("messages", f"messages: {e}") from None


# --- responses -----------------------------------------------------------------------------


def finish_reason(reason: str | None) -> str | None:
    # A request the server cancelled at shutdown ended early, as one ended by a stop string.
    return "stop" if reason == "cancelled" else reason


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(obj: dict | str) -> str:
    """One server-sent event."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def _token_bytes(tokenizer, token_id: int) -> bytes | None:
    # The exact bytes of a byte-level token (None for tokenizers without them, and for
    # special tokens, which add no bytes to the text).
    get = getattr(tokenizer, "token_bytes", None)
    raw = get(token_id) if get is not None else None
    return raw or None


def token_text(tokenizer, token_id: int) -> str:
    # The piece as text: "▁" is a space; a byte-fallback piece outside ASCII is "bytes:\xNN"
    # (OpenAI's convention for partial characters); control pieces keep their name ("<s>").
    # A byte-level token holding part of a character is "bytes:" and its bytes, the valid
    # ones as text and the others as \xNN, instead of the U+FFFD of its decoded text.
    piece = tokenizer.piece_table()[token_id]
    if piece is None:
        return tokenizer.id_to_piece(token_id)
    raw = _token_bytes(tokenizer, token_id)
    if raw is not None:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + raw.decode("utf-8", "backslashreplace")
    if isinstance(piece, int):
        return chr(piece) if piece < 0x80 else f"bytes:\\x{piece:02x}"
    return piece


def completion_logprobs(tokenizer, decoder, ids: list[int], scored: list, first_unscored: bool = False,
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
    return {"tokens": [token_text(tokenizer, t) for t in ids],
            "token_logprobs": [lp for lp, _ in scored],
            "top_logprobs": [None if alts is None else {token_text(tokenizer, a): v for a, v in alts}
                             for _, alts in scored],
            "text_offset": offsets}, at


def chat_logprobs(tokenizer, ids: list[int], scored: list) -> dict:
    def entry(t, lp):
        text = token_text(tokenizer, t)
        exact = _token_bytes(tokenizer, t)
        if exact is not None:  # byte-level BPE: the token's own bytes, partial characters included
            return {"token": text, "logprob": lp, "bytes": list(exact)}
        raw = tokenizer.piece_table()[t]
        return {"token": text, "logprob": lp, "bytes": [raw] if isinstance(raw, int) else list(text.encode())}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, v) for a, v in alts]}
                        for t, (lp, alts) in zip(ids, scored)]}


class Responder:
    """The response objects of one request: the whole response, or its stream of chunks."""

    def __init__(self, req: GenerationRequest, model_name: str, tokenizer, prompt_ids: list[int], index: int = 0,
                 id: str | None = None):
        """One choice's responder: `index` is its place among the request's n choices, all of
        which share the first's `id`."""
        self.req, self.model_name, self.tokenizer, self.prompt_ids = req, model_name, tokenizer, prompt_ids
        self.index = index
        self.id = id or ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if req.chat else "text_completion"
        self._strip = req.chat  # chat replies lose their leading spaces (see the template above)
        # Streaming: tokens whose log-probabilities went out, their text's length, and a
        # decoder holding that text (completions' text_offset counts from the prompt's end).
        self._sent_tokens = 0
        self._sent_chars = 0
        self._decoder = tokenizer.stream_decoder(prompt_ids) if req.logprobs is not None and not req.chat else None

    def reply_text(self, text: str) -> str:
        if self._strip:
            text = text.lstrip()
            self._strip = not text
        return text

    def _message(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_name, "choices": choices}

    def role_chunk(self) -> dict:
        """A chat stream's first chunk."""
        return self._message("chat.completion.chunk", [{"index": self.index,
                                                        "delta": {"role": "assistant", "content": ""},
                                                        "logprobs": None, "finish_reason": None}])

    def _new_logprobs(self, tokens: list[int], scored: list) -> dict | None:
        # The engine appends a token and its log-probabilities before it emits the token's
        # text, so every token behind a text event is here (text held back for a stop
        # string or a partial character has its log-probabilities sent already).
        if self.req.logprobs is None:
            return None
        start, end = self._sent_tokens, len(scored)
        toks, scored = tokens[start:end], scored[start:end]
        self._sent_tokens = end
        if not toks:
            return None
        if self.req.chat:
            return chat_logprobs(self.tokenizer, toks, scored)
        out, self._sent_chars = completion_logprobs(self.tokenizer, self._decoder, toks, scored,
                                                    base=self._sent_chars)
        return out

    def chunk(self, delta: str | None, finish: str | None, tokens: list[int], scored: list) -> dict:
        """A stream chunk: new text (or None) and the finish reason at the end; `tokens` and
        `scored` are all the request's tokens and log-probabilities so far."""
        logprobs = self._new_logprobs(tokens, scored)
        if self.req.chat:
            choice = {"index": self.index, "delta": {} if delta is None else {"content": delta}, "logprobs": logprobs,
                      "finish_reason": finish_reason(finish)}
            msg = self._message("chat.completion.chunk", [choice])
        else:
            choice = {"index": self.index, "text": delta or "", "logprobs": logprobs,
                      "finish_reason": finish_reason(finish)}
            msg = self._message("text_completion", [choice])
        if self.req.include_usage:
            msg["usage"] = None
        return msg

    def usage_chunk(self, completion_tokens: int) -> dict:
        obj = "chat.completion.chunk" if self.req.chat else "text_completion"
        return {**self._message(obj, []), "usage": usage(len(self.prompt_ids), completion_tokens)}

    def response(self, text: str, finish: str | None, tokens: list[int], scored: list,
                 prompt_scored: list) -> dict:
        """The whole (non-streamed) response."""
        tok, ids, n = self.tokenizer, self.prompt_ids, self.req.logprobs
        text = self.reply_text(text)
        if self.req.chat:
            logprobs = None if n is None else chat_logprobs(tok, tokens, scored)
            choice = {"index": self.index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": finish_reason(finish)}
        else:
            logprobs = None
            if n is not None and self.req.echo:
                logprobs = completion_logprobs(tok, tok.stream_decoder(), ids + tokens, prompt_scored + scored,
                                               first_unscored=True)[0]
            elif n is not None:
                logprobs = completion_logprobs(tok, tok.stream_decoder(ids), tokens, scored)[0]
            if self.req.echo:
                text = tok.decode(ids) + text
            choice = {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(finish)}
        return {**self._message(self.object, [choice]), "usage": usage(len(ids), len(tokens))}


def merge_choices(responses: list[dict]) -> dict:
    """One response of n choices from the n one-choice responses of a request's Responders
    (in index order): usage counts the prompt once and every choice's tokens."""
    out = dict(responses[0])
    out["choices"] = [c for r in responses for c in r["choices"]]
    completion = sum(r["usage"]["completion_tokens"] for r in responses)
    out["usage"] = usage(out["usage"]["prompt_tokens"], completion)
    return out


# --- embeddings ----------------------------------------------------------------------------

MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit of inputs per request


@dataclass(frozen=True)
class EmbeddingRequest:
    """A validated /v1/embeddings request: texts to tokenise (bos first, as a completion's
    prompt) or token id lists, and the vectors' encoding."""

    inputs: tuple[str | tuple[int, ...], ...]
    encoding_format: str  # "float" (JSON numbers) or "base64" (little-endian float32 bytes)


def parse_embeddings(body: dict, info: ModelInfo, dim: int) -> EmbeddingRequest:
    """`input`: a string, a list of strings, a list of token ids or a list of such lists, as
    OpenAI's; `encoding_format`; `dimensions` only as the model's own width (no truncation)."""
    raw = body.get("input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(_is_int(t) for t in raw[: info.context + 1])):
        raw = [raw]  # one input
    if not isinstance(raw, list) or not raw:
        raise invalid("input", "input must be a string, a non-empty list of strings, a list of token ids or a list "
                               "of token id lists")
    if len(raw) > MAX_EMBEDDING_INPUTS:
        raise invalid("input", f"input holds {len(raw)} items; at most {MAX_EMBEDDING_INPUTS} per request")
    inputs: list[str | tuple[int, ...]] = []
    for x in raw:
        if isinstance(x, str):
            if not x:
                raise invalid("input", "input strings must not be empty")
            _check_prompt_chars(x, "input", info)
            inputs.append(x)
        elif isinstance(x, list) and x and all(_is_int(t) for t in x[: info.context + 1]):
            if len(x) > info.context:
                raise APIError(400, f"an input has {len(x)} tokens but the context window is {info.context} tokens: "
                               "shorten it", param="input", code="context_length_exceeded")
            if not all(0 <= t < info.vocab_size for t in x):
                raise invalid("input", f"input token ids must be in [0, {info.vocab_size})")
            inputs.append(tuple(x))
        else:
            raise invalid("input", "each input must be a non-empty string or a non-empty list of token ids")
    fmt = body.get("encoding_format", "float")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise invalid("encoding_format", f"encoding_format must be 'float' or 'base64', got {shown(fmt)}")
    dims = body.get("dimensions")
    if dims is not None and (not _is_int(dims) or dims != dim):
        raise invalid("dimensions", f"dimensions: this model's embeddings have {dim} dimensions and are not "
                                    f"truncated; leave it unset or send {dim}, got {shown(dims)}")
    return EmbeddingRequest(tuple(inputs), fmt)


def encode_embedding_input(tokenizer, x: str | tuple[int, ...], context: int) -> list[int]:
    """One input's token ids (text with bos first, as a completion's prompt), checked against
    the context window."""
    if isinstance(x, tuple):
        return list(x)
    try:
        x.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, which JSON allows and UTF-8 does not
        raise invalid("input", f"the input is not valid Unicode text: {e.reason} at character {e.start}") from None
    ids = tokenizer.encode(x, bos=True, eos=False)
    if len(ids) > context:
        raise APIError(400, f"an input has {len(ids)} tokens but the context window is {context} tokens: shorten it",
                       param="input", code="context_length_exceeded")
    return ids


def embeddings_response(vectors, model_name: str, encoding_format: str, prompt_tokens: int) -> dict:
    """OpenAI's list of embeddings; `vectors` (n, dim) float32 tensor."""
    data = []
    for i, v in enumerate(vectors):
        if encoding_format == "base64":
            value: Any = base64.b64encode(v.float().numpy().astype("<f4").tobytes()).decode("ascii")
        else:
            value = v.float().tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": model_name,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
