"""How a command's parameters become command-line options: `Annotated[T, Arg(...)]`.

The lowest layer of the package, so every command module can annotate its parameters
without importing the CLI that reads them (llamaworks.cli derives the parsers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

__all__ = ["Annotated", "Arg"]


@dataclass(frozen=True)
class Arg:
    help: str = ""
    positional: bool = False
    flag: str | None = None  # e.g. "--from" for a parameter that cannot be named `from`
    metavar: str | None = None
