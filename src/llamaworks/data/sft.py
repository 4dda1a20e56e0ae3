"""Instruction data for fine-tuning (LLaMA-I, section 4): JSONL files in the layouts people have,
read as conversations, split into training and held-out examples by content, and tokenised with a
chat template into (ids, labels) whose labels keep the assistant's tokens only.

Layouts, one per file (the first line decides; every line must share it):

- Alpaca (Taori et al. 2023): {"instruction", "input" (optional, may be empty), "output"}: one user
  turn (the instruction, then the input after a blank line) and one assistant turn.
- messages (OpenAI's chat fine-tuning format): {"messages": [{"role", "content"}, ...]} with system,
  user and assistant turns; every assistant turn is trained on.
- prompt/completion (OpenAI's legacy fine-tuning format): {"prompt", "completion"}: one user turn
  and one assistant turn. Rendered with the chat template like the others, so that a model
  fine-tuned on any of the three layouts answers the same chat format at inference.

Other keys on a line (ids, categories, sources) are ignored.

Labels: every token is IGNORE_INDEX except those an assistant turn adds, its end-of-turn token
included (Llama 2's `</s>`, Llama 3's `<|eot_id|>`), so the model learns to answer and to stop,
never to write the user's or the system's text (Llama 2 section 3.1 zeroes the loss on the prompt
the same way). The tokens of assistant turn k are found by encoding the conversation up to the
prompt of turn k and up to the end of turn k: the turn's tokens lie between the two lengths.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llamaworks.data.document import json_lines
from llamaworks.tokenizer.chat import ROLES, ChatTemplate, control_token_ids, encode_chat

log = logging.getLogger("llamaworks")

# The target that counts in no loss: torch's cross_entropy default ignore_index, which
# train/loss.py's lm_loss takes from here.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Layout:
    name: str
    marker: str  # the key that tells this layout from the others
    required: tuple[str, ...]
    shape: str  # for error messages: what a line holds
    to_messages: Callable[[dict, str], list[dict[str, str]]]


def _text(record: dict, key: str, where: str, optional: bool = False) -> str:
    value = record.get(key)
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise ValueError(f"{where}: {key!r} must be a string, got {kind}; fix or delete the line")
    return value


def _alpaca(record: dict, where: str) -> list[dict[str, str]]:
    instruction = _text(record, "instruction", where)
    extra = _text(record, "input", where, optional=True)
    # Alpaca's own prompt puts the input under the instruction in a section of its own; in a chat
    # turn a blank line is that separation.
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": _text(record, "output", where)}]


def _prompt_completion(record: dict, where: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": _text(record, "prompt", where)},
            {"role": "assistant", "content": _text(record, "completion", where)}]


def _messages(record: dict, where: str) -> list[dict[str, str]]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects; fix or "
                         "delete the line")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: messages[{i}] must be a {{\"role\", \"content\"}} object, got "
                             f"{type(m).__name__}; fix or delete the line")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"{where}: messages[{i}] has no {key!r} key; give every message a role "
                                 f"({', '.join(ROLES)}) and a content string, or delete the line")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: messages[{i}]['role'] is {m['role']!r}; use one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": _text(m, "content", f"{where}: messages[{i}]")})
    roles = [m["role"] for m in out]
    if "assistant" not in roles:
        raise ValueError(f"{where}: no assistant message, so nothing to learn; add the reply or delete the line")
    first = next(r for r in roles if r != "system")
    if first != "user":
        raise ValueError(f"{where}: the first message after the system prompt is {first!r}; a conversation starts "
                         "with a user message (the assistant answers it)")
    return out


LAYOUTS: tuple[Layout, ...] = (
    Layout("alpaca", "instruction", ("instruction", "output"), "instruction, optional input, output", _alpaca),
    Layout("messages", "messages", ("messages",), "messages: a list of {role, content}", _messages),
    Layout("prompt-completion", "prompt", ("prompt", "completion"), "prompt, completion", _prompt_completion),
)
_LAYOUT_HELP = "; ".join(f"{layout.name} ({layout.shape})" for layout in LAYOUTS)


def detect_layout(record: Any, where: str) -> Layout:
    """The layout of one parsed line, told by its marker key."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a line is a JSON object, this one is {type(record).__name__}; the layouts are "
                         f"{_LAYOUT_HELP}")
    found = [layout for layout in LAYOUTS if layout.marker in record]
    if len(found) > 1:
        raise ValueError(f"{where}: the line has the keys of several layouts ({', '.join(x.marker for x in found)}); "
                         f"keep one layout's keys: {_LAYOUT_HELP}")
    if not found:
        raise ValueError(f"{where}: no layout's key among {sorted(record)[:8]}; a line holds one of {_LAYOUT_HELP}")
    return found[0]


@dataclass(frozen=True)
class Example:
    line: int  # 1-based line of the file, for messages about it
    messages: list[dict[str, str]]


