"""`llamaworks chat`: a terminal conversation with a model, through the checkpoint's chat template.

The conversation is a list of messages rendered by the same template and `encode_chat` that
`serve` uses, so control tokens come only from the template, never from what is typed. Each
reply streams as it is generated and stops at the template's end-of-turn token. When the
history no longer fits the context window with room for a reply, the oldest turns are
dropped (the system prompt stays) and a notice says so. Ctrl-C stops a reply, keeps what was
written of it, and returns to the prompt.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Annotated, TextIO

import torch

from llamaworks.args import Arg
from llamaworks.device import resolve_device
from llamaworks.inference.generate import CompletionBuilder, generate_ids
from llamaworks.inference.load import load_model
from llamaworks.tokenizer.base import stop_ids as tokenizer_stop_ids
from llamaworks.tokenizer.chat import ChatTemplate, encode_chat, resolve_chat_template, stop_token_ids

# Meta's chat examples for Llama 2 and 3 sample at temperature 0.6, top-p 0.9.
CHAT_TEMPERATURE = 0.6
CHAT_TOP_P = 0.9
HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit"


class ChatSession:
    """A conversation: its messages, and replies generated to fit the context window."""

    def __init__(self, model, tokenizer, template: ChatTemplate, system: str | None = None,
                 max_new_tokens: int = 512, temperature: float = CHAT_TEMPERATURE, top_p: float = CHAT_TOP_P,
                 seed: int | None = None):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.system, self.max_new_tokens = system, max_new_tokens
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.turns: list[dict[str, str]] = []  # user and assistant messages, oldest first
        self.stop_ids = tokenizer_stop_ids(tokenizer) | frozenset(stop_token_ids(tokenizer, template))
        if max_new_tokens >= model.args.max_seq_len:
            raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                             f"{model.args.max_seq_len}-token context; lower it")

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def reset(self) -> None:
        self.turns = []

    def prompt_ids(self) -> tuple[list[int], int]:
        """The ids of the conversation with a generation prompt, and how many old turns were
        dropped to leave room for a reply of max_new_tokens."""
        budget = self.model.args.max_seq_len - self.max_new_tokens
        dropped = 0
        while True:
            ids = encode_chat(self.tokenizer, self.template, self.messages(), add_generation_prompt=True)
            if len(ids) <= budget:
                return ids, dropped
            if len(self.turns) <= 1:
                raise ValueError(f"the message is {len(ids)} tokens with the system prompt, more than the "
                                 f"{budget} the context leaves beside a reply; shorten it or lower --max-new-tokens")
            # Drop the oldest exchange (a user message and the reply to it) as one.
            cut = 2 if len(self.turns) > 2 and self.turns[1]["role"] == "assistant" else 1
            del self.turns[:cut]
            dropped += cut

    @torch.no_grad()
    def reply(self, text: str, on_text: Callable[[str], None]) -> tuple[str, int]:
        """Append the user's `text`, generate the reply streaming through on_text, and append it.
        Returns (reply, turns dropped). A KeyboardInterrupt stops the reply and keeps its text."""
        self.turns.append({"role": "user", "content": text})
        try:
            ids, dropped = self.prompt_ids()
        except (ValueError, KeyboardInterrupt):  # nothing was said: the message is not kept
            self.turns.pop()
            raise
        builder = CompletionBuilder(self.tokenizer, [ids], (), lambda _, delta: on_text(delta),
                                    stop_ids=self.stop_ids)
        try:
            for chunk, _ in generate_ids(self.model, [ids], self.max_new_tokens, temperature=self.temperature,
                                         top_p=self.top_p, stop_ids=self.stop_ids, seed=self.seed, sync_every=1,
                                         logprobs=False):
                builder.take(0, chunk[0].tolist())
                if builder.finished[0]:
                    break
        except KeyboardInterrupt:
            pass  # Ctrl-C: the reply ends here; what was written of it stays in the conversation
        answer = builder.completion(0).text
        self.turns.append({"role": "assistant", "content": answer})
        return answer, dropped


def run_repl(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> int:
    """Read lines until /exit or end of input; answer each with a streamed reply."""
    print(f"chatting with a {session.model.args.max_seq_len}-token context; {HELP}", file=out)
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            print(file=out)
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, as a shell does
            print(file=out)
            continue
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            session.reset()
            print("(conversation reset)", file=out)
            continue
        if line == "/system" or line.startswith("/system "):
            session.system = line[len("/system"):].strip() or None
            session.reset()
            print(f"(system prompt {'set' if session.system else 'cleared'}; conversation reset)", file=out)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]!r}; {HELP}", file=out)
            continue

        def show(delta: str) -> None:
            out.write(delta)
            out.flush()

        try:
            _, dropped = session.reply(line, show)
        except ValueError as e:
            print(f"error: {e}", file=out)
            continue
        except KeyboardInterrupt:  # Ctrl-C before the reply began
            print("(interrupted)", file=out)
            continue
        print(file=out)
        if dropped:
            print(f"(the {dropped} oldest messages no longer fit the context and were dropped)", file=out)


def chat_command(
    checkpoint: Annotated[str, Arg("model directory, Hugging Face or Meta folder, or .gguf file")],
    adapter: Annotated[str | None, Arg("a LoRA adapter directory (PEFT layout) applied unmerged")] = None,
    system: Annotated[str | None, Arg("system prompt")] = None,
    chat_template: Annotated[str | None, Arg("a template the checkpoint names (e.g. tool_use), a built-in "
                                             "(llama2, llama3, plain), a .jinja file, a "
                                             "tokenizer_config.json or a model folder (default: the "
                                             "checkpoint's own, else plain)")] = None,
    max_new_tokens: Annotated[int, Arg("longest reply, in tokens")] = 512,
    temperature: Annotated[float, Arg("sampling temperature; 0 is greedy")] = CHAT_TEMPERATURE,
    top_p: Annotated[float, Arg("nucleus sampling mass")] = CHAT_TOP_P,
    seed: Annotated[int | None, Arg("random seed")] = None,
    device: Annotated[str, Arg("cpu, cuda, cuda:N or auto")] = "auto",
    dtype: Annotated[str | None, Arg("float32, bfloat16 or float16 (default: fp32 on CPU, bf16 on GPU)")] = None,
) -> int:
    """Chat with a model in the terminal: streamed replies, multi-turn history, /reset, /system, /exit;
    Ctrl-C stops a reply without quitting."""
    dev, dt = resolve_device(device, dtype)
    model, tokenizer = load_model(checkpoint, device=dev, dtype=dt, adapter=adapter)
    template = resolve_chat_template(tokenizer, chat_template)
    session = ChatSession(model, tokenizer, template, system=system, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, seed=seed)
    return run_repl(session)
