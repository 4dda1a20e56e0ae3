from __future__ import annotations

import gzip
import io
import json
import logging
import os
import random
import sys
import threading
import time
import types
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llamaworks import cli
from llamaworks.data import shards
from llamaworks.data.document import raw_lines
from llamaworks.data.shards import open_token_dataset, prepare, window_order
from llamaworks.train.loader import TokenLoader

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "corpora" / "shakespeare"  # beside the repository
WORDS = ("the king queen castle river stone light dark speak sword crown night day bread wine "
         "horse field storm ship sail north 1066 1603 über café naïve").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) + rng.choice([".", "!\n", "?"])
            for _ in range(n)]


class SPTokenizer:
    """The duck-typed interface `prepare` needs, until llamaworks.tokenizer lands; pickles by path."""

    def __init__(self, path: str):
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size, self.bos_id, self.eos_id = self.sp.vocab_size(), self.sp.bos_id(), self.sp.eos_id()

    def __reduce__(self):
        return SPTokenizer, (self.path,)

    def encode_batch(self, texts, bos=True, eos=False):
        return [[self.bos_id] * bos + ids + [self.eos_id] * eos for ids in self.sp.encode(list(texts))]

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])


class Unloadable(SPTokenizer):
    def __reduce__(self):
        return _fail, ()


def _fail():
    raise RuntimeError("cannot load in a worker")


class FakeTokenizer:
    """Maps each character to a fixed id; lets tests choose any vocab size."""

    def __init__(self, vocab_size: int, offset: int = 3):
        self.vocab_size, self.bos_id, self.eos_id, self.offset = vocab_size, 1, 2, offset

    def encode_batch(self, texts, bos=True, eos=False):
        return [[self.bos_id] * bos + [self.offset + ord(c) for c in t] + [self.eos_id] * eos for t in texts]


@pytest.fixture(scope="session")
def sp_path(tmp_path_factory) -> str:
    model = io.BytesIO()
    # Identity normalisation and kept whitespace so decode(encode(text)) == text exactly.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_docs(400, seed=1)), model_writer=model, model_type="bpe", vocab_size=300,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        num_threads=1, minloglevel=2)
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    path.write_bytes(model.getvalue())
    return str(path)


@pytest.fixture(scope="session")
def tok(sp_path) -> SPTokenizer:
    return SPTokenizer(sp_path)


