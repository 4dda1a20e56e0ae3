"""An instruction set built from the running Python's standard library, for `llamaworks demo
--instruct`: questions about real functions and classes, answered from their source.

Three kinds of question, each answered by the code itself (parsed with `ast`, never imported, so
no module runs and the set is the same on every machine with this Python):

- signature: "Write the signature of `json.dumps`." -> "def dumps(obj, *, skipkeys=False, ...)"
  (the `def` line as the source spells it, defaults and annotations included);
- summary: "What does `textwrap.dedent` do?" -> the first sentence of its docstring;
- module: "Which module defines `dedent`?" -> "textwrap", asked only of names that one module alone
  defines (else the question has several right answers).

Held-out modules, not held-out examples: the validation split takes whole top-level packages
(`email` with `email.utils`, `json` with `json.decoder`), chosen by a seeded hash, so the
validation loss measures answers about code the tuning never asked about, not the recall of a
neighbouring question about the same function.

The examples are written as prompt/completion JSONL (data/sft.py), which `finetune` renders with
its chat template.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
import sysconfig
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llamaworks.atomic import atomic_write_text

# Folders of the standard library that are not its code: tests, third-party packages, caches.
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "lib2to3"})
KINDS = ("signature", "summary", "module")
PROMPTS = {
    "signature": "Write the signature of `{qualname}`.",
    "summary": "What does `{qualname}` do?",
    "module": "Which module defines `{name}`?",
}
# Longer answers are left out: a small model learns a 300-character signature poorly, and a long
# first "sentence" is usually a docstring without one (a list, a table, a doctest).
MAX_ANSWER_CHARS = 160
MIN_SUMMARY_CHARS = 12


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The Python sources under `root` (default: the interpreter's standard library), test suites
    and third-party packages excluded, in a fixed order."""
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder of Python sources; give the standard library's folder")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    if not files:
        raise ValueError(f"found no Python sources under {root}; pass --corpus DIR with text files instead")
    return files


@dataclass(frozen=True)
class Definition:
    module: str  # dotted module name, e.g. "json.decoder"
    qualname: str  # "dumps", or "JSONEncoder.encode" for a method
    kind: str  # "function" or "class"
    signature: str | None  # the def line without its colon; None for a class
    summary: str | None  # the docstring's first sentence, when it has a usable one
    line: int


@dataclass(frozen=True)
class Instruction:
    module: str
    kind: str  # one of KINDS
    prompt: str
    completion: str

    def record(self) -> dict[str, str]:
        """The JSONL line: data/sft.py's prompt/completion layout, plus what it is about (ignored
        by the reader, kept for whoever reads the file)."""
        return {"prompt": self.prompt, "completion": self.completion, "module": self.module, "kind": self.kind}


@dataclass
class InstructionSet:
    train: list[Instruction]
    val: list[Instruction]
    train_packages: list[str]
    val_packages: list[str]


