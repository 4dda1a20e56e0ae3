"""Shards in gzip through zlib-ng (data/storage.py's gzip_module, the `data` extra) or the standard
library: the same documents either way, read back by any gzip reader, level 6 for final shards,
and the same bytes from run to run."""

from __future__ import annotations

import gzip

import pytest

from llamaworks.data import storage
from llamaworks.data.document import Document, ShardWriter, read_jsonl

DOCS = [Document(f"d{i}", f"line {i} of a page, über café {'x' * (i % 97)}\nand a second line", "web",
                 {"n": i}) for i in range(2000)]


@pytest.fixture(params=[True, False], ids=["zlib-ng", "stdlib"])
def fast(request):
    storage.set_fast_gzip(request.param)
    yield request.param
    storage.set_fast_gzip(True)


def _write(path):
    with ShardWriter(path) as w:
        for d in DOCS:
            w.write(d)
    return path.read_bytes()


def test_shards_read_back_the_same_documents_and_repeat_byte_for_byte(tmp_path, fast):
    if fast:
        pytest.importorskip("zlib_ng")
        assert storage.gzip_module().__name__.endswith("gzip_ng")
    else:
        assert storage.gzip_module() is gzip
    first = _write(tmp_path / "a.jsonl.gz")
    (tmp_path / "again").mkdir()
    assert _write(tmp_path / "again" / "a.jsonl.gz") == first  # a rerun writes the same bytes
    assert gzip.decompress(first) == b"".join((d.to_json() + "\n").encode() for d in DOCS)  # any gzip reader
    assert first[8] == 0  # XFL: neither the fastest (4) nor the best (2) setting: level 6
    got = list(read_jsonl(tmp_path / "a.jsonl.gz"))
    assert [(d.id, d.text, d.metadata) for d in got] == [(d.id, d.text, d.metadata) for d in DOCS]


def test_zlib_ng_and_the_standard_library_read_each_others_shards(tmp_path):
    pytest.importorskip("zlib_ng")
    storage.set_fast_gzip(True)
    ng = _write(tmp_path / "ng.jsonl.gz")
    storage.set_fast_gzip(False)
    try:
        std = _write(tmp_path / "std.jsonl.gz")
        assert [d.id for d in read_jsonl(tmp_path / "ng.jsonl.gz")] == [d.id for d in DOCS]
    finally:
        storage.set_fast_gzip(True)
    assert [d.id for d in read_jsonl(tmp_path / "std.jsonl.gz")] == [d.id for d in DOCS]
    assert gzip.decompress(ng) == gzip.decompress(std)
    assert abs(len(ng) - len(std)) < 0.05 * len(std)  # the same level: about the same size