def read_examples(path: str | os.PathLike) -> tuple[Layout, list[Example]]:
    """The file's layout (detected from its first line) and its examples as conversations."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"instruction data {path} does not exist")
    if not path.is_file():  # a folder, or a FIFO that would be read forever
        raise ValueError(f"instruction data {path} is not a regular file; give a JSONL file")
    layout, first_line, examples = None, 0, []
    for line, record in json_lines(path):  # a line that is not JSON: ValueError naming the file and line
        where = f"{path}:{line}"
        if layout is None:
            layout, first_line = detect_layout(record, where), line
        elif not isinstance(record, dict) or layout.marker not in record:
            other = [x for x in LAYOUTS if isinstance(record, dict) and x.marker in record]
            looks = f" (it looks like the {other[0].name} layout)" if other else ""
            raise ValueError(f"{where}: missing key {layout.marker!r}{looks}; line {first_line} set this file's "
                             f"layout to {layout.name} ({layout.shape}) and every line must share it: fix the line "
                             "or put each layout in a file of its own")
        for key in layout.required:
            if key not in record:
                raise ValueError(f"{where}: missing key {key!r} of the {layout.name} layout ({layout.shape}), "
                                 f"which line {first_line} set for this file; add it or delete the line")
        examples.append(Example(line, layout.to_messages(record, where)))
    if layout is None:
        raise ValueError(f"{path} holds no examples; a line holds one of {_LAYOUT_HELP}")
    return layout, examples


def is_held_out(messages: Sequence[dict[str, str]], fraction: float) -> bool:
    """Whether an example goes to the held-out split: by a hash of its content, so the split does not
    depend on the file's order or on the seed, and duplicates land on the same side (a copy of a
    validation example in the training split would make the validation loss a training loss)."""
    text = json.dumps(list(messages), sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_examples(examples: Sequence[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """(training, held-out) examples, each in file order."""
    train, held_out = [], []
    for ex in examples:
        (held_out if is_held_out(ex.messages, fraction) else train).append(ex)
    return train, held_out


@dataclass
class TokenizedExample:
    ids: np.ndarray  # int32 token ids of the whole conversation
    labels: np.ndarray  # int32: ids where the assistant writes, IGNORE_INDEX elsewhere
    line: int


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def tokenize_conversation(tokenizer, template: ChatTemplate, messages: Sequence[dict[str, str]],
                          control_tokens: dict[str, int] | None = None) -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation: labels are the ids of the assistant turns, IGNORE_INDEX elsewhere.

    A turn's tokens are those between the conversation encoded up to its prompt
    (add_generation_prompt) and up to its end. Where a tokenizer merges across that boundary (text
    that is not cut by a control token, as in the "plain" template), the common prefix with the whole
    conversation's ids decides, so a token that holds the end of the prompt and the start of the
    reply counts as the reply's.
    """
    controls = control_token_ids(tokenizer, template) if control_tokens is None else control_tokens
    ids = encode_chat(tokenizer, template, messages, add_generation_prompt=False, control_tokens=controls)
    labels = [IGNORE_INDEX] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = encode_chat(tokenizer, template, messages[:k], add_generation_prompt=True, control_tokens=controls)
        through = encode_chat(tokenizer, template, messages[:k + 1], add_generation_prompt=False,
                              control_tokens=controls)
        start, end = common_prefix(prompt, ids), common_prefix(through, ids)
        labels[start:end] = ids[start:end]
    return ids, labels


@dataclass
class TokenizedSplit:
    examples: list[TokenizedExample]
    dropped: int  # examples longer than max_tokens, left out
    longest: int  # tokens of the longest example read, dropped ones included


def tokenize_examples(examples: Sequence[Example], tokenizer, template: ChatTemplate, max_tokens: int,
                      source: str | os.PathLike) -> TokenizedSplit:
    """Tokenise `examples` (from file `source`); examples of more than max_tokens tokens are dropped.

    Dropped, not truncated: a truncated example trains on a reply cut off before its end-of-turn
    token (the model learns to stop mid-sentence, or never to stop), or, when the prompt alone is
    too long, on no reply at all.
    """
    controls = control_token_ids(tokenizer, template)
    out, dropped, longest = [], 0, 0
    for ex in examples:
        try:
            ids, labels = tokenize_conversation(tokenizer, template, ex.messages, controls)
        except ValueError as e:
            raise ValueError(f"{source}:{ex.line}: {e}") from None
        if all(label == IGNORE_INDEX for label in labels):
            raise ValueError(f"{source}:{ex.line}: {template.where} writes no token for the assistant's reply, so "
                             "the example has nothing to learn; fix the line or the chat template")
        longest = max(longest, len(ids))
        if len(ids) > max_tokens:
            dropped += 1
            continue
        out.append(TokenizedExample(np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32), ex.line))
    return TokenizedSplit(out, dropped, longest)
