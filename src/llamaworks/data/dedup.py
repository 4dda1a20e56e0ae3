"""Cross-document deduplication steps (they hold state across the whole run: global_state).

- `ExactDedup`: drop documents whose text hashes equal an earlier one's (GitHub, section 2.1:
  "deduplicate files by exact match").
- `LineDedup`: CCNet's line-level dedup (Wenzek et al. 2020, section 3.1): hash each line after
  normalisation (lowercase, digits -> 0, punctuation and accents stripped) and remove lines
  already seen in the shard group; keep the first occurrence.
- `MinHashDedup`: book-level near-duplicate removal (section 2.1: "removing books with more
  than 90% content overlap"), MinHash over word n-gram shingles with LSH banding.

State (8-byte line/document hashes; the MinHash signatures and LSH band buckets) is kept
in memory up to the budget the executor gives (`Step.configure_state`), then moved to an
SQLite file on disk, whose page cache is bounded by the same budget: a corpus larger than
memory dedups with bounded memory and the same result (the same lookups in the same order).
SQLite rather than hand-made hash-partitioned files: it is in the standard library, its
B-tree lookups cost O(log n) page reads with no rehashing, and batched `IN (...)` queries
keep the Python overhead per document, not per line.

A dedup step keeps exactly the documents (lines) it would add to its state, so its state
after its own output equals its state after its input: `restore` replays the kept
documents of finished shards, and a killed global stage resumes shard by shard.
"""

from __future__ import annotations

import base64
import hashlib
import re
import sqlite3
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from llamaworks.data.step import Dropped, LinesRemoved, Step
from llamaworks.tokenizer import native

_SQL_VARS = 500  # bound parameters per query (SQLite's limit is 999 in old builds)


def content_hash(text: str) -> int:
    # Signed: SQLite integers are signed 64-bit.
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=8).digest(),
                          "little", signed=True)


def _open_db(path: Path | None, memory_bytes: int | None) -> tuple[sqlite3.Connection, tempfile.TemporaryDirectory
                                                                   | None]:
    tmp = None
    if path is None:  # no directory from the executor (a step run by hand): a private temporary one
        tmp = tempfile.TemporaryDirectory(prefix="llamaworks-dedup-")
        path = Path(tmp.name) / "state.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    # The file is scratch state, rebuilt from the outputs after a crash (`restore`): no journal, no fsync.
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute(f"PRAGMA cache_size=-{max(64, (memory_bytes or 0) // 1024)}")  # negative: KiB
    db.execute("PRAGMA temp_store=FILE")
    db.execute("BEGIN")
    return db, tmp


