"""Chat formats: a checkpoint's Jinja2 chat template rendered as transformers renders it, and
conversations tokenised so that control tokens come only from the template.

A `ChatTemplate` is the template text, where it came from (file and key, for errors) and the
special-token strings it is rendered with (`bos_token`, `eos_token`). Sources:

- `ChatTemplate.from_tokenizer_config(path)`: `chat_template` of a tokenizer_config.json, a string
  or a list of `{"name", "template"}` (the "default" entry unless `name=` says otherwise);
  `bos_token`/`eos_token` as strings or AddedToken dicts. None when the file has none (a base model).
- `ChatTemplate.from_hf_folder(folder)`: what transformers 5 reads: chat_template.jinja first
  (`save_pretrained` writes the template there now), then additional_chat_templates/NAME.jinja,
  chat_template.json, then tokenizer_config.json.
- `ChatTemplate.from_gguf_value(text, bos_token=..., eos_token=...)`: a GGUF file's
  `tokenizer.chat_template`, with the bos/eos pieces looked up by the GGUF reader.
- `ChatTemplate.builtin(name)`: "llama2" (Meta's `[INST] <<SYS>>` format, the template of
  meta-llama/Llama-2-*-chat-hf), "llama3" (header tokens, Meta-Llama-3-*-Instruct's template) and
  "plain" for base models, which have no chat format: the dialogue serve/protocol.py has always
  rendered (system text, then "User: ...\\n" / "Assistant: ...\\n" lines, then "Assistant:"),
  generation stopping at "\\nUser:" (`stop_strings`). There is no "none": a base model chats through
  "plain"; LLaMA-I fine-tuning (issue 14) should use "llama2", whose turns end with eos.
- `ChatTemplate.load(spec)`: a built-in name, a folder, a tokenizer_config.json or a .jinja file,
  for a `--chat-template` option.

Named templates: a checkpoint may ship several (tool_use, rag, ...) beside its default: in
tokenizer_config.json's list form, as additional_chat_templates/NAME.jinja (transformers 5), or as
GGUF `tokenizer.chat_template.NAME` keys. `ChatTemplate.folder_templates` reads a folder's all; a
loaded tokenizer carries the default as `chat_template` and the others as `chat_templates` (name ->
ChatTemplate, `attach_chat_templates`); `write_chat_template_files` writes them back, and
`resolve_chat_template(tokenizer, "tool_use")` picks one by name.

Rendering uses a sandboxed Jinja2 environment configured like transformers' (immutable sandbox,
trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that does
not HTML-escape, `{% generation %}` blocks accepted), with `messages`, `add_generation_prompt`,
`tools=None`, `documents=None`, `bos_token`, `eos_token` and any extra variables, so
`render(...)` equals `tokenizer.apply_chat_template(..., tokenize=False)`.

Tools: a template renders tools when its code reads the `tools` variable (`renders_tools`, found
with jinja2.meta; Llama 3.1's does, Llama 3's does not). Such a conversation may hold tool turns
as transformers passes them: an assistant message with `tool_calls` ([{"id", "type": "function",
"function": {"name", "arguments": dict}}], content "" when it had none) and `tool` (or Llama 3.1's
`ipython`) messages with the tool's output as content and an optional `tool_call_id`.

Tokenising: transformers encodes the rendered string with special tokens parsed, so a user who
types "<|eot_id|>" or "</s>" gets the control token: injection. Meta's reference encodes headers
as ids and message text with special tokens disallowed. `encode_chat` gets both: before rendering
it breaks every control token in the caller's strings with a random marker the template cannot
know; the rendered text is then cut at the control tokens left (the template's own, now the only
ones), which become ids, and the text between is encoded as plain text (markers removed, special
tokens not parsed). For conversations without control-token text the ids equal
`apply_chat_template(messages, tokenize=True)`; with it, that text is encoded as text, as Meta's
reference encodes it. What this cannot see is a template that assembles a control token out of
fragments of message text (slicing, replacing, two messages joined with nothing between): roles
are checked against system/user/assistant for the templates that build headers from them, and
the Llama templates write every control token whole. Llama 2's `[INST]`/`<<SYS>>` are plain
text that no tokenizer can tell from the template's, so, as Meta's reference does, messages
containing them are refused unless `allow_format_tags=True`.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from llamaworks.atomic import atomic_write_text

__all__ = ["ChatTemplate", "BUILTIN_TEMPLATES", "ROLES", "attach_chat_templates", "check_messages", "control_token_ids",
           "encode_chat", "resolve_chat_template", "stop_token_ids", "tokenizer_chat_templates",
           "write_chat_template_files"]

ROLES = ("system", "user", "assistant")
TOOL_ROLES = ("tool", "ipython")  # a tool's output (Llama 3.1 writes both under the ipython header)

# meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json chat_template, which renders Meta's
# reference chat_completion format: "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s>".
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# meta-llama/Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# serve/protocol.py's render_chat as a template: system messages first (joined by blank lines),
# the turns as "User: ..."/"Assistant: ..." lines, then "Assistant:" for the model to continue.
PLAIN_TEMPLATE = (
    "{{ bos_token }}"
    "{% set system = messages | selectattr('role', 'equalto', 'system') | map(attribute='content') | list %}"
    "{% if system %}{{ system | join('\\n\\n') + '\\n\\n' }}{% endif %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{{ ('User: ' if message['role'] == 'user' else 'Assistant: ') + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# name: (source, bos_token, eos_token, stop_strings)
BUILTIN_TEMPLATES: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "llama2": (LLAMA2_TEMPLATE, "<s>", "</s>", ()),
    "llama3": (LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", ()),
    "plain": (PLAIN_TEMPLATE, "<s>", "</s>", ("\nUser:",)),
}

# Plain-text tags of the Llama 2 format (Meta's SPECIAL_TAGS): a template whose text holds them
# is refused messages that contain them, as Meta's chat_completion refuses them.
FORMAT_TAGS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")
# Control tokens that end a turn: generation stops at any of these the template writes.
END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|end|>", "<end_of_turn>")
# How a control token looks in template text when it is not bos_token/eos_token: "<|...|>".
_CONTROL_SHAPE = re.compile(r"<\|[^\s|<>]{1,100}\|>")
_TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# transformers 5's files: the default template, and a folder of named ones (NAME.jinja).
CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_DIR = "chat_template.jinja", "additional_chat_templates"
MAX_CHAT_TEMPLATES = 64  # named templates of one model (tool_use, rag, ...): a few in practice
_MAX_CONFIG_BYTES = 64 << 20  # tokenizer_config.json with a large added_tokens_decoder is a few MB
_BUILTIN_ORIGIN = "llamaworks built-in chat template"


class _RaisedByTemplate(Exception):
    """`raise_exception(...)` in a template: the template refuses the conversation."""


class ChatTemplate:
    """A Jinja2 chat template, where it came from, and the special-token strings it renders."""

    def __init__(self, source: str, *, origin: str = "<string>", key: str = "chat_template",
                 bos_token: str | None = None, eos_token: str | None = None,
                 stop_strings: Sequence[str] = ()):
        self.origin, self.key = str(origin), key
        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"{self.where} is {'empty' if isinstance(source, str) else type(source).__name__}; "
                             "a chat template is Jinja2 text: fix the file, or choose a built-in template "
                             f"({', '.join(BUILTIN_TEMPLATES)})")
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        self.stop_strings = tuple(stop_strings)
        env = _environment()
        try:
            self._compiled = env.from_string(source)
            ast = env.parse(source)
            literals = _literal_text(ast)
        except Exception as e:  # TemplateSyntaxError, and the sandbox's errors at compile time
            line = getattr(e, "lineno", None)
            at = f" (line {line})" if line else ""
            raise ValueError(f"{self.where} is not a valid Jinja2 template{at}: {_message(e)}; fix the template "
                             f"in that file, or choose a built-in one ({', '.join(BUILTIN_TEMPLATES)})") from None
        # Computed once here: both need the template's literal text, which renders never change.
        self.format_tags = tuple(t for t in FORMAT_TAGS if t in literals)
        import jinja2.meta  # jinja2 is imported by _environment() above

        # Whether the template reads `tools` (renders the functions a request offers).
        self.renders_tools = "tools" in jinja2.meta.find_undeclared_variables(ast)
        self.control_literals = tuple(sorted(set(_CONTROL_SHAPE.findall(literals))))
        ends = [eos_token] if eos_token else []
        self.stop_tokens = tuple(dict.fromkeys(ends + [t for t in END_OF_TURN if t in literals]))

    @property
    def where(self) -> str:
        return f"{self.origin}: {self.key}"

    def __repr__(self) -> str:
        return f"ChatTemplate({self.where}, bos_token={self.bos_token!r}, eos_token={self.eos_token!r})"

    # --- sources ----------------------------------------------------------------------------

    @classmethod
    def builtin(cls, name: str, *, bos_token: str | None = None, eos_token: str | None = None) -> ChatTemplate:
        """A built-in template; `bos_token`/`eos_token` default to the format's own (LLaMA's <s>, </s>
        for "plain"): pass the tokenizer's pieces when they differ."""
        if name not in BUILTIN_TEMPLATES:
            raise ValueError(f"{name!r} is not a built-in chat template; choose one of "
                             f"{', '.join(BUILTIN_TEMPLATES)}, or give a tokenizer_config.json or .jinja file")
        source, bos, eos, stops = BUILTIN_TEMPLATES[name]
        return cls(source, origin=_BUILTIN_ORIGIN, key=name, bos_token=bos if bos_token is None else bos_token,
                   eos_token=eos if eos_token is None else eos_token, stop_strings=stops)

    @classmethod
    def from_tokenizer_config(cls, path: str | os.PathLike, name: str = "default") -> ChatTemplate | None:
        """`chat_template` of a tokenizer_config.json; None when it has none (a base model)."""
        path = Path(path)
        config = _read_json(path)
        if not isinstance(config, dict):
            raise ValueError(f"{path}: a tokenizer_config.json is a JSON object, this one is "
                             f"{type(config).__name__}; copy it from the model again")
        raw = config.get("chat_template")
        if raw is None:
            return None
        bos = token_string(config, "bos_token", path)
        eos = token_string(config, "eos_token", path)
        if isinstance(raw, str):
            if name != "default":
                raise ValueError(f"{path}: chat_template is a single template, with no template named {name!r}; "
                                 "use the default one")
            return cls(raw, origin=str(path), key="chat_template", bos_token=bos, eos_token=eos)
        templates = _named_templates(raw, path)
        if name not in templates:
            raise ValueError(f"{path}: chat_template has no template named {name!r} (it has "
                             f"{', '.join(map(repr, templates))}); choose one of those names")
        return cls(templates[name], origin=str(path), key=f"chat_template[name={name!r}]", bos_token=bos,
                   eos_token=eos)

    @classmethod
    def from_hf_folder(cls, folder: str | os.PathLike, name: str = "default") -> ChatTemplate | None:
        """The template transformers would use for a model folder; None when there is none."""
        folder = Path(folder)
        if not _TEMPLATE_NAME.match(name):
            raise ValueError(f"{name!r} is not a chat template name (letters, digits, '_', '.', '-')")
        templates = cls.folder_templates(folder)
        if name == "default" or name in templates:
            return templates.get(name)
        raise ValueError(f"{folder} has no chat template named {name!r} (it has "
                         f"{', '.join(map(repr, templates)) or 'none'}); choose one of those names")

    @classmethod
    def folder_templates(cls, folder: str | os.PathLike, *, bos_token: str | None = None,
                         eos_token: str | None = None) -> dict[str, ChatTemplate]:
        """Every chat template of a model folder, name -> template, "default" for the one chat uses,
        read as transformers 5 reads them: chat_template.jinja and additional_chat_templates/NAME.jinja
        when either exists, else chat_template.json, else tokenizer_config.json's chat_template (a
        string, or a list of {"name", "template"}). bos/eos pieces from tokenizer_config.json, else
        `bos_token`/`eos_token` (the tokenizer's, for a model directory, which has no config)."""
        folder = Path(folder)
        config_path = folder / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        if not isinstance(config, dict):
            raise ValueError(f"{config_path}: a tokenizer_config.json is a JSON object; copy it from the model again")
        bos = token_string(config, "bos_token", config_path) or bos_token
        eos = token_string(config, "eos_token", config_path) or eos_token
        files: dict[str, Path] = {}
        if (folder / CHAT_TEMPLATE_FILE).is_file():
            files["default"] = folder / CHAT_TEMPLATE_FILE
        extra = folder / CHAT_TEMPLATE_DIR
        if extra.is_dir():
            for path in sorted(extra.glob("*.jinja")):
                name = path.name.removesuffix(".jinja")
                if not _TEMPLATE_NAME.match(name) or name == "default":
                    raise ValueError(f"{path}: {name!r} is not a chat template name (letters, digits, '_', '.', '-'; "
                                     "not 'default', which is chat_template.jinja); rename the file")
                files[name] = path
        if len(files) > MAX_CHAT_TEMPLATES:
            raise ValueError(f"{folder} holds {len(files)} chat templates, more than {MAX_CHAT_TEMPLATES}; keep the "
                             "ones the model uses")
        # transformers reads these files over tokenizer_config.json's chat_template.
        if files:
            return {name: cls(_read_text(path), origin=str(path), key="template text", bos_token=bos, eos_token=eos)
                    for name, path in files.items()}
        legacy = folder / "chat_template.json"
        if legacy.is_file():
            data = _read_json(legacy)
            if not isinstance(data, dict) or not isinstance(data.get("chat_template"), str):
                raise ValueError(f"{legacy}: chat_template must be a string; fix the file or delete it")
            return {"default": cls(data["chat_template"], origin=str(legacy), key="chat_template", bos_token=bos,
                                   eos_token=eos)}
        raw = config.get("chat_template")
        if raw is None:
            return {}
        if isinstance(raw, str):
            return {"default": cls(raw, origin=str(config_path), key="chat_template", bos_token=bos, eos_token=eos)}
        return {name: cls(text, origin=str(config_path), key=f"chat_template[name={name!r}]", bos_token=bos,
                          eos_token=eos) for name, text in _named_templates(raw, config_path).items()}

    @classmethod
    def from_gguf_value(cls, text: str, *, bos_token: str | None, eos_token: str | None,
                        source: str | os.PathLike = "GGUF file", key: str = "tokenizer.chat_template") -> ChatTemplate:
        """A GGUF file's `tokenizer.chat_template` (or `tokenizer.chat_template.NAME`); the GGUF
        reader passes the pieces of `tokenizer.ggml.bos_token_id`/`eos_token_id`."""
        if not isinstance(text, str):
            raise ValueError(f"{source}: {key} is a {type(text).__name__}, not a string; the file is corrupt: "
                             "convert the model again or choose a built-in chat template")
        return cls(text, origin=str(source), key=key, bos_token=bos_token, eos_token=eos_token)

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, bos_token: str | None = None,
                  eos_token: str | None = None) -> ChatTemplate:
        """A template on its own in a file (e.g. chat_template.jinja)."""
        path = Path(path)
        return cls(_read_text(path), origin=str(path), key="template text", bos_token=bos_token, eos_token=eos_token)

    @classmethod
    def load(cls, spec: str | os.PathLike, *, bos_token: str | None = None,
             eos_token: str | None = None) -> ChatTemplate:
        """A `--chat-template` value: a built-in name, a model folder, a tokenizer_config.json or a
        template file. `bos_token`/`eos_token` fill in what the source does not say."""
        text = str(spec)
        if text in BUILTIN_TEMPLATES:
            return cls.builtin(text, bos_token=bos_token, eos_token=eos_token)
        path = Path(spec)
        if path.is_dir():
            found = cls.from_hf_folder(path)
        elif path.is_file() and path.suffix == ".json":
            found = cls.from_tokenizer_config(path)
        elif path.is_file():
            return cls.from_file(path, bos_token=bos_token, eos_token=eos_token)
        else:
            raise ValueError(f"chat template {text!r} is neither a built-in ({', '.join(BUILTIN_TEMPLATES)}) nor a "
                             "file or folder; name a built-in or give the path of a tokenizer_config.json or .jinja "
                             "file")
        if found is None:
            raise ValueError(f"{path} has no chat template (no chat_template.jinja, and no chat_template key in "
                             "tokenizer_config.json), as for a base model: choose a built-in one "
                             f"({', '.join(BUILTIN_TEMPLATES)})")
        if (bos_token and found.bos_token is None) or (eos_token and found.eos_token is None):
            found = cls(found.source, origin=found.origin, key=found.key, bos_token=found.bos_token or bos_token,
                        eos_token=found.eos_token or eos_token, stop_strings=found.stop_strings)
        return found

    # --- rendering --------------------------------------------------------------------------

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **extra) -> str:
        """The conversation as text, exactly as transformers' apply_chat_template(tokenize=False)."""
        return self._render(check_messages(messages), add_generation_prompt, _check_extra(extra))

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool, extra: dict[str, Any]) -> str:
        variables: dict[str, Any] = {"tools": None, "documents": None}  # transformers passes both; templates test them
        if self.bos_token is not None:
            variables["bos_token"] = self.bos_token
        if self.eos_token is not None:
            variables["eos_token"] = self.eos_token
        variables.update(extra)
        variables.update(messages=messages, add_generation_prompt=bool(add_generation_prompt))
        try:
            return self._compiled.render(**variables)
        except _RaisedByTemplate as e:
            raise ValueError(f"{self.where} refuses this conversation: {e}; change the messages to the form the "
                             "template accepts (most chat formats take an optional system message, then user and "
                             "assistant turns alternating, starting with user)") from None
        except Exception as e:  # UndefinedError, SecurityError, TypeError, ... from the template's code
            raise ValueError(f"{self.where} failed to render: {type(e).__name__}: {_message(e)}; the template needs "
                             "something llamaworks does not give it (it gets messages with role and content, "
                             "add_generation_prompt, bos_token, eos_token, tools=None, documents=None and the extra "
                             "variables passed): pass the variable it needs, fix the template, or choose a built-in "
                             f"one ({', '.join(BUILTIN_TEMPLATES)})") from None


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Plain copies of `messages`, checked: a non-empty list of {"role", "content"} with a role of
    system/user/assistant (or tool/ipython) and string content; an assistant message may carry
    `tool_calls` (a list of objects; content None becomes ""), a tool message `tool_call_id`.
    Other keys are dropped."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} objects, got "
                         f"{type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty; a conversation needs at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}] must be a {{'role': ..., 'content': ...}} object, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in ROLES + TOOL_ROLES:
            raise ValueError(f"messages[{i}]['role'] is {role!r}; use one of {', '.join(ROLES + TOOL_ROLES)}")
        calls = m.get("tool_calls") if role == "assistant" else None
        if calls is not None and content is None:
            content = ""
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}]['content'] must be a string, got {type(content).__name__}")
        # str.__str__ drops subclasses, whose extra methods the sandbox would not know to forbid.
        msg: dict[str, Any] = {"role": str.__str__(role), "content": str.__str__(content)}
        if calls is not None:
            if not isinstance(calls, (list, tuple)) or not all(isinstance(c, Mapping) for c in calls):
                raise ValueError(f"messages[{i}]['tool_calls'] must be a list of objects")
            msg["tool_calls"] = _plain(list(calls), f"messages[{i}]['tool_calls']")
        call_id = m.get("tool_call_id") if role in TOOL_ROLES else None
        if call_id is not None:
            if not isinstance(call_id, str):
                raise ValueError(f"messages[{i}]['tool_call_id'] must be a string")
            msg["tool_call_id"] = str.__str__(call_id)
        out.append(msg)
    return out


