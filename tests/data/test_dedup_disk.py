from __future__ import annotations

import random
import tracemalloc
from pathlib import Path

import pytest

from llamaworks.data.dedup import ExactDedup, HashSet, LineDedup, LshIndex, MinHashDedup
from llamaworks.data.document import Document, ShardWriter, read_jsonl
from llamaworks.data.executor import JsonlReader, LocalExecutor
from llamaworks.data.step import Dropped, LinesRemoved


def outcome(events) -> list:
    """Every event as plain values: which documents were kept (with their text), dropped (why, of what)."""
    out = []
    for e in events:
        if isinstance(e, Dropped):
            out.append(("dropped", e.doc.id, e.reason, e.doc.metadata.get("duplicate_of")))
        elif isinstance(e, LinesRemoved):
            out.append(("lines", e.reason, e.lines, e.chars))
        else:
            out.append(("kept", e.id, e.text))
    return out


def word(i: int) -> str:
    """A letters-only name for i (line normalisation maps every digit to 0)."""
    return "".join(chr(97 + int(c)) for c in str(i))


def line_docs(n: int = 300, seed: int = 0) -> list[Document]:
    rng = random.Random(seed)
    pool = [f"Line {word(i)} says something about topic {word(i % 17)}." for i in range(400)]
    texts = ["\n".join(rng.choice(pool) if rng.random() < 0.5 else f"unique {word(d)} {word(k)}"
                       for k in range(rng.randint(1, 8))) for d in range(n)]
    texts = [texts[rng.randrange(d)] if d and d % 7 == 0 else t for d, t in enumerate(texts)]  # exact copies
    return [Document(str(d), t, "t") for d, t in enumerate(texts)]


def book_docs() -> list[Document]:
    rng = random.Random(1)
    books = []
    for b in range(12):
        words = [f"w{rng.randrange(5000)}" for _ in range(600)]
        books.append(Document(f"b{b}", " ".join(words), "t"))
        if b % 3 == 0:  # a near-copy: 1 word in 200 changed
            near = [w if i % 200 else "changed" for i, w in enumerate(words)]
            books.append(Document(f"b{b}-near", " ".join(near), "t"))
    books.append(Document("empty", "", "t"))
    return books


def configured(step, tmp_path: Path, memory_bytes):
    step.configure_state(tmp_path / step.name, memory_bytes)
    return step


@pytest.mark.parametrize("make,docs", [(LineDedup, line_docs), (ExactDedup, line_docs), (MinHashDedup, book_docs)])
def test_disk_and_spilled_state_give_the_same_result(tmp_path, make, docs):
    ref = outcome(make().run(docs()))
    assert any(e[0] in ("dropped", "lines") for e in ref)  # the input has duplicates to find
    store = "index" if make is MinHashDedup else "seen"
    entry = getattr(make(), store).entry_bytes
    for budget in (0, 5 * entry):  # on disk from the start; spills after 5 entries
        step = configured(make(), tmp_path / str(budget), budget)
        assert outcome(step.run(docs())) == ref
        assert getattr(step, store).on_disk


def test_hash_set_semantics_on_disk(tmp_path):
    mem, disk = HashSet(), HashSet(tmp_path / "h.sqlite", memory_bytes=0)
    batches = [[1, 2, 2, -5], [2, 3, 3], [], [-5, 7, 1 << 62]]
    for keys in batches:
        assert mem.add_new(keys) == disk.add_new(keys)
    assert disk.add_new([1, 9]) == mem.add_new([1, 9]) == [False, True] and len(disk) == len(mem) == 7
    many = list(range(2000))  # more than one IN (...) query's worth of parameters
    assert disk.add_new(many) == mem.add_new(many)
    disk.close()


