"""CommonCrawl WET files: the extracted-text records of a crawl, one document per page.

A WET file (`CC-MAIN-...warc.wet.gz`) is a WARC file of `conversion` records (the page's
plain text, UTF-8) after one `warcinfo` record; each record is its own gzip member. The
steps that clean them (CCNet, Wenzek et al. 2020) are in data/ccnet.py.

warcio is lenient: on a truncated gzip member or record it stops or returns short content
without an error, so a cut-off download would pass for a shorter file. We decompress with
Python's strict gzip reader and check every record's length against its Content-Length, so
such files are reported as malformed (the executor skips or stops, per --on-malformed).
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Iterable
from pathlib import Path

from llamaworks.atomic import atomic_write_bytes
from llamaworks.data import storage
from llamaworks.data.document import Document, MalformedInput
from llamaworks.data.executor import Reader


class _Strict(io.RawIOBase):
    """Read-through that remembers a decompression error: warcio catches EOFError while parsing
    headers and takes it for the end of the file."""

    def __init__(self, f):
        self.f, self.error = f, None

    def readable(self):
        return True

    def readinto(self, b):
        try:
            # read1: one decompression step, so the pages before a truncated member come out before its error.
            data = self.f.read1(len(b))
        except (EOFError, OSError) as e:  # gzip: truncated member (EOFError) or corrupt data (BadGzipFile)
            self.error = e
            raise
        b[:len(data)] = data
        return len(data)


def _open(path):
    raw = storage.open_raw(path)
    gz = raw.read(2) == b"\x1f\x8b"  # by content: a .wet may be compressed and a .gz may not
    raw.seek(0)
    return raw, (gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw)


def _truncated(path, n: int, error: Exception) -> str:
    return f"{path}: truncated or corrupt gzip data in or after record {n} ({error}); download the file again"


class WetReader(Reader):
    name = "commoncrawl"
    patterns = ("*.warc.wet.gz", "*.wet.gz", "*.warc.wet", "*.wet")
    remote_inputs = True

    def read(self, path):
        from warcio.archiveiterator import ArchiveIterator

        raw, stream = _open(path)
        strict = _Strict(stream)
        n = 0
        try:
            for rec in ArchiveIterator(strict):  # unbuffered: a buffered read would lose the pages before an error
                n += 1
                doc = self._document(path, n, rec)
                if rec.rec_type == "conversion":  # not warcinfo (the file header) or request/response records
                    yield doc
        except MalformedInput:
            raise
        except Exception as e:
            if strict.error is not None:
                raise MalformedInput(_truncated(path, n, strict.error)) from None
            raise MalformedInput(f"{path}: record {n}: {type(e).__name__}: {e}") from None
        finally:
            raw.close()
        if strict.error is not None:
            raise MalformedInput(_truncated(path, n, strict.error))
        if n == 0 and storage.size(path) > 0:
            raise MalformedInput(f"{path}: no WARC record found (not a WET file, or truncated in the first record)")

    @staticmethod
    def _document(path, n: int, rec) -> Document:
        head = rec.rec_headers
        rid = head.get_header("WARC-Record-ID")
        length = head.get_header("Content-Length")
        if not rid or length is None or not length.strip().isdigit():
            raise MalformedInput(f"{path}: record {n}: no WARC-Record-ID or Content-Length header "
                                 "(truncated or not a WET file)")
        body = rec.content_stream().read()
        if len(body) != int(length):
            raise MalformedInput(f"{path}: record {n} ({rid}): {len(body)} bytes of content, Content-Length "
                                 f"says {length} (truncated file); download it again")
        # WET text is UTF-8 by CommonCrawl's conversion; a stray invalid byte costs one U+FFFD, not the
        # rest of the file (language id and the LM then judge the page like any other).
        text = body.decode("utf-8", errors="replace").strip()
        return Document(id=rid.strip("<>"), text=text, source="commoncrawl",
                        metadata={"url": head.get_header("WARC-Target-URI"), "date": head.get_header("WARC-Date"),
                                  "digest": head.get_header("WARC-Block-Digest"), "length": int(length)})

    def describe(self):
        return "CommonCrawl WET conversion records (warcio), one document per page"


def write_wet(path: str | os.PathLike, pages: Iterable[tuple[str, str | bytes]],
              date: str = "2020-01-01T00:00:00Z") -> None:
    """Write (url, text) pages as a WET file laid out as CommonCrawl's: a warcinfo record, then one
    conversion record per page, each its own gzip member when the name ends in .gz (test fixtures
    and benchmark corpora; bytes pass through as is, invalid UTF-8 included)."""
    from warcio.warcwriter import WARCWriter

    path = Path(path)
    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=path.name.endswith(".gz"))
    writer.write_record(writer.create_warcinfo_record(path.name, {"software": "llamaworks write_wet"}))
    for url, text in pages:
        body = text if isinstance(text, bytes) else text.encode("utf-8")
        writer.write_record(writer.create_warc_record(
            url, "conversion", payload=io.BytesIO(body),
            warc_headers_dict={"WARC-Date": date, "Content-Type": "text/plain"}))
    atomic_write_bytes(path, buf.getvalue())
