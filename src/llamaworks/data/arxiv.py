"""ArXiv LaTeX sources (section 2.1, following RedPajama-Data v1's arxiv_cleaner).

Keep the text from the first \\section (or \\chapter) up to the bibliography, remove
comments, and inline-expand the paper's own argument-free \\newcommand / \\def macros.
Inputs: a .tex file, a folder of one paper's .tex files, or a (gzipped) tar of them, as
arXiv's bulk source archives hold them.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

from llamaworks.data.books import decode_text
from llamaworks.data.document import Document, MalformedInput
from llamaworks.data.executor import Reader
from llamaworks.data.step import LineCleaner


class ArxivReader(Reader):
    """One document per paper: a .tex file, a folder (its .tex files joined, main file first)
    or a tar archive (the same, from its members)."""

    name = "arxiv"

    def files(self, inputs):
        out = []
        for raw in inputs:
            p = Path(raw)
            if not p.exists():
                raise FileNotFoundError(f"input {str(raw)!r} does not exist; pass .tex files, paper folders or tars")
            if p.is_file() or any(p.glob("*.tex")):
                out.append(p)
            else:
                out += sorted(c for c in p.iterdir() if not c.name.startswith(".")
                              and (c.is_dir() or c.suffix == ".tex" or ".tar" in c.name or c.suffix == ".tgz"))
        return out

    def read(self, path):
        if path.is_dir():
            parts = [(f.name, f.read_bytes()) for f in sorted(path.rglob("*.tex"))]
        elif path.suffix == ".tex":
            parts = [(path.name, path.read_bytes())]
        else:
            try:
                with tarfile.open(path) as tar:
                    parts = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()
                             if m.isfile() and m.name.endswith(".tex")]
            except (tarfile.TarError, EOFError, OSError) as e:
                raise MalformedInput(f"{path}: not a readable tar archive ({e})") from None
        if not parts:
            return
        texts = [(name, decode_text(data)[0]) for name, data in parts]
        # The main file (the one with \documentclass) first: its preamble holds the macros.
        texts.sort(key=lambda nt: "\\documentclass" not in nt[1])
        name = path.name.removesuffix(".gz").removesuffix(".tar").removesuffix(".tgz").removesuffix(".tex")
        yield Document(id=name, text="\n".join(t for _, t in texts), source="arxiv",
                       metadata={"files": [n for n, _ in texts]})


_COMMENT = re.compile(r"(?<!\\)%.*")  # % starts a comment unless escaped (\%)
_NEWCOMMAND = re.compile(r"\\(?:re)?newcommand\*?\s*\{?\s*(\\[A-Za-z]+)\s*\}?\s*(\[\d\])?\s*\{")
_DEF = re.compile(r"\\def\s*(\\[A-Za-z]+)\s*(#\d)?\s*\{")
_SECTION = re.compile(r"\\(?:section|chapter)\*?\s*[\[{]")
_BIBLIO = re.compile(r"\\begin\{thebibliography\}|\\bibliography\{|\\printbibliography|"
                     r"\\section\*?\{(?:References|Bibliography)\}", re.I)


def _braced(text: str, start: int) -> int | None:
    """Index just past the group whose '{' is at text[start - 1]; None if unbalanced."""
    depth = 1
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def macros(text: str) -> tuple[dict[str, str], list[tuple[int, int]]]:
    """Argument-free macro definitions {"\\name": body} and the spans of all definitions."""
    found: dict[str, str] = {}
    spans = []
    for pat in (_NEWCOMMAND, _DEF):
        for m in pat.finditer(text):
            end = _braced(text, m.end())
            if end is None:
                continue
            spans.append((m.start(), end))
            if m.group(2) is None:  # with arguments ([1] or #1): left as is
                found[m.group(1)] = text[m.end():end - 1]
    return found, spans


def expand(text: str, defs: dict[str, str], rounds: int = 5) -> str:
    if not defs:
        return text
    # Longest names first, and the name must not continue with a letter (\foo vs \foobar).
    names = "|".join(re.escape(n) for n in sorted(defs, key=len, reverse=True))
    pat = re.compile(f"(?:{names})(?![A-Za-z])")
    for _ in range(rounds):  # macros that use macros; bounded, so a self-referencing \def stops
        new = pat.sub(lambda m: defs[m.group(0)], text)  # a function: the body's backslashes stay literal
        if new == text:
            break
        text = new
    return text


class ArxivCleaner(LineCleaner):
    name = "arxiv_latex"
    empty_reason = "no text between the first section and the bibliography"

    def clean(self, doc):
        lines = doc.text.split("\n")
        no_comments = [_COMMENT.sub("", x) for x in lines]
        comment_lines = [x for x, y in zip(lines, no_comments) if x.strip() and not y.strip()]
        text = "\n".join(y for x, y in zip(lines, no_comments) if y.strip() or not x.strip())
        defs, spans = macros(text)
        sec = _SECTION.search(text)
        if sec is None:
            return None, {"no \\section or \\chapter: not a paper body": []}
        removed = {"comment": comment_lines, "before the first section": text[:sec.start()].split("\n")}
        body = text[sec.start():]
        bib = _BIBLIO.search(body)
        if bib:
            removed["bibliography and after"] = body[bib.start():].split("\n")
            body = body[:bib.start()]
        # Definitions made inside the body go too (their effect is expanded in place).
        body_defs, body_spans = macros(body)
        for s, e in sorted(body_spans, reverse=True):
            body = body[:s] + body[e:]
        defs.update(body_defs)
        body = expand(body, defs)
        body = re.sub(r"\n{3,}", "\n\n", body).strip() + "\n"
        return body, removed

    def describe(self):
        return ("LaTeX: drop everything before the first \\section and from the bibliography on, remove comments, "
                "expand argument-free \\newcommand/\\def macros")