class _Spilling:
    """Memory until `entries * entry_bytes` exceeds the budget, then an SQLite file at `path`."""

    entry_bytes = 1

    def __init__(self, path: Path | None = None, memory_bytes: int | None = None):
        self.path, self.memory_bytes = path, memory_bytes
        self.db: sqlite3.Connection | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._pending = 0

    @property
    def on_disk(self) -> bool:
        return self.db is not None

    def _over_budget(self, entries: int) -> bool:
        return self.memory_bytes is not None and entries * self.entry_bytes > self.memory_bytes

    def _spill(self) -> None:
        self.db, self._tmp = _open_db(self.path, self.memory_bytes)
        self._create()

    def _wrote(self, rows: int) -> None:
        self._pending += rows
        if self._pending > 200_000:  # commit now and then: dirty pages go to the file, not the heap
            self.db.execute("COMMIT")
            self.db.execute("BEGIN")
            self._pending = 0

    def _create(self) -> None:
        raise NotImplementedError

    def __getstate__(self):  # steps are pickled into workers before they run: never with an open file
        assert self.db is None, "a dedup store on disk cannot be copied"
        return self.__dict__

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class HashSet(_Spilling):
    """A set of signed 64-bit hashes."""

    entry_bytes = 72  # a Python int (32 B) plus its set slot at ~2/3 load (measured: tracemalloc ~70 B)

    def __init__(self, path: Path | None = None, memory_bytes: int | None = None):
        super().__init__(path, memory_bytes)
        self.mem: set[int] | None = set()
        if self._over_budget(1):
            self._spill()

    def _create(self) -> None:
        self.db.execute("CREATE TABLE h (k INTEGER PRIMARY KEY)")
        mem, self.mem = self.mem, None
        self.db.executemany("INSERT INTO h VALUES (?)", ((k,) for k in mem))

    def add_new(self, keys: Sequence[int]) -> list[bool]:
        """For each key, in order: True if it was not in the set (it is now), else False."""
        if self.mem is not None:
            mem, out = self.mem, []
            for k in keys:
                new = k not in mem
                if new:
                    mem.add(k)
                out.append(new)
            if self._over_budget(len(mem)):
                self._spill()
            return out
        seen: set[int] = set()
        uniq = list(set(keys))
        for c in range(0, len(uniq), _SQL_VARS):
            part = uniq[c:c + _SQL_VARS]
            seen.update(r[0] for r in self.db.execute(f"SELECT k FROM h WHERE k IN ({','.join('?' * len(part))})",
                                                      part))
        out, new = [], []
        for k in keys:
            if k in seen:
                out.append(False)
            else:
                seen.add(k)
                new.append((k,))
                out.append(True)
        self.db.executemany("INSERT INTO h VALUES (?)", new)
        self._wrote(len(new))
        return out

    def __len__(self) -> int:
        return len(self.mem) if self.mem is not None else self.db.execute("SELECT count(*) FROM h").fetchone()[0]


class LshIndex(_Spilling):
    """MinHash signatures, their documents' ids and the LSH band buckets, in insertion order."""

    def __init__(self, bands: int, rows: int, path: Path | None = None, memory_bytes: int | None = None):
        super().__init__(path, memory_bytes)
        # A signature (4 B x bands x rows + array header) and id, plus per band a key (4 B x rows +
        # bytes header), its dict slot and a one-element bucket list.
        self.entry_bytes = 4 * bands * rows + 200 + bands * (4 * rows + 150)
        self.bands = bands
        self.buckets: list[dict[bytes, list[int]]] | None = [{} for _ in range(bands)]
        self.sigs: list[np.ndarray] = []
        self.ids: list[str] = []
        self.size = 0
        if self._over_budget(1):
            self._spill()

    def _create(self) -> None:
        self.db.execute("CREATE TABLE sig (j INTEGER PRIMARY KEY, id TEXT, sig BLOB)")
        self.db.execute("CREATE TABLE band (key BLOB, j INTEGER)")  # key: band number (2 B) + band values
        self.db.execute("CREATE INDEX band_key ON band (key, j)")
        self.db.executemany("INSERT INTO sig VALUES (?, ?, ?)",
                            ((j, i, s.tobytes()) for j, (i, s) in enumerate(zip(self.ids, self.sigs))))
        self.db.executemany("INSERT INTO band VALUES (?, ?)", ((b.to_bytes(2, "little") + key, j)
                                                               for b, bucket in enumerate(self.buckets)
                                                               for key, js in bucket.items() for j in js))
        self.buckets, self.sigs, self.ids = None, [], []

    def candidates(self, keys: list[bytes]) -> Iterator[int]:
        """Earlier documents sharing a band with `keys`: band by band, each bucket in insertion order."""
        for b, key in enumerate(keys):
            if self.buckets is not None:
                yield from self.buckets[b].get(key, ())
            else:
                for (j,) in self.db.execute("SELECT j FROM band WHERE key = ? ORDER BY j",
                                            (b.to_bytes(2, "little") + key,)):
                    yield j

    def get(self, j: int) -> tuple[np.ndarray, str]:
        if self.buckets is not None:
            return self.sigs[j], self.ids[j]
        doc_id, blob = self.db.execute("SELECT id, sig FROM sig WHERE j = ?", (j,)).fetchone()
        return np.frombuffer(blob, dtype=np.uint32), doc_id

    def add(self, sig: np.ndarray, doc_id: str, keys: list[bytes]) -> None:
        j = self.size
        self.size += 1
        if self.buckets is not None:
            self.sigs.append(sig)
            self.ids.append(doc_id)
            for b, key in enumerate(keys):
                self.buckets[b].setdefault(key, []).append(j)
            if self._over_budget(self.size):
                self._spill()
            return
        self.db.execute("INSERT INTO sig VALUES (?, ?, ?)", (j, doc_id, sig.tobytes()))
        self.db.executemany("INSERT INTO band VALUES (?, ?)",
                            ((b.to_bytes(2, "little") + key, j) for b, key in enumerate(keys)))
        self._wrote(1 + len(keys))

    def __len__(self) -> int:
        return self.size


