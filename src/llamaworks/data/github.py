"""GitHub code (section 2.1): permissive licences, quality heuristics, licence headers, exact dedup.

Inputs: a folder of repositories (each with its LICENSE file), or JSONL in the BigQuery
`github_repos` export layout {repo_name, path, license, content}. Constants follow
RedPajama-Data v1's github filter (max line length 1000, mean line length 100,
alphanumeric fraction 0.25) which reproduces LLaMA's description.
"""

from __future__ import annotations

import re
from pathlib import Path

from llamaworks.data.books import decode_text
from llamaworks.data.document import Document, MalformedInput, json_lines
from llamaworks.data.executor import Reader
from llamaworks.data.step import Filter, LineCleaner

# Section 2.1: "Apache, BSD and MIT licenses" (BigQuery's license field spelling).
ALLOWED_LICENSES = ("mit", "apache-2.0", "bsd-2-clause", "bsd-3-clause")
MAX_LINE_LENGTH = 1000  # RedPajama github_clean_dedup: max_line_length > 1000 -> drop
MAX_MEAN_LINE_LENGTH = 100  # RedPajama: avg_line_length > 100 -> drop
MIN_ALNUM_FRACTION = 0.25  # RedPajama: alphanum_fraction < 0.25 -> drop
# RedPajama's extension allow-list (source code and markup people write by hand).
EXTENSIONS = frozenset(
    "asm bat c cc cmd cpp cs css cxx f f90 go h hpp hs html java jl js jsx kt lisp lua m md php pl ps1 py r rb "
    "rs rst scala sh sql swift tex ts tsx vb vue xml yaml yml json".split())

_LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "COPYING", "LICENCE", "license", "License.txt")
_LICENSE_PATTERNS = (  # the clause each licence's text is recognised by
    ("apache-2.0", re.compile(r"Apache License,?\s+Version 2\.0", re.I)),
    ("mit", re.compile(r"Permission is hereby granted, free of charge", re.I)),
    ("bsd-3-clause", re.compile(r"Neither the name of .{0,200}? nor the names", re.I | re.S)),
    ("bsd-2-clause", re.compile(r"Redistribution and use in source and binary forms", re.I)),
)


def detect_license(text: str) -> str | None:
    for name, pat in _LICENSE_PATTERNS:
        if pat.search(text):
            return name
    return None


class GithubReader(Reader):
    """A folder of repositories (one sub-folder each) is one shard per repository; JSONL files
    in the BigQuery layout are one shard per file."""

    name = "github"

    def files(self, inputs):
        out = []
        for raw in inputs:
            p = Path(raw)
            if not p.exists():
                raise FileNotFoundError(f"input {str(raw)!r} does not exist; pass repository folders, a folder of "
                                        "them, or BigQuery-layout .jsonl[.gz] files")
            if p.is_file():
                out.append(p)
            elif any((p / f).is_file() for f in _LICENSE_FILES) or (p / ".git").exists():
                out.append(p)
            else:
                out += sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))
                out += sorted(c for c in p.iterdir() if c.is_file() and ".jsonl" in c.name)
        return out

    def read(self, path):
        if path.is_dir():
            yield from self._repo(path)
            return
        for lineno, rec in json_lines(path):
            if not isinstance(rec, dict) or "content" not in rec:
                raise MalformedInput(f"{path}:{lineno}: not a BigQuery github record "
                                     "{repo_name, path, license, content}")
            content = rec["content"]
            if not isinstance(content, str):  # binary files have content null in the export
                continue
            yield Document(id=f"{rec.get('repo_name')}/{rec.get('path')}", text=content, source="github",
                           metadata={"repo_name": rec.get("repo_name"), "path": rec.get("path"),
                                     "license": (rec.get("license") or "").lower() or None})

    def _repo(self, repo: Path):
        lic_file = next((repo / f for f in _LICENSE_FILES if (repo / f).is_file()), None)
        license = detect_license(decode_text(lic_file.read_bytes())[0]) if lic_file else None
        for f in sorted(repo.rglob("*")):
            rel = f.relative_to(repo)
            if not f.is_file() or any(part.startswith(".") for part in rel.parts):
                continue
            data = f.read_bytes()
            if b"\0" in data[:8192]:  # binary file (image, archive): not code
                continue
            yield Document(id=f"{repo.name}/{rel.as_posix()}", text=decode_text(data)[0], source="github",
                           metadata={"repo_name": repo.name, "path": rel.as_posix(), "license": license})


class LicenseFilter(Filter):
    name = "license"

    def __init__(self, allowed=ALLOWED_LICENSES):
        self.allowed = tuple(a.lower() for a in allowed)

    def reason(self, doc):
        lic = doc.metadata.get("license")
        return None if lic in self.allowed else f"licence {lic or 'unknown'} not in the allow-list"

    def describe(self):
        return f"keep repositories licensed {', '.join(self.allowed)}"


class CodeQualityFilter(Filter):
    name = "code_quality"

    def __init__(self, extensions=EXTENSIONS, max_line_length=MAX_LINE_LENGTH,
                 max_mean_line_length=MAX_MEAN_LINE_LENGTH, min_alnum_fraction=MIN_ALNUM_FRACTION):
        self.extensions = frozenset(extensions)
        self.max_line, self.max_mean, self.min_alnum = max_line_length, max_mean_line_length, min_alnum_fraction

    def reason(self, doc):
        path = doc.metadata.get("path") or doc.id
        ext = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
        if ext not in self.extensions:
            return f"extension .{ext} not in the allow-list" if ext else "file without extension"
        text = doc.text
        if not text.strip():
            return "empty file"
        lines = text.splitlines()
        if max(map(len, lines)) > self.max_line:
            return f"a line longer than {self.max_line} characters (generated or minified)"
        if sum(map(len, lines)) / len(lines) > self.max_mean:
            return f"mean line length above {self.max_mean}"
        if sum(c.isalnum() for c in text) / len(text) < self.min_alnum:
            return f"alphanumeric fraction below {self.min_alnum}"
        return None

    def describe(self):
        return (f"drop files: extension not allowed, a line > {self.max_line} chars, mean line > {self.max_mean}, "
                f"alphanumeric fraction < {self.min_alnum}")


# A leading comment block (//, #, --, ;, /* */, <!-- -->) that mentions a licence or copyright.
_HEADER = re.compile(
    r"\A(?:\s*(?:#![^\n]*\n))?"  # keep room for a shebang: matched, re-inserted below
    r"(?P<block>(?:[ \t]*(?:/\*.*?\*/|<!--.*?-->|\"\"\".*?\"\"\""  # block comments, a leading docstring
    r"|(?://|#(?![A-Za-z!])|--|;)[^\n]*)[ \t]*\n?)+)",  # line comments; "#include", "#!" are not comments
    re.S)
_LICENSE_WORDS = re.compile(r"copyright|licen[sc]e|spdx-license-identifier|all rights reserved", re.I)


class LicenseHeaderCleaner(LineCleaner):
    name = "license_header"
    empty_reason = "nothing left after removing the licence header"

    def clean(self, doc):
        text = doc.text
        m = _HEADER.match(text)
        if not m or not _LICENSE_WORDS.search(m.group("block")):
            return text, {}
        shebang = text[:m.start("block")]
        rest = text[m.end("block"):].lstrip("\n")
        return shebang + rest, {"licence / copyright header comment": m.group("block").splitlines()}

    def describe(self):
        return "remove a leading comment block that mentions a licence or copyright"
