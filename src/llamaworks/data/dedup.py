"""Cross-document deduplication steps (they hold state across the whole run: global_state).

- `ExactDedup`: drop documents whose text hashes equal an earlier one's (GitHub, section 2.1:
  "deduplicate files by exact match").
- `LineDedup`: CCNet's line-level dedup (Wenzek et al. 2020, section 3.1): hash each line after
  normalisation (lowercase, digits -> 0, punctuation and accents stripped) and remove lines
  already seen in the shard group; keep the first occurrence.
- `MinHashDedup`: book-level near-duplicate removal (section 2.1: "removing books with more
  than 90% content overlap"), MinHash over word n-gram shingles with LSH banding.

State is in memory (8-byte digests; 4 bytes x num_perm per book); see the report for the
on-disk variant left to do for corpora beyond one machine's memory.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import defaultdict

import numpy as np

from llamaworks.data.step import Dropped, LinesRemoved, Step


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=8).digest()


class ExactDedup(Step):
    name = "exact_dedup"
    global_state = True

    def __init__(self):
        self.seen: set[bytes] = set()

    def run(self, docs, rank=0, world_size=1):
        for doc in docs:
            h = _digest(doc.text)
            if h in self.seen:
                yield Dropped(doc, "exact duplicate of an earlier document")
            else:
                self.seen.add(h)
                yield doc

    def describe(self):
        return "drop documents whose content hash (blake2b-64) equals an earlier document's"


_DIGITS = re.compile(r"\d")


def normalize_line(line: str) -> str:
    # CCNet text_normalizer.normalize: lowercase, strip accents, digits -> 0, drop punctuation.
    line = unicodedata.normalize("NFD", line.strip().lower())
    line = "".join(c for c in line if unicodedata.category(c)[0] not in ("P", "M"))
    line = _DIGITS.sub("0", line)
    return " ".join(line.split())


class LineDedup(Step):
    name = "line_dedup"
    global_state = True

    def __init__(self):
        self.seen: set[bytes] = set()

    def run(self, docs, rank=0, world_size=1):
        for doc in docs:
            kept, removed = [], 0
            removed_chars = 0
            for line in doc.text.split("\n"):
                norm = normalize_line(line)
                if not norm:  # blank or punctuation-only lines are layout, not content
                    kept.append(line)
                    continue
                h = _digest(norm)
                if h in self.seen:
                    removed += 1
                    removed_chars += len(line) + 1
                else:
                    self.seen.add(h)
                    kept.append(line)
            if removed:
                yield LinesRemoved("line seen earlier in the shard group (CCNet)", removed, removed_chars)
            text = "\n".join(kept)
            if not normalize_line(text):
                yield Dropped(doc, "no lines left after line dedup")
                continue
            doc.text = text
            yield doc

    def describe(self):
        return "CCNet line dedup: remove lines whose normalised hash was already seen (first kept)"


_WORD = re.compile(r"\w+")
_PRIME = np.uint64(4294967291)  # largest prime below 2^32: (a*h + b) stays below 2^64 in uint64


def shingles(text: str, n: int) -> np.ndarray:
    """32-bit hashes of the word n-grams of `text` (lowercased words: line wrapping, punctuation and
    case do not change a book's shingles)."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        words = words + [""] * (n - len(words)) if words else []
    grams = {" ".join(words[i:i + n]) for i in range(max(0, len(words) - n + 1))}
    return np.fromiter((int.from_bytes(hashlib.blake2b(g.encode(), digest_size=4).digest(), "little")
                        for g in grams), dtype=np.uint64, count=len(grams))


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


class MinHashDedup(Step):
    name = "minhash_dedup"
    global_state = True

    def __init__(self, threshold: float = 0.9, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        # 0.9: the paper's "more than 90% content overlap" (section 2.1), as Jaccard similarity of
        # the books' word 5-gram sets (5: as in datatrove / RedPajama's book dedup).
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}; the paper uses 0.9")
        if num_perm < 2 or ngram < 1:
            raise ValueError(f"num_perm must be >= 2 and ngram >= 1, got {num_perm} and {ngram}")
        self.threshold, self.num_perm, self.ngram = threshold, num_perm, ngram
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, int(_PRIME), size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, int(_PRIME), size=num_perm, dtype=np.uint64)
        self.bands, self.rows = _lsh_params(threshold, num_perm)
        self.buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(self.bands)]
        self.signatures: list[np.ndarray] = []
        self.ids: list[str] = []

    def signature(self, text: str) -> np.ndarray | None:
        h = shingles(text, self.ngram)
        if h.size == 0:
            return None
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        for chunk in range(0, h.size, 8192):  # bounded temporaries for long books
            part = h[chunk:chunk + 8192]
            sig = np.minimum(sig, ((np.outer(part, self.a) + self.b) % _PRIME).min(axis=0))
        return sig.astype(np.uint32)

    def run(self, docs, rank=0, world_size=1):
        for doc in docs:
            sig = self.signature(doc.text)
            if sig is None:
                yield doc  # too short to shingle: nothing to compare
                continue
            keys = [sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]
            match = None
            for band, key in enumerate(keys):
                for j in self.buckets[band].get(key, ()):
                    if float(np.mean(self.signatures[j] == sig)) >= self.threshold:
                        match = j
                        break
                if match is not None:
                    break
            if match is not None:
                doc.metadata = {**doc.metadata, "duplicate_of": self.ids[match]}
                yield Dropped(doc, f"near-duplicate (MinHash Jaccard >= {self.threshold}) of an earlier document")
                continue
            idx = len(self.signatures)
            self.signatures.append(sig)
            self.ids.append(doc.id)
            for band, key in enumerate(keys):
                self.buckets[band][key].append(idx)
            yield doc

    def describe(self):
        return (f"MinHash LSH near-dedup: drop a document whose word {self.ngram}-gram Jaccard with an earlier one "
                f"is >= {self.threshold} ({self.num_perm} permutations, {self.bands} bands x {self.rows} rows)")
