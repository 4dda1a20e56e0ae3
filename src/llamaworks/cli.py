"""The command line: a table from command name to a plain typed function.

Each command is an ordinary function (callable from Python and tests); its argparse
parser is derived from its signature. Annotate a parameter with `Annotated[T, Arg(...)]`
to give it help text, make it positional or rename its flag. A function that takes
`overrides: list[str]` receives the unparsed `--section.key value` pairs (config files).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import sys
import types
import typing
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

from llamaworks import __version__
from llamaworks.args import Arg

__all__ = ["Arg", "Annotated", "COMMANDS", "build_parser", "main"]


# command -> ("module:function", one-line summary). Modules import lazily, so
# `llamaworks --help` and each command load only what they use.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("llamaworks.demo:demo", "the main job: corpus -> tokenizer -> pretrain `small` -> samples"),
    "pretrain": ("llamaworks.train.trainer:pretrain", "pretrain with the paper's recipe from a config file"),
    "finetune": ("llamaworks.train.finetune:finetune_command", "instruction fine-tuning of a checkpoint (LLaMA-I, 4)"),
    "generate": ("llamaworks.inference.command:generate_command", "generate text from a model directory"),
    "chat": ("llamaworks.inference.chat:chat_command", "chat with a model in the terminal (its chat template)"),
    "serve": ("llamaworks.serve.command:serve_command", "OpenAI-compatible HTTP server with continuous batching"),
    "tokenizer train": ("llamaworks.tokenizer.command:train_command",
                        "train a SentencePiece BPE tokenizer (section 2)"),
    "tokenizer encode": ("llamaworks.tokenizer.command:encode_command", "print the token ids and pieces of a text"),
    "tokenizer decode": ("llamaworks.tokenizer.command:decode_command", "print the text of token ids"),
    "data run": ("llamaworks.data.command:run_command", "clean and deduplicate one source of Table 1 (section 2.1)"),
    "data mix": ("llamaworks.data.mix:mix_command", "tokenise the sources and sample them by token share (Table 1)"),
    "data train-classifier": ("llamaworks.data.ccnet:train_classifier_command",
                              "train the fastText 'referenced by Wikipedia' page classifier (2.1)"),
    "data train-lm": ("llamaworks.data.ngram:train_lm_command",
                      "train the n-gram language model (ARPA, for KenLM) behind the perplexity buckets"),
    "prepare": ("llamaworks.data.shards:prepare_command", "tokenise documents into packed token shards"),
    "convert": ("llamaworks.convert.command:convert_command", "convert checkpoints: native, Meta, Hugging Face, GGUF"),
    "quantize": ("llamaworks.inference.command:quantize_command", "weight-only int8 / int4 quantisation of a model "
                 "directory"),
    "merge": ("llamaworks.inference.command:merge_command", "fold a LoRA adapter into its base model: a plain model "
              "directory"),
    "plan": ("llamaworks.plan:plan_command", "memory and time plan for a preset on a GPU cluster"),
    "carbon": ("llamaworks.carbon:carbon_command", "energy and CO2 of a run (section 6, Table 15)"),
    "eval": ("llamaworks.eval.run:eval_command", "the paper's benchmarks (section 3) beside its LLaMA-7B/65B numbers"),
    "eval code": ("llamaworks.eval.code_exec:code_command",
                  "pass@k of code samples (HumanEval) run in a sandbox (3.5)"),
}


def _resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _unwrap(tp) -> tuple[Any, Arg]:
    meta = Arg()
    if get_origin(tp) is Annotated:
        tp, *extras = get_args(tp)
        meta = next((e for e in extras if isinstance(e, Arg)), meta)
    return tp, meta


def _strip_optional(tp):
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _add_param(parser: argparse.ArgumentParser, name: str, param: inspect.Parameter, tp) -> None:
    tp, meta = _unwrap(tp)
    tp = _strip_optional(tp)
    has_default = param.default is not inspect.Parameter.empty
    kwargs: dict[str, Any] = {"help": meta.help or None}
    if meta.metavar:
        kwargs["metavar"] = meta.metavar
    if get_origin(tp) is Literal:
        kwargs["choices"] = list(get_args(tp))
        kwargs["type"] = type(get_args(tp)[0])
    elif get_origin(tp) in (list, tuple):
        kwargs["nargs"] = "+"
        kwargs["type"] = get_args(tp)[0]
    elif tp is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = tp
    if has_default and kwargs["help"] is not None and param.default not in (None, False):
        kwargs["help"] += f" (default: {param.default})"
    if meta.positional:
        if has_default:
            kwargs["nargs"] = kwargs.get("nargs", "?")
            kwargs["default"] = param.default
        parser.add_argument(name, **kwargs)
    else:
        flag = meta.flag or "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, required=not has_default,
                            default=param.default if has_default else None, **kwargs)


def build_parser(command: str) -> tuple[argparse.ArgumentParser, Any, bool]:
    target, summary = COMMANDS[command]
    fn = _resolve(target)
    parser = argparse.ArgumentParser(prog=f"llamaworks {command}", description=inspect.getdoc(fn) or summary,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = get_type_hints(fn, include_extras=True)
    takes_overrides = False
    for name, param in inspect.signature(fn).parameters.items():
        if name == "overrides":
            takes_overrides = True
            continue
        _add_param(parser, name, param, hints.get(name, str))
    if takes_overrides:
        parser.epilog = "Any config field can be overridden as --section.key VALUE."
        if getattr(fn, "config_class", None) is not None:
            parser.epilog += "\n\n" + _config_keys(fn.config_class)
    return parser, fn, takes_overrides


def _config_keys(cls) -> str:
    lines = ["config keys (section.key = default):"]
    for section in dataclasses.fields(cls):
        sub = section.default_factory()
        values = ", ".join(f"{f.name}={getattr(sub, f.name)!r}" for f in dataclasses.fields(sub))
        lines.append(f"  [{section.name}] {values}")
    return "\n".join(lines)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: llamaworks COMMAND [options]   (llamaworks COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def _group_usage(group: str) -> str:
    names = [name for name in COMMANDS if name.split()[0] == group and " " in name]
    width = max(map(len, names))
    lines = [f"usage: llamaworks {group} SUBCOMMAND [options]   (llamaworks {group} SUBCOMMAND --help for its options)",
             "", "subcommands:"]
    lines += [f"  {name:<{width}}  {COMMANDS[name][1]}" for name in names]
    return "\n".join(lines)


def _groups() -> set[str]:
    """Command groups whose first word is not itself a command (`tokenizer`, `data`)."""
    return {name.split()[0] for name in COMMANDS if " " in name} - set(COMMANDS)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"llamaworks {__version__}")
        return 0
    if argv[0] in _groups() and (len(argv) == 1 or argv[1] in ("-h", "--help", "help")):
        print(_group_usage(argv[0]))
        return 0
    # Longest match first, so "tokenizer train" wins over a (hypothetical) "tokenizer".
    for n in (2, 1):
        command = " ".join(argv[:n])
        if command in COMMANDS and len(argv) >= n:
            break
    else:
        if argv[0] in _groups():
            print(f"llamaworks: unknown {argv[0]} subcommand {argv[1]!r}\n\n{_group_usage(argv[0])}", file=sys.stderr)
        else:
            print(f"llamaworks: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    parser, fn, takes_overrides = build_parser(command)
    rest = argv[len(command.split()):]
    if takes_overrides:
        args, overrides = parser.parse_known_args(rest)
        kwargs = {**vars(args), "overrides": overrides}
    else:
        kwargs = vars(parser.parse_args(rest))
    try:
        result = fn(**kwargs)
    except (ValueError, FileNotFoundError) as e:
        # User errors: one clear line, no traceback (set LLAMAWORKS_DEBUG=1 for one).
        if os.environ.get("LLAMAWORKS_DEBUG"):
            raise
        print(f"llamaworks {command}: error: {e}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
