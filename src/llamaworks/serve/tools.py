"""Tool calling in OpenAI's shape over chat templates that render tools (Llama 3.1's JSON calls).

Request: `tools` (a list of {"type": "function", "function": {"name", "description",
"parameters"}}) and `tool_choice`: "auto" (the default with tools: the model chooses), "none"
(the tools are not rendered and the reply is text), "required" (a call to some tool) or
{"type": "function", "function": {"name": N}} (a call to N). The tools go to the chat template
as its `tools` variable, as transformers passes them; a template that does not read `tools`
(tokenizer.chat.ChatTemplate.renders_tools) is refused with a 400 naming the fix.

"required" and a named function are kept by structured output (structured.py, llguidance):
the reply is constrained to the JSON schema of a call, {"name": one of the names (or the
named one), "parameters": that tool's parameters schema}, so it always parses as a call
(unless cut by max_tokens). Without llguidance, or for a parameters schema it cannot compile,
the reply is started for the model instead: the prompt ends with `{"name": "` (required) or
`{"name": "N", "parameters": ` (named), the start of Llama 3.1's call, and the reply is read
with that prefix in front; nothing constrains the rest then (a model that wanders off gives
text, returned as content).

Reply: Llama 3.1 answers a call as JSON, `{"name": ..., "parameters": {...}}` (some models write
"arguments"), optionally after `<|python_tag|>` (a control token, absent from the decoded text),
several separated by ";". A reply that is wholly such calls, each naming an offered tool, becomes
`tool_calls` ([{"id": "call_...", "type": "function", "function": {"name", "arguments": JSON text}}])
with content null and finish_reason "tool_calls"; anything else is content. Streaming, in
OpenAI's call deltas (a chunk with the call's index, id, type, name and empty arguments, then
chunks of its arguments): a constrained call streams as it is written (ReplyReader); with
"auto", a reply whose first non-blank character is "{" is held until it ends (it may be a
call), then sent as calls (or as text); any other reply streams as text at once.

Conversation: an assistant message with `tool_calls` (arguments as JSON text, OpenAI's form)
goes to the template with the arguments as an object (transformers' form, which Llama 3.1's
template writes with tojson); `tool` messages need `tool_call_id` and string content.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llamaworks.serve.structured import Constraint, compile_constraint

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
PYTHON_TAG = "<|python_tag|>"


class ToolsError(ValueError):
    """A request's tools, tool_choice or tool messages are wrong: `param` names the field."""

    def __init__(self, param: str, message: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.message, self.code = param, message, code


@dataclass(frozen=True)
class Tools:
    """The tools of one request and how a call is required."""

    tools: tuple[dict, ...]  # as sent (checked), for the template's `tools`
    choice: str  # "auto", "required" or "function"
    name: str | None = None  # choice "function": the tool to call
    constrained: bool = False  # the reply is constrained to call_schema() (no prefix then)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t["function"]["name"] for t in self.tools)

    @property
    def prefix(self) -> str:
        """The text the reply starts with, written into the prompt (see the module's doc)."""
        if self.constrained:
            return ""
        if self.choice == "function":
            return '{"name": ' + json.dumps(self.name) + ', "parameters": '
        if self.choice == "required":
            return '{"name": "'
        return ""

    def template_tools(self) -> list[dict]:
        return [dict(t) for t in self.tools]

    def call_schema(self) -> dict:
        """The JSON schema of a call this choice allows (Llama 3.1's form)."""
        def one(tool: dict) -> dict:
            fn = tool["function"]
            return {"type": "object", "properties": {"name": {"const": fn["name"]},
                                                     "parameters": fn.get("parameters") or {"type": "object"}},
                    "required": ["name", "parameters"], "additionalProperties": False}

        if self.choice == "function":
            return one(next(t for t in self.tools if t["function"]["name"] == self.name))
        return {"anyOf": [one(t) for t in self.tools]}


def constrain(tools: Tools | None) -> tuple[Tools | None, Constraint | None]:
    """For "required" and a named function: the tools marked constrained and the constraint of
    their call schema; unchanged and None for "auto", or when the schema cannot be compiled
    (no llguidance, or a parameters schema it does not take): the prompt prefix keeps the call."""
    if tools is None or tools.choice == "auto":
        return tools, None
    try:
        constraint = compile_constraint("json_schema", tools.call_schema())
    except ValueError:
        return tools, None
    return dataclasses.replace(tools, constrained=True), constraint


def parse_tools(body: Mapping, renders_tools: bool, where: str) -> Tools | None:
    """The request's tools and tool_choice, checked; None when there are none to offer (none
    sent, or tool_choice "none"). `renders_tools`/`where`: the served template's."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise ToolsError("tool_choice", f"tool_choice {_short(choice)} needs tools; send tools or leave "
                                            "tool_choice unset")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ToolsError("tools", f"tools must be a list of at most {MAX_TOOLS} function tools")
    seen: set[str] = set()
    checked = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise ToolsError("tools", f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., '
                                      '"parameters": {...}}}}')
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolsError("tools", f"tools[{i}].function.name must be 1-64 letters, digits, _ or -, got "
                                      f"{_short(name)}")
        if name in seen:
            raise ToolsError("tools", f"tools[{i}].function.name {name!r} is given twice; tool names must differ")
        seen.add(name)
        if not isinstance(fn.get("description", ""), str):
            raise ToolsError("tools", f"tools[{i}].function.description must be a string")
        if not isinstance(fn.get("parameters", {}), dict):
            raise ToolsError("tools", f"tools[{i}].function.parameters must be a JSON schema object")
        checked.append({"type": "function", "function": fn})
    if choice is None or choice == "auto":
        kind, name = "auto", None
    elif choice == "none":
        return None
    elif choice == "required":
        kind, name = "required", None
    elif (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
          and isinstance(choice["function"].get("name"), str)):
        kind, name = "function", choice["function"]["name"]
        if name not in seen:
            raise ToolsError("tool_choice", f"tool_choice names the function {_short(name)}, which is not among "
                                            f"the tools ({', '.join(sorted(seen))})")
    else:
        raise ToolsError("tool_choice", 'tool_choice must be "none", "auto", "required" or {"type": "function", '
                                        f'"function": {{"name": ...}}}}, got {_short(choice)}')
    if not renders_tools:
        raise ToolsError("tools", no_tool_template(where), code="unsupported_value")
    return Tools(tuple(checked), kind, name)


def no_tool_template(where: str) -> str:
    return (f"the served chat template ({where}) does not render tools; serve the model with a template that does "
            "(llamaworks serve --chat-template NAME|FILE, e.g. the checkpoint's tool_use template or a Llama 3.1 "
            "chat_template.jinja), or send the request without tools")


def tool_message(m: Mapping, i: int) -> dict[str, Any]:
    """A `tool` message as the template gets it: role, content (text), tool_call_id."""
    call_id, content = m.get("tool_call_id"), m.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ToolsError("messages", f"messages[{i}].content must be the tool's output as a string")
    if not isinstance(call_id, str) or not call_id:
        raise ToolsError("messages", f"messages[{i}] (role tool) needs the tool_call_id of the call it answers")
    return {"role": "tool", "content": content, "tool_call_id": call_id}


def assistant_calls(m: Mapping, i: int) -> list[dict[str, Any]]:
    """An assistant message's tool_calls in the template's form (arguments as an object)."""
    calls = m.get("tool_calls")
    if not isinstance(calls, list) or not calls:
        raise ToolsError("messages", f"messages[{i}].tool_calls must be a non-empty list of tool calls")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise ToolsError("messages", f'messages[{i}].tool_calls[{j}] must be {{"id": ..., "type": "function", '
                                         '"function": {"name": ..., "arguments": JSON text}}')
        try:
            args = json.loads(fn["arguments"])
        except ValueError:
            args = None
        if not isinstance(args, dict):
            raise ToolsError("messages", f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object "
                                         "as text")
        call = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(c.get("id"), str):
            call["id"] = c["id"]
        out.append(call)
    return out


def uses_tools(messages) -> bool:
    return any(m["role"] == "tool" or "tool_calls" in m for m in messages)


# --- replies ------------------------------------------------------------------------------------


def parse_calls(text: str, names: frozenset[str]) -> list[dict] | None:
    """The OpenAI tool_calls a reply holds, or None when it is not wholly calls to `names`."""
    s = text.strip().removeprefix(PYTHON_TAG).strip()
    decoder = json.JSONDecoder()
    calls, at = [], 0
    while True:
        if at >= len(s) or s[at] != "{":
            return None
        try:
            obj, at = decoder.raw_decode(s, at)
        except ValueError:
            return None
        if not isinstance(obj, dict) or obj.get("name") not in names:
            return None
        args = obj.get("parameters", obj.get("arguments", {}))
        if isinstance(args, str):  # arguments written as JSON text
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}})
        while at < len(s) and s[at].isspace():
            at += 1
        if at == len(s):
            return calls
        if s[at] != ";":
            return None
        at += 1
        while at < len(s) and s[at].isspace():
            at += 1
        if at == len(s):
            return calls


# A constrained call's start, as structured output writes it (compact JSON, keys in the
# schema's order): once seen, its arguments can stream as they come.
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"\s*,\s*"parameters"\s*:\s*')


class ReplyReader:
    """One choice's reply, read for tool calls, as stream deltas: `push` the text as it comes,
    `finish` at the end; each returns the deltas to send now ({"content": ...} or {"tool_calls":
    [...]}), finish also whether the reply was calls (finish_reason "tool_calls").

    A reply constrained to a call (Tools.constrained) streams the call as it is written: the
    id and name once the call's head is in, then its arguments' text as it comes, all but a
    last "}" (which may close the call rather than the arguments), as OpenAI streams calls.
    Other replies that may be calls are held to the end (see the module's doc)."""

    def __init__(self, tools: Tools):
        self.tools = tools
        self._held = tools.prefix
        self._holding = bool(tools.prefix) or tools.constrained  # a forced call: everything is held
        self._decided = self._holding
        self._call: dict | None = None  # the constrained call being streamed
        self._args_at = 0  # where its arguments start in _held
        self._sent = 0  # characters of its arguments sent

    def push(self, text: str) -> list[dict]:
        if self._decided and not self._holding:
            return [{"content": text}] if text else []
        self._held += text
        if not self._decided and self._held.strip():
            self._decided = True
            self._holding = self._held.lstrip().startswith(("{", PYTHON_TAG))
            if not self._holding:
                out, self._held = self._held, ""
                return [{"content": out}]
        if not self.tools.constrained:
            return []
        out = []
        if self._call is None:
            m = _CALL_HEAD.match(self._held)
            if m is None or m[1] not in self.tools.names:
                return []
            self._call = {"id": "call_" + uuid.uuid4().hex[:24], "name": m[1]}
            self._args_at = m.end()
            out.append({"tool_calls": [{"index": 0, "id": self._call["id"], "type": "function",
                                        "function": {"name": m[1], "arguments": ""}}]})
        args = self._held[self._args_at:].rstrip()
        args = args[:-1] if args.endswith("}") else args  # the last "}" may close the call
        return out + self._args_delta(args)

    def _args_delta(self, args: str) -> list[dict]:
        new, self._sent = args[self._sent:], max(self._sent, len(args))
        return [{"tool_calls": [{"index": 0, "function": {"arguments": new}}]}] if new else []

    def finish(self) -> tuple[list[dict], bool]:
        held, self._held = self._held, ""
        if not self._holding:
            return ([{"content": held}] if held else []), False
        calls = parse_calls(held, self.tools.names)
        if self._call is not None:
            # The call streamed so far: its arguments' text to the end, without the call's "}".
            args = held[self._args_at:].rstrip()
            if calls is not None and len(calls) == 1 and args.endswith("}"):
                return self._args_delta(args[:-1].rstrip()), True
            return self._args_delta(args), False  # cut short (max_tokens): the rest as it is
        if calls:
            return call_deltas(calls), True
        return ([{"content": held}] if held else []), False


def read_reply(tools: Tools, text: str) -> tuple[str, list[dict] | None]:
    """A whole reply: its calls (content "") or its text (with the forced prefix in front)."""
    full = tools.prefix + text
    calls = parse_calls(full, tools.names)
    return ("", calls) if calls else (full, None)


def call_deltas(calls: list[dict]) -> list[dict]:
    """The stream deltas of `calls`, as OpenAI sends them: the call's id, type and name with
    empty arguments, then its arguments."""
    out = []
    for k, c in enumerate(calls):
        out.append({"tool_calls": [{"index": k, "id": c["id"], "type": "function",
                                    "function": {"name": c["function"]["name"], "arguments": ""}}]})
        out.append({"tool_calls": [{"index": k, "function": {"arguments": c["function"]["arguments"]}}]})
    return out


def with_calls(response: dict, index: int, calls: list[dict]) -> dict:
    """A whole chat response whose choice `index` is the calls."""
    for choice in response["choices"]:
        if choice["index"] == index:
            choice["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
            choice["finish_reason"] = "tool_calls"
    return response


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
