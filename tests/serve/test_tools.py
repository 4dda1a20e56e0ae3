"""Tools: `tools`/`tool_choice` over a Llama-3.1-style chat template (written here), the reply
read into OpenAI's tool_calls (whole and streamed), tool turns sent back through the template;
round trips through the official openai client against the real HTTP server, with a stand-in
model that writes a scripted reply. The template's rendering is checked against transformers'."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamaworks.serve import tools as tools_module
from llamaworks.serve.protocol import APIError, ChatFormat, ModelInfo, encode_prompt, model_info, parse_chat
from llamaworks.serve.tools import ReplyReader, Tools, ToolsError, parse_calls, parse_tools
from llamaworks.tokenizer import load_tokenizer
from llamaworks.tokenizer.chat import ChatTemplate

from .conftest import MODEL, running_server

pytest.importorskip("tokenizers")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from tiny_llama3 import ScriptedModel, make_model_dir, write_tokenizer  # noqa: E402

# Llama 3.1's tool format, written for these tests: with tools, the system turn says
# "Environment: ipython" and the first user turn lists the functions as JSON; a call is the
# assistant's JSON {"name", "parameters"}; a tool's output comes back under the ipython header.
TOOL_TEMPLATE = r"""{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}{{- "Environment: ipython\n" }}{%- endif %}
{{- system_message + "<|eot_id|>" }}
{%- if tools is not none and messages and messages[0]['role'] == 'user' %}
    {%- set first = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
    {{- "<|start_header_id|>user<|end_header_id|>\n\n" }}
    {{- "To call a function, answer only with JSON: {\"name\": function name, \"parameters\": its arguments}.\n\n" }}
    {%- for t in tools %}{{- t | tojson(indent=4) + "\n\n" }}{%- endfor %}
    {{- first + "<|eot_id|>" }}
{%- endif %}
{%- for message in messages %}
    {%- if 'tool_calls' in message %}
        {{- "<|start_header_id|>assistant<|end_header_id|>\n\n" }}
        {%- for call in message.tool_calls %}
            {{- '{"name": "' + call.function.name + '", "parameters": ' + call.function.arguments | tojson + '}' }}
            {%- if not loop.last %}{{- "; " }}{%- endif %}
        {%- endfor %}
        {{- "<|eot_id|>" }}
    {%- elif message.role == 'tool' or message.role == 'ipython' %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" + message.content + "<|eot_id|>" }}
    {%- else %}
        {{- "<|start_header_id|>" + message.role + "<|end_header_id|>\n\n" + message.content | trim + "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- "<|start_header_id|>assistant<|end_header_id|>\n\n" }}{%- endif %}
"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
NAMES = frozenset({"get_weather", "get_time"})


def template() -> ChatTemplate:
    return ChatTemplate(TOOL_TEMPLATE, origin="test", bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


# --- reading replies ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', [("get_weather", {"city": "Paris"})]),
    (' \n{"name": "get_time", "arguments": {}}  ', [("get_time", {})]),
    ('<|python_tag|>{"name": "get_time", "parameters": {}}', [("get_time", {})]),
    ('{"name": "get_weather", "parameters": "{\\"city\\": \\"Oslo\\"}"}', [("get_weather", {"city": "Oslo"})]),
    ('{"name": "get_weather", "parameters": {"city": "Rome"}}; {"name": "get_time", "parameters": {}}',
     [("get_weather", {"city": "Rome"}), ("get_time", {})]),
    ('{"name": "get_weather", "parameters": {"city": "日本"}};', [("get_weather", {"city": "日本"})]),
    ('{"name": "launch", "parameters": {}}', None),  # not an offered tool
    ('{"name": "get_time", "parameters": {}} and some words', None),
    ('{"name": "get_time", "parameters": [1]}', None),
    ('{"name": "get_time", "parameters": {', None),  # cut short
    ("The weather is fine.", None),
    ('{"city": "Paris"}', None),
    ("", None),
])
def test_parse_calls(text, expected):
    calls = parse_calls(text, NAMES)
    if expected is None:
        assert calls is None
        return
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == expected
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == len(calls)


def text_of(deltas):
    return "".join(d.get("content", "") for d in deltas)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                     | st.text(), lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(), inner, max_size=3), max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(args=st.lists(st.dictionaries(st.text(), _json, max_size=4), min_size=1, max_size=3),
       compact=st.booleans(), key=st.sampled_from(["parameters", "arguments"]))
def test_calls_round_trip(args, compact, key):
    # Any arguments object, written as Llama 3.1 writes calls, comes back equal.
    sep = (",", ":") if compact else (", ", ": ")
    text = "; ".join(json.dumps({"name": "get_weather", key: a}, separators=sep, ensure_ascii=False) for a in args)
    calls = parse_calls(text, NAMES)
    assert [json.loads(c["function"]["arguments"]) for c in calls] == args


def test_reader_streams_text_at_once_and_holds_calls():
    auto = Tools((WEATHER, TIME), "auto")
    r = ReplyReader(auto)
    assert r.push("") == [] and r.push("  ") == [] and text_of(r.push("It")) == "  It"
    assert r.push(" rains") == [{"content": " rains"}]
    assert r.finish() == ([], False)
    r = ReplyReader(auto)
    assert r.push('{"name": "get_time", ') == [] and r.push('"parameters": {}}') == []
    deltas, called = r.finish()
    assert called and deltas[0]["tool_calls"][0]["function"] == {"name": "get_time", "arguments": ""}
    r = ReplyReader(auto)  # looked like a call, was not: the text comes out at the end
    assert r.push("{not json") == []
    assert r.finish() == ([{"content": "{not json"}], False)
    named = Tools((WEATHER, TIME), "function", "get_weather")  # the prompt-prefix fallback
    r = ReplyReader(named)
    assert r.push('{"city": "Paris"}') == [] and r.push("}") == []
    deltas, called = r.finish()
    assert called and deltas[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert deltas[1]["tool_calls"][0] == {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}


def test_constrained_call_streams_its_arguments():
    r = ReplyReader(Tools((WEATHER, TIME), "required", constrained=True))
    pieces = ['{"na', 'me":"get_wea', 'ther","parameters":', '{"ci', 'ty":"Par', 'is"', "}", "}"]
    deltas = [d for p in pieces for d in r.push(p)]
    more, called = r.finish()
    deltas += more
    calls = [c for d in deltas for c in d["tool_calls"]]
    assert called and calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert calls[0]["id"].startswith("call_") and all(c["index"] == 0 for c in calls)
    args = [c["function"]["arguments"] for c in calls[1:]]
    assert len(args) >= 3 and "".join(args) == '{"city":"Paris"}'  # in pieces, as written
    # Cut short by max_tokens: what was written is sent, and it is not a finished call.
    r = ReplyReader(Tools((WEATHER,), "required", constrained=True))
    deltas = r.push('{"name":"get_weather","parameters":{"city":"Pa')
    more, called = r.finish()
    assert not called and "".join(c["function"]["arguments"] for d in deltas + more
                                  for c in d["tool_calls"]) == '{"city":"Pa'


@pytest.mark.parametrize("body, param, match", [
    ({"tools": TOOLS}, "tools", "--chat-template"),  # a template without tools
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools", "letters"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "twice"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools", "type"),
    ({"tools": TOOLS, "tool_choice": "any"}, "tool_choice", "tool_choice must be"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
])
def test_bad_tools_are_named(body, param, match):
    renders = param != "tools" or match != "--chat-template"
    with pytest.raises(ToolsError, match=match) as e:
        parse_tools(body, renders, "the-template")
    assert e.value.param == param


def test_tool_choice_none_and_no_tools():
    assert parse_tools({"tools": TOOLS, "tool_choice": "none"}, False, "t") is None
    assert parse_tools({}, False, "t") is None
    assert parse_tools({"tools": TOOLS}, True, "t").choice == "auto"
    named = parse_tools({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
                        True, "t")
    assert named.prefix == '{"name": "get_time", "parameters": '


# --- the template, against transformers ------------------------------------------------------------


def conversation_with_tool_turns():
    return ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear", "celsius": 21}'},
    ]


def test_rendering_equals_transformers():
    render = pytest.importorskip("transformers.utils.chat_template_utils").render_jinja_template
    tmpl = template()
    for messages, tools in ((ASK, TOOLS), (conversation_with_tool_turns(), TOOLS), (ASK, None)):
        body = {"model": MODEL, "messages": messages}
        if tools:
            body["tools"] = tools
        # Parsing needs no tokenizer: the template alone.
        req = parse_chat(body, ModelInfo(MODEL, 4096, 1000, None, ChatFormat(tmpl, None, None, None)))
        # transformers gets the conversation in its own form: arguments as an object.
        hf_messages = [dict(m) for m in req.messages]
        rendered, _ = render(conversations=[hf_messages], tools=tools, chat_template=TOOL_TEMPLATE,
                             add_generation_prompt=True, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
        assert req.prompt == rendered[0]
        if messages is not ASK:
            assert '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>' in req.prompt
            assert '<|start_header_id|>ipython<|end_header_id|>\n\n{"sky": "clear", "celsius": 21}' in req.prompt


# --- served ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tool_dir(tmp_path_factory, corpus_docs):
    root = tmp_path_factory.mktemp("tools")
    return make_model_dir(root / "model", write_tokenizer(root / "tok", corpus_docs), template=None)


@pytest.fixture(scope="module")
def served(tool_dir):
    tok = load_tokenizer(tool_dir / "tokenizer.model")
    stub = ScriptedModel(tok.vocab_size, 1, [tok.eos_id], context=1024)
    with running_server(tool_dir, max_batch=2, chat_template=template(), wrap=lambda m: stub) as s:
        s.stub, s.info = stub, model_info(MODEL, 1024, s.tokenizer, template())
        yield s


def script(served, body: dict, reply: str) -> None:
    """Make the stand-in model answer `body` with `reply` then <|eot_id|>."""
    tok = served.tokenizer
    ids = encode_prompt(tok, parse_chat({"model": MODEL, **body}, served.info), served.info.chat)
    served.stub.prompt_len = len(ids)
    served.stub.script = tok.encode(reply, bos=False, eos=False) + [tok.special_tokens["<|eot_id|>"]]


@pytest.fixture()
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60)


CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'


def test_auto_call_whole(served, client):
    script(served, {"messages": ASK, "tools": TOOLS}, CALL)
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_auto_call_streamed(served, client):
    script(served, {"messages": ASK, "tools": TOOLS}, CALL)
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.content for d in deltas)
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_openai_stream_helper_accumulates_the_calls(served, client):
    # The client's own accumulator (chat.completions.stream) rebuilds the message from our deltas.
    script(served, {"messages": ASK, "tools": TOOLS}, CALL)
    with client.chat.completions.stream(model=MODEL, messages=ASK, tools=TOOLS) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert final.choices[0].finish_reason == "tool_calls"


def test_n_choices_each_carry_calls(served, client):
    script(served, {"messages": ASK, "tools": TOOLS}, CALL)
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, n=2)
    assert [c.index for c in out.choices] == [0, 1]
    for c in out.choices:
        assert c.finish_reason == "tool_calls" and c.message.tool_calls[0].function.name == "get_weather"
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, n=2, stream=True))
    for k in (0, 1):
        calls = [tc for c in chunks for ch in c.choices if ch.index == k for tc in (ch.delta.tool_calls or [])]
        assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Paris"}


