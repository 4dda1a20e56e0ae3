from __future__ import annotations

import json

import pytest

from llamaworks.data.c4 import C4Filter
from llamaworks.data.dedup import ExactDedup, LineDedup, normalize_line
from llamaworks.data.document import Document
from llamaworks.data.executor import LocalExecutor
from llamaworks.data.github import CodeQualityFilter, GithubReader, LicenseHeaderCleaner, detect_license
from llamaworks.data.step import Dropped, LinesRemoved

GOOD = ("The cat sat on the mat today. It was a sunny day outside! Did the dog come along too? "
        "Everyone said it was lovely. The end of the story is near.")


def run(step, *texts):
    return list(step.run([Document(str(i), t, "t") for i, t in enumerate(texts)]))


def kept(events):
    return [e for e in events if isinstance(e, Document)]


def test_c4_keeps_good_page_and_cuts_lines():
    page = "\n".join([GOOD, "Menu", "Home | About | Contact", "Please enable JavaScript to view this page.",
                      "This site uses cookies to improve your experience.", "A line ending with ellipsis...",
                      "x" * 1500 + " is a very long word indeed."])
    ev = run(C4Filter(), page)
    (doc,) = kept(ev)
    assert doc.text == GOOD
    reasons = {e.reason for e in ev if isinstance(e, LinesRemoved)}
    assert reasons == {"line without terminal punctuation", "line mentions javascript",
                       "cookie / policy boilerplate line", "line with a word longer than 1000 characters"}


@pytest.mark.parametrize("text,why", [
    ("Lorem ipsum dolor sit amet. " + GOOD, "lorem ipsum"),
    ("function f() { return 1; }. " + GOOD, "curly brace"),
    ("Only one sentence here.", "fewer than 5 sentences"),
    ("", "fewer than 5 sentences"),
    ("\n\n   \n", "fewer than 5 sentences"),
    ("word " * 400_000 + ".", "fewer than 5 sentences"),  # one 2 MB line
    ("\ufffd\ufffd invalid bytes. " * 3, "fewer than 5 sentences"),
])
def test_c4_drops_pages(text, why):
    (ev,) = run(C4Filter(), text)
    assert isinstance(ev, Dropped) and why in ev.reason


def test_c4_cuts_citations_as_c4_utils():
    # tensorflow/datasets c4_utils_test.test_clean_page_citations, its page and its expected text
    text = ("This page has some text.\nSome lines don't end with punctuation\n"
            "And some of these lines end with citations.[3]\n"
            "Or have requested citations[citation needed]. Or the option to edit.[edit]\n")
    (doc,) = kept(run(C4Filter(min_sentences=1), text))
    assert doc.text == ("This page has some text.\nAnd some of these lines end with citations.\n"
                        "Or have requested citations. Or the option to edit.")


@pytest.mark.parametrize("extra", [
    "body { color: red }",  # a brace on a line the punctuation rule removes first
    "Lorem ipsum dolor",  # placeholder text on a line that is too short and unpunctuated
    "Please enable javascript { here }.",  # c4_utils tests javascript before the brace: the line goes
])
def test_c4_page_rules_only_see_lines_that_survive_the_line_rules(extra):
    (doc,) = kept(run(C4Filter(), GOOD + "\n" + extra))
    assert doc.text == GOOD


def test_c4_sentences_are_counted_per_kept_line():
    # Five one-sentence lines ending in a quote: a page-wide regex would merge them into fewer sentences.
    lines = [f'He said it was number {w}."' for w in ("one", "two", "three", "four", "five")]
    assert kept(run(C4Filter(), "\n".join(lines)))
    assert not kept(run(C4Filter(), "\n".join(lines[:4])))


def test_c4_badwords(tmp_path):
    (tmp_path / "bad.txt").write_text("frobnicate\ntwo words\n")
    f = C4Filter(badwords=tmp_path / "bad.txt")
    assert isinstance(run(f, GOOD + " We frobnicate.")[0], Dropped)
    assert isinstance(run(f, GOOD + " Two  words.")[0], Document)  # phrase match is on the exact spacing
    assert isinstance(run(f, GOOD + " Frobnicated.")[0], Document)  # whole words only
    assert kept(run(f, GOOD + "\nfrobnicate menu"))  # only the cleaned page is checked
    with pytest.raises(FileNotFoundError, match="one word or phrase per line"):
        C4Filter(badwords=tmp_path / "missing.txt")


