from __future__ import annotations

import subprocess
import sys
from typing import Annotated, Literal

import pytest

from llamaworks import cli
from llamaworks.cli import COMMANDS, Arg, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main(command.split() + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: llamaworks {command}")
    parser, fn, _ = cli.build_parser(command)
    # every option documented: argparse prints help text for each
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, f"{command}: option {action.dest} has no help text"


def test_top_level_usage_and_unknown_command(capsys):
    assert main([]) == 0
    assert "tokenizer train" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_signature_becomes_parser(monkeypatch):
    seen = {}

    def fn(src: Annotated[str, Arg("source", positional=True)],
           fmt: Annotated[Literal["a", "b"], Arg("format", flag="--from")],
           n: Annotated[int, Arg("count")] = 3,
           flag: Annotated[bool, Arg("a switch")] = False,
           names: Annotated[list[str] | None, Arg("names")] = None,
           overrides: list[str] | None = None) -> int:
        seen.update(src=src, fmt=fmt, n=n, flag=flag, names=names, overrides=overrides)
        return 0

    monkeypatch.setitem(COMMANDS, "fake", ("x:y", "fake command"))
    monkeypatch.setattr(cli, "_resolve", lambda target: fn)
    assert main(["fake", "S", "--from", "b", "--n", "5", "--flag", "--names", "p", "q", "--sec.key", "v"]) == 0
    assert seen == {"src": "S", "fmt": "b", "n": 5, "flag": True, "names": ["p", "q"],
                    "overrides": ["--sec.key", "v"]}
    with pytest.raises(SystemExit):
        main(["fake", "S", "--from", "c"])


def test_user_errors_are_one_line(monkeypatch, capsys):
    def fn(x: Annotated[int, Arg("x")] = 1) -> int:
        raise ValueError("option --x is wrong; use 2")

    monkeypatch.setitem(COMMANDS, "fake", ("x:y", "fake"))
    monkeypatch.setattr(cli, "_resolve", lambda target: fn)
    assert main(["fake"]) == 2
    assert capsys.readouterr().err == "llamaworks fake: error: option --x is wrong; use 2\n"


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "llamaworks", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "pretrain" in out.stdout


def test_a_command_group_lists_its_subcommands(capsys):
    for group, sub in (("tokenizer", "tokenizer encode"), ("data", "data mix")):
        assert main([group, "--help"]) == 0
        out = capsys.readouterr().out
        assert sub in out and "usage: llamaworks " + group in out
    assert main(["data"]) == 0 and "data run" in capsys.readouterr().out
    assert main(["tokenizer", "frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown tokenizer subcommand 'frobnicate'" in err and "tokenizer train" in err


def test_version(capsys):
    from llamaworks import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"llamaworks {__version__}"