def test_tiny_budget_bounds_memory(tmp_path):
    lines = [f"distinct line {word(i)} of the corpus" for i in range(12_000)]
    docs = [Document(str(i), "\n".join(lines[i:i + 10]), "t") for i in range(0, len(lines), 10)]

    def peak(step) -> int:
        tracemalloc.start()
        for _ in step.run(Document(d.id, d.text, "t") for d in docs):
            pass
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return top

    in_memory = peak(LineDedup())
    disk = LineDedup()
    disk.configure_state(tmp_path / "state", 64 * 1024)
    on_disk = peak(disk)
    assert disk.seen.on_disk and len(disk.seen) == 12_000
    # 12,000 hashes in a Python set take ~0.9 MB; on disk the heap holds about one document.
    assert in_memory > 600_000 and on_disk < 200_000, (in_memory, on_disk)


def test_lsh_index_disk_order_matches_memory(tmp_path):
    import numpy as np

    mem, disk = LshIndex(2, 2), LshIndex(2, 2, tmp_path / "l.sqlite", memory_bytes=0)
    sigs = [np.array(x, dtype=np.uint32) for x in ([1, 2, 3, 4], [1, 2, 9, 9], [0, 0, 3, 4], [1, 2, 3, 4])]
    for i, s in enumerate(sigs):
        keys = [s[:2].tobytes(), s[2:].tobytes()]
        assert list(mem.candidates(keys)) == list(disk.candidates(keys))
        mem.add(s, f"d{i}", keys)
        disk.add(s, f"d{i}", keys)
    keys = [sigs[0][:2].tobytes(), sigs[0][2:].tobytes()]
    assert list(disk.candidates(keys)) == [0, 1, 3, 0, 2, 3]
    sig, doc_id = disk.get(2)
    assert doc_id == "d2" and sig.tolist() == [0, 0, 3, 4]


def write_shards(folder: Path, docs: list[Document], n: int) -> None:
    for f in range(n):
        with ShardWriter(folder / f"in{f}.jsonl.gz") as w:
            for d in docs[f::n]:
                w.write(d)


def tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.jsonl.gz"))}


class Boom(Exception):
    pass


def test_executor_disk_state_and_global_stage_resumes_shard_by_shard(tmp_path):
    write_shards(tmp_path / "in", line_docs(200), 5)
    steps = lambda: [LineDedup()]  # noqa: E731
    ref = LocalExecutor(tmp_path / "ref", workers=1, progress=False, dedup_memory_mb=None).run(
        "t", JsonlReader(), steps(), [tmp_path / "in"])
    out = tmp_path / "out"
    seen: list[tuple[int, int]] = []

    def kill_in_global_stage(stage, shard):
        seen.append((stage, shard))
        if (stage, shard) == (1, 2):
            raise Boom

    with pytest.raises(Boom):
        LocalExecutor(out, workers=1, progress=False, dedup_memory_mb=0).run(
            "t", JsonlReader(), steps(), [tmp_path / "in"], on_shard=kill_in_global_stage)
    assert sorted(p.name for p in (out / "documents").glob("*.gz")) == [f"{i:05d}.jsonl.gz" for i in range(3)]
    assert (out / ".state" / "stage1" / "state" / "0-line_dedup" / "seen.sqlite").exists()  # state went to disk
    before = {p.name: p.stat().st_mtime_ns for p in (out / "documents").glob("*.gz")}
    redone: list[tuple[int, int]] = []
    stats = LocalExecutor(out, workers=1, progress=False, dedup_memory_mb=0).run(
        "t", JsonlReader(), steps(), [tmp_path / "in"], on_shard=lambda s, i: redone.append((s, i)))
    assert redone == [(1, 3), (1, 4)]  # shards 0-2 of the dedup stage are not redone
    assert all((out / "documents" / n).stat().st_mtime_ns == t for n, t in before.items())
    assert tree(out / "documents") == tree(tmp_path / "ref" / "documents") and stats == ref
    kept = [d for p in sorted((out / "documents").glob("*.gz")) for d in read_jsonl(p)]
    lines = [x for d in kept for x in d.text.split("\n") if x]
    assert len(lines) == len({x.lower() for x in lines})  # no line kept twice across the resumed run