# --- tokenising ---------------------------------------------------------------------------------


def control_token_ids(tokenizer, template: ChatTemplate | None = None) -> dict[str, int]:
    """The control tokens a rendered conversation may hold, as text -> id: the tokenizer's bos and
    eos pieces, its `special_tokens` mapping when it has one (byte-level BPE), and the template's
    bos_token, eos_token and "<|...|>" tokens, looked up with piece_to_id."""
    out: dict[str, int] = {}
    specials = getattr(tokenizer, "special_tokens", None)
    if isinstance(specials, Mapping):
        out.update({str(k): int(v) for k, v in specials.items()})
    for token_id in (tokenizer.bos_id, tokenizer.eos_id):
        if token_id is not None and token_id >= 0:
            out.setdefault(tokenizer.id_to_piece(token_id), token_id)
    if template is not None:
        wanted = [("bos_token", template.bos_token), ("eos_token", template.eos_token)]
        wanted += [("control token", t) for t in template.control_literals]
        for what, text in wanted:
            if text is None or text in out:
                continue
            token_id = _piece_id(tokenizer, text)
            if token_id is None:
                raise ValueError(f"{template.where} writes the {what} {text!r}, which the tokenizer ({tokenizer!r}) "
                                 "does not have as a token: the template belongs to another model; use this model's "
                                 f"own template or a built-in one that fits it ({', '.join(BUILTIN_TEMPLATES)})")
            out[text] = token_id
    short = [t for t in out if len(t) < 2]
    if short:
        raise ValueError(f"control token {short[0]!r} is a single character, which cannot be told apart from text; "
                         "leave it out of control_tokens")
    return out


