from __future__ import annotations

import inspect
import textwrap

import pytest

from llamaworks.data.sft import read_examples
from llamaworks.data.stdlib_instruct import (
    KINDS,
    build_instruction_set,
    first_sentence,
    held_out_packages,
    instructions,
    module_name,
    package_of,
    parse_definitions,
    read_definitions,
    showcase,
    stdlib_files,
    stdlib_root,
    write_jsonl,
)

SOURCE = '''
"""A module."""
import os


def visible(a, b=2, *args, key: int = 3, **kw) -> list[int]:
    """Add things up. Then more text."""


async def fetch(url):
    """Fetch a URL, e.g. a page.

    Longer description.
    """


def _private(x):
    """Hidden."""


def undocumented(x, /, y):
    pass


def visible(other):
    """A second definition of the same name (a platform branch): the first counts."""


class Thing(Base):
    """A thing with parts!"""

    def method(self, n=None):
        """Return the part."""

    def __init__(self):
        """Dunder: left out."""

    def _helper(self):
        pass


if os.name == "nt":
    def conditional():
        """Defined in a branch: not at the top level."""
'''


def test_parse_definitions_reads_public_top_level_functions_classes_and_methods():
    defs = {d.qualname: d for d in parse_definitions(SOURCE, "pkg.mod")}
    assert list(defs) == ["visible", "fetch", "undocumented", "Thing", "Thing.method"]
    assert defs["visible"].signature == "def visible(a, b=2, *args, key: int=3, **kw) -> list[int]"
    assert defs["visible"].summary == "Add things up."
    assert defs["fetch"].signature == "async def fetch(url)" and defs["fetch"].summary == "Fetch a URL, e.g. a page."
    assert defs["undocumented"].signature == "def undocumented(x, /, y)" and defs["undocumented"].summary is None
    assert defs["Thing"].kind == "class" and defs["Thing"].signature is None
    assert defs["Thing"].summary == "A thing with parts!"
    assert defs["Thing.method"].signature == "def method(self, n=None)"
    assert all(d.module == "pkg.mod" for d in defs.values())


def test_instructions_ask_each_kind_with_the_source_as_answer():
    items = instructions(parse_definitions(SOURCE, "pkg.mod"))
    pairs = {(i.kind, i.prompt): i.completion for i in items}
    assert pairs[("signature", "Write the signature of `pkg.mod.undocumented`.")] == "def undocumented(x, /, y)"
    assert pairs[("summary", "What does `pkg.mod.Thing.method` do?")] == "Return the part."
    assert pairs[("module", "Which module defines `Thing`?")] == "pkg.mod"
    # no summary without a docstring; no module question for a method (its class is asked instead)
    assert ("summary", "What does `pkg.mod.undocumented` do?") not in pairs
    assert not any(k == "module" and "method" in p for k, p in pairs)


def test_module_question_only_for_names_one_module_defines():
    defs = parse_definitions("def shared():\n    pass\n\ndef own():\n    pass\n", "a") + \
        parse_definitions("def shared():\n    pass\n", "b")
    asked = [i.prompt for i in instructions(defs) if i.kind == "module"]
    assert asked == ["Which module defines `own`?"]


@pytest.mark.parametrize("doc, sentence", [
    ("Return the sum.  More.", "Return the sum."),
    ("Split\n    over lines, then stop. Next", "Split over lines, then stop."),
    ("No full stop at all", "No full stop at all"),
    ("Uses os.path and e.g. names.", "Uses os.path and e.g. names."),
    ("First paragraph only\n\nsecond one.", "First paragraph only"),
    (">>> a_doctest()", None),
    ("Short.", None),
    ("x" * 200 + ".", None),
    ("", None),
    (None, None),
])
def test_first_sentence(doc, sentence):
    assert first_sentence(doc) == sentence


def test_module_name(tmp_path):
    assert module_name(tmp_path / "json" / "__init__.py", tmp_path) == "json"
    assert module_name(tmp_path / "json" / "decoder.py", tmp_path) == "json.decoder"
    assert module_name(tmp_path / "textwrap.py", tmp_path) == "textwrap"
    for private in ("_pydecimal.py", "__main__.py", "json/_helper.py", "_private/mod.py", "bad-name.py"):
        assert module_name(tmp_path / private, tmp_path) is None, private


def test_answers_for_known_stdlib_functions_match_inspect():
    root = stdlib_root()
    items = instructions(read_definitions([root / "textwrap.py"], root))
    pairs = {i.prompt: i.completion for i in items}
    assert pairs["Write the signature of `textwrap.dedent`."] == f"def dedent{inspect.signature(textwrap.dedent)}"
    assert pairs["What does `textwrap.dedent` do?"] == first_sentence(inspect.getdoc(textwrap.dedent))
    assert pairs["What does `textwrap.dedent` do?"].startswith("Remove any common leading whitespace")
    assert pairs["Which module defines `dedent`?"] == "textwrap"
    assert pairs["Write the signature of `textwrap.TextWrapper.wrap`."] == "def wrap(self, text)"
    # keyword-only arguments and defaults as the source writes them (json.dumps' is too long for the set)
    json_root = root / "json" / "__init__.py"
    dumps = next(d for d in read_definitions([json_root], root) if d.qualname == "dumps")
    import json

    assert dumps.module == "json" and dumps.signature == f"def dumps{inspect.signature(json.dumps)}"