def test_python_tag_call(served, client):
    # Llama 3.1 may open a call with <|python_tag|> (a control token, no text) and end it with <|eom_id|>.
    tok = served.tokenizer
    script(served, {"messages": ASK, "tools": TOOLS}, CALL)
    served.stub.script = ([tok.special_tokens["<|python_tag|>"]] + tok.encode(CALL, bos=False, eos=False)
                          + [tok.special_tokens["<|eom_id|>"]])
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
    assert out.choices[0].finish_reason == "tool_calls"
    assert out.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_text_reply_with_tools_streams_as_text(served, client):
    script(served, {"messages": ASK, "tools": TOOLS}, "It is sunny.")
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "It is sunny."
    assert chunks[-1].choices[0].finish_reason == "stop"
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
    assert out.choices[0].message.content == "It is sunny." and not out.choices[0].message.tool_calls


@pytest.mark.parametrize("constrained", [True, False])
def test_named_function_is_forced(served, client, constrained, monkeypatch):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": choice}
    if constrained:
        pytest.importorskip("llguidance")
        # The reply is held to the call's schema (compact JSON, structured.py).
        reply = '{"name":"get_weather","parameters":{"city":"Paris"}}'
    else:
        # Without llguidance: the prompt ends with the call's start; the model writes the arguments.
        monkeypatch.setattr(tools_module, "compile_constraint", no_llguidance)
        reply = '{"city": "Paris"}}'
    req = parse_chat({"model": MODEL, **body}, served.info)
    assert req.tools.constrained == constrained and (req.constraint is not None) == constrained
    script(served, body, reply)
    for stream in (False, True):
        if stream:
            chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                                         stream=True))
            calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
            name, args = calls[0].function.name, "".join(tc.function.arguments or "" for tc in calls)
            if constrained:  # the arguments stream as they are written
                assert len(calls) > 2
            assert chunks[-1].choices[0].finish_reason == "tool_calls"
        else:
            out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice)
            name, args = out.choices[0].message.tool_calls[0].function.name, \
                out.choices[0].message.tool_calls[0].function.arguments
        assert name == "get_weather" and json.loads(args) == {"city": "Paris"}