def stop_token_ids(tokenizer, template: ChatTemplate, control_tokens: Mapping[str, int] | None = None) -> list[int]:
    """Ids at which generation of a reply stops: eos and the end-of-turn tokens the template writes."""
    controls = control_token_ids(tokenizer, template) if control_tokens is None else control_tokens
    ids = [controls[t] for t in template.stop_tokens if t in controls]
    if tokenizer.eos_id is not None and tokenizer.eos_id >= 0:
        ids.append(tokenizer.eos_id)
    return list(dict.fromkeys(ids))


def encode_chat(tokenizer, template: ChatTemplate, messages: Sequence[Mapping[str, Any]],
                add_generation_prompt: bool = True, *, control_tokens: Mapping[str, int] | None = None,
                allow_format_tags: bool = False, **extra) -> list[int]:
    """Token ids of a conversation; control ids come only from the template's own text.

    Equals transformers' apply_chat_template(messages, tokenize=True) when no message spells a
    control token; when one does, it is encoded as text. BOS is there when the template writes
    bos_token (the Llama templates do): do not add another. `control_tokens` (text -> id) defaults to
    `control_token_ids(tokenizer, template)`. The tokenizer needs `encode(text, bos, eos)` that
    encodes special-token text as text (SentencePiece does; a byte-level BPE tokenizer is asked for
    it with allow_special=False); it is checked on every piece.
    """
    msgs = check_messages(messages)
    extra = _check_extra(extra)
    if template.format_tags and not allow_format_tags:
        for i, m in enumerate(msgs):
            tag = next((t for t in template.format_tags if t in m["content"]), None)
            if tag is not None:
                raise ValueError(f"messages[{i}]['content'] contains {tag!r}, a tag of this chat format "
                                 f"({template.where}) that the model cannot tell from the template's own; remove it "
                                 "(Meta's reference refuses it too)")
    controls = dict(control_token_ids(tokenizer, template) if control_tokens is None else control_tokens)
    if not controls:
        return _nonempty(_encode_text(tokenizer, template._render(msgs, add_generation_prompt, extra), set()),
                         template)
    alternatives = "|".join(re.escape(t) for t in sorted(controls, key=len, reverse=True))
    pattern = re.compile(alternatives)
    # Message text is broken in any letter case (a template's upper/lower/title filter must not turn
    # "<|EOT_ID|>" into "<|eot_id|>") and after every character a control token starts with, not only
    # inside whole tokens: a template that deletes characters (`split('|') | join('')` on "a|b")
    # must not join user text into a token that the text never spelled.
    starts = re.compile("|".join(re.escape(t[0]) for t in controls if len(t) > 1) or "(?!)", re.IGNORECASE)
    # Private-use characters no template can know: case filters leave them alone, and a template
    # that slices through one still cannot join the two halves of a token it broke.
    mark = "".join(chr(0xE000 + secrets.randbelow(0x1900)) for _ in range(8))
    # Tool calls and ids are message text too: broken the same way.
    marked = [{**_break_all(m, starts, mark), "role": m["role"]} for m in msgs]
    text = template._render(marked, add_generation_prompt, _break_all(extra, starts, mark))
    control_ids = set(controls.values())
    allow = _takes_allow_special(tokenizer)
    ids: list[int] = []
    pos = 0
    for m in pattern.finditer(text):
        ids += _encode_text(tokenizer, text[pos:m.start()].replace(mark, ""), control_ids, allow)
        ids.append(controls[m[0]])
        pos = m.end()
    ids += _encode_text(tokenizer, text[pos:].replace(mark, ""), control_ids, allow)
    return _nonempty(ids, template)


