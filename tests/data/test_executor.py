from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from llamaworks.data.document import Document, MalformedInput, ShardWriter, read_jsonl
from llamaworks.data.executor import JsonlReader, LocalExecutor
from llamaworks.data.step import Filter, LineCleaner


class ShortFilter(Filter):
    name = "short"

    def reason(self, doc):
        return "fewer than 3 words" if len(doc.text.split()) < 3 else None


class DropDigitLines(LineCleaner):
    name = "digits"

    def clean(self, doc):
        lines = doc.text.split("\n")
        return "\n".join(x for x in lines if not x.isdigit()), {"digit line": [x for x in lines if x.isdigit()]}


def write_inputs(folder: Path, n_files: int = 4, per_file: int = 5) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        with ShardWriter(folder / f"in{f}.jsonl.gz") as w:
            for i in range(per_file):
                text = "x" if i == 0 else f"document {f} {i} has words\n123\nmore words here"
                w.write(Document(id=f"{f}-{i}", text=text, source="test"))


def all_docs(folder: Path) -> list[Document]:
    return [d for p in sorted(folder.glob("*.jsonl.gz")) for d in read_jsonl(p)]


def test_shard_writer_is_atomic(tmp_path):
    w = ShardWriter(tmp_path / "a.jsonl.gz")
    w.write(Document("1", "text", "s"))
    assert not (tmp_path / "a.jsonl.gz").exists()
    w.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "b.jsonl.gz") as w:
        w.write(Document("1", "text", "s"))
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_local_scratch_shards_are_stored_gzip_and_outputs_compressed(tmp_path):
    # A scratch shard (read once by the next stage) is written at gzip level 0 on a local disk: the
    # same format, no deflate CPU; the run's outputs stay at level 6.
    docs = [Document(str(i), "the same words again and again " * 20, "s") for i in range(50)]
    raw = sum(len(d.to_json().encode()) + 1 for d in docs)
    for name, scratch in (("scratch.jsonl.gz", True), ("out.jsonl.gz", False)):
        with ShardWriter(tmp_path / name, scratch=scratch) as w:
            for d in docs:
                w.write(d)
        assert list(read_jsonl(tmp_path / name)) == docs
    assert (tmp_path / "scratch.jsonl.gz").stat().st_size > raw  # stored blocks: no smaller than the JSON
    assert (tmp_path / "out.jsonl.gz").stat().st_size < raw // 10


def test_zstd_roundtrip(tmp_path):
    pytest.importorskip("zstandard")
    with ShardWriter(tmp_path / "a.jsonl.zst", compression="zstd") as w:
        w.write(Document("1", "héllo\n", "s", {"k": 1}))
    assert read_jsonl(tmp_path / "a.jsonl.zst").__next__() == Document("1", "héllo\n", "s", {"k": 1})


def test_run_counts_stats_card_and_excluded(tmp_path):
    write_inputs(tmp_path / "in")
    ex = LocalExecutor(tmp_path / "out", workers=2, keep_excluded=True, progress=False)
    stats = ex.run("test", JsonlReader(), [ShortFilter(), DropDigitLines()], [tmp_path / "in"])
    short, digits = stats["steps"]
    assert stats["read"] == {"files": 4, "documents": 20, "malformed": [], "malformed_records": 0,
                             "malformed_record_examples": []}
    assert short["in"]["documents"] == 20 and short["kept"]["documents"] == 16
    assert short["dropped"]["fewer than 3 words"]["documents"] == 4
    assert digits["lines_removed"]["digit line"] == {"lines": 16, "chars": 64}
    assert digits["in"]["lines"] - digits["kept"]["lines"] == 16
    kept = all_docs(tmp_path / "out" / "documents")
    assert len(kept) == 16 and all("123" not in d.text for d in kept)
    excluded = all_docs(tmp_path / "out" / "excluded")
    assert {d.metadata["excluded"]["reason"] for d in excluded} == {"fewer than 3 words"}
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats
    card = (tmp_path / "out" / "DATACARD.md").read_text()
    assert "fewer than 3 words" in card and "| short | 20 | 16 | 4 (20.0%)" in card


class Boom(Exception):
    pass


def test_killed_run_resumes_without_redoing_shards(tmp_path):
    write_inputs(tmp_path / "in", n_files=4)
    out = tmp_path / "out"
    done = []

    def kill_after_two(stage, shard):
        done.append(shard)
        if len(done) == 2:
            raise Boom

    with pytest.raises(Boom):
        LocalExecutor(out, workers=1, progress=False).run("t", JsonlReader(), [ShortFilter()], [tmp_path / "in"],
                                                          on_shard=kill_after_two)
    finished = sorted(p.name for p in (out / "documents").iterdir())
    assert finished == ["00000.jsonl.gz", "00001.jsonl.gz"]  # no temporary or half-written file
    before = {p: p.stat().st_mtime_ns for p in (out / "documents").iterdir()}
    redone = []
    stats = LocalExecutor(out, workers=1, progress=False).run(
        "t", JsonlReader(), [ShortFilter()], [tmp_path / "in"], on_shard=lambda s, i: redone.append(i))
    assert redone == [2, 3]
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert stats["steps"][0]["in"]["documents"] == 20 and len(all_docs(out / "documents")) == 16


def test_resume_refuses_a_different_pipeline(tmp_path):
    write_inputs(tmp_path / "in", n_files=1)
    LocalExecutor(tmp_path / "out", workers=1, progress=False).run("t", JsonlReader(), [], [tmp_path / "in"])
    with pytest.raises(ValueError, match="--overwrite"):
        LocalExecutor(tmp_path / "out", workers=1, progress=False).run("t", JsonlReader(), [ShortFilter()],
                                                                        [tmp_path / "in"])
    LocalExecutor(tmp_path / "out", workers=1, progress=False, overwrite=True).run(
        "t", JsonlReader(), [ShortFilter()], [tmp_path / "in"])


