"""The document record and the compressed JSONL shards documents travel in.

One JSON object per line: {"id", "text", "source", "metadata"} — the same layout
`llamaworks prepare` (train/shards.py) reads, so a pipeline's output tokenises as is.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamaworks.data import storage
from llamaworks.data.storage import zstandard_module


@dataclass
class Document:
    id: str
    text: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "text": self.text, "source": self.source, "metadata": self.metadata},
                          ensure_ascii=False)


class MalformedInput(ValueError):
    """An input file that cannot be read as its format; the message starts with its path."""


def open_read(path: str | os.PathLike):
    """Binary reader that undoes .gz / .zst / .bz2 / .xz by file name; a local path or a URL (data/storage.py)."""
    return storage.open_read(path)


def json_lines(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a (compressed) JSONL file."""
    for lineno, line in raw_lines(path):
        yield lineno, parse_line(path, lineno, line)


def raw_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each non-blank line of a (compressed) JSONL file, unparsed: `prepare`
    reads them in the main process and parses them in its workers (parse_line)."""
    with open_read(path) as f:
        for lineno, line in enumerate(f, 1):
            if line and not line.isspace():  # a blank line (`line.strip()` without its copy)
                yield lineno, line


def _fast_json():
    """orjson's loads when it is installed (the `data` extra) and LLAMAWORKS_FAST_JSON is not 0, else None."""
    if os.environ.get("LLAMAWORKS_FAST_JSON", "1") == "0":
        return None
    try:
        import orjson
    except ImportError:
        return None
    return orjson.loads


# Parsing a document's line was the largest stage of `data mix` after the tokenizer (0.84 CPU s per
# 200 MiB with json; docs/data.md). orjson returns the same objects as json for every line it
# accepts (tests/data/test_document_json.py) and refuses more (NaN, lone surrogates, a byte-order
# mark, UTF-16): such a line goes to json, which parses it or names the error. One difference it does
# not refuse: an integer past 64 bits becomes a float (2e+19 for 20000000000000000000, where json
# keeps the int, and an id would change), so a line whose objects hold a float and whose text has a
# run of 19 digits or more goes to json. The float check comes first: the regex over every line cost
# six times orjson's parse (95 against 576 MiB/s; 2.1 of 7.8 CPU s of a 200 MiB `data mix`), and a
# document record holds no float.
_FAST_LOADS = _fast_json()
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def set_fast_json(on: bool) -> None:
    """Parse with orjson (when installed) or with json alone, for the rest of the process (tests, A/B runs)."""
    global _FAST_LOADS
    _FAST_LOADS = _fast_json() if on else None


def _holds_float(value: Any) -> bool:
    """Whether a parsed JSON value has a float anywhere in it (a walk with a stack, not recursion:
    orjson nests 1024 deep)."""
    stack = [value]
    while stack:
        v = stack.pop()
        kind = type(v)
        if kind is float:
            return True
        if kind is dict:
            stack.extend(v.values())
        elif kind is list:
            stack.extend(v)
    return False


def parse_line(path: str | os.PathLike, lineno: int, line: bytes) -> Any:
    """Line `lineno` of JSONL file `path` parsed; MalformedInput naming both when it is not JSON."""
    if _FAST_LOADS is not None:
        try:
            parsed = _FAST_LOADS(line)
        except ValueError:  # orjson.JSONDecodeError: json decides below
            pass
        else:
            if not (_holds_float(parsed) and _LONG_DIGITS.search(line)):
                return parsed
    try:
        return json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        why = e.msg if isinstance(e, json.JSONDecodeError) else "invalid UTF-8"
        raise MalformedInput(f"{path}:{lineno}: malformed JSON ({why}); fix or delete the line") from None


@dataclass
class MalformedRecord:
    """A record that is not a document (valid JSON of the wrong shape), yielded by a reader in its
    place: the executor skips and counts it, or stops, per --on-malformed, and the file's other
    records are read on. A file that cannot be parsed at all raises MalformedInput instead."""

    message: str  # starts with "<path>:<line>: "