class _GlobalDedup(Step):
    global_state = True

    def restore(self, kept):
        for _ in self.run(kept):  # everything kept is new to the state (module docstring)
            pass
        return True


class _HashSetDedup(_GlobalDedup):
    """State: the set of digests seen so far (spilling to SQLite past the memory budget)."""

    def __init__(self):
        self.seen = HashSet()

    def configure_state(self, directory, memory_bytes):
        self.seen = HashSet(Path(directory) / "seen.sqlite", memory_bytes)


class ExactDedup(_HashSetDedup):
    name = "exact_dedup"

    def run(self, docs, rank=0, world_size=1):
        for doc in docs:
            if self.seen.add_new([content_hash(doc.text)])[0]:
                yield doc
            else:
                yield Dropped(doc, "exact duplicate of an earlier document")

    def describe(self):
        return "drop documents whose content hash (blake2b-64) equals an earlier document's"


_DIGITS = re.compile(r"\d")


class _DropMarks(dict):
    """str.translate table deleting punctuation (P*) and combining marks (M*): filled on first
    sight of each character, so translating is a C loop of dict lookups, not a Python one."""

    def __missing__(self, code: int) -> int | None:
        self[code] = None if unicodedata.category(chr(code))[0] in ("P", "M") else code
        return self[code]


_DROP_MARKS = _DropMarks()


def normalize_line(line: str) -> str:
    # CCNet text_normalizer.normalize: lowercase, strip accents, digits -> 0, drop punctuation.
    line = unicodedata.normalize("NFD", line.strip().lower()).translate(_DROP_MARKS)
    line = _DIGITS.sub("0", line)
    return " ".join(line.split())


def without_lines(doc, lines: list[str], gone: Iterable[bool]) -> Iterator:
    """LineDedup's events for one document split into `lines`, dropping those whose `gone` is true:
    LinesRemoved if any went, then the document with the rest, or Dropped when nothing but layout
    is left. Shared by LineDedup and its partitioned filter (data/dedup_partitioned.py)."""
    kept, removed, removed_chars = [], 0, 0
    for line, g in zip(lines, gone):
        if g:
            removed += 1
            removed_chars += len(line) + 1
        else:
            kept.append(line)
    if removed:
        yield LinesRemoved("line seen earlier in the shard group (CCNet)", removed, removed_chars)
    text = "\n".join(kept)
    if not normalize_line(text):
        yield Dropped(doc, "no lines left after line dedup")
        return
    doc.text = text
    yield doc


class LineDedup(_HashSetDedup):
    name = "line_dedup"

    def run(self, docs, rank=0, world_size=1):
        for doc in docs:
            lines = doc.text.split("\n")
            norms = [normalize_line(line) for line in lines]
            # Blank or punctuation-only lines are layout, not content: always kept, never hashed.
            new = iter(self.seen.add_new([content_hash(n) for n in norms if n]))
            yield from without_lines(doc, lines, (bool(n) and not next(new) for n in norms))

    def describe(self):
        return "CCNet line dedup: remove lines whose normalised hash was already seen (first kept)"