def _nonempty(ids: list[int], template: ChatTemplate) -> list[int]:
    # transformers returns [] here; a prompt of nothing is never what a caller wants.
    if not ids:
        raise ValueError(f"{template.where} renders these messages as nothing (Llama 2's template skips a system "
                         "message with no user message after it); add a user message")
    return ids


def _encode_text(tokenizer, text: str, control_ids: set[int], allow_special: bool = False) -> list[int]:
    # Each run of text between control tokens is encoded on its own, as tokenizers does after
    # splitting on added tokens (SentencePiece's dummy prefix starts every run).
    if not text:
        return []
    if allow_special:
        ids = tokenizer.encode(text, bos=False, eos=False, allow_special=False)
    else:
        ids = tokenizer.encode(text, bos=False, eos=False)
    leaked = [i for i in ids if i in control_ids]
    if leaked:
        raise ValueError(f"the tokenizer ({tokenizer!r}) encoded plain text {text[:60]!r} to the control token id "
                         f"{leaked[0]}; its encode must treat special-token text as text (for SentencePiece, a "
                         "user_defined_symbol does not: leave that symbol out of control_tokens)")
    return ids


def _break_tokens(text: str, firsts: re.Pattern, mark: str) -> str:
    # A mark after every character that starts a control token (any letter case): no run of the
    # text, nor of what a template cuts and joins from it, holds a whole token ("abc" with "ab" and
    # "bc" becomes "a·b·c"). The marks are taken out of the rendered text before it is encoded.
    return firsts.sub(lambda m: m[0] + mark, text)


