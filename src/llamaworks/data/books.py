"""Books: Project Gutenberg plain-text files (section 2.1, "Books").

The Gutenberg header (title page boilerplate up to "*** START OF THE PROJECT GUTENBERG
EBOOK ... ***") and the licence footer (from "*** END OF THE PROJECT GUTENBERG EBOOK")
are not part of the book; the book-level near-dedup is `dedup.MinHashDedup`.
"""

from __future__ import annotations

import re

from llamaworks.data.document import Document
from llamaworks.data.executor import Reader
from llamaworks.data.step import LineCleaner


def decode_text(data: bytes) -> tuple[str, str]:
    """UTF-8, else Windows-1252 (older Gutenberg files are Latin-1/CP1252); never fails."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace"), "cp1252"


class GutenbergReader(Reader):
    name = "gutenberg"
    patterns = ("*.txt",)

    def read(self, path):
        text, encoding = decode_text(path.read_bytes())
        yield Document(id=path.stem, text=text.replace("\r\n", "\n"), source="books",
                       metadata={"file": path.name, "encoding": encoding})


# The marker lines over the years: "*** START OF THE PROJECT GUTENBERG EBOOK X ***",
# "*** START OF THIS PROJECT GUTENBERG EBOOK X ***", "***START OF THE PROJECT GUTENBERG EBOOK",
# and the 1990s "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*".
_START = re.compile(r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG|^\s*\*END\*THE SMALL PRINT", re.I)
_END = re.compile(r"^\s*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|^\s*End of (the )?Project Gutenberg'?s?\b", re.I)


class GutenbergCleaner(LineCleaner):
    name = "gutenberg_boilerplate"
    empty_reason = "no book text between the Gutenberg header and footer"

    def clean(self, doc):
        lines = doc.text.split("\n")
        start = next((i for i, x in enumerate(lines) if _START.search(x)), None)
        header = lines[:start + 1] if start is not None else []
        body = lines[start + 1:] if start is not None else lines
        end = next((i for i, x in enumerate(body) if _END.search(x)), None)
        footer = body[end:] if end is not None else []
        body = body[:end] if end is not None else body
        return "\n".join(body).strip("\n") + "\n", {"Project Gutenberg header": header,
                                                   "Project Gutenberg licence footer": footer}

    def describe(self):
        return "strip the Project Gutenberg header (to '*** START OF ...') and licence footer (from '*** END OF ...')"