class _NonWordToSpace(dict):
    r"""str.translate table: a character `\w` does not match (not alphanumeric, not "_") -> " ".
    Filled on first sight of each character; translate + split gives re.findall(r"\w+")'s words
    (checked on every code point in the tests) at about half its cost."""

    def __missing__(self, code: int) -> int:
        ch = chr(code)
        self[code] = code if ch.isalnum() or ch == "_" else 32
        return self[code]


_NON_WORD_TO_SPACE = _NonWordToSpace()
# The same for ASCII text as a bytes.translate table (after bytes.lower(), as str.lower() on ASCII): one C
# pass over the bytes, where str.translate looks every character up in the dict above.
_ASCII_NON_WORD_TO_SPACE = bytes(b if b < 0x80 and (chr(b).isalnum() or b == 0x5F) else 0x20 for b in range(256))
_HASH_SEED = 0x5EED  # fixed: shingle hashes and permutations must be the same in every process and run


class _WordHashes(dict):
    """word -> 64-bit blake2b of its UTF-8, filled on first sight: a document's words become an
    array through one C-level map over this dict, not a hash call per word or per shingle."""

    limit = 1 << 20  # distinct words kept (~100 MB at most); a web corpus's long tail would grow it without end

    def __missing__(self, word: str | bytes) -> int:
        # A word of ASCII text comes as its bytes (_words): the same UTF-8, so the same hash as the str.
        data = word if isinstance(word, bytes) else word.encode("utf-8", errors="replace")
        h = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
        self[word] = h
        return h

    def array(self, words: list[str]) -> np.ndarray:
        if len(self) > self.limit:
            self.clear()
        return np.fromiter(map(self.__getitem__, words), dtype=np.uint64, count=len(words))


_WORD_HASHES = _WordHashes()


def _gram_multipliers(n: int) -> np.ndarray:
    return np.random.default_rng([_HASH_SEED, n]).integers(1, 2**63, size=n, dtype=np.uint64) | np.uint64(1)


def _mix32(g: np.ndarray) -> np.ndarray:
    # splitmix64's finaliser (every input bit reaches every output bit), top 32 bits: the shingle hash.
    g ^= g >> np.uint64(30)
    g *= np.uint64(0xBF58476D1CE4E5B9)
    g ^= g >> np.uint64(27)
    g *= np.uint64(0x94D049BB133111EB)
    g ^= g >> np.uint64(31)
    return g >> np.uint64(32)


def _words(text: str, n: int) -> list[str | bytes]:
    if text.isascii():  # O(1) for str; the words as bytes, several times faster (_ASCII_NON_WORD_TO_SPACE)
        words = text.encode("ascii").lower().translate(_ASCII_NON_WORD_TO_SPACE).split()
    else:
        words = text.lower().translate(_NON_WORD_TO_SPACE).split()  # re.findall(r"\w+", text.lower())
    if 0 < len(words) < n:  # a short text is one shingle of its words, padded
        words += [""] * (n - len(words))
    return words