def _break_all(value: Any, pattern: re.Pattern, mark: str) -> Any:
    if isinstance(value, str):
        return _break_tokens(value, pattern, mark)
    if isinstance(value, dict):
        return {k: _break_all(v, pattern, mark) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_break_all(v, pattern, mark) for v in value)
    return value


def _takes_allow_special(tokenizer) -> bool:
    try:
        return "allow_special" in inspect.signature(tokenizer.encode).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


def _piece_id(tokenizer, text: str) -> int | None:
    # piece_to_id answers unk for an unknown piece (SentencePiece), so the id is checked back.
    try:
        token_id = tokenizer.piece_to_id(text)
        if token_id is None or not 0 <= int(token_id) < tokenizer.vocab_size:
            return None
        return int(token_id) if tokenizer.id_to_piece(int(token_id)) == text else None
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None


# --- the Jinja2 environment ---------------------------------------------------------------------


@functools.cache
def _environment():
    # jinja2 is imported here, not at the top: it takes ~50 ms and only chat needs it.
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.sandbox
    import jinja2.utils

    class GenerationTag(jinja2.ext.Extension):
        # transformers' {% generation %}...{% endgeneration %} marks assistant text for its masks;
        # templates that use it must compile here too: the block renders as its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class TemplateNamespace(jinja2.utils.Namespace):
        # namespace(...) attributes starting with "_" are how sandbox escapes reach Python internals.
        def __init__(*args, **kwargs):  # Jinja's own signature trick: namespace(self=...) works
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                TemplateNamespace.check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace.check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                      extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=TemplateNamespace)
    return env


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates (and transformers) want JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise _RaisedByTemplate(message)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    # `dict` in a template: calling it and dict.fromkeys, without the type itself (its mro() and
    # the like lead to Python internals).
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _literal_text(ast) -> str:
    # The template's text and string constants, joined by NUL so that a search never matches
    # across two of them.
    import jinja2.nodes

    parts = {n.data for n in ast.find_all(jinja2.nodes.TemplateData)}
    parts |= {n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
    return "\0".join(sorted(parts))


def _message(e: Exception) -> str:
    return getattr(e, "message", None) or str(e) or type(e).__name__


def _check_extra(extra: Mapping[str, Any]) -> dict[str, Any]:
    # messages and add_generation_prompt cannot arrive here: they are render's own parameters.
    return {name: _plain(value, name) for name, value in extra.items()}


def _plain(value: Any, where: str, depth: int = 0) -> Any:
    # Templates see JSON-like data only: other objects have methods the sandbox does not know
    # to forbid.
    if depth > 32:
        raise ValueError(f"template variable {where} is nested more than 32 levels deep; flatten it")
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, numpy strings) become the plain type
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}[{k!r}]", depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    raise ValueError(f"template variable {where} is a {type(value).__name__}; pass strings, numbers, booleans, "
                     "None, lists and dicts only")


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_file():  # a FIFO or device would block or never end
        raise ValueError(f"{path} is not a regular file; give the path of the file itself")
    with open(path, "rb") as f:
        data = f.read(_MAX_CONFIG_BYTES + 1)
    if len(data) > _MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is larger than {_MAX_CONFIG_BYTES >> 20} MiB; not a tokenizer or template file")
    return data


