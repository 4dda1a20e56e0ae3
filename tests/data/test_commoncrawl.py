from __future__ import annotations

import json

import pytest

from llamaworks.data.commoncrawl import WetReader, write_wet
from llamaworks.data.document import MalformedInput
from llamaworks.data.executor import LocalExecutor

PAGES = [
    ("http://example.com/a", "First page title\nSome text of the first page.\n"),
    ("http://example.org/b", b"Caf\xc3\xa9 and a stray byte \xff here"),  # invalid UTF-8 inside a record
    ("http://example.net/c", ""),  # an empty conversion record (CommonCrawl has them)
    ("http://example.net/d", "word " * 200_000),  # one 1 MB line
]


def test_reads_conversion_records_with_metadata(tmp_path):
    path = tmp_path / "CC-MAIN-test.warc.wet.gz"
    write_wet(path, PAGES, date="2019-04-01T10:00:00Z")
    docs = list(WetReader().read(path))
    assert [d.metadata["url"] for d in docs] == [u for u, _ in PAGES]  # the warcinfo record is not a page
    a, b, c, d = docs
    assert a.text == "First page title\nSome text of the first page."
    assert a.source == "commoncrawl" and a.id.startswith("urn:uuid:") and ">" not in a.id
    assert len({x.id for x in docs}) == 4
    assert a.metadata["date"] == "2019-04-01T10:00:00Z"
    assert a.metadata["digest"].startswith("sha1:")
    assert a.metadata["length"] == len(PAGES[0][1].encode())
    assert b.text == "Café and a stray byte \ufffd here"
    assert c.text == ""
    assert len(d.text) == len(PAGES[3][1].strip())


def test_uncompressed_and_misnamed_files(tmp_path):
    write_wet(tmp_path / "plain.wet", PAGES[:1])
    write_wet(tmp_path / "x.wet.gz", PAGES[:1])
    # gzip content under a plain name: detected by its magic bytes
    (tmp_path / "gz-named.wet").write_bytes((tmp_path / "x.wet.gz").read_bytes())
    for name in ("plain.wet", "gz-named.wet"):
        (doc,) = WetReader().read(tmp_path / name)
        assert doc.metadata["url"] == "http://example.com/a"
    files = WetReader().files([tmp_path])
    assert sorted(f.name for f in files) == ["gz-named.wet", "plain.wet", "x.wet.gz"]


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_file_is_malformed_with_its_path(tmp_path, gz):
    path = tmp_path / ("t.warc.wet.gz" if gz else "t.warc.wet")
    write_wet(path, [(f"http://e.com/{i}", f"page {i} " * 500) for i in range(3)])
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 2 // 3])  # cut in the middle of a record
    with pytest.raises(MalformedInput, match=str(path)):
        list(WetReader().read(path))


def test_not_a_wet_file(tmp_path):
    path = tmp_path / "junk.wet"
    path.write_bytes(b"<html>this is not a WARC file</html>\n")
    with pytest.raises(MalformedInput, match="junk.wet"):
        list(WetReader().read(path))
    path.write_bytes(b"x")
    with pytest.raises(MalformedInput, match="no WARC record"):
        list(WetReader().read(path))


def test_executor_skips_or_stops_on_a_truncated_wet(tmp_path):
    good, bad = tmp_path / "in" / "good.warc.wet.gz", tmp_path / "in" / "bad.warc.wet.gz"
    good.parent.mkdir()
    write_wet(good, PAGES[:2])
    write_wet(bad, [(f"http://e.com/{i}", f"page {i} " * 500) for i in range(4)])
    bad.write_bytes(bad.read_bytes()[:-200])
    stats = LocalExecutor(tmp_path / "out", workers=1, progress=False).run("commoncrawl", WetReader(), [],
                                                                         [tmp_path / "in"])
    assert stats["read"]["documents"] == 2 + 3  # the records before the cut are kept
    (msg,) = stats["read"]["malformed"]
    assert str(bad) in msg and "truncated" in msg
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["read"]["malformed"] == [msg]
    with pytest.raises(MalformedInput, match="bad.warc.wet.gz"):
        LocalExecutor(tmp_path / "out2", workers=1, progress=False, on_malformed="stop").run(
            "commoncrawl", WetReader(), [], [tmp_path / "in"])