_JSON_TYPE = {str: "a string", list: "an array", int: "a number", float: "a number", bool: "a boolean"}


def _record_problem(rec: Any) -> str | None:
    """Why a parsed JSONL line is not a document, or None when it is one."""
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        return "record has no string `text` field"
    # Steps read and extend doc.metadata as a dict (dedup signatures, the excluded reason): any
    # other type would fail inside a step, on every retry of the shard. An empty value ("", [])
    # has always meant "no metadata" and still does.
    metadata = rec.get("metadata")
    if metadata and not isinstance(metadata, dict):
        return (f"`metadata` must be a JSON object, got {_JSON_TYPE.get(type(metadata), type(metadata).__name__)}; "
                "fix or delete the line")
    return None


def jsonl_records(path: str | os.PathLike) -> Iterator[Document | MalformedRecord]:
    """The documents of a (compressed) JSONL file, a MalformedRecord in place of each line that
    parses but is not a document. Unparsable JSON raises MalformedInput (file:line)."""
    path = storage.as_path(path)
    for lineno, rec in json_lines(path):
        problem = _record_problem(rec)
        if problem is not None:
            yield MalformedRecord(f"{path}:{lineno}: {problem}")
            continue
        yield Document(id=str(rec.get("id", f"{storage.name(path)}:{lineno}")), text=rec["text"],
                       source=str(rec.get("source") or ""), metadata=rec.get("metadata") or {})


def read_jsonl(path: str | os.PathLike) -> Iterator[Document]:
    """The documents of a (compressed) JSONL file; any malformed line is a MalformedInput (file:line)."""
    for item in jsonl_records(path):
        if isinstance(item, MalformedRecord):
            raise MalformedInput(item.message)
        yield item


class ShardWriter:
    """Writes documents to `path` under a temporary name; `close()` renames it into place.

    A writer that is never closed (the process was killed, or `abort()` was called) leaves
    no file at `path`, so a shard either exists complete or not at all. `path` may be a URL
    (data/storage.py): the object is committed at `close()` only.
    """

    def __init__(self, path: str | os.PathLike, compression: str = "gzip", scratch: bool = False):
        # scratch: a file only the next stage of the run reads (executor `.stages/`), same format.
        # On a local disk gzip level 0 (stored blocks: only the CRC is computed, and reading it
        # back is a copy): level 1 still cost ~20% of a MinHash run's CPU, writing a file that is
        # read once and deleted with the run. In an object store bytes are transfer and
        # requests, so level 1 there (~3x faster than 6, ~15% more bytes).
        if compression not in ("gzip", "zstd"):
            raise ValueError(f"compression must be 'gzip' or 'zstd', got {compression!r}")
        self.path = storage.as_path(path)
        if isinstance(self.path, Path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            self._raw = open(self._tmp, "wb")
        else:
            self._tmp, self._raw = None, storage.open_writer(self.path)
        if compression == "gzip":
            # mtime=0 and the final name (not the temporary one, which holds the pid): identical
            # documents give byte-identical shards (reproducible runs).
            level = (0 if self._tmp is not None else 1) if scratch else 6
            self._f = storage.gzip_module().GzipFile(filename=storage.name(self.path), fileobj=self._raw, mode="wb",
                                                     compresslevel=level, mtime=0)
        else:
            level = 1 if scratch else 3
            self._f = zstandard_module().ZstdCompressor(level=level).stream_writer(self._raw, closefd=False)
        self.count = 0

    def write(self, doc: Document) -> None:
        self._f.write(doc.to_json().encode("utf-8", errors="replace") + b"\n")
        self.count += 1

    def close(self) -> None:
        self._f.close()
        if self._tmp is None:
            self._raw.commit()
            return
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if self._tmp is None:
            self._raw.abort()
            return
        self._raw.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.abort() if exc_type else self.close()


def shard_suffix(compression: str) -> str:
    return ".jsonl.gz" if compression == "gzip" else ".jsonl.zst"