def _read_text(path: Path) -> str:
    try:
        return _read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None


def _read_json(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); copy it from the "
                         "model again") from None


def token_string(config: dict, key: str, path: Path) -> str | None:
    value = config.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):  # a serialised AddedToken
        return value["content"]
    raise ValueError(f"{path}: {key} must be a string or an AddedToken object with a content string, got "
                     f"{type(value).__name__}; fix the file")


def _named_templates(raw: Any, path: Path) -> dict[str, str]:
    entries = raw.items() if isinstance(raw, dict) else None
    if isinstance(raw, list):
        entries = []
        for i, item in enumerate(raw):
            if not (isinstance(item, dict) and isinstance(item.get("name"), str)
                    and isinstance(item.get("template"), str)):
                raise ValueError(f"{path}: chat_template[{i}] must be {{\"name\": str, \"template\": str}}; fix the "
                                 "file")
            entries.append((item["name"], item["template"]))
    if entries is None:
        raise ValueError(f"{path}: chat_template must be a string or a list of {{\"name\", \"template\"}} objects, "
                         f"got {type(raw).__name__}; fix the file")
    templates = {}
    for name, template in entries:
        if not isinstance(template, str):
            raise ValueError(f"{path}: chat_template {name!r} must be a string; fix the file")
        templates[str(name)] = template
    return templates


