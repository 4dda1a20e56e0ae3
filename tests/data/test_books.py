from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from llamaworks.data.books import GutenbergCleaner, GutenbergReader
from llamaworks.data.dedup import MinHashDedup, shingles
from llamaworks.data.document import Document, read_jsonl
from llamaworks.data.executor import LocalExecutor
from llamaworks.data.step import Dropped

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "corpora" / "shakespeare"
needs_corpus = pytest.mark.skipif(not SHAKESPEARE.is_dir(), reason=f"{SHAKESPEARE} absent (no ../shared corpora)")

HEADER = ("The Project Gutenberg EBook of {t}, by William Shakespeare\n\nThis eBook is for the use of anyone "
          "anywhere at no cost.\n\n*** START OF THIS PROJECT GUTENBERG EBOOK {T} ***\n\n")
FOOTER = ("\n\nEnd of the Project Gutenberg EBook of {t}\n\n*** END OF THIS PROJECT GUTENBERG EBOOK {T} ***\n\n"
          "Updated editions will replace the previous one.\nSection 1. General Terms of Use\n")


def gutenberg(title: str, body: str) -> str:
    return HEADER.format(t=title, T=title.upper()) + body + FOOTER.format(t=title, T=title.upper())


def test_strip_header_and_footer():
    doc = Document("b", gutenberg("Hamlet", "ACT I\nWho's there?\n"), "books")
    out = list(GutenbergCleaner().run([doc]))[-1]
    assert out.text == "ACT I\nWho's there?\n"


def test_old_small_print_header_and_no_markers():
    old = "legal stuff\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nThe book.\n"
    assert list(GutenbergCleaner().run([Document("a", old, "b")]))[-1].text == "The book.\n"
    plain = "A book without any boilerplate.\n"
    assert list(GutenbergCleaner().run([Document("p", plain, "b")]))[-1].text == plain
    only = gutenberg("Nothing", "")
    assert isinstance(list(GutenbergCleaner().run([Document("n", only, "b")]))[-1], Dropped)


def test_reader_falls_back_to_cp1252(tmp_path):
    (tmp_path / "latin.txt").write_bytes("café ends here\r\n".encode("cp1252"))
    (doc,) = GutenbergReader().read(tmp_path / "latin.txt")
    assert doc.text == "café ends here\n" and doc.metadata["encoding"] == "cp1252"


def test_minhash_separates_exact_rewrapped_and_distinct():
    words = [f"w{i % 997}x{i % 13}" for i in range(3000)]
    book = " ".join(words)
    other = " ".join(reversed(words))
    dedup = MinHashDedup()
    out = list(dedup.run([Document("a", book, "b"), Document("b", textwrap.fill(book, 40), "b"),
                          Document("c", other, "b"), Document("e", "", "b")]))
    assert [type(x).__name__ for x in out] == ["Document", "Dropped", "Document", "Document"]
    assert out[1].doc.metadata["duplicate_of"] == "a"


def test_minhash_threshold_is_an_option():
    with pytest.raises(ValueError, match="threshold"):
        MinHashDedup(threshold=1.5)


def _jaccard(a: str, b: str) -> float:
    x, y = set(shingles(a, 5).tolist()), set(shingles(b, 5).tolist())
    return len(x & y) / len(x | y)