def module_name(path: str | os.PathLike, root: str | os.PathLike) -> str | None:
    """The dotted name a file under `root` is imported as; None for private modules (a part
    starting with "_", such as `_pydecimal` or `__main__`), whose names users do not write."""
    parts = list(Path(path).relative_to(root).with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    if not parts or any(p.startswith("_") or not p.isidentifier() for p in parts):
        return None
    return ".".join(parts)


def first_sentence(doc: str | None) -> str | None:
    """The first sentence of a docstring's first paragraph, on one line; None when there is no
    usable one (empty, a doctest, too short or too long to be a sentence)."""
    if not doc:
        return None
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    if not paragraph or paragraph.startswith(">>>"):
        return None
    # A sentence ends at . ! or ? before the end or a space and a word not in lower case: "os.path"
    # and "e.g. a page" do not end one.
    m = re.match(r"(.+?[.!?])(?=\s+[^a-z\s]|$)", paragraph)
    sentence = m.group(1) if m else paragraph
    if not MIN_SUMMARY_CHARS <= len(sentence) <= MAX_ANSWER_CHARS:
        return None
    return sentence


def signature_text(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """A function's def line as the source writes it, without the colon (ast.unparse normalises
    spacing and quotes, not content)."""
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    return f"{prefix} {node.name}({ast.unparse(node.args)}){returns}"


def parse_definitions(source: str, module: str) -> list[Definition]:
    """The public functions and classes a module defines at its top level, and the public methods
    of those classes (names starting with "_" are private or dunder, left out); the first of a
    name defined twice (a platform branch, a property's setter)."""
    tree = ast.parse(source)
    out: dict[str, Definition] = {}

    def add(node, qualname: str) -> None:
        if qualname in out:
            return
        if isinstance(node, ast.ClassDef):
            out[qualname] = Definition(module, qualname, "class", None, first_sentence(ast.get_docstring(node)),
                                       node.lineno)
        else:
            out[qualname] = Definition(module, qualname, "function", signature_text(node),
                                       first_sentence(ast.get_docstring(node)), node.lineno)

    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if not isinstance(node, (*functions, ast.ClassDef)) or node.name.startswith("_"):
            continue
        add(node, node.name)
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, functions) and not item.name.startswith("_"):
                    add(item, f"{node.name}.{item.name}")
    return list(out.values())


def read_definitions(files: Iterable[str | os.PathLike], root: str | os.PathLike) -> list[Definition]:
    """The definitions of every public module among `files` (all under `root`), in file order.
    A file that is not UTF-8 Python this interpreter parses (a template, another version's
    syntax) is skipped: the set is what this Python's own source says."""
    defs = []
    for path in files:
        module = module_name(path, root)
        if module is None:
            continue
        try:
            source = Path(path).read_text(encoding="utf-8")
            defs += parse_definitions(source, module)
        except (SyntaxError, UnicodeDecodeError, ValueError):  # ValueError: source with a NUL byte
            continue
    return defs


def instructions(defs: Sequence[Definition]) -> list[Instruction]:
    """The questions each definition answers (module docstring), in the definitions' order."""
    # A name two modules define (`open`, `main`) has no one right module to name.
    owners = Counter(d.qualname for d in {(d.module, d.qualname): d for d in defs}.values())
    out = []
    for d in defs:
        qualname = f"{d.module}.{d.qualname}"
        if d.signature is not None and len(d.signature) <= MAX_ANSWER_CHARS:
            out.append(Instruction(d.module, "signature", PROMPTS["signature"].format(qualname=qualname), d.signature))
        if d.summary is not None:
            out.append(Instruction(d.module, "summary", PROMPTS["summary"].format(qualname=qualname), d.summary))
        if "." not in d.qualname and owners[d.qualname] == 1:
            out.append(Instruction(d.module, "module", PROMPTS["module"].format(name=d.qualname), d.module))
    return out


def package_of(module: str) -> str:
    return module.split(".")[0]


def held_out_packages(counts: dict[str, int], fraction: float, seed: int) -> set[str]:
    """Top-level packages for validation: in an order fixed by (seed, name) hashes, packages are
    taken until their examples reach `fraction` of all; at least one, never all."""
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    if len(counts) < 2:
        raise ValueError(f"need at least two top-level packages to hold some out, got {sorted(counts)}; give "
                         "more modules")
    total = sum(counts.values())
    order = sorted(counts, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    held, n = set(), 0
    for package in order[:-1]:  # the last never: something must stay to train on
        if n >= fraction * total:
            break
        held.add(package)
        n += counts[package]
    return held


def build_instruction_set(files: Sequence[str | os.PathLike] | None = None, root: str | os.PathLike | None = None,
                          *, val_fraction: float = 0.1, seed: int = 0, max_train: int | None = None,
                          max_val: int | None = None) -> InstructionSet:
    """The instruction set of `files` under `root` (default: this Python's standard library), split
    by top-level package; max_train / max_val keep a seeded sample of each split (in its order)."""
    root = stdlib_root() if root is None else Path(root)
    files = stdlib_files(root) if files is None else files
    for name, value in (("max_train", max_train), ("max_val", max_val)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 (or unset for all), got {value}")
    items = instructions(read_definitions(files, root))
    if not items:
        raise ValueError(f"no public function or class with a usable signature or docstring in {len(files)} files "
                         f"under {root}")
    held = held_out_packages(Counter(package_of(i.module) for i in items), val_fraction, seed)
    train = [i for i in items if package_of(i.module) not in held]
    val = [i for i in items if package_of(i.module) in held]
    rng = random.Random(seed)
    train, val = sample(train, max_train, rng), sample(val, max_val, rng)
    return InstructionSet(train, val, sorted({package_of(i.module) for i in train}), sorted(held))


def sample(items: list[Instruction], limit: int | None, rng: random.Random) -> list[Instruction]:
    """At most `limit` of items, drawn by rng, kept in their order."""
    if limit is None or len(items) <= limit:
        return items
    keep = sorted(rng.sample(range(len(items)), limit))
    return [items[i] for i in keep]


def write_jsonl(items: Iterable[Instruction], path: str | os.PathLike) -> Path:
    text = "".join(json.dumps(i.record(), ensure_ascii=False) + "\n" for i in items)
    atomic_write_text(path, text)
    return Path(path)


def showcase(items: Sequence[Instruction], n: int, seed: int) -> list[Instruction]:
    """n examples to show before and after tuning: the kinds in turn, each a seeded draw, from as
    many different modules as there are."""
    rng = random.Random(seed)
    by_kind = {k: [i for i in items if i.kind == k] for k in KINDS}
    for pool in by_kind.values():
        rng.shuffle(pool)
    out, seen = [], set()
    while len(out) < n and any(by_kind.values()):
        for k in KINDS:
            pool = by_kind[k]
            # prefer a module not shown yet; else whatever is left
            pick = next((j for j, i in enumerate(pool) if i.module not in seen), 0 if pool else None)
            if pick is None or len(out) >= n:
                continue
            item = pool.pop(pick)
            seen.add(item.module)
            out.append(item)
    return out