def token_piece(tokenizer, token_id: int | None) -> str | None:
    return tokenizer.id_to_piece(token_id) if token_id is not None and token_id >= 0 else None


def builtin_chat_template(name: str, tokenizer) -> ChatTemplate:
    """A built-in template rendered with the tokenizer's bos/eos pieces (transformers renders
    every template with its tokenizer's); a tokenizer without bos renders none."""
    bos, eos = token_piece(tokenizer, tokenizer.bos_id), token_piece(tokenizer, tokenizer.eos_id)
    template = ChatTemplate.builtin(name, bos_token=bos, eos_token=eos)
    if bos is None or eos is None:  # builtin() fills in the format's own ("<s>"), which this tokenizer lacks
        template = ChatTemplate(template.source, origin=template.origin, key=template.key, bos_token=bos,
                                eos_token=eos, stop_strings=template.stop_strings)
    return template


def resolve_chat_template(tokenizer, spec: str | None = None) -> ChatTemplate:
    """The template `serve --chat-template` names: the name of a template the checkpoint carries
    (`tokenizer.chat_templates`, e.g. "tool_use"; "default" is its own default), a built-in name,
    or the path of a .jinja file, a tokenizer_config.json or a model folder; by default the
    checkpoint's own (`tokenizer.chat_template`, read from chat_template.jinja by the loader), else
    "plain". The checkpoint's names come first: a template it ships named "llama3" is the one it
    was trained with."""
    own = getattr(tokenizer, "chat_template", None)
    if spec is None:
        return own if own is not None else builtin_chat_template("plain", tokenizer)
    named = getattr(tokenizer, "chat_templates", None) or {}
    if spec in named:
        return named[spec]
    if spec == "default" and own is not None:
        return own
    if spec in BUILTIN_TEMPLATES:
        return builtin_chat_template(spec, tokenizer)
    if not Path(spec).exists() and _TEMPLATE_NAME.match(spec):
        have = list(named) + (["default"] if own is not None else [])
        raise ValueError(f"chat template {spec!r} is neither a built-in ({', '.join(BUILTIN_TEMPLATES)}), a "
                         f"template of this checkpoint ({', '.join(map(repr, have)) or 'it has none'}), nor a file "
                         "or folder; choose one of those")
    return ChatTemplate.load(spec, bos_token=token_piece(tokenizer, tokenizer.bos_id),
                             eos_token=token_piece(tokenizer, tokenizer.eos_id))