def test_line_dedup_normalisation_and_first_kept():
    assert normalize_line("  Héllo, World 2023! ") == "hello world 0000"
    dedup = LineDedup()
    ev = run(dedup, "Copyright 2019 Acme.\nreal text one\n", "copyright 2020 ACME\nreal text two\n",
             "COPYRIGHT 2021 acme!!")
    docs = kept(ev)
    assert docs[0].text == "Copyright 2019 Acme.\nreal text one\n"
    assert docs[1].text == "real text two\n"
    assert any(isinstance(e, Dropped) for e in ev)


def test_exact_dedup():
    ev = run(ExactDedup(), "a = 1\n", "b = 2\n", "a = 1\n")
    assert [type(e).__name__ for e in ev] == ["Document", "Document", "Dropped"]


MIT = "MIT License\n\nPermission is hereby granted, free of charge, to any person obtaining a copy..."
GPL = "GNU GENERAL PUBLIC LICENSE\nVersion 3, 29 June 2007"


def test_detect_license():
    assert detect_license(MIT) == "mit"
    assert detect_license("Apache License\n Version 2.0, January 2004") == "apache-2.0"
    assert detect_license(GPL) is None


def test_code_quality():
    f = CodeQualityFilter()
    def doc(path, text):
        return Document(path, text, "github", {"path": path})
    assert f.reason(doc("a.py", "def f():\n    return 1\n")) is None
    assert "extension" in f.reason(doc("a.png", "x"))
    assert "without extension" in f.reason(doc("Makefile", "all:\n"))
    assert "longer than 1000" in f.reason(doc("min.js", "var a=1;" * 200))
    assert "mean line" in f.reason(doc("a.js", ("x = '" + "a" * 150 + "'\n") * 3))
    assert "alphanumeric" in f.reason(doc("a.py", "#" * 50 + "\n"))
    assert f.reason(doc("a.py", "")) == "empty file"


def test_license_header_removal():
    c = LicenseHeaderCleaner()
    py = "#!/usr/bin/env python\n# Copyright 2020 Foo\n# Licensed under MIT\n\nimport os\n"
    assert c.clean(Document("a", py, "g"))[0] == "#!/usr/bin/env python\nimport os\n"
    cc = "/*\n * Copyright (c) 2001 Bar\n * SPDX-License-Identifier: BSD-3-Clause\n */\n#include <stdio.h>\nint x;\n"
    assert c.clean(Document("b", cc, "g"))[0] == "#include <stdio.h>\nint x;\n"
    plain = "// helper functions\nint y;\n"
    assert c.clean(Document("c", plain, "g"))[0] == plain  # a comment without licence words stays
    weird = "/* unterminated copyright comment\nint z;\n" + "/" * 50000  # no "*/": not a comment
    assert c.clean(Document("d", weird, "g"))[0] == weird


def test_github_pipeline_repos_and_bigquery(tmp_path):
    from llamaworks.data.sources import pipeline

    repos = tmp_path / "repos"
    (repos / "good" / "src").mkdir(parents=True)
    (repos / "good" / "LICENSE").write_text(MIT)
    (repos / "good" / "src" / "a.py").write_text("# Copyright 2020 A\n# MIT licence\nprint('hi')\n")
    (repos / "good" / "src" / "img.png").write_bytes(b"\x89PNG\0\0")
    (repos / "good" / "dup.py").write_text("print('hi')\n")
    (repos / "gpl").mkdir()
    (repos / "gpl" / "LICENSE").write_text(GPL)
    (repos / "gpl" / "b.py").write_text("print('gpl')\n")
    bq = tmp_path / "bq.jsonl"
    bq.write_text("\n".join(json.dumps(r) for r in [
        {"repo_name": "x/y", "path": "m.go", "license": "apache-2.0", "content": "package main\n"},
        {"repo_name": "x/z", "path": "n.go", "license": "gpl-3.0", "content": "package gpl\n"},
        {"repo_name": "x/w", "path": "bin.go", "license": "mit", "content": None}]) + "\n")
    reader, steps = pipeline("github")
    stats = LocalExecutor(tmp_path / "out", workers=1, progress=False).run("github", reader, steps,
                                                                          [repos, bq])
    from llamaworks.data.document import read_jsonl
    docs = [d for p in sorted((tmp_path / "out" / "documents").glob("*.gz")) for d in read_jsonl(p)]
    assert sorted(d.text for d in docs) == ["package main\n", "print('hi')\n"]
    assert "exact duplicate of an earlier document" in stats["steps"][-1]["dropped"]
    assert isinstance(GithubReader(), GithubReader)