def test_malformed_file_skipped_or_stops(tmp_path):
    write_inputs(tmp_path / "in", n_files=2)
    bad = tmp_path / "in" / "in1.jsonl.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b'{"id": "ok", "text": "a good document here"}\n{"id": broken\n')
    (tmp_path / "in" / "in9.jsonl.gz").write_bytes(b"not gzip at all")
    stats = LocalExecutor(tmp_path / "out", workers=1, progress=False).run("t", JsonlReader(), [], [tmp_path / "in"])
    malformed = stats["read"]["malformed"]
    assert len(malformed) == 2 and str(bad) in malformed[0] and "in9.jsonl.gz" in malformed[1]
    assert stats["read"]["documents"] == 5 + 1  # the good record before the broken line is kept
    with pytest.raises(MalformedInput, match="in1.jsonl.gz:2"):
        LocalExecutor(tmp_path / "out2", workers=1, progress=False, on_malformed="stop").run(
            "t", JsonlReader(), [], [tmp_path / "in"])
    # the shard finished before the failure is complete and kept
    assert [p.name for p in (tmp_path / "out2" / "documents").iterdir()] == ["00000.jsonl.gz"]


class TagFilter(Filter):
    """Reads doc.metadata as steps do (the dedup steps keep signatures there)."""

    name = "tag"

    def reason(self, doc):
        return "tagged drop" if doc.metadata.get("drop") else None


def test_a_record_whose_metadata_is_not_an_object_is_malformed(tmp_path):
    """Such a record used to reach the steps and crash the shard on every retry, whatever
    --on-malformed said; now it is skipped alone (and counted), or the run stops naming it."""
    (tmp_path / "in").mkdir()
    lines = ['{"id": "a", "text": "one two three", "metadata": {"k": 1}}',
             '{"id": "b", "text": "one two three", "metadata": "a string"}',
             '{"id": "c", "text": "one two three", "metadata": ["a", "list"]}',
             '{"id": "d", "text": "one two three", "metadata": {"drop": true}}',
             '{"id": "e", "text": "one two three", "metadata": ""}',  # empty: no metadata, as always
             '{"id": "f", "text": "one two three"}']
    bad = tmp_path / "in" / "in0.jsonl.gz"
    with gzip.open(bad, "wt") as f:
        f.write("\n".join(lines) + "\n")
    write_inputs(tmp_path / "in" / "more", n_files=1)
    out = tmp_path / "out"
    stats = LocalExecutor(out, workers=1, progress=False, keep_excluded=True).run(
        "t", JsonlReader(), [TagFilter(), ShortFilter()], [tmp_path / "in"])
    read = stats["read"]
    assert read["malformed"] == [] and read["malformed_records"] == 2
    assert read["malformed_record_examples"] == [
        f"{bad}:2: `metadata` must be a JSON object, got a string; fix or delete the line",
        f"{bad}:3: `metadata` must be a JSON object, got an array; fix or delete the line"]
    assert read["documents"] == 4 + 5  # the records after the bad ones are read on
    assert sorted(d.id for d in all_docs(out / "documents")) == ["0-1", "0-2", "0-3", "0-4", "a", "e", "f"]
    assert [d.id for d in all_docs(out / "excluded") if d.metadata["excluded"]["reason"] == "tagged drop"] == ["d"]
    card = (out / "DATACARD.md").read_text()
    assert "2 malformed records skipped" in card and f"{bad}:3:" in card

    with pytest.raises(MalformedInput, match=r"in0.jsonl.gz:2: `metadata` must be a JSON object, got a string"
                                             r".*--on-malformed skip"):
        LocalExecutor(tmp_path / "out2", workers=1, progress=False, on_malformed="stop").run(
            "t", JsonlReader(), [TagFilter()], [tmp_path / "in"])
    # read_jsonl, which the executor reads its own shards with, refuses such a record too
    with pytest.raises(MalformedInput, match="in0.jsonl.gz:2: `metadata`"):
        list(read_jsonl(bad))


def test_invalid_utf8_and_empty_documents(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(b'{"id": "e", "text": ""}\n{"id": "u", "text": "ok \\ud800 x y"}\n')
    stats = LocalExecutor(tmp_path / "out", workers=1, progress=False).run("t", JsonlReader(), [ShortFilter()],
                                                                          [tmp_path / "in"])
    assert stats["steps"][0]["kept"]["documents"] == 1
    (doc,) = all_docs(tmp_path / "out" / "documents")
    assert doc.text.encode("utf-8")  # a lone surrogate was replaced, the shard is valid UTF-8


def test_output_is_readable_by_prepare(tmp_path, tiny_tokenizer):
    from llamaworks.data.shards import prepare

    write_inputs(tmp_path / "in")
    LocalExecutor(tmp_path / "out", workers=1, progress=False).run("t", JsonlReader(), [ShortFilter()],
                                                                  [tmp_path / "in"])
    manifest = prepare([str(tmp_path / "out" / "documents")], tiny_tokenizer, tmp_path / "tok", workers=1,
                       val_fraction=0.0)
    assert manifest["documents"] == 16


def test_cli_data_run(tmp_path, capsys):
    from llamaworks.cli import main

    write_inputs(tmp_path / "in", n_files=2)
    assert main(["data", "run", "jsonl", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                 "--workers", "1"]) == 0
    assert (tmp_path / "out" / "stats.json").exists() and "kept 10" in capsys.readouterr().out