def attach_chat_templates(tokenizer, templates: Mapping[str, ChatTemplate]) -> None:
    """Set a loaded tokenizer's templates: `chat_template` the "default" one (None without one),
    `chat_templates` the named others (name -> ChatTemplate), as every loader leaves them."""
    templates = dict(templates)
    tokenizer.chat_template = templates.pop("default", None)
    tokenizer.chat_templates = templates


def tokenizer_chat_templates(tokenizer) -> dict[str, ChatTemplate]:
    """A tokenizer's templates as name -> template, "default" first when it has one, the named
    ones sorted by name; each name checked (it becomes a file name and a GGUF key)."""
    own = getattr(tokenizer, "chat_template", None)
    named = getattr(tokenizer, "chat_templates", None) or {}
    out = {"default": own} if own is not None else {}
    for name in sorted(named):
        if not isinstance(name, str) or not _TEMPLATE_NAME.match(name) or name == "default":
            raise ValueError(f"chat template name {name!r} is not a name (letters, digits, '_', '.', '-', not "
                             "'default', which is tokenizer.chat_template); rename it in tokenizer.chat_templates")
        out[name] = named[name]
    if len(named) > MAX_CHAT_TEMPLATES:
        raise ValueError(f"the tokenizer carries {len(named)} named chat templates, more than {MAX_CHAT_TEMPLATES}; "
                         "keep the ones the model uses")
    return out


def write_chat_template_files(tokenizer, folder: str | os.PathLike) -> dict[str, ChatTemplate]:
    """chat_template.jinja (the default) and additional_chat_templates/NAME.jinja (the named ones)
    in `folder`, the files transformers 5 writes and reads; returns what was written, name -> template."""
    folder = Path(folder)
    templates = tokenizer_chat_templates(tokenizer)
    for name, template in templates.items():
        if name == "default":
            atomic_write_text(folder / CHAT_TEMPLATE_FILE, template.source)
        else:
            (folder / CHAT_TEMPLATE_DIR).mkdir(exist_ok=True)
            atomic_write_text(folder / CHAT_TEMPLATE_DIR / f"{name}.jinja", template.source)
    return templates