def _word_hashes(texts: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every text's word hashes back to back (short texts padded to n words, `_words`), and per text its count."""
    words = [_words(t, n) for t in texts]
    counts = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    return _WORD_HASHES.array([x for ws in words for x in ws]), counts


def _batch_shingles(texts: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes (uint64) of every word n-gram of every text, in text order (repeats kept: the
    signature is a minimum), and per text the offset of its first shingle (len(texts) + 1 bounds)."""
    w, counts = _word_hashes(texts, n)
    grams = np.maximum(counts - (n - 1), 0)  # shingles per text
    bounds = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(grams, out=bounds[1:])
    if not bounds[-1]:
        return np.zeros(0, dtype=np.uint64), bounds
    # Start of every shingle in the flat word array: each text's word offset, then its shingles in turn.
    word_start = np.repeat(np.cumsum(counts) - counts, grams)
    start = word_start + (np.arange(bounds[-1]) - np.repeat(bounds[:-1], grams))
    mult = _gram_multipliers(n)
    g = w[start] * mult[0]
    for k in range(1, n):  # position-weighted sum: "a b" and "b a" differ
        g += w[start + k] * mult[k]
    return _mix32(g), bounds


def shingles(text: str, n: int) -> np.ndarray:
    """32-bit hashes (as uint64) of the distinct word n-grams of `text` (lowercased `\\w+` words:
    line wrapping, punctuation and case do not change a book's shingles)."""
    return np.unique(_batch_shingles([text], n)[0])


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Multiply-add-shift parameters (`minhash_signatures`): odd 64-bit a, any 64-bit b."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**64, size=num_perm, dtype=np.uint64) | np.uint64(1), \
        rng.integers(0, 2**64, size=num_perm, dtype=np.uint64)


def _lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    # As datasketch's MinHashLSH: the (bands, rows) minimising false positives + false negatives
    # of the S-curve 1 - (1 - s^r)^b around the threshold.
    integrate = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed trapz
    below, above = np.linspace(0.0, threshold, 200), np.linspace(threshold, 1.0, 200)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = float(integrate(1 - (1 - below ** r) ** b, below))  # pairs below the threshold that collide
            fn = float(integrate((1 - above ** r) ** b, above))  # pairs above it that never share a band
            if fp + fn < best_err:
                best, best_err = (b, r), fp + fn
    return best


SIGNATURE_KEY = "_minhash"  # doc.metadata key between MinHashSignatures and MinHashDedup


_BLOCK = 8192  # shingles per product block: (num_perm, 8192) uint64, 8 MiB at 128 permutations


def minhash_signatures(texts: Sequence[str], a: np.ndarray, b: np.ndarray, ngram: int) -> list[np.ndarray | None]:
    """Per text, (num_perm,) uint32: per permutation h -> ((a h + b) mod 2^64) >> 32 (multiply-add-
    shift, a universal family on 32-bit keys, no division), the minimum over the text's shingles;
    None for a text without words. All texts' shingles go through the products together, in
    blocks, each block's rows reduced per text (np.minimum.reduceat): no Python per shingle, and
    a few numpy calls per block rather than per document. With the compiled text kernels
    (tokenizer/native.py) the shingles and minima are one pass in C++ over the word hashes, the same
    signatures bit for bit (tests/data/test_minhash.py)."""
    lib = native.library()
    if lib is not None:
        w, counts = _word_hashes(texts, ngram)
        sig = native.minhash(lib, w, counts, _gram_multipliers(ngram), a, b)
        return [sig[i] if counts[i] else None for i in range(len(texts))]  # a text with words has a shingle
    h, bounds = _batch_shingles(texts, ngram)
    sig = np.full((a.size, len(texts)), np.iinfo(np.uint64).max, dtype=np.uint64)
    owner = np.repeat(np.arange(len(texts)), np.diff(bounds))  # the text of every shingle
    b_col = b[:, None]
    for c in range(0, h.size, _BLOCK):
        # (num_perm, block): each permutation's row contiguous, so the per-text minima below are
        # runs along a row (reduceat along the last axis: ~10x faster than down the columns).
        x = np.multiply.outer(a, h[c:c + _BLOCK])  # wraps mod 2^64, as meant
        x += b_col
        own = owner[c:c + _BLOCK]
        first = np.flatnonzero(np.r_[True, own[1:] != own[:-1]])  # each text's first row in the block
        d = own[first]  # a text cut by the block edge is completed in the next block
        sig[:, d] = np.minimum(sig[:, d], np.minimum.reduceat(x, first, axis=1))
    # >> 32 after the minimum: the shift is monotone, so min(x) >> 32 == min(x >> 32).
    sig32 = np.ascontiguousarray((sig.T >> np.uint64(32)).astype(np.uint32))
    return [sig32[i] if bounds[i + 1] > bounds[i] else None for i in range(len(texts))]


def minhash_signature(text: str, a: np.ndarray, b: np.ndarray, ngram: int) -> np.ndarray | None:
    """One text's signature (`minhash_signatures`)."""
    return minhash_signatures([text], a, b, ngram)[0]


class MinHashSignatures(Step):
    """The parallel share of MinHashDedup: each document's signature, base64 in
    metadata["_minhash"] ("" when too short to shingle), which the dedup step takes out again."""

    name = "minhash_signatures"

    def __init__(self, a: np.ndarray, b: np.ndarray, ngram: int):
        self.a, self.b, self.ngram = a, b, ngram

    batch_chars = 1 << 20  # documents signed together (`minhash_signatures`): ~1 MB of text at a time

    def run(self, docs, rank=0, world_size=1):
        batch: list = []
        chars = 0
        for doc in docs:
            batch.append(doc)
            chars += len(doc.text)
            if chars >= self.batch_chars:
                yield from self._signed(batch)
                batch, chars = [], 0
        yield from self._signed(batch)

    def _signed(self, batch: list) -> Iterator:
        for doc, sig in zip(batch, minhash_signatures([d.text for d in batch], self.a, self.b, self.ngram)):
            encoded = "" if sig is None else base64.b64encode(sig.astype("<u4").tobytes()).decode("ascii")
            doc.metadata = {**doc.metadata, SIGNATURE_KEY: encoded}
            yield doc

    def describe(self):
        return f"MinHash signatures of word {self.ngram}-grams ({self.a.size} permutations), on every worker, " \
               "for the near-dedup that follows"


class MinHashDedup(_GlobalDedup):
    name = "minhash_dedup"

    def __init__(self, threshold: float = 0.9, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        # 0.9: the paper's "more than 90% content overlap" (section 2.1), as Jaccard similarity of
        # the books' word 5-gram sets (5: as in datatrove / RedPajama's book dedup).
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}; the paper uses 0.9")
        if num_perm < 2 or ngram < 1:
            raise ValueError(f"num_perm must be >= 2 and ngram >= 1, got {num_perm} and {ngram}")
        self.threshold, self.num_perm, self.ngram = threshold, num_perm, ngram
        self.a, self.b = _permutations(num_perm, seed)
        self.bands, self.rows = _lsh_params(threshold, num_perm)
        self.index = LshIndex(self.bands, self.rows)

    def configure_state(self, directory, memory_bytes):
        self.index = LshIndex(self.bands, self.rows, Path(directory) / "lsh.sqlite", memory_bytes)

    def parallel_part(self) -> Step:
        return MinHashSignatures(self.a, self.b, self.ngram)

    def take_signature(self, doc) -> np.ndarray | None:
        # Computed by MinHashSignatures on the workers of the stage before (the costly part:
        # shingling and num_perm hashes per shingle); computed here for documents that come
        # without one (a resumed stage's restore, or the step run on its own).
        if SIGNATURE_KEY not in doc.metadata:
            return minhash_signature(doc.text, self.a, self.b, self.ngram)
        meta = dict(doc.metadata)
        encoded = meta.pop(SIGNATURE_KEY)
        doc.metadata = meta
        if not encoded:
            return None
        sig = np.frombuffer(base64.b64decode(encoded), dtype="<u4")
        assert sig.size == self.num_perm, (sig.size, self.num_perm)
        return sig

    def run(self, docs, rank=0, world_size=1):
        index = self.index
        for doc in docs:
            sig = self.take_signature(doc)
            if sig is None:
                yield doc  # too short to shingle: nothing to compare
                continue
            keys = [sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]
            match = None
            for j in index.candidates(keys):
                other, other_id = index.get(j)
                if float(np.mean(other == sig)) >= self.threshold:
                    match = other_id
                    break
            if match is not None:
                doc.metadata = {**doc.metadata, "duplicate_of": match}
                yield Dropped(doc, f"near-duplicate (MinHash Jaccard >= {self.threshold}) of an earlier document")
                continue
            index.add(sig, doc.id, keys)
            yield doc

    def describe(self):
        return (f"MinHash LSH near-dedup: drop a document whose word {self.ngram}-gram Jaccard with an earlier one "
                f"is >= {self.threshold} ({self.num_perm} permutations, {self.bands} bands x {self.rows} rows)")
