"""The OpenAI protocol without HTTP: every body parses into a typed request or a 4xx APIError."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamaworks.serve.protocol import (
    CHAT_STOP,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    APIError,
    GenerationRequest,
    ModelInfo,
    model_info,
    parse_chat,
    parse_completion,
    parse_json,
)

from .conftest import MODEL

INFO = ModelInfo(MODEL, context=256, vocab_size=512, max_prompt_chars=256 * 16)
BIG = 10**400


def parse(body: dict | str, chat: bool = False) -> GenerationRequest:
    raw = body if isinstance(body, str) else json.dumps(body)
    return (parse_chat if chat else parse_completion)(parse_json(raw.encode(), MODEL), INFO)


def refused(body, chat=False) -> APIError:
    with pytest.raises(APIError) as e:
        parse(body, chat)
    return e.value


def test_a_typed_request():
    r = parse({"model": MODEL, "prompt": "x", "temperature": 1, "seed": 2**64 - 1, "stop": "\n", "max_tokens": 5})
    assert r == GenerationRequest(chat=False, prompt="x", prompt_param="prompt", max_tokens=5,
                                  max_tokens_param="max_tokens", temperature=1.0, top_p=1.0, top_k=None,
                                  seed=2**64 - 1, stop=("\n",), stream=False, include_usage=False, logprobs=None,
                                  echo=False)
    c = parse({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stop": ["a"]}, chat=True)
    # The rendered conversation (with the plain template's BOS text) bounds the length; the ids
    # come from the messages, kept as sent.
    assert c.prompt == "<s>User: Hi\nAssistant:" and c.stop == ("a", CHAT_STOP) and c.max_tokens is None
    assert c.messages == ({"role": "user", "content": "Hi"},)
    assert c.budget(10, 256) == 246 and parse({"model": MODEL, "prompt": [1, 2]}).budget(2, 256) == 16


@pytest.mark.parametrize("field, value", [
    ("seed", 2**64), ("seed", -(2**63) - 1), ("seed", 1.5),
    ("temperature", BIG), ("temperature", -BIG), ("top_p", BIG), ("max_tokens", 0), ("n", BIG),
    ("presence_penalty", BIG), ("logprobs", BIG), ("top_k", -BIG),
    ("stop", ["x"] * (MAX_STOP_STRINGS + 1)), ("stop", "x" * (MAX_STOP_CHARS + 1)),
])
def test_numbers_and_stops_out_of_range_name_their_field(field, value):
    e = refused({"model": MODEL, "prompt": "x", field: value})
    assert e.status == 400 and e.param == field
    assert len(e.message) < 400  # the value is echoed as a short excerpt


def test_max_tokens_beyond_the_room_left_by_the_prompt():
    r = parse({"model": MODEL, "prompt": "x", "max_tokens": BIG})
    with pytest.raises(APIError, match=r"max_tokens must be an integer in \[1, 246\]") as e:
        r.budget(10, 256)
    assert e.value.param == "max_tokens"


@pytest.mark.parametrize("raw", [
    "[" * 100_000 + "]" * 100_000,  # used to be a RecursionError: 500
    '{"model": "tiny", "prompt": "x", "seed": ' + "9" * 5000 + "}",  # past Python's 4300-digit limit: 500
    '{"model": "tiny", "prompt": "x", "temperature": 1' + "0" * 400 + "}",  # OverflowError in isfinite: 500
    "\xff\xfe",
    "",
])
def test_malformed_bodies_are_400(raw):
    e = refused(raw)
    assert e.status == 400 and e.param in (None, "temperature")


def test_prompts_too_long_for_the_context_are_refused_by_their_length():
    e = refused({"model": MODEL, "prompt": "x" * INFO.max_prompt_chars})
    assert e.code == "context_length_exceeded" and e.param == "prompt" and "4096 characters" in e.message
    e = refused({"model": MODEL, "messages": [{"role": "user", "content": "x" * INFO.max_prompt_chars}]}, chat=True)
    assert e.code == "context_length_exceeded" and e.param == "messages"
    e = refused({"model": MODEL, "prompt": [1] * 256})
    assert e.code == "context_length_exceeded"


def test_the_character_bound_is_safe(tiny_tokenizer):
    # No prompt under the bound is refused that would fit: at the bound, even the most
    # compressible text (the longest piece repeated) fills the context window.
    info = model_info(MODEL, 256, tiny_tokenizer)
    table = tiny_tokenizer.piece_table()
    longest = max((p for p in table if isinstance(p, str)), key=len)
    assert info.max_prompt_chars == 256 * len(longest)
    text = (longest * (info.max_prompt_chars // len(longest) + 1))[: info.max_prompt_chars]
    assert len(tiny_tokenizer.encode(text)) >= 256


# --- fuzzing: any JSON body is a request or a 4xx -------------------------------------------

scalars = (st.none() | st.booleans() | st.integers() | st.sampled_from([BIG, -BIG, 2**64, 2**63, -1, 0, 1, 2])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def field(plausible):
    # Mostly plausible, so that many bodies get past their first field to the later ones.
    return st.integers(0, 9).flatmap(lambda i: json_values if i == 0 else plausible)


# Edges where a check can be off by one or where a conversion overflows.
edges = st.sampled_from([BIG, -BIG, 2**64, 2**64 - 1, 2**63, -(2**63), -(2**63) - 1, 1e308, -1e-320])
OPTIONS = {
    "temperature": field(st.floats(0, 2) | st.sampled_from([0, 1e-38, 1e-300, 2]) | edges),
    "top_p": field(st.floats(0, 1) | edges),
    "top_k": field(st.integers(-2, 600) | edges),
    "seed": field(st.integers(-(2**64), 2**65) | edges),
    "n": field(st.integers(-1, 20) | edges),
    "presence_penalty": field(st.floats(-3, 3) | edges),
    "frequency_penalty": field(st.floats(-3, 3) | edges),
    "repetition_penalty": field(st.floats(-1, 11) | edges),
    "min_p": field(st.floats(-0.5, 1.5) | edges),
    "stop_token_ids": field(st.lists(st.integers(-5, 600) | edges, max_size=4)),
    "grammar": field(st.sampled_from(['root ::= "a" | "b"', "root ::= foo", "", "root ::= [0-9]+"])
                     | st.text(max_size=20)),
    "max_tokens": field(st.integers(-1, 8) | edges),
    "max_completion_tokens": field(st.integers(-1, 8) | edges),
    "stop": field(st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=5)),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "logprobs": field(st.integers(-1, 21) | st.booleans() | edges),
    "top_logprobs": field(st.integers(-1, 21) | edges),
    "echo": field(st.booleans()),
    "best_of": field(st.just(1)),
    "logit_bias": field(st.dictionaries(st.integers(-5, 600).map(str) | st.text(max_size=4),
                                        st.floats(-150, 150) | edges, max_size=4)),
    "tools": field(st.just([])),
    "response_format": field(st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json_schema"}])
                             | st.fixed_dictionaries({"type": st.just("json_schema"),
                                                      "json_schema": st.fixed_dictionaries({"schema": json_values})})),
}
options = st.fixed_dictionaries({}, optional=OPTIONS)
models = field(st.just(MODEL))
prompts = field(st.text(max_size=30) | st.lists(st.integers(-5, 600), max_size=6) | st.lists(st.text(max_size=5),
                                                                                             max_size=2))
message = st.fixed_dictionaries({"role": field(st.sampled_from(["system", "developer", "user", "assistant"])),
                                 "content": field(st.text(max_size=20) | st.lists(st.fixed_dictionaries(
                                     {"type": st.just("text"), "text": st.text(max_size=5)}), max_size=2))})
completion_bodies = st.builds(lambda m, p, o: {"model": m, "prompt": p, **o}, models, prompts, options)
chat_bodies = st.builds(lambda m, ms, o: {"model": m, "messages": ms, **o}, models,
                        field(st.lists(message, max_size=3)), options)


def check(raw: bytes, chat: bool) -> None:
    try:
        req = (parse_chat if chat else parse_completion)(parse_json(raw, MODEL), INFO)
    except APIError as e:
        assert e.status in (400, 404), e.body()
        return
    assert 0 <= req.temperature <= 2 and 0 < req.top_p <= 1
    assert req.top_k is None or req.top_k >= 1
    assert req.seed is None or -(2**63) <= req.seed < 2**64
    assert len(req.stop) <= MAX_STOP_STRINGS + chat and all(len(s) <= MAX_STOP_CHARS for s in req.stop)
    assert isinstance(req.prompt, str) or all(0 <= t < INFO.vocab_size for t in req.prompt)
    assert 1 <= req.n <= 16 and 0 <= req.min_p <= 1 and 0 < req.repetition_penalty <= 10
    assert -2 <= req.presence_penalty <= 2 and -2 <= req.frequency_penalty <= 2
    assert all(0 <= t < INFO.vocab_size and -100 <= b <= 100 for t, b in req.logit_bias)
    assert all(0 <= t < INFO.vocab_size for t in req.stop_token_ids)
    try:
        req.budget(min(len(req.prompt), 255), INFO.context)
    except APIError as e:
        assert e.status == 400 and e.param == req.max_tokens_param


@settings(max_examples=400, deadline=None)
@given(body=completion_bodies | json_values)
def test_fuzz_completion_bodies(body):
    check(json.dumps(body).encode(), chat=False)


@settings(max_examples=400, deadline=None)
@given(body=chat_bodies | json_values)
def test_fuzz_chat_bodies(body):
    check(json.dumps(body).encode(), chat=True)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=64))
def test_fuzz_raw_bytes(raw):
    check(raw, chat=False)