def no_llguidance(kind, spec=None):
    raise ValueError("structured output needs the llguidance package")


def test_constrained_calls_always_parse(served, client):
    # "required": a model that would rather talk is held to a call (the mask leaves it only
    # the call's JSON); the stand-in's favourite token is refused, so it takes the first allowed.
    pytest.importorskip("llguidance")
    body = {"messages": ASK, "tools": [TIME], "tool_choice": "required"}
    script(served, body, '{"name":"get_time","parameters":{}}')
    served.stub.script = served.stub.script[:3] + served.tokenizer.encode("Hello", bos=False, eos=False)
    out = client.chat.completions.create(model=MODEL, max_tokens=200, **body)
    assert out.choices[0].finish_reason == "tool_calls", out
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "get_time" and isinstance(json.loads(call.function.arguments), dict)


def test_tool_choice_none_gives_text(served, client):
    script(served, {"messages": ASK}, CALL)  # "none": the tools are not rendered
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none")
    assert out.choices[0].message.content == CALL and out.choices[0].finish_reason == "stop"


def test_round_trip(served, client):
    script(served, {"messages": ASK, "tools": TOOLS}, CALL)
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'}]
    script(served, {"messages": messages, "tools": TOOLS}, "Clear skies in Paris.")
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    assert out.choices[0].message.content == "Clear skies in Paris."
    req = parse_chat({"model": MODEL, "messages": messages, "tools": TOOLS}, served.info)
    assert '"parameters": {"city": "Paris"}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n{"sky": "clear"}' \
        in req.prompt


def test_template_without_tools_is_a_400(llama3_served):
    client = openai.OpenAI(base_url=llama3_served.url + "/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
    assert e.value.param == "tools" and "--chat-template" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=conversation_with_tool_turns())
    assert e.value.param == "messages" and "--chat-template" in e.value.message


@pytest.fixture(scope="module")
def llama3_served(tool_dir):
    tok = load_tokenizer(tool_dir / "tokenizer.model")
    stub = ScriptedModel(tok.vocab_size, 1, [tok.eos_id], context=1024)
    with running_server(tool_dir, max_batch=1, chat_template=ChatTemplate.builtin("llama3"), wrap=lambda m: stub) as s:
        yield s


def test_bad_tool_messages():
    info = ModelInfo(MODEL, 4096, 1000, None)  # the plain template
    for messages in ([{"role": "tool", "content": "x"}],
                     [{"role": "assistant", "tool_calls": [{"type": "function",
                                                            "function": {"name": "f", "arguments": "[1]"}}]}]):
        with pytest.raises(APIError) as e:
            parse_chat({"model": MODEL, "messages": messages}, info)
        assert e.value.param == "messages"