def write_docs(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (folder / f"doc{i:04d}.txt").write_text(d)
    return folder


def stream(out: Path, split: str = "train") -> np.ndarray:
    m = json.loads((out / "manifest.json").read_text())
    parts = [np.fromfile(out / s["file"], dtype=m["dtype"]) for s in m["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=m["dtype"])


def documents_of(tokens: np.ndarray, tok) -> list[str]:
    starts = np.flatnonzero(tokens == tok.bos_id)
    ends = np.flatnonzero(tokens == tok.eos_id)
    assert len(starts) == len(ends) and starts[0] == 0 and ends[-1] == len(tokens) - 1
    assert np.array_equal(starts[1:], ends[:-1] + 1)  # </s> is always followed by the next <s>
    return [tok.decode(tokens[s + 1 : e]) for s, e in zip(starts, ends)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tok) -> Path:
    """About 24k train tokens in 7 shards: enough windows for the loader tests."""
    root = tmp_path_factory.mktemp("ds")
    prepare([str(write_docs(root / "docs", make_docs(1000)))], tok, root / "out", val_fraction=0.05,
            shard_tokens=4000, workers=1)
    return root / "out"


# ---------------------------------------------------------------------------- prepare


def test_packing_places_bos_eos_and_decodes_back(tmp_path, tok):
    docs = make_docs(30)
    m = prepare([str(write_docs(tmp_path / "d", docs))], tok, tmp_path / "out", val_fraction=0, workers=1,
                shard_tokens=97, batch_chars=200)
    tokens = stream(tmp_path / "out")
    assert documents_of(tokens, tok) == docs  # file order: sorted names
    assert m["documents"] == 30 and m["tokens"] == len(tokens) == m["splits"]["train"]["tokens"]
    assert m["sources"] == {"d": {"documents": 30, "tokens": len(tokens)}}
    sizes = [s["tokens"] for s in m["splits"]["train"]["shards"]]
    assert all(n == 97 for n in sizes[:-1]) and 0 < sizes[-1] <= 97
    assert [s["file"] for s in m["splits"]["train"]["shards"]][:2] == ["train/00000.bin", "train/00001.bin"]
    assert m["splits"]["val"] == {"documents": 0, "tokens": 0, "shards": []}
    assert m["dtype"] == "uint16" and m["vocab_size"] == 300 and m["bos_id"] == 1 and m["eos_id"] == 2
    assert m["tokenizer"]["path"] == tok.path and len(m["tokenizer"]["sha256"]) == 64
    assert m["llamaworks_version"] and m["created"].endswith("+00:00")
    assert open_token_dataset(tmp_path / "out") == json.loads((tmp_path / "out/manifest.json").read_text())
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_jsonl_gz_records_sources_and_skipped_files(tmp_path, tok):
    d = tmp_path / "corpus"
    (d / "web").mkdir(parents=True)
    (d / "web/a.jsonl").write_text(json.dumps({"id": "a1", "text": "the king", "source": "cc"}) + "\n\n"
                                   + json.dumps({"text": "the queen"}) + "\n")
    with gzip.open(d / "web/b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"id": 7, "text": "a ship", "source": "wiki", "metadata": {}}) + "\n")
    (d / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (d / "empty.txt").write_text("  \n")
    (d / ".git").mkdir()
    (d / ".git/HEAD").write_text("ref: refs/heads/main")
    single = tmp_path / "one.txt"
    single.write_text("north storm")
    m = prepare([str(d), str(single)], tok, tmp_path / "out", val_fraction=0, workers=1)
    assert documents_of(stream(tmp_path / "out"), tok) == ["the king", "the queen", "a ship", "north storm"]
    per_source = {k: v["documents"] for k, v in m["sources"].items()}
    assert per_source == {"cc": 1, "corpus": 1, "wiki": 1, "one.txt": 1}
    assert m["skipped_files"] == 2 and m["empty_documents"] == 1


# A JSONL file with what line splitting can get wrong: blank and whitespace-only lines, CRLF, a line
# longer than any span, UTF-8 of several bytes, no newline at the end.
AWKWARD_JSONL = (json.dumps({"text": "the king"}) + "\n\n   \n" + json.dumps({"text": "café über"}, ensure_ascii=False)
                 + "\r\n" + json.dumps({"id": 5, "text": "sail " * 300}) + "\n\n" + json.dumps({"text": "north"}))


@pytest.mark.parametrize("span_bytes", [1, 7, 64, 1 << 20])
def test_spans_read_the_records_raw_lines_reads(tmp_path, span_bytes):
    # The workers read local .jsonl files as spans of lines: the same records (line numbers included,
    # which name documents without an id) as the main process reading line by line.
    path = tmp_path / "a.jsonl"
    path.write_bytes(AWKWARD_JSONL.encode())
    spans = list(shards._spans(path, "src", "a.jsonl", span_bytes))
    assert spans[0].start == 0 and spans[-1].end == path.stat().st_size
    assert all(a.end == b.start for a, b in zip(spans, spans[1:]))
    assert all(s.end - s.start >= span_bytes or s is spans[-1] for s in spans)
    got = [r for s in spans for r in shards._span_records(s)]
    want = [(str(path), "src", "a.jsonl", n, line) for n, line in raw_lines(path)]
    # raw_lines keeps each line's "\n"; a span's line ends before it (JSON ignores either).
    assert [(*r[:4], r[4]) for r in got] == [(*w[:4], w[4].removesuffix(b"\n")) for w in want]
    assert [r[3] for r in got] == [1, 4, 5, 7]
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert list(shards._spans(empty, "src", "empty.jsonl", span_bytes)) == []


def test_a_span_of_a_file_that_shrank_is_an_error(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(AWKWARD_JSONL.encode())
    (span,) = shards._spans(path, "src", "a.jsonl", 1 << 20)
    path.write_bytes(AWKWARD_JSONL.encode()[:40])
    with pytest.raises(ValueError, match="changed while it was being read"):
        list(shards._span_records(span))


@pytest.mark.parametrize("workers", [1, 2])
def test_spans_give_the_shards_of_lines_read_one_by_one(tmp_path, tok, workers, monkeypatch):
    # Plain .jsonl goes to the workers as spans; read line by line in this process (as .jsonl.gz is)
    # it gives the same documents, ids from line numbers, val split and shards, whatever the batch size.
    lines = [json.dumps({"text": d}) if i % 3 else json.dumps({"id": f"d{i}", "text": d})
             for i, d in enumerate(make_docs(300, seed=9))]
    lines[10:10] = ["", "  "]
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "c.jsonl").write_text("\n".join(lines) + "\n")
    kw = dict(val_fraction=0.2, shard_tokens=777, workers=workers)
    by_span = {b: prepare([str(tmp_path / "corpus")], tok, tmp_path / f"s{b}", batch_chars=b, **kw)
               for b in (97, 1 << 20)}
    records = shards._records
    monkeypatch.setattr(shards, "_records", lambda inputs, stats, span_bytes=0: records(inputs, stats))
    by_line = prepare([str(tmp_path / "corpus")], tok, tmp_path / "lines", batch_chars=97, **kw)
    for b, manifest in by_span.items():
        assert manifest["splits"] == by_line["splits"] and manifest["splits"]["val"]["documents"] > 0
        for split in ("train", "val"):
            assert np.array_equal(stream(tmp_path / f"s{b}", split), stream(tmp_path / "lines", split))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.booleans()), max_size=150))
def test_split_tokens_is_the_mask_over_tokens(docs):
    lengths = np.array([n for n, _ in docs], np.int64)
    val = np.array([v for _, v in docs], bool)
    flat = np.arange(int(lengths.sum()), dtype=np.uint16)
    train, held = shards._split_tokens(flat, lengths, val)
    mask = np.repeat(val, lengths)
    assert np.array_equal(train, flat[~mask]) and np.array_equal(held, flat[mask])
    assert train.dtype == held.dtype == np.uint16


def test_windows_written_in_any_order_with_or_without_dropping_their_pages_keep_the_bytes(tmp_path, monkeypatch):
    # write_window gathers runs of a stream of token files (some runs crossing from one file into the next)
    # and writes them at their offsets of the shard files (some windows crossing shards): in any order, by
    # any thread, with the written pages dropped from the page cache (drop_cache) or not, the same bytes.
    rng = np.random.default_rng(0)
    files = []
    for k, n in enumerate([700, 1300]):
        rng.integers(0, 60000, n).astype(np.uint16).tofile(tmp_path / f"c{k}.bin")
        files.append((str(tmp_path / f"c{k}.bin"), n))
    stream = np.concatenate([np.fromfile(f, np.uint16) for f, _ in files])
    begin = rng.integers(0, 1990, 80)
    count = np.minimum(rng.integers(1, 120, 80), 2000 - begin)
    source = np.zeros(80, np.int64)
    want = np.concatenate([stream[b:b + c] for b, c in zip(begin, count)])
    cuts = [0, 7, 19, 20, 45, 60, 80]  # windows of 7, 12, 1, 25, 15 and 20 runs
    at = np.concatenate([[0], np.cumsum(count)])[cuts]
    windows = [shards.Window(source[a:b], begin[a:b], count[a:b], int(at[k]))
               for k, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    dropped = []
    if hasattr(shards.os, "posix_fadvise"):
        fadvise = shards.os.posix_fadvise
        monkeypatch.setattr(shards.os, "posix_fadvise", lambda fd, *a: (dropped.append(a), fadvise(fd, *a)))
    for drop in (False, True):
        folder = tmp_path / f"out{drop}"
        folder.mkdir()
        for k in rng.permutation(len(windows)).tolist():
            assert shards.write_window(f"w{drop}", [files], "<u2", windows[k], str(folder), 1000, drop) == \
                int(windows[k].count.sum())
        got = [(folder / f"{k:05d}.bin.tmp").read_bytes() for k in range(-(-len(want) // 1000))]
        assert [len(g) for g in got[:-1]] == [2000] * (len(got) - 1) and b"".join(got) == want.tobytes()
        assert bool(dropped) == (drop and hasattr(shards.os, "posix_fadvise")), len(dropped)


def test_workers_share_new_chunks_through_the_word_log(tmp_path, sp_path, tok):
    # prepare's workers send back the chunks they gave SentencePiece; this process appends them to the
    # pool's word log, and each worker reads the others' before its next batch. The log lives as long
    # as the pool, the shards are those of one worker.
    write_docs(tmp_path / "d", make_docs(400, seed=8))
    kw = dict(val_fraction=0.1, shard_tokens=900, batch_chars=400)
    one = prepare([str(tmp_path / "d")], sp_path, tmp_path / "w1", workers=1, **kw)
    two = prepare([str(tmp_path / "d")], sp_path, tmp_path / "w2", workers=2, **kw)
    log = shards._POOL.words
    try:
        assert Path(log).stat().st_size > 0
        assert one["splits"] == two["splits"]
        for split in ("train", "val"):
            assert np.array_equal(stream(tmp_path / "w1", split), stream(tmp_path / "w2", split))
    finally:
        shards._drop_pool()
    assert not Path(log).exists()


@pytest.mark.parametrize("broken", ["make", "append"])
def test_a_word_log_that_cannot_be_made_or_written_only_stops_the_sharing(tmp_path, sp_path, monkeypatch, caplog,
                                                                          broken):
    # A full or read-only temporary folder: the workers each encode their own new chunks, same shards.
    write_docs(tmp_path / "d", make_docs(300, seed=9))
    kw = dict(val_fraction=0.1, shard_tokens=900, batch_chars=400)
    one = prepare([str(tmp_path / "d")], sp_path, tmp_path / "w1", workers=1, **kw)
    shards._drop_pool()

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards, "_make_log" if broken == "make" else "_append", fail)
    try:
        with caplog.at_level(logging.WARNING, logger="llamaworks.data.shards"):
            two = prepare([str(tmp_path / "d")], sp_path, tmp_path / "w2", workers=2, **kw)
            again = prepare([str(tmp_path / "d")], sp_path, tmp_path / "w3", workers=2, **kw)  # the same pool
        assert shards._POOL.words is None
    finally:
        shards._drop_pool()
    assert "do not share new chunks" in caplog.text and "No space left" in caplog.text
    assert one["splits"] == two["splits"] == again["splits"]
    for split in ("train", "val"):
        assert np.array_equal(stream(tmp_path / "w1", split), stream(tmp_path / "w2", split))


def test_a_worker_reads_the_word_log_once_up_to_the_size_it_is_given(tmp_path, tok):
    from llamaworks.tokenizer import Tokenizer
    from llamaworks.tokenizer.word_cache import FlatEncoder

    sp = Tokenizer(tok.path)
    a, b = FlatEncoder(sp), FlatEncoder(sp)
    a.sharing = True
    a.encode(make_docs(50, seed=1))
    first, cached = a.take_new(), len(a)
    a.encode(make_docs(50, seed=2) + ["apple pear plum quince"])  # four new chunks
    second = a.take_new()
    assert 0 < cached < len(a)
    log = tmp_path / "words.bin"
    log.write_bytes(first + second)
    shards._read_words(b, str(log), len(first))  # the size when its batch was sent: the first record
    assert len(b) == cached
    shards._read_words(b, str(log), len(first))  # nothing new below that size
    assert len(b) == cached
    shards._read_words(b, str(log), len(first) + len(second))
    assert len(b) == len(a)


def _batches_of(folder: Path, batch_chars: int) -> list:
    return list(shards._batches(shards._records([str(folder)], {"files": 0, "skipped_files": 0},
                                                span_bytes=batch_chars), batch_chars))


def test_results_come_back_through_slots_or_the_pipe_alike(tmp_path, sp_path):
    # The workers write each batch's tokens into a result slot this process maps (the pipe carried them
    # pickled); one too large for its slot still comes through the pipe. Either way: the one-process result.
    docs = make_docs(300, seed=12) + ["the king " * 400]  # a batch of its own, far past a small slot
    write_docs(tmp_path / "d", docs)
    batches = _batches_of(tmp_path / "d", 500)
    args = (0, 0.1, np.dtype(np.uint16), 512)
    want = [shards._encode(b, *args, shards.load_tokenizer(sp_path))[:-1] for b in batches]
    sizes = sorted(r[4].nbytes + r[5].nbytes for r in want)
    try:
        for slot_bytes in (0, sizes[len(sizes) // 2], 1 << 20):  # none, half of them fit, all fit
            got = []
            for r in shards._encoded(iter(batches), None, sp_path, 2, *args, slot_bytes=slot_bytes):
                got.append([x.copy() if isinstance(x, np.ndarray) else x for x in r])  # views: valid until the next
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert g[0][0] == w[0][0] and np.array_equal(g[0][1], w[0][1]) and g[2] == w[2]
                for k in (1, 3, 4, 5):
                    assert g[k].dtype == w[k].dtype and np.array_equal(g[k], w[k]), (slot_bytes, k)
            slots = shards._POOL.slots
            assert len(slots.maps) == (6 if slot_bytes else 0) and all(Path(p).is_file() for p, _ in slots.maps)
        paths = [p for p, _ in slots.maps]
    finally:
        shards._drop_pool()
    assert not any(Path(p).exists() for p in paths)  # the slots go with the pool


def test_a_slot_holds_one_batch_at_a_time(tmp_path, sp_path, monkeypatch):
    # Each result's tokens are views of its slot, read after the workers ran ahead: a slot given to a
    # second batch before its first one's result was taken is overwritten by then.
    write_docs(tmp_path / "d", make_docs(400, seed=13))
    batches = _batches_of(tmp_path / "d", 300)
    args = (0, 0.0, np.dtype(np.uint16), 512)
    want = [shards._encode(b, *args, shards.load_tokenizer(sp_path))[4] for b in batches]
    given = []
    arg = shards._Slots.arg
    monkeypatch.setattr(shards._Slots, "arg", lambda self, slot: (given.append(slot), arg(self, slot))[1])
    try:
        for k, r in enumerate(shards._encoded(iter(batches), None, sp_path, 2, *args, slot_bytes=1 << 16)):
            time.sleep(0.002)  # the workers run ahead meanwhile
            assert np.array_equal(r[4], want[k]), k
    finally:
        shards._drop_pool()
    assert len(given) == len(batches) > 10 and set(given) == set(range(6))


def test_prepares_in_two_threads_each_get_their_own_tokens(tmp_path, sp_path, monkeypatch):
    # The shared pool (its result slots, its word log) serves one prepare at a time; another thread's
    # prepare meanwhile gets a pool of its own, closed when it is done.
    for k in range(2):
        write_docs(tmp_path / f"d{k}", make_docs(300, seed=20 + k))
    kw = dict(val_fraction=0.1, shard_tokens=900, batch_chars=300)
    want = [prepare([str(tmp_path / f"d{k}")], sp_path, tmp_path / f"one{k}", workers=1, **kw) for k in range(2)]
    batches, both_in = shards._batches, threading.Barrier(2, timeout=60)

    def overlapping(items, n):  # each prepare, its pool taken, waits after its first batch for the other
        for k, batch in enumerate(batches(items, n)):
            yield batch
            if k == 0:
                both_in.wait()

    new_pool, pools = shards._new_pool, []
    monkeypatch.setattr(shards, "_batches", overlapping)
    monkeypatch.setattr(shards, "_new_pool", lambda *a: pools.append(new_pool(*a)) or pools[-1])
    got, errors = {}, []

    def run(k):
        try:
            got[k] = prepare([str(tmp_path / f"d{k}")], sp_path, tmp_path / f"two{k}", workers=2, **kw)
        except BaseException as e:  # re-raised below
            errors.append(e)

    try:
        threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert len(pools) == 2 and sum(p is shards._POOL for p in pools) == 1  # one shared, one of its own
        private = next(p for p in pools if p is not shards._POOL)
        assert private.executor._shutdown_thread and not private.slots.maps  # closed with its prepare
    finally:
        shards._drop_pool()
    for k in range(2):
        assert got[k]["splits"] == want[k]["splits"]
        for split in ("train", "val"):
            assert np.array_equal(stream(tmp_path / f"one{k}", split), stream(tmp_path / f"two{k}", split))
    assert not shards._POOL_BUSY.locked()


@pytest.mark.skipif(os.name != "posix", reason="stale slots are found by pid on POSIX only")
def test_slot_files_of_processes_that_died_are_removed(tmp_path):
    # A killed mix leaves its slot files (no atexit); /dev/shm keeps their pages until they are removed.
    import subprocess

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        names = {who: tmp_path / f"llamaworks-tokens-{pid}-0-abc.bin" for who, pid in
                 (("dead", int(dead.stdout)), ("alive", alive.pid), ("me", os.getpid()))}
        other = tmp_path / "llamaworks-words-1.bin"
        for path in [*names.values(), other]:
            path.write_bytes(b"x")
        shards._remove_stale_slots(str(tmp_path))
        assert not names["dead"].exists() and names["alive"].exists() and names["me"].exists() and other.exists()
    finally:
        alive.kill()
        alive.wait()


def test_slots_that_cannot_be_made_leave_the_tokens_to_the_pipe(tmp_path, sp_path, monkeypatch, caplog):
    # A full /dev/shm: fallocate fails when the slots are made (never a SIGBUS in a worker), with a warning.
    write_docs(tmp_path / "d", make_docs(300, seed=14))
    kw = dict(val_fraction=0.1, shard_tokens=900, batch_chars=400)
    one = prepare([str(tmp_path / "d")], sp_path, tmp_path / "w1", workers=1, **kw)

    def full(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards.os, "posix_fallocate", full, raising=False)
    monkeypatch.setattr(shards.os, "ftruncate", full)
    try:
        with caplog.at_level(logging.WARNING, logger="llamaworks.data.shards"):
            two = prepare([str(tmp_path / "d")], sp_path, tmp_path / "w2", workers=2, **kw)
        assert shards._POOL.slots.off and not shards._POOL.slots.maps
    finally:
        shards._drop_pool()
    assert "through a pipe" in caplog.text and "No space left" in caplog.text
    assert one["splits"] == two["splits"]
    for split in ("train", "val"):
        assert np.array_equal(stream(tmp_path / "w1", split), stream(tmp_path / "w2", split))
    assert not [p for p in Path(shards.tempfile.gettempdir()).glob(f"llamaworks-tokens-{os.getpid()}-*")]


@pytest.mark.parametrize("chosen", [None, "3"])
def test_workers_start_with_one_blas_thread_unless_the_caller_chose(sp_path, monkeypatch, chosen):
    # Idle OpenBLAS threads spin ~0.1 s of CPU in each process as it starts; the workers never use them.
    if chosen is None:
        monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", chosen)
    pool = shards._new_pool(2, sp_path)
    try:
        seen = {pool.executor.submit(os.getenv, "OPENBLAS_NUM_THREADS").result() for _ in range(4)}
        assert seen == {chosen or "1"} and len(pool.executor._processes) == 2  # both started at once
        assert os.environ.get("OPENBLAS_NUM_THREADS") == chosen  # this process's own setting is kept
    finally:
        shards._close(pool)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_text_that_is_no_unicode_keeps_its_own_error(tmp_path, sp_path, workers):
    # JSON may hold a lone surrogate ("\\ud800"); SentencePiece refuses such a text, and so does prepare,
    # with the encoder's UnicodeEncodeError (not a word about the vocabulary).
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "the king"}\n{"text": "bad \\ud800 text"}\n')
    try:
        with pytest.raises(UnicodeEncodeError):
            prepare([str(tmp_path / "d")], sp_path, tmp_path / "out", workers=workers)
    finally:
        shards._drop_pool()


def test_dtype_follows_vocab_size(tmp_path):
    write_docs(tmp_path / "d", ["abc", "xyz"])
    small = prepare([str(tmp_path / "d")], FakeTokenizer(65536), tmp_path / "a", val_fraction=0, workers=1)
    big = prepare([str(tmp_path / "d")], FakeTokenizer(70000, offset=65500), tmp_path / "b", val_fraction=0,
                  workers=1)
    assert small["dtype"] == "uint16" and big["dtype"] == "uint32"
    assert stream(tmp_path / "b").tolist() == [1, 65500 + ord("a"), 65500 + ord("b"), 65500 + ord("c"), 2,
                                               1, 65500 + ord("x"), 65500 + ord("y"), 65500 + ord("z"), 2]
    with pytest.raises(ValueError, match="outside its vocab_size 100"):
        prepare([str(tmp_path / "d")], FakeTokenizer(100), tmp_path / "c", workers=1)


def test_val_split_is_per_document_and_stable_when_data_is_added(tmp_path, tok):
    docs = [f"{d} {i}" for i, d in enumerate(make_docs(200))]  # unique texts
    write_docs(tmp_path / "d", docs)
    a = prepare([str(tmp_path / "d")], tok, tmp_path / "a", val_fraction=0.2, workers=1)
    write_docs(tmp_path / "extra", [f"more {i}" for i in range(50)])
    b = prepare([str(tmp_path / "d"), str(tmp_path / "extra")], tok, tmp_path / "b", val_fraction=0.2,
                workers=1)
    val_a, val_b = (set(documents_of(stream(tmp_path / x, "val"), tok)) for x in "ab")
    train_a, train_b = (set(documents_of(stream(tmp_path / x, "train"), tok)) for x in "ab")
    assert 15 < len(val_a) < 65 and val_a | train_a == set(docs) and not val_a & train_a
    assert val_a <= val_b and train_a <= train_b
    assert a["splits"]["val"]["documents"] == len(val_a) and b["documents"] == 250
    c = prepare([str(tmp_path / "d")], tok, tmp_path / "c", val_fraction=0.2, seed=1, workers=1)
    assert set(documents_of(stream(tmp_path / "c", "val"), tok)) != val_a  # the seed picks another split
    assert c["documents"] == 200


def test_atomicity_incomplete_directory_and_overwrite(tmp_path, tok):
    write_docs(tmp_path / "d", make_docs(20))
    out = tmp_path / "out"

    class Crashing(SPTokenizer):
        def encode_batch(self, texts, bos=True, eos=False):
            if any("1066" in t for t in texts):
                raise RuntimeError("killed")
            return super().encode_batch(texts, bos, eos)

    with pytest.raises(RuntimeError):
        prepare([str(tmp_path / "d")], Crashing(tok.path), out, shard_tokens=10, workers=1, batch_chars=1)
    assert list((out / "train").glob("*.bin"))  # some shards were renamed into place ...
    with pytest.raises(FileNotFoundError, match="no manifest.json"):  # ... but the directory is incomplete
        open_token_dataset(out)
    (out / "train/00099.bin.tmp").write_bytes(b"junk")
    first = prepare([str(tmp_path / "d")], tok, out, workers=1)  # an incomplete directory is redone
    assert not list(out.rglob("*.tmp"))
    with pytest.raises(ValueError, match="already exists.*overwrite"):
        prepare([str(tmp_path / "d")], tok, out, workers=1)
    again = prepare([str(tmp_path / "d")], tok, out, workers=1, overwrite=True, shard_tokens=50)
    assert again["tokens"] == first["tokens"] and len(again["splits"]["train"]["shards"]) > 1
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        Path(s["file"]).name for s in again["splits"]["train"]["shards"]]

    shard = out / again["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match="00000.bin has 98 bytes, expected 50 uint16 tokens"):
        open_token_dataset(out)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="00000.bin listed in the manifest is missing"):
        open_token_dataset(out)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_token_dataset(tmp_path / "nowhere")


def test_user_errors_name_the_file_and_fix(tmp_path, tok):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="'missing' does not exist"):
        prepare(["missing"], tok, out, workers=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no input files found"):
        prepare([str(tmp_path / "empty")], tok, out, workers=1)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/x.dat").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match="no documents found .*1 binary"):
        prepare([str(tmp_path / "bin")], tok, out, workers=1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "oops"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        prepare([str(bad)], tok, out, workers=1)
    bad.write_text('{"text": "fine"}\n\n{"content": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: record has no string `text` field"):
        prepare([str(bad)], tok, out, workers=1)
    bad.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: malformed JSON \(invalid UTF-8\)"):
        prepare([str(bad)], tok, out, workers=1)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        prepare([str(bad)], tok, out, val_fraction=1.0)
    with pytest.raises(FileNotFoundError, match="tokenizer 'nope.model' not found"):
        prepare([str(bad)], "nope.model", out)
    with pytest.raises(TypeError, match="encode_batch"):
        prepare([str(bad)], object(), out)


def test_zstd_jsonl_needs_zstandard_and_reads_lines(tmp_path, tok, monkeypatch):
    path = tmp_path / "part.jsonl.zst"
    path.write_text(json.dumps({"text": "the king"}) + "\n" + json.dumps({"text": "a ship"}) + "\n")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if not installed
    with pytest.raises(ValueError, match="part.jsonl.zst is zstd-compressed .*pip install zstandard"):
        prepare([str(path)], tok, tmp_path / "a", workers=1)
    # A stand-in whose open() returns a raw, readline-less stream, as zstandard's reader is.
    monkeypatch.setitem(sys.modules, "zstandard", types.SimpleNamespace(open=lambda f, mode: io.FileIO(f)))
    prepare([str(path)], tok, tmp_path / "b", val_fraction=0, workers=1)
    assert documents_of(stream(tmp_path / "b"), tok) == ["the king", "a ship"]


def test_worker_that_cannot_load_the_tokenizer_fails_instead_of_hanging(tmp_path, tok):
    write_docs(tmp_path / "d", make_docs(5))
    with pytest.raises(BrokenProcessPool):
        prepare([str(tmp_path / "d")], Unloadable(tok.path), tmp_path / "out", workers=2)


def test_workers_give_identical_shards(tmp_path, tok):
    write_docs(tmp_path / "d", make_docs(300, seed=5))
    kw = dict(val_fraction=0.1, shard_tokens=1000, batch_chars=300)
    one = prepare([str(tmp_path / "d")], tok, tmp_path / "w1", workers=1, **kw)
    two = prepare([str(tmp_path / "d")], tok, tmp_path / "w2", workers=2, **kw)
    for key in ("documents", "tokens", "splits", "sources"):
        assert one[key] == two[key]
    for split in ("train", "val"):
        for s in one["splits"][split]["shards"]:
            assert (tmp_path / "w1" / s["file"]).read_bytes() == (tmp_path / "w2" / s["file"]).read_bytes()


@pytest.mark.parametrize("workers", [1, 2])
def test_document_lengths_are_the_shards_documents(tmp_path, tok, workers):
    # `data mix` indexes its source caches by these lengths instead of scanning the shards for <s>:
    # per split, in shard order, whatever the batches, shard boundaries and worker count.
    write_docs(tmp_path / "d", make_docs(200, seed=3) + ["", "  "])
    lengths = {}
    m = prepare([str(tmp_path / "d")], tok, tmp_path / "out", val_fraction=0.2, shard_tokens=333, batch_chars=250,
                workers=workers, document_lengths=lengths)
    for split in ("train", "val"):
        tokens = stream(tmp_path / "out", split)
        starts = np.flatnonzero(tokens == tok.bos_id)
        want = np.diff(np.append(starts, len(tokens)))
        assert lengths[split].dtype == np.int64 and np.array_equal(lengths[split], want), split
        assert len(want) == m["splits"][split]["documents"] > 0
    assert m["empty_documents"] == 2


def test_cli_prepare_reports_errors(tmp_path, capsys):
    write_docs(tmp_path / "d", ["abc"])
    assert cli.main(["prepare", "--input", str(tmp_path / "d"), "--tokenizer", "nope.model",
                     "--output", str(tmp_path / "out")]) == 2
    assert "tokenizer 'nope.model' not found" in capsys.readouterr().err


def test_cli_prepare_with_tokenizer_path(tmp_path, sp_path, tok, capsys):
    pytest.importorskip("llamaworks.tokenizer", reason="llamaworks.tokenizer not written yet")
    write_docs(tmp_path / "d", make_docs(40))
    args = ["prepare", "--input", str(tmp_path / "d"), "--tokenizer", sp_path, "--output",
            str(tmp_path / "out"), "--workers", "2", "--val-fraction", "0"]
    assert cli.main(args) == 0
    assert "prepared 40 documents" in capsys.readouterr().out
    assert documents_of(stream(tmp_path / "out"), tok) == make_docs(40)
    assert cli.main(args) == 2 and "already exists" in capsys.readouterr().err


@pytest.mark.skipif(not SHAKESPEARE.is_dir(), reason=f"{SHAKESPEARE} absent")
def test_shakespeare_corpus(tmp_path, tok):
    plays = sorted(SHAKESPEARE.glob("*_gut.txt"))[:6]
    m = prepare([str(p) for p in plays], tok, tmp_path / "out", val_fraction=0.5, workers=2, seed=3)
    assert m["documents"] == 6 and set(m["sources"]) == {p.name for p in plays}
    assert 0 < m["splits"]["val"]["documents"] < 6
    texts = documents_of(np.concatenate([stream(tmp_path / "out", s) for s in ("train", "val")]), tok)
    assert sorted(texts) == sorted(p.read_text() for p in plays)


# ---------------------------------------------------------------------------- loader


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5000), seed=st.integers(0, 2**31), epoch=st.integers(0, 100))
def test_window_order_is_a_permutation(n, seed, epoch):
    order = window_order(np.arange(n), n, seed, epoch)
    assert np.array_equal(np.sort(order), np.arange(n))
    assert np.array_equal(window_order(np.arange(n - 1, -1, -1), n, seed, epoch), order[::-1])


def test_window_order_shuffles():
    a, b = window_order(np.arange(1000), 1000, 0, 0), window_order(np.arange(1000), 1000, 0, 1)
    assert (a != np.arange(1000)).mean() > 0.9 and (a != b).mean() > 0.9
    assert abs(np.corrcoef(a, np.arange(1000))[0, 1]) < 0.1


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_loader_batches_are_shifted_windows_of_the_stream(dataset):
    tokens = stream(dataset).astype(np.int64)
    loader = TokenLoader(dataset, batch_size=4, seq_len=16, seed=3)
    assert loader.num_windows == (len(tokens) - 1) // 16 and len(loader) == loader.num_windows // 4
    x, y = next(loader)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        k = np.flatnonzero([np.array_equal(tokens[i * 16 : i * 16 + 16], row_x)
                            for i in range(loader.num_windows)])
        assert len(k) >= 1 and np.array_equal(tokens[k[0] * 16 + 1 : k[0] * 16 + 17], row_y)


def test_loader_is_deterministic_and_seeded(dataset):
    a, b = (take(TokenLoader(dataset, batch_size=4, seq_len=32, seed=1), 5) for _ in range(2))
    c = take(TokenLoader(dataset, batch_size=4, seq_len=32, seed=2), 5)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_exact_resume(dataset):
    loader = TokenLoader(dataset, batch_size=3, seq_len=32, seed=4)
    take(loader, 7)
    state = loader.state_dict()
    assert all(isinstance(v, int) for v in state.values()) and state["position"] == 21
    expected = take(loader, 5)
    resumed = TokenLoader(dataset, batch_size=3, seq_len=32, seed=999)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    for (x, y), (rx, ry) in zip(expected, take(resumed, 5)):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_ranks_together_see_the_single_process_batch(dataset):
    single = TokenLoader(dataset, batch_size=6, seq_len=64, seed=7)
    ranks = [TokenLoader(dataset, batch_size=3, seq_len=64, seed=7, rank=r, world_size=2) for r in (0, 1)]
    steps = single.batches_per_epoch + 3  # across an epoch boundary
    for _ in range(steps):
        x, y = next(single)
        (x0, y0), (x1, y1) = next(ranks[0]), next(ranks[1])
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)  # rank order
    assert single.epoch == ranks[0].epoch == 1


def test_resume_on_another_world_size_with_the_same_global_batch(dataset):
    single = TokenLoader(dataset, batch_size=4, seq_len=32, seed=5)
    take(single, 9)
    state = single.state_dict()
    expected = take(single, 4)
    ranks = [TokenLoader(dataset, batch_size=2, seq_len=32, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for r in ranks:
        r.load_state_dict(state)
    for x, _ in expected:
        assert torch.equal(torch.cat([next(ranks[0])[0], next(ranks[1])[0]]), x)
    with pytest.raises(ValueError, match="global batch of 4 .*this loader has 6"):
        TokenLoader(dataset, batch_size=3, seq_len=32, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len=32"):
        TokenLoader(dataset, batch_size=4, seq_len=16).load_state_dict(state)


def test_epoch_rollover_covers_every_window_once_per_epoch(dataset, caplog):
    loader = TokenLoader(dataset, batch_size=5, seq_len=128, seed=0)
    tokens = stream(dataset).astype(np.int64)
    per_epoch = loader.batches_per_epoch
    used = loader.batches_per_epoch * 5
    starts = lambda batches: sorted(  # noqa: E731
        next(i for i in range(loader.num_windows) if np.array_equal(tokens[i * 128 : i * 128 + 128], row))
        for x, _ in batches for row in x.numpy())
    with caplog.at_level(logging.INFO, logger=TokenLoader.__module__):
        epoch0 = take(loader, per_epoch)
        assert loader.epoch == 0 and not caplog.records
        epoch1 = take(loader, per_epoch)
    assert loader.epoch == 1 and "epoch 1 begins" in caplog.text
    assert len(set(starts(epoch0))) == len(set(starts(epoch1))) == used
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(epoch0, epoch1))  # a new order


def test_val_loader_is_ordered_and_finite(dataset):
    tokens = stream(dataset, "val").astype(np.int64)
    loader = TokenLoader(dataset, "val", batch_size=2, seq_len=16)
    assert not loader.shuffle and not loader.infinite
    first, second = list(loader), list(loader)  # each `for` loop is one fresh pass
    assert len(first) == len(second) == len(loader) == loader.num_windows // 2
    expected = np.stack([tokens[k * 16 : k * 16 + 16] for k in range(2 * len(loader))])
    assert np.array_equal(torch.cat([x for x, _ in first]).numpy(), expected)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))


def test_loader_errors(dataset, tmp_path):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TokenLoader(dataset, "val", batch_size=1000, seq_len=512)
    with pytest.raises(ValueError, match="split must be one of"):
        TokenLoader(dataset, "test", batch_size=1, seq_len=8)
    with pytest.raises(ValueError, match="rank 2 of 2"):
        TokenLoader(dataset, batch_size=1, seq_len=8, rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        TokenLoader(tmp_path, batch_size=1, seq_len=8)