@needs_corpus
def test_shakespeare_editions_kept_copies_removed(tmp_path):
    plays = ["hamlet_gut.txt", "hamlet_gut_f.txt", "macbeth_gut.txt", "macbeth_gut_f.txt"]
    texts = {p: (SHAKESPEARE / p).read_text(encoding="utf-8") for p in plays}
    assert _jaccard(texts["hamlet_gut.txt"], texts["hamlet_gut_f.txt"]) < 0.5  # editions differ: ~30% shared
    src = tmp_path / "in"
    src.mkdir()
    for p, t in texts.items():
        (src / p).write_text(gutenberg(p, t))
    # A re-wrapped copy of Hamlet with a different (newer-style) Gutenberg header and footer:
    rewrapped = "\n\n".join(textwrap.fill(par, 57) for par in texts["hamlet_gut.txt"].split("\n\n"))
    (src / "zz_hamlet_copy.txt").write_text(
        "Title: Hamlet\nRelease date: 2024\n\n*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***\n"
        + rewrapped + "\n*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***\nFull licence text.\n")
    (src / "zz_macbeth_f_copy.txt").write_text(gutenberg("Macbeth (copy)", texts["macbeth_gut_f.txt"]))
    reader, steps = GutenbergReader(), [GutenbergCleaner(), MinHashDedup(threshold=0.9)]
    stats = LocalExecutor(tmp_path / "out", workers=2, keep_excluded=True, progress=False).run(
        "books", reader, steps, [src])
    kept = {d.id for p in (tmp_path / "out" / "documents").glob("*.gz") for d in read_jsonl(p)}
    assert kept == {p.removesuffix(".txt") for p in plays}
    dropped = {d.id: d.metadata["duplicate_of"] for p in (tmp_path / "out" / "excluded").glob("*.gz")
               for d in read_jsonl(p)}
    assert dropped == {"zz_hamlet_copy": "hamlet_gut", "zz_macbeth_f_copy": "macbeth_gut_f"}
    assert stats["steps"][0]["lines_removed"]["Project Gutenberg header"]["lines"] > 0


def test_minhash_signatures_run_on_the_workers_and_change_nothing(tmp_path):
    from llamaworks.data.dedup import LineDedup, MinHashSignatures
    from llamaworks.data.document import ShardWriter
    from llamaworks.data.executor import JsonlReader, _stages

    stages = _stages([GutenbergCleaner(), MinHashDedup()])
    assert [[type(s).__name__ for s in st.steps] for st in stages] == [
        ["GutenbergCleaner", "MinHashSignatures"], ["MinHashDedup"]]
    stages = _stages([LineDedup(), MinHashDedup()])  # after another global stage: a parallel stage of its own
    assert [([type(s).__name__ for s in st.steps], st.global_state) for st in stages] == [
        ([], False), (["LineDedup"], True), (["MinHashSignatures"], False), (["MinHashDedup"], True)]

    words = [f"w{i % 997}x{i % 13}" for i in range(2000)]
    books = [" ".join(words), textwrap.fill(" ".join(words), 50), " ".join(reversed(words)), "",
             " ".join(words[:1000]) + " changed " + " ".join(words[1000:]), "too short"]
    docs = [Document(f"d{i}", t, "books") for i, t in enumerate(books)]
    (tmp_path / "in").mkdir()
    for f in range(3):  # the near-copies sit in other shards than their originals
        with ShardWriter(tmp_path / "in" / f"{f}.jsonl.gz") as w:
            for d in docs[f::3]:
                w.write(d)
    stats = LocalExecutor(tmp_path / "out", workers=2, keep_excluded=True, progress=False).run(
        "books", JsonlReader(), [MinHashDedup()], [tmp_path / "in"])
    # the same decisions as the step alone over the documents in shard order
    ordered = [d for f in range(3) for d in docs[f::3]]
    alone = list(MinHashDedup().run([Document(d.id, d.text, d.source) for d in ordered]))
    want_kept = [x.id for x in alone if isinstance(x, Document)]
    want_dropped = {x.doc.id: x.doc.metadata["duplicate_of"] for x in alone if isinstance(x, Dropped)}
    kept = [d for p in sorted((tmp_path / "out" / "documents").glob("*.gz")) for d in read_jsonl(p)]
    dropped = [d for p in (tmp_path / "out" / "excluded").glob("*.gz") for d in read_jsonl(p)]
    assert [d.id for d in kept] == want_kept and {d.id: d.metadata["duplicate_of"] for d in dropped} == want_dropped
    assert len(want_dropped) == 2  # the re-wrapped copy and the one-word change
    assert all("_minhash" not in d.metadata for d in kept + dropped)  # taken out again by the dedup step
    assert [s["name"] for s in stats["steps"]] == ["minhash_signatures", "minhash_dedup"]
    assert isinstance(MinHashDedup().parallel_part(), MinHashSignatures)