def write_tree(root, packages: int = 8):
    """A fake standard library: `packages` top-level packages, some with submodules, plus files
    the reader must skip."""
    for p in range(packages):
        funcs = "".join(f'def f{p}_{k}(x, y={k}):\n    """Compute thing {k} of package {p}."""\n\n\n'
                        for k in range(3 + p % 3))
        if p % 2:
            (root / f"pkg{p}").mkdir()
            (root / f"pkg{p}" / "__init__.py").write_text(funcs)
            (root / f"pkg{p}" / "sub.py").write_text(f'class C{p}:\n    """A class of package {p}."""\n')
        else:
            (root / f"pkg{p}.py").write_text(funcs)
    (root / "_private.py").write_text('def hidden(x):\n    """Never asked about."""\n')
    (root / "broken.py").write_text("def (:\n")  # not Python this interpreter parses: skipped
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text('def test_x():\n    """A test suite, not the library."""\n')


def test_build_is_deterministic_and_splits_by_package(tmp_path):
    write_tree(tmp_path)
    files = stdlib_files(tmp_path)
    assert all("tests" not in f.parts for f in files)
    a = build_instruction_set(files, tmp_path, val_fraction=0.25, seed=0)
    b = build_instruction_set(files, tmp_path, val_fraction=0.25, seed=0)
    assert a == b
    train_pk, val_pk = {package_of(i.module) for i in a.train}, {package_of(i.module) for i in a.val}
    assert val_pk and train_pk and not train_pk & val_pk  # whole packages on one side
    assert set(a.val_packages) == val_pk and set(a.train_packages) == train_pk
    assert train_pk | val_pk == {f"pkg{p}" for p in range(8)}  # _private, broken and tests left out
    n = len(a.train) + len(a.val)
    assert 0.25 * n <= len(a.val) < 0.6 * n
    assert {i.kind for i in a.train + a.val} == set(KINDS)
    # another seed holds out other packages (for some seed: the split is the seed's, not fixed)
    assert any(build_instruction_set(files, tmp_path, val_fraction=0.25, seed=s).val_packages != a.val_packages
               for s in range(1, 6))


def test_held_out_packages_take_the_fraction_and_never_all():
    counts = {f"p{i}": 10 for i in range(10)}
    held = held_out_packages(counts, 0.3, seed=0)
    assert len(held) == 3
    assert held == held_out_packages(counts, 0.3, seed=0)
    assert len(held_out_packages(counts, 0.99, seed=0)) == 9  # one package always stays to train on
    assert len(held_out_packages({"a": 1000, "b": 1}, 0.01, seed=0)) == 1  # at least one


def test_sampling_keeps_order_and_is_seeded(tmp_path):
    write_tree(tmp_path, packages=10)
    full = build_instruction_set(root=tmp_path, val_fraction=0.2, seed=1)
    small = build_instruction_set(root=tmp_path, val_fraction=0.2, seed=1, max_train=10, max_val=3)
    assert len(small.train) == 10 and len(small.val) == 3
    assert small == build_instruction_set(root=tmp_path, val_fraction=0.2, seed=1, max_train=10, max_val=3)
    positions = [full.train.index(i) for i in small.train]
    assert positions == sorted(positions)


def test_jsonl_is_read_by_finetune_as_prompt_completion(tmp_path):
    (tmp_path / "lib").mkdir()
    write_tree(tmp_path / "lib")
    s = build_instruction_set(root=tmp_path / "lib", val_fraction=0.25, seed=0)
    path = write_jsonl(s.train, tmp_path / "train.jsonl")
    layout, examples = read_examples(path)
    assert layout.name == "prompt-completion" and len(examples) == len(s.train)
    assert examples[0].messages == [{"role": "user", "content": s.train[0].prompt},
                                    {"role": "assistant", "content": s.train[0].completion}]


def test_showcase_takes_kinds_in_turn_from_different_modules(tmp_path):
    write_tree(tmp_path)
    items = build_instruction_set(root=tmp_path, val_fraction=0.5, seed=0).val
    shown = showcase(items, 3, seed=0)
    assert [i.kind for i in shown] == list(KINDS)
    assert len({i.module for i in shown}) == 3
    assert shown == showcase(items, 3, seed=0) and all(i in items for i in shown)
    assert len(showcase(items, 1000, seed=0)) == len(items)  # no more than there are


@pytest.mark.parametrize("kwargs, message", [
    ({"val_fraction": 0.0}, "val_fraction must be in"),
    ({"val_fraction": 1.0}, "val_fraction must be in"),
    ({"max_train": 0}, "max_train must be >= 1"),
])
def test_bad_options_are_refused(tmp_path, kwargs, message):
    write_tree(tmp_path)
    with pytest.raises(ValueError, match=message):
        build_instruction_set(root=tmp_path, **kwargs)


def test_bad_trees_are_refused(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        stdlib_files(tmp_path / "missing")
    with pytest.raises(ValueError, match="found no Python sources"):
        stdlib_files(tmp_path)
    (tmp_path / "only.py").write_text('def f(x):\n    """One package cannot be split."""\n')
    with pytest.raises(ValueError, match="at least two top-level packages"):
        build_instruction_set(root=tmp_path)
    (tmp_path / "only.py").write_text("X = 1\n")
    with pytest.raises(ValueError, match="no public function or class"):
        build_instruction_set(root=tmp_path)
