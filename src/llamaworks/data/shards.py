"""Packed token shards for pretraining, and a rank-aware, exactly resumable loader over them.

`prepare` encodes every document as `<s> text </s>` and concatenates them into one stream,
as LLaMA packs its pretraining documents, split per document into train/val and cut into
fixed-size raw `.bin` shards (uint16 when the vocabulary fits, else uint32):

    output/manifest.json          written last: a directory with a manifest is complete
    output/train/00000.bin ...    each shard is written as `NAME.tmp` and renamed when full
    output/val/00000.bin ...

manifest.json: {"format", "documents", "tokens", "splits": {"train"|"val": {"documents",
"tokens", "shards": [{"file", "tokens"}]}}, "sources": {name: {"documents", "tokens"}},
"dtype", "vocab_size", "bos_id", "eos_id", "tokenizer": {"path", "sha256"}, "val_fraction",
"seed", "shard_tokens", "skipped_files", "empty_documents", "created", "llamaworks_version",
"seconds"}.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import hashlib
import itertools
import json
import logging
import math
import mmap
import multiprocessing
import os
import pickle
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import numpy as np

from llamaworks import __version__
from llamaworks.args import Arg
from llamaworks.atomic import atomic_write_json
from llamaworks.data.document import parse_line, raw_lines
from llamaworks.tokenizer import load_tokenizer as load_tokenizer_file
from llamaworks.tokenizer import native
from llamaworks.tokenizer.word_cache import IdOverflow, flat_encoder, joined_utf8, ragged_arange

log = logging.getLogger(__name__)

FORMAT = "llamaworks.shards/1"
SPLITS = ("train", "val")
_JSONL = (".jsonl", ".jsonl.gz", ".jsonl.zst")
_HELP_INPUTS = "pass folders of text files, .txt files or .jsonl[.gz|.zst] files with a `text` field"


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


# ---------------------------------------------------------------------------- reading documents


def input_files(inputs: Iterable[str]) -> Iterator[tuple[Path, str, str]]:
    """(file, source, stable name) in a deterministic order: inputs as given, folders sorted."""
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"input {raw!r} does not exist; {_HELP_INPUTS}")
        source = path.resolve().name  # resolve() so that "." is named after its folder
        if path.is_file():
            yield path, source, path.name
            continue
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .git, .cache: never documents
            for name in sorted(f for f in files if not f.startswith(".")):
                file = Path(root) / name
                yield file, source, f"{source}/{file.relative_to(path).as_posix()}"


# A record of the corpus as the main process reads it: (file, source, name, line number, payload). For a
# JSONL line (line number >= 1) the payload is the line's raw bytes, parsed into a document by the encoding
# worker (_document_of), so JSON decoding runs in parallel; for a text file (0) it is the text itself.
Record = tuple[str, str, str, int, Any]


class Span(NamedTuple):
    """Whole lines of a local, uncompressed JSONL file: bytes [start, end), the first of them line `lineno`.

    The main process cuts such a file into spans at line ends (a memory map: it reads only the
    newlines' positions) and the encoding worker reads the span's bytes and splits them into the
    same records raw_lines would give. The lines themselves never cross a pipe: sending 1 GiB of
    lines to the workers (pickling, two copies through the kernel) was a third of the mixing
    process's CPU in a 1 GiB `data mix` (docs/data.md)."""

    file: str
    source: str
    name: str
    lineno: int
    start: int
    end: int


def _spans(file: Path, source: str, name: str, span_bytes: int) -> Iterator[Span]:
    """`file` as spans of at least `span_bytes` bytes (the last one up to its end), each ending after a newline."""
    size = file.stat().st_size
    if size == 0:  # mmap refuses an empty file; it has no line
        return
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        data = np.frombuffer(mm, np.uint8)  # no copy: lines counted at ~9 GB/s, 4x bytes.count on a slice
        try:
            start, lineno = 0, 1
            while start < size:
                newline = mm.find(b"\n", min(start + span_bytes, size) - 1)
                end = size if newline < 0 else newline + 1
                yield Span(str(file), source, name, lineno, start, end)
                lineno += int(np.count_nonzero(data[start:end] == ord("\n")))
                start = end
        finally:
            del data  # the map cannot close while an array views it


_SPAN_BUFFER = np.empty(0, np.uint8)  # this process's buffer of a span's bytes, reused span after span


def _span_bytes(span: Span, reuse: bool = False) -> bytes | np.ndarray:
    """The span's bytes; with `reuse`, read into this process's span buffer (grown when short) and returned
    as a view of it, valid until the next such read: a fresh buffer per span costs its page faults (a
    third of reading a span on a VM that reports freed pages)."""
    global _SPAN_BUFFER
    n = span.end - span.start
    if reuse and len(_SPAN_BUFFER) < n:
        _SPAN_BUFFER = np.empty(max(n, 2 * len(_SPAN_BUFFER)), np.uint8)
    with open(span.file, "rb") as f:
        f.seek(span.start)
        if not reuse:
            data = f.read(n)
            got = len(data)
        else:
            data = _SPAN_BUFFER[:n]
            got = f.readinto(memoryview(data))
    if got != n:
        raise ValueError(f"{span.file} changed while it was being read (shorter than {span.end} bytes); "
                         "run again on files that nothing writes to")
    return data


def _span_records(span: Span) -> Iterator[Record]:
    """raw_lines' (line number, bytes) of the span's non-blank lines, as records (in the worker)."""
    for lineno, line in enumerate(_span_bytes(span).split(b"\n"), span.lineno):
        if line and not line.isspace():  # raw_lines' test, without strip()'s copy of the line
            yield span.file, span.source, span.name, lineno, line


def _records(inputs: Iterable[str], stats: dict[str, int], span_bytes: int = 0) -> Iterator[Record | Span]:
    """The corpus's records in order, one at a time: the corpus is never held whole. With `span_bytes`,
    a local uncompressed JSONL file comes as Spans of that many bytes instead of one record per line."""
    for file, source, name in input_files(inputs):
        stats["files"] += 1
        if name.lower().endswith(_JSONL):
            path = str(file)
            if span_bytes and name.lower().endswith(".jsonl"):
                yield from _spans(file, source, name, span_bytes)
                continue
            for lineno, line in raw_lines(file):
                yield path, source, name, lineno, line
            continue
        try:
            text = file.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None or "\0" in text:  # NUL: decodes, yet binary (images, archives, weights)
            stats["skipped_files"] += 1
            continue
        yield str(file), source, name, 0, text


def _document_of(record: Record) -> tuple[str, str, str]:
    """(document id, source, text) of a record."""
    file, source, name, lineno, payload = record
    if not lineno:
        return name, source, payload
    parsed = parse_line(file, lineno, payload)
    if not isinstance(parsed, dict) or not isinstance(parsed.get("text"), str):
        raise ValueError(f"{file}:{lineno}: record has no string `text` field; every JSONL line "
                         'must be an object like {"id": ..., "text": "...", "source": ...}')
    # A record id keeps the split stable when files are re-sharded; else file and line.
    doc_id = str(parsed["id"]) if parsed.get("id") is not None else f"{name}:{lineno}"
    return doc_id, str(parsed.get("source") or source), parsed["text"]


def _split_digest(doc_id: str, seed: int) -> bytes:
    # A hash of the id (not a position or an RNG draw) so adding data never moves a document.
    return hashlib.blake2b(f"{seed}\0{doc_id}".encode(), digest_size=8).digest()


def _in_val(doc_id: str, seed: int, val_fraction: float) -> bool:
    """The split's rule for one document (what _val_mask computes for a batch)."""
    return int.from_bytes(_split_digest(doc_id, seed), "little") < val_fraction * 2**64


def _val_mask(doc_ids: list[str], seed: int, val_fraction: float) -> np.ndarray:
    """[_in_val(i, seed, val_fraction) for i in doc_ids] as a bool array: the digests joined and compared
    as one uint64 array, not an int and a float comparison per document. Exact: for an integer h,
    h < f (a float) holds when h < ceil(f), an integer below 2**64 here."""
    digests = b"".join([_split_digest(i, seed) for i in doc_ids])
    return np.frombuffer(digests, "<u8") < np.uint64(_val_threshold(val_fraction))


def _val_threshold(val_fraction: float) -> int:
    """The digests below which a document is held out (_val_mask; below 2**64 for val_fraction < 1)."""
    return math.ceil(val_fraction * 2**64)


# ---------------------------------------------------------------------------- encoding


_WORKER_TOKENIZER: Any = None


def load_tokenizer(tokenizer):
    if isinstance(tokenizer, (str, os.PathLike)):
        if not Path(tokenizer).is_file():
            raise FileNotFoundError(f"tokenizer {str(tokenizer)!r} not found; pass a tokenizer file: a SentencePiece "
                                    ".model (train one with `llamaworks tokenizer train`), Llama 3's tiktoken "
                                    "tokenizer.model or a tokenizer.json")
        return load_tokenizer_file(str(tokenizer))  # the class the file's content calls for
    missing = [a for a in ("encode_batch", "bos_id", "eos_id", "vocab_size") if not hasattr(tokenizer, a)]
    if missing:
        raise TypeError(f"tokenizer must be a tokenizer file's path or have {', '.join(missing)}")
    return tokenizer


def _init_worker(tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(tokenizer)


class _Documents:
    """A batch's documents, parsed in order: the kept ones' texts (a list of str, or with `joined` one
    word_cache buffer of them), val flags and sources (names, and an index per document), and how many
    were empty. `joined`: local JSONL spans are read by the compiled kernel (native.jsonl_docs), any other
    record and any line it leaves by _document_of."""

    def __init__(self, seed: int, val_fraction: float, lib=None):
        self.seed, self.val_fraction, self.lib = seed, val_fraction, lib
        self.seed_prefix = f"{seed}\0".encode()
        self.threshold = _val_threshold(val_fraction)
        self.names: dict[str, int] = {}
        self.texts: list = []  # str texts, or (joined) pieces of the buffer
        self.val: list[np.ndarray] = []
        self.which: list[np.ndarray] = []
        self.kept = self.empty = 0
        self.records: list[Record] = []  # for _document_of, in order, not yet added

    def add(self, item: Record | Span) -> None:
        if not isinstance(item, Span):
            self.records.append(item)
            return
        name = _utf8_or_none(item.name)
        if self.lib is None or name is None:  # a name no UTF-8 holds: _document_of raises where it is needed
            self.records.extend(_span_records(item))
            return
        data = _span_bytes(item, reuse=True)
        at, lineno = 0, item.lineno
        while at < len(data):
            part = native.jsonl_docs(self.lib, data, at, lineno, name, self.seed_prefix, self.threshold)
            self._flush()  # the records before it go first
            if len(part.val):
                names = [item.source, *part.sources]
                used = np.unique(part.source, return_index=True)  # (local numbers, first use): named in that order
                lut = np.zeros(len(names), np.int64)
                for k in used[0][np.argsort(used[1])].tolist():
                    lut[k] = self.names.setdefault(names[k], len(self.names))
                self._part(part.text, len(part.val), part.val, lut[part.source])
            self.empty += part.empty
            at, lineno = part.at, part.lineno
            if part.stop >= 0:  # a line the kernel leaves to _document_of (its error, or an id it cannot name)
                self.records.append((item.file, item.source, item.name, lineno, data[at:at + part.stop].tobytes()))
                at, lineno = at + part.stop + 1, lineno + 1

    def _part(self, texts, kept: int, val: np.ndarray, which: np.ndarray) -> None:
        self.texts.append(texts) if self.lib is not None else self.texts.extend(texts)
        self.kept += kept
        self.val.append(val)
        self.which.append(which)

    def _flush(self) -> None:
        if not self.records:
            return
        docs = [_document_of(r) for r in self.records]
        self.records = []
        # An empty document is counted, never encoded (`not text.strip()`, without strip()'s copy of a text).
        kept = [d for d in docs if d[2] and not d[2].isspace()]
        self.empty += len(docs) - len(kept)
        which = np.fromiter((self.names.setdefault(d[1], len(self.names)) for d in kept), np.int64, len(kept))
        texts = [d[2] for d in kept]
        if self.lib is not None:  # word_cache's buffer, as the kernel writes it
            texts = joined_utf8(texts)
        self._part(texts, len(kept), _val_mask([d[0] for d in kept], self.seed, self.val_fraction), which)

    def done(self) -> tuple[list | bytes, np.ndarray, np.ndarray]:
        """(texts, val, which) of the kept documents."""
        self._flush()
        texts = self.texts if self.lib is None else self.texts[0] if len(self.texts) == 1 else b"".join(self.texts)
        return (texts, np.concatenate([np.zeros(0, bool), *self.val]),
                np.concatenate([np.zeros(0, np.int64), *self.which]))


def _utf8_or_none(text: str) -> bytes | None:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return None


def _encode(items: list[Record | Span], seed: int, val_fraction: float, dtype: np.dtype, vocab_size: int,
            tokenizer=None, words: tuple[str, int] | None = None, slot: tuple[str, int] | None = None) -> tuple:
    """A batch of records (and spans of them) parsed, split and encoded: ((the batch's sources, each
    document's index in them), in val, empty documents, lengths, train tokens, val tokens, the word
    cache's new chunks), the tokens in the shards' `dtype`. Runs in the workers: JSON, the val-split
    hashes, the encoder, the range check and the split in parallel; this process only writes what
    comes back. The sources go back as names and an index array, not a string per document.
    `words`: the word log (_encoded) and its size; its new part is read first, the batch's new
    chunks come back last (b"" without a log). `slot`: a result slot's file and size (_Slots); tokens
    that fit it are written there and come back as an _InSlot in place of the train tokens (val: None)."""
    # SentencePiece models of LLaMA's kind go through a word cache (same ids, several times faster);
    # any other tokenizer through its encode_batch. Arrays, not lists: far cheaper to send back from a worker.
    encoder = flat_encoder(_WORKER_TOKENIZER if tokenizer is None else tokenizer)
    if words is not None:
        encoder.sharing = True
        _read_words(encoder, *words)
    # A word cache that takes word_cache's buffer: the compiled kernel reads JSONL spans straight into it.
    documents = _Documents(seed, val_fraction, native.library() if encoder.takes_joined else None)
    for item in items:
        documents.add(item)
    texts, val, which = documents.done()
    # The ids in the shards' dtype from the encoder itself (an id that does not fit it: IdOverflow; any
    # other error, such as a text with an unpaired surrogate, goes on as it is).
    def outside(detail: str) -> ValueError:
        return ValueError(f"the tokenizer produced an id outside its vocab_size {vocab_size} ({detail}), unfit "
                          f"for {np.dtype(dtype).name} shards; check the tokenizer")

    encoded_dtype = _encoded_dtype(dtype)
    try:
        if documents.lib is None:
            flat, lengths = encoder.encode(texts, bos=True, eos=True, dtype=encoded_dtype)
        else:
            flat, lengths = encoder.encode_joined(texts, documents.kept, bos=True, eos=True, dtype=encoded_dtype)
    except IdOverflow as e:
        raise outside(str(e)) from None
    if len(flat) and (flat.min() < 0 or flat.max() >= vocab_size):
        raise outside(f"max {int(flat.max())}")
    train, held = _split_tokens(flat.astype(dtype, copy=False), lengths, val)
    new = encoder.take_new() if words is not None else b""
    if slot is not None and train.nbytes + held.nbytes <= slot[1]:
        train, held = _to_slot(slot[0], slot[1], train, held), None
    return (list(documents.names), which), val, documents.empty, lengths, train, held, new


def _encoded_dtype(dtype: np.dtype) -> np.dtype:
    """What the encoder writes for `dtype` shards: uint16 ones as is (most vocabularies), else int64
    (converted after the range check)."""
    return np.dtype(np.uint16) if np.dtype(dtype) == np.uint16 else np.dtype(np.int64)


_WORDS_READ: dict[str, int] = {}  # per word log, the bytes of it this worker has taken


def _read_words(encoder, path: str, size: int) -> None:
    """The other workers' new chunks: the word log from where this worker left it up to `size` (whole
    records: the log grows a record at a time, and `size` was read between two)."""
    at = _WORDS_READ.get(path, 0)
    if size <= at:
        return
    with open(path, "rb") as f:
        f.seek(at)
        encoder.put_new(f.read(size - at))
    _WORDS_READ[path] = size


def _split_tokens(flat: np.ndarray, lengths: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): the tokens of the documents not in val and of those in val, each in order. Held-out
    documents are few (0.5%): slices around them, not a mask over every token."""
    held = np.flatnonzero(val)
    if len(held) > 64:
        mask = np.repeat(val, lengths)  # (tokens,) True where the token's document is held out
        return flat[~mask], flat[mask]
    ends = np.cumsum(lengths)  # (documents,) each document's end in flat
    starts = ends - lengths
    cuts = [0, *itertools.chain.from_iterable(zip(starts[held].tolist(), ends[held].tolist())), len(flat)]
    pieces = [flat[a:b] for a, b in zip(cuts[::2], cuts[1::2])]  # the runs between held-out documents
    train = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    return train, np.concatenate([flat[:0], *(flat[a:b] for a, b in zip(cuts[1:-1:2], cuts[2::2]))])


def _batches(items: Iterator[Record | Span], batch_chars: int) -> Iterator[list[Record | Span]]:
    batch, chars = [], 0
    for item in items:
        batch.append(item)
        chars += item.end - item.start if isinstance(item, Span) else len(item[4])
        if chars >= batch_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class _InSlot(NamedTuple):
    """A batch's tokens in its result slot: `train` tokens, then `held` ones, of dtype `dtype` (a numpy str)."""

    train: int
    held: int
    dtype: str


_SLOT_MAPS: dict[str, mmap.mmap] = {}  # in a worker: the result slots it has written to, mapped once


def _to_slot(path: str, size: int, train: np.ndarray, held: np.ndarray) -> _InSlot:
    """train's and held's tokens written into the result slot at `path` (in the worker)."""
    if path not in _SLOT_MAPS:
        if len(_SLOT_MAPS) >= 64:  # bounded: slots replaced by larger ones (_Slots.reserve) are let go
            _SLOT_MAPS.pop(next(iter(_SLOT_MAPS))).close()
        with open(path, "r+b") as f:
            _SLOT_MAPS[path] = mmap.mmap(f.fileno(), size)
    out = np.frombuffer(_SLOT_MAPS[path], train.dtype, len(train) + len(held))
    out[:len(train)], out[len(train):] = train, held
    del out  # a map cannot close while an array views it
    return _InSlot(len(train), len(held), train.dtype.str)


_SLOT_NAMES = itertools.count()


class _Slots:
    """Result slots: files (in /dev/shm where there is one) that the workers write each batch's tokens
    into and this process reads through memory maps, so that the tokens skip the result pipe. Through
    the pipe a 1 GiB `data mix` paid ~0.5 GB of tokens pickled in the workers, copied into and out of a
    64 KiB pipe (this process woken per 64 KiB) and unpickled, ~0.6 s of wall time on 2 cores
    (docs/data.md). A slot is reused batch after batch (its pages stay), given to one batch at a time by
    _encoded; a result larger than its slot comes through the pipe as before. The files are reserved
    (fallocate) when made: a full /dev/shm is a warning and the pipe here, not a SIGBUS in a worker."""

    def __init__(self):
        self.maps: list[tuple[str, mmap.mmap]] = []
        self.size = 0
        self.free: deque[int] = deque()
        self.off = False  # could not be made: the pipe carries every result
        atexit.register(self.close)

    def reserve(self, count: int, size: int) -> bool:
        """At least `count` slots of `size` bytes, all free; False when they cannot be made."""
        if self.off:
            return False
        if count > len(self.maps) or size > self.size:
            self.close()
            folder = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            _remove_stale_slots(folder or tempfile.gettempdir())
            try:
                for _ in range(count):
                    # Named by this process and a count too: a worker maps a slot by its name, once.
                    fd, path = tempfile.mkstemp(prefix=f"llamaworks-tokens-{os.getpid()}-{next(_SLOT_NAMES)}-",
                                                suffix=".bin", dir=folder)
                    try:
                        self.maps.append((path, None))
                        if hasattr(os, "posix_fallocate"):
                            os.posix_fallocate(fd, 0, size)
                        else:
                            os.ftruncate(fd, size)
                        self.maps[-1] = (path, mmap.mmap(fd, size))
                    finally:
                        os.close(fd)
            except OSError as e:
                self.close()
                self.off = True
                log.warning("prepare's workers send their tokens through a pipe (no result slots: %s: %s)",
                            type(e).__name__, e)
                return False
            self.size = size
        self.free = deque(range(len(self.maps)))
        return True

    def arg(self, slot: int) -> tuple[str, int]:
        return self.maps[slot][0], self.size

    def tokens(self, slot: int, where: _InSlot) -> tuple[np.ndarray, np.ndarray]:
        """(train, held) tokens of the batch in `slot`: views, valid until the slot is given out again."""
        both = np.frombuffer(self.maps[slot][1], np.dtype(where.dtype), where.train + where.held)
        return both[:where.train], both[where.train:]

    def close(self) -> None:
        for path, mm in self.maps:
            if mm is not None:
                with contextlib.suppress(BufferError):  # an array still views it: unmapped when collected
                    mm.close()
            _remove(path)
        self.maps, self.size, self.free = [], 0, deque()


def _remove_stale_slots(folder: str) -> None:
    """Slot files left by processes that no longer run (killed: no atexit), whose pages /dev/shm keeps
    until they are removed. A file named by a process that runs (or a reused pid) is left alone. POSIX
    only: on Windows os.kill(pid, 0) would end that process."""
    if os.name != "posix":
        return
    for path in Path(folder).glob("llamaworks-tokens-*-*-*.bin"):
        pid = path.name.split("-")[2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                path.unlink()
        except OSError:  # another user's process: it runs
            continue


class _Pool(NamedTuple):
    key: tuple
    executor: ProcessPoolExecutor
    words: str | None  # the word log: new chunks the workers' word caches met, for the others (None: off)
    slots: _Slots  # where the workers write their batches' tokens


_POOL: _Pool | None = None


def _new_pool(workers: int, worker_arg, key: tuple = ()) -> _Pool:
    # spawn: workers import only numpy and this module (not torch), and it behaves the same on
    # every OS; callers' scripts need the usual `if __name__ == "__main__":` guard. An executor,
    # not a Pool: a worker that cannot load the tokenizer breaks it with an error instead of a hang.
    context = multiprocessing.get_context("spawn")
    try:
        words = _make_log()
    except OSError as e:
        _no_words(None, e)
        words = None
    executor = ProcessPoolExecutor(workers, context, initializer=_init_worker, initargs=(worker_arg,))
    # Every worker started now (the executor starts one per task while none is idle), each with one BLAS
    # thread unless the caller chose: the workers never multiply matrices, and each idle OpenBLAS thread
    # spins ~0.1 s of CPU in a process that has just started, beside the workers' own start.
    saved = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        for _ in range(workers):
            executor.submit(_started)
    finally:
        if saved is None:
            del os.environ["OPENBLAS_NUM_THREADS"]
    return _Pool(key, executor, words, _Slots())


def _started() -> None:
    """A task that only starts a worker (_new_pool)."""


def _make_log() -> str:
    fd, path = tempfile.mkstemp(prefix="llamaworks-words-", suffix=".bin")
    os.close(fd)
    atexit.register(_remove, path)  # the log outlives no process that made it
    return path


def _remove(path: str | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _no_words(pool: _Pool | None, why: Exception) -> None:
    """Sharing new chunks is only a saving: a word log that cannot be made or written turns it off (the
    workers each encode their own, the same ids) instead of failing the run."""
    global _POOL
    log.warning("prepare's workers do not share new chunks (%s: %s): each encodes its own", type(why).__name__, why)
    if pool is not None:
        _remove(pool.words)
        if _POOL is pool:
            _POOL = pool._replace(words=None)


def _append(path: str, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


_POOL_BUSY = threading.Lock()  # held while a `prepare` uses the shared pool (its slots, its word log)


def _pool(workers: int, worker_arg) -> tuple[_Pool, bool]:
    """(pool, shared): encoding processes kept across `prepare` calls with the same tokenizer file, so
    that `data mix`, which tokenises its sources one after another, spawns them once and their word
    caches stay warm. A tokenizer object gets a pool of its own (shared False: the caller closes it),
    and so does a `prepare` while another thread's uses the shared one (their result slots would mix).
    shared True: the caller holds _POOL_BUSY until it is done (_held_pool releases it)."""
    global _POOL
    if not isinstance(worker_arg, (str, os.PathLike)) or not _POOL_BUSY.acquire(blocking=False):
        return _new_pool(workers, worker_arg), False
    try:
        st = os.stat(worker_arg)
        key = (workers, os.path.abspath(worker_arg), st.st_size, st.st_mtime_ns)  # a rewritten file: new workers
        if _POOL is not None and _POOL.key != key:
            _drop_pool()
        if _POOL is None:
            _POOL = _new_pool(workers, worker_arg, key)
    except BaseException:
        _POOL_BUSY.release()
        raise
    return _POOL, True


@contextlib.contextmanager
def _held_pool(workers: int, worker_arg) -> Iterator[_Pool]:
    """_pool's pool for the `with` block: a pool of its own closed after it, the shared one released
    (and dropped on an error or an abandoned generator: no worker keeps running its tasks)."""
    pool, shared = _pool(workers, worker_arg)
    finished = False
    try:
        yield pool
        finished = True
    finally:
        if not shared:
            _close(pool)
        else:
            if not finished:
                _drop_pool()
            _POOL_BUSY.release()


def _close(pool: _Pool) -> None:
    pool.executor.shutdown(cancel_futures=True)
    _remove(pool.words)
    pool.slots.close()


def _drop_pool() -> None:
    global _POOL
    if _POOL is not None:
        _close(_POOL)
        _POOL = None


def _encoded(batches, tokenizer, worker_arg, workers: int, *args, slot_bytes: int = 0):
    """_encode(batch, *args)'s result per batch, in input order whatever the worker count.

    With workers, each batch also carries the word log's size when it is sent, and each result the
    chunks its worker newly sent to SentencePiece, appended to the log here: a worker takes the
    others' chunks from the log before it encodes (word_cache's put_new), so each new chunk is
    encoded about once between the workers instead of once per worker (~3 us each: 218k of them in
    a 200 MiB mix, paid again by every worker's cold cache). With `slot_bytes`, each batch also gets
    a result slot of that size (_Slots) for its tokens: then a result's train and val tokens are views
    of it, valid until the next result is asked for."""
    if workers == 1:
        for batch in batches:
            yield _encode(batch, *args, tokenizer)[:-1]
        return
    with _held_pool(workers, worker_arg) as pool:
        # At most 2 * workers + 1 batches are out when one is sent, and the one the caller holds is back by then.
        slots = pool.slots if slot_bytes and pool.slots.reserve(2 * workers + 2, slot_bytes) else None
        pending: deque = deque()  # (future, slot): bounded, so documents are read only a few batches ahead
        words, logged = pool.words, os.path.getsize(pool.words) if pool.words else 0

        def submit(batch) -> None:
            slot = slots.free.popleft() if slots else None
            future = pool.executor.submit(_encode, batch, *args, None, words and (words, logged),
                                          slots and slots.arg(slot))
            pending.append((future, slot))

        def result(future, slot):
            nonlocal words, logged
            *out, new = future.result()
            if new and words:
                try:
                    _append(words, new)
                    logged += len(new)
                except OSError as e:  # a full disk: a record may be cut short, so the log goes
                    _no_words(pool, e)
                    words = None
            if isinstance(out[4], _InSlot):
                out[4:6] = slots.tokens(slot, out[4])
            return tuple(out)

        for batch in batches:
            submit(batch)
            if len(pending) > 2 * workers:
                future, slot = pending.popleft()
                yield result(future, slot)
                if slots:  # the caller asked for the next result: done with this one's tokens
                    slots.free.append(slot)
        while pending:
            yield result(*pending.popleft())


# ---------------------------------------------------------------------------- writing shards


class ShardWriter:
    """Appends tokens to `split/NNNNN.bin.tmp`; renames it to `.bin` when it holds shard_tokens.

    `shards`: entries of full shards already on disk (a resumed write continues after them).
    """

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int,
                 shards: list[dict[str, Any]] | None = None):
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = list(shards or [])
        self._file, self._filled = None, 0

    def _path(self) -> Path:
        return self.root / self.split / f"{len(self.shards):05d}.bin"

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None:
                self._file, self._filled = open(self._path().with_suffix(".bin.tmp"), "wb"), 0
            take = min(len(tokens), self.shard_tokens - self._filled)
            tokens[:take].tofile(self._file)
            self._filled, tokens = self._filled + take, tokens[take:]
            if self._filled == self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        path = self._path()
        os.replace(path.with_suffix(".bin.tmp"), path)
        self.shards.append({"file": f"{self.split}/{path.name}", "tokens": self._filled})
        self._file = None

    def close(self) -> None:
        if self._file is not None:
            self._finish()


# ---------------------------------------------------------------------------- writing windows of streams (data mix)


class TokenFiles:
    """Token files read as one stream (each memory-mapped when first read): `copy_runs` gathers runs of it
    (documents) in one call. `files`: (path, tokens) in stream order."""

    def __init__(self, files: list[tuple[str, int]], dtype: np.dtype | str):
        self.dtype = np.dtype(dtype)
        self._files = [f for f, _ in files]
        self._bounds = np.cumsum([0] + [n for _, n in files])  # (files + 1,) stream offset of each
        self._maps: dict[int, np.memmap] = {}

    def _map(self, i: int) -> np.memmap:
        if i not in self._maps:
            if len(self._maps) >= 64:  # bounded: each map holds a file descriptor
                self._maps.pop(next(iter(self._maps)))
            self._maps[i] = np.memmap(self._files[i], dtype=self.dtype, mode="r")
        return self._maps[i]

    def copy_runs(self, begin: np.ndarray, count: np.ndarray, out: np.ndarray, at: np.ndarray) -> None:
        """out[at[k]:at[k] + count[k]] = stream[begin[k]:begin[k] + count[k]] for every k: one memcpy per
        run with the compiled kernel (tokenizer/native.py), else an index per token. A run crossing
        from one file into the next is cut in pieces, one per file."""
        first = np.searchsorted(self._bounds, begin, side="right") - 1  # (runs,) the file of each run's start
        last = np.searchsorted(self._bounds, begin + np.maximum(count, 1) - 1, side="right") - 1
        pieces = last - first + 1  # (runs,) files each run spans: 1 but where a document straddles files
        if (pieces > 1).any():
            run = np.repeat(np.arange(len(begin)), pieces)  # (pieces,) the run of each piece
            file = ragged_arange(first, pieces)
            lo = np.maximum(begin[run], self._bounds[file])
            hi = np.minimum(begin[run] + count[run], self._bounds[file + 1])
            begin, count, at, first = lo, hi - lo, at[run] + (lo - begin[run]), file
        lib = native.library()
        for i in np.unique(first).tolist():
            mine = first == i
            src, start = self._map(i), begin[mine] - self._bounds[i]
            if lib is not None:
                native.copy_runs(lib, src, start, count[mine], out, at[mine])
            else:
                out[ragged_arange(at[mine], count[mine])] = src[ragged_arange(start, count[mine])]


class Window(NamedTuple):
    """A window of the output stream to write (data mix): runs `count` tokens long from `begin` in the
    streams `source` (indices into write_window's streams), in order, written from output offset `at` on."""

    source: np.ndarray
    begin: np.ndarray
    count: np.ndarray
    at: int


_WRITING = threading.local()  # per thread of a process that writes windows: its streams' maps and its buffer


def write_window(key: str, streams: list[list[tuple[str, int]]], dtype: str, window: Window, folder: str,
                 shard_tokens: int, drop_cache: bool) -> int:
    """Gather `window`'s runs of `streams` (each a list of (file, tokens)) and write them at their offset
    of the shard files (pwrite: windows are written in any order, by any process, at disjoint offsets; the
    caller renames a shard once every window in it is written). Runs in prepare's workers (pool_executor).
    `key` names the write: the streams' maps are reused for the same key, made anew for another one (a
    source cache rebuilt in place between two mixes is read anew). Returns the tokens.

    `drop_cache`: for output this run never reads back. Each window's range is dropped from the page
    cache (posix_fadvise DONTNEED) once written back, so the next windows are written into the pages
    just freed instead of growing the cache over the whole output. On VMs whose hypervisor reclaims free
    guest memory (free page reporting), a page not recently used costs a fault in the host when touched
    again: writing 256 MB into new page cache took 1.2-1.7 s of system time on the 2-vCPU Zen 4 VM of
    docs/data.md, and 0.15 s with a 32 MiB pool recycled. Neither the bytes nor the completion change."""
    state = _WRITING
    if getattr(state, "key", None) != key:
        state.key, state.streams = key, [TokenFiles(files, dtype) for files in streams]
    tokens, dtype = state.streams, np.dtype(dtype)
    n = int(window.count.sum())
    buffer = getattr(state, "buffer", np.empty(0, np.uint8))
    if len(buffer) < n * dtype.itemsize:  # one buffer, reused window after window (its pages stay)
        buffer = state.buffer = np.empty(max(n * dtype.itemsize, 2 * len(buffer)), np.uint8)
    out = buffer[:n * dtype.itemsize].view(dtype)
    at = np.cumsum(window.count) - window.count  # (runs,) where each run's tokens go in out
    for s in np.unique(window.source).tolist():
        mine = window.source == s
        tokens[s].copy_runs(window.begin[mine], window.count[mine], out, at[mine])
    drop = drop_cache and hasattr(os, "posix_fadvise")
    written, done = [], 0
    while done < n:  # the window cut at shard boundaries
        shard, offset = divmod(window.at + done, shard_tokens)
        take = min(n - done, shard_tokens - offset)
        path = str(Path(folder) / f"{shard:05d}.bin.tmp")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
        try:
            _pwrite_all(fd, memoryview(out[done:done + take]).cast("B"), offset * dtype.itemsize)
            if drop:  # starts the range's writeback, without waiting for it (DONTNEED writes dirty pages back)
                os.posix_fadvise(fd, offset * dtype.itemsize, take * dtype.itemsize, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        written.append((path, offset * dtype.itemsize, take * dtype.itemsize))
        done += take
    if drop:
        # The ranges of this thread's previous window, written back by now: dropped, so that the next
        # windows' writes reuse their pages. Waiting for each window's
        # writeback here (fdatasync) kept the workers idle for 0.49 of a 1 GiB mix's 0.73 s of writing.
        for path, offset, size in getattr(state, "written", []):
            with contextlib.suppress(FileNotFoundError):  # its shard sealed and renamed meanwhile
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                try:
                    os.posix_fadvise(fd, offset, size, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        state.written = written
    return n


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        if hasattr(os, "pwrite"):
            k = os.pwrite(fd, data, offset)
        else:  # Windows: this descriptor's own position, so other processes' writes do not move it
            os.lseek(fd, offset, os.SEEK_SET)
            k = os.write(fd, data)
        data, offset = data[k:], offset + k


class _Inline:
    """An executor that runs each task as it is submitted (one worker: no thread or process to wait on)."""

    def submit(self, fn, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # given back by result(), as an executor's future does
            future.set_exception(e)
        return future


@contextlib.contextmanager
def pool_executor(workers: int | None, tokenizer: str | os.PathLike) -> Iterator[Any]:
    """prepare's encoding processes for other work of the same run (the shared pool when it is free, so
    no process is spawned again): `data mix` writes its shards with them. One worker: tasks run inline."""
    workers = default_workers() if workers is None else workers
    if workers == 1:
        yield _Inline()
        return
    with _held_pool(workers, tokenizer) as pool:
        yield pool.executor


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare(inputs: list[str], tokenizer, output_dir: str | os.PathLike, val_fraction: float = 0.005,
            shard_tokens: int = 2**27, seed: int = 0, workers: int | None = None, overwrite: bool = False,
            batch_chars: int = 1 << 22, document_lengths: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Tokenise documents into packed shards under `output_dir`; return the manifest.

    `tokenizer` is a tokenizer file's path (SentencePiece .model, Llama 3's tiktoken
    tokenizer.model, tokenizer.json) or any object with encode_batch, bos_id, eos_id
    and vocab_size (picklable when workers > 1). Documents go to the encoder in batches of about
    `batch_chars` characters (4 MiB: a batch's fixed costs, such as the workers' sharing of new chunks,
    took ~1 ms of each 1 MiB batch's ~9; docs/data.md). `document_lengths`, when given a dict, receives
    each split's document lengths in tokens, in shard order (int64 arrays; `data mix` indexes its source
    caches by them).
    """
    workers = default_workers() if workers is None else workers
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}; e.g. 0.005 holds out 0.5%")
    if shard_tokens < 1 or workers < 1:
        raise ValueError(f"shard_tokens and workers must be positive, got {shard_tokens} and {workers}")
    tok = load_tokenizer(tokenizer)
    is_path = isinstance(tokenizer, (str, os.PathLike))
    if workers > 1 and not is_path:
        try:
            pickle.dumps(tok)
        except Exception as e:
            raise ValueError(f"the tokenizer object cannot be sent to worker processes ({e}); "
                             "pass its .model path or workers=1") from None
    vocab_size = int(tok.vocab_size)
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    if vocab_size > 2**32:
        raise ValueError(f"vocab_size {vocab_size} does not fit uint32 shards; use a smaller vocabulary")

    out = Path(output_dir)
    if (out / "manifest.json").exists():
        if not overwrite:
            raise ValueError(f"{out} already exists as a prepared dataset (it has a manifest.json); "
                             "pass overwrite=True (--overwrite) to replace it, or choose another output")
        (out / "manifest.json").unlink()  # first: while rewriting, the directory reads as incomplete
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
        for stale in itertools.chain((out / split).glob("*.bin"), (out / split).glob("*.bin.tmp")):
            stale.unlink()  # only our own files: leftovers of an earlier or interrupted run

    start = time.perf_counter()
    stats = {"files": 0, "skipped_files": 0, "empty_documents": 0}
    writers = {s: ShardWriter(out, s, dtype, shard_tokens) for s in SPLITS}
    counts = {s: {"documents": 0, "tokens": 0} for s in SPLITS}
    sources: dict[str, dict[str, int]] = {}
    doc_lengths: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    # Local uncompressed JSONL goes to the workers as spans of lines they read themselves.
    batches = _batches(_records(inputs, stats, span_bytes=batch_chars), batch_chars)
    # Each batch's tokens come back through a result slot with room for a token per 2 characters (LLaMA's
    # tokenizer: ~0.25-0.3 on text and code); a denser batch's come through the pipe.
    encoded = _encoded(batches, tok, tokenizer if is_path else tok, workers, seed, val_fraction, dtype, vocab_size,
                       slot_bytes=batch_chars * dtype.itemsize // 2)
    with contextlib.closing(encoded):  # on any failure, shut the worker pool down at once
        for meta, val, empty, lengths, train, held in encoded:
            stats["empty_documents"] += empty
            writers["val"].write(held)
            writers["train"].write(train)
            # Counted with numpy per split and per source (a batch is mostly one source), not per document.
            for split, mine in (("train", ~val), ("val", val)):
                counts[split]["documents"] += int(mine.sum())
                counts[split]["tokens"] += int(lengths[mine].sum())
                if document_lengths is not None:
                    doc_lengths[split].append(lengths[mine].astype(np.int64, copy=False))
            names, which = meta
            for k, source in enumerate(names):
                mine = which == k
                c = sources.setdefault(source, {"documents": 0, "tokens": 0})
                c["documents"] += int(mine.sum())
                c["tokens"] += int(lengths[mine].sum())
    for w in writers.values():
        w.close()
    if document_lengths is not None:
        document_lengths.update({s: np.concatenate([np.zeros(0, np.int64), *parts])
                                 for s, parts in doc_lengths.items()})
    if stats["files"] == 0:
        raise ValueError(f"no input files found in {inputs}; {_HELP_INPUTS}")
    if not sources:
        raise ValueError(f"no documents found in {inputs} ({stats['skipped_files']} binary or non-UTF-8 "
                         f"files skipped, {stats['empty_documents']} empty documents); {_HELP_INPUTS}")

    tok_path = Path(tokenizer) if is_path else getattr(tok, "path", None)
    tok_path = Path(tok_path).resolve() if tok_path else None  # absolute: read later from anywhere
    manifest = {
        "format": FORMAT,
        "documents": sum(c["documents"] for c in counts.values()),
        "tokens": sum(c["tokens"] for c in counts.values()),
        "splits": {s: {**counts[s], "shards": writers[s].shards} for s in SPLITS},
        "sources": dict(sorted(sources.items())),
        "dtype": dtype.name, "vocab_size": vocab_size, "bos_id": int(tok.bos_id), "eos_id": int(tok.eos_id),
        "tokenizer": {"path": str(tok_path) if tok_path else None,
                      "sha256": sha256_file(tok_path) if tok_path and tok_path.is_file() else None},
        "val_fraction": val_fraction, "seed": seed, "shard_tokens": shard_tokens,
        "skipped_files": stats["skipped_files"], "empty_documents": stats["empty_documents"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "llamaworks_version": __version__,
        "seconds": round(time.perf_counter() - start, 3),
    }
    atomic_write_json(out / "manifest.json", manifest)  # last: its presence marks the directory complete
    return manifest


def open_token_dataset(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Check that `data_dir` is a complete prepared directory; return its manifest."""
    root, fix = Path(data_dir), f"run `llamaworks prepare --input ... --output {data_dir} --overwrite`"
    if not root.is_dir():
        raise FileNotFoundError(f"token dataset {str(data_dir)!r} does not exist; {fix}")
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(f"{root} has no manifest.json: `prepare` did not finish there, or it is not "
                                f"a prepared directory; {fix}")
    manifest = json.loads((root / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{root}/manifest.json has format {manifest.get('format')!r}, not {FORMAT!r}; {fix}")
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            path = root / shard["file"]
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} listed in the manifest is missing; {fix}")
            if path.stat().st_size != shard["tokens"] * itemsize:
                raise ValueError(f"shard {path} has {path.stat().st_size} bytes, expected "
                                 f"{shard['tokens']} {manifest['dtype']} tokens; it is corrupt; {fix}")
    return manifest


# ---------------------------------------------------------------------------- loading batches


def _mix64(x: np.ndarray) -> np.ndarray:
    # splitmix64's finaliser; uint64 array arithmetic wraps modulo 2**64, which is intended.
    x = (x ^ (x >> 30)) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> 27)) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> 31)


def window_order(positions: np.ndarray, num_windows: int, seed: int, epoch: int) -> np.ndarray:
    """The window at each position of the (seed, epoch) shuffle: a bijection on [0, num_windows).

    Computed on the fly by a 6-round Feistel network over the smallest even-bit domain that holds
    num_windows, cycle-walking values that land outside (under 4 steps on average): O(1) memory,
    where a stored permutation costs 8 bytes per window (1.4T tokens / 2048 = 680M windows = 5.4 GB).
    """
    half = max(1, -(-(num_windows - 1).bit_length() // 2))
    mask = np.uint64((1 << half) - 1)
    digest = hashlib.blake2b(f"{seed}:{epoch}".encode(), digest_size=48).digest()
    keys = np.frombuffer(digest, dtype="<u8")

    def permute(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for key in keys:
            left, right = right, left ^ (_mix64(right ^ key) & mask)
        return (left << np.uint64(half)) | right

    out = permute(np.asarray(positions, dtype=np.uint64))
    while (outside := out >= num_windows).any():
        out[outside] = permute(out[outside])
    return out.astype(np.int64)


class TokenStream:
    """Random access to a prepared split as one token stream across its shard files (memory-mapped)."""

    def __init__(self, data_dir: str | os.PathLike, manifest: dict[str, Any], split: str):
        shards = manifest["splits"][split]["shards"]
        self.dtype = np.dtype(manifest["dtype"])
        self._files = [Path(data_dir) / s["file"] for s in shards]
        self._starts = [0, *itertools.accumulate(s["tokens"] for s in shards)]  # stream offset per shard
        self._maps: dict[int, np.memmap] = {}
        self.tokens = self._starts[-1]

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) of the stream as int64."""
        assert 0 <= start and start + count <= self.tokens, (start, count, self.tokens)
        out, filled = np.empty(count, dtype=np.int64), 0
        i = bisect.bisect_right(self._starts, start) - 1
        while filled < count:  # a window (or document) may straddle shards
            if i not in self._maps:
                if len(self._maps) >= 64:  # bounded: each map holds a file descriptor
                    self._maps.pop(next(iter(self._maps)))
                self._maps[i] = np.memmap(self._files[i], dtype=self.dtype, mode="r")
            offset = start + filled - self._starts[i]
            take = min(count - filled, self._starts[i + 1] - self._starts[i] - offset)
            out[filled : filled + take] = self._maps[i][offset : offset + take]
            filled, i = filled + take, i + 1
        return out


def prepare_command(
    input: Annotated[list[str], Arg("folders of text files, .txt or .jsonl[.gz|.zst] files", metavar="PATH")],
    tokenizer: Annotated[str, Arg("SentencePiece .model file", metavar="FILE")],
    output: Annotated[str, Arg("directory for train/, val/ and manifest.json", metavar="DIR")],
    val_fraction: Annotated[float, Arg("fraction of documents held out for validation")] = 0.005,
    shard_tokens: Annotated[int, Arg("tokens per shard file")] = 2**27,
    workers: Annotated[int | None, Arg("encoding processes (default: min(4, CPU count))")] = None,
    seed: Annotated[int, Arg("seed of the train/val split")] = 0,
    overwrite: Annotated[bool, Arg("replace an existing prepared directory")] = False,
) -> int:
    """Tokenise documents into packed `<s> text </s>` token shards for pretraining."""
    m = prepare(input, tokenizer, output, val_fraction=val_fraction, shard_tokens=shard_tokens, seed=seed,
                workers=workers, overwrite=overwrite)
    print(f"prepared {m['documents']:,} documents, {m['tokens']:,} {m['dtype']} tokens in "
          f"{m['seconds']:.1f} s ({m['tokens'] / max(m['seconds'], 1e-9):,.0f} tokens/s) -> {output}")
    for name, s in m["splits"].items():
        print(f"  {name:<5} {s['documents']:>12,} documents {s['tokens']:>16,} tokens "
              f"{len(s['shards']):>6} shards")
    for name, s in m["sources"].items():
        print(f"  source {name}: {s['documents']:,} documents, {s['tokens']:,} tokens")
    if m["skipped_files"] or m["empty_documents"]:
        print(f"  skipped {m['skipped_files']} binary or non-UTF-8 files and "
              f"{m['empty_documents']} empty documents")
    return 0
