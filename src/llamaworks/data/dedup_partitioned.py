"""The dedup steps split into datatrove's shape, so that the global work runs on every worker.

A global dedup step (data/dedup.py) streams every document of the run through one process.
Split, it runs as four phases; the executor runs each phase's tasks on its workers, writes
their files and keeps a completion marker per task (`executor.Executor._run_partitioned`):

1. index, one task per shard: the shard's records, hash-partitioned into P payloads
   (document hashes, line hashes, or MinHash band keys with their signatures);
2. reduce, one task per partition: all shards' records of that partition, in global order
   (shard, position): which of them go;
3. merge (MinHash only), one task: the greedy pass over the candidate pairs in global order;
4. filter, one task per shard: the step's own events (the same `Dropped` / `LinesRemoved`
   and reasons), from the decisions of the phases before.

The kept documents are those of the single-process step, byte for byte:

- exact and line dedup keep the first occurrence of each hash in global order, and every
  occurrence of a hash lands in the same partition, so each partition decides alone;
- MinHash: the single-process step drops a document when an earlier *kept* document shares
  a band key with it and their signatures agree on >= threshold of the permutations. That is
  a greedy pass in document order over the verified candidate pairs, not a union-find (in a
  chain A~B~C with A!~C it keeps A and C), so the reduce phase finds and verifies the pairs
  per partition and the merge phase walks them in order. Documents with identical signatures
  ("twins") have the same candidates: a later twin is always dropped, so within a bucket only
  the first of each twin class is paired with the others (no quadratic blow-up on exact copies).
  `duplicate_of` names the same earlier document as the single-process step (the first match
  in its band-then-insertion order).

Payloads are `.npy` bytes (structured arrays, no pickles). Memory per reduce task is one
partition's records: P sets the scale, not the corpus.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from llamaworks.data.dedup import (
    SIGNATURE_KEY,
    ExactDedup,
    LineDedup,
    MinHashDedup,
    content_hash,
    normalize_line,
    without_lines,
)
from llamaworks.data.document import Document
from llamaworks.data.step import Dropped, Step

_POS_BITS = 32  # global document index: shard << 32 | position in the shard


def _to_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _from_bytes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _split_by_partition(records: np.ndarray, part: np.ndarray, partitions: int) -> list[bytes]:
    order = np.argsort(part, kind="stable")  # records keep their global order within a partition
    bounds = np.searchsorted(part[order], np.arange(partitions + 1))
    return [_to_bytes(records[order[bounds[p]:bounds[p + 1]]]) for p in range(partitions)]


def _split_by_shard(doc: np.ndarray, values: np.ndarray, world: int) -> list[bytes]:
    shard = (doc >> np.uint64(_POS_BITS)).astype(np.int64)
    order = np.argsort(shard, kind="stable")
    bounds = np.searchsorted(shard[order], np.arange(world + 1))
    return [_to_bytes(values[order[bounds[i]:bounds[i + 1]]]) for i in range(world)]


class PartitionedDedup:
    """One dedup step as index / reduce / (merge) / filter; see the module docstring."""

    has_merge = False

    def __init__(self, partitions: int):
        assert partitions >= 1, partitions
        self.partitions = partitions

    def index(self, docs: Iterable[Document], shard: int) -> tuple[list[bytes], bytes | None]:
        """P payloads (one per partition) and an optional side payload kept for the merge."""
        raise NotImplementedError

    def reduce(self, partition: int, payloads: list[bytes], world: int) -> tuple[list[bytes], dict]:
        """The partition's payloads of every shard (shard order) -> one payload per shard, and stats."""
        raise NotImplementedError

    def merge(self, reduced: Callable[[int], list[bytes]], side: Callable[[int], bytes | None],
              world: int) -> Iterator[tuple[int, bytes, dict]]:
        """Only when has_merge: per shard, in order, (shard, decisions, stats so far)."""
        raise NotImplementedError

    def filter(self, decisions: list[bytes]) -> Step:
        """The step that applies the decisions to one shard (the same name, description and events)."""
        raise NotImplementedError


class _Applied(Step):
    """A filter step standing in for `step` (its name and description, so the stats match)."""

    def __init__(self, step: Step):
        self.name, self._describe = step.name, step.describe()

    def describe(self):
        return self._describe


# --- exact and line dedup: first occurrence of each hash in global order ---

_HASH = np.dtype([("h", "<i8"), ("doc", "<u8"), ("line", "<u4")])


def _first_occurrences(payloads: list[bytes], world: int) -> tuple[list[bytes], dict]:
    recs = np.concatenate([_from_bytes(b) for b in payloads]) if payloads else np.zeros(0, _HASH)
    order = np.lexsort((recs["line"], recs["doc"], recs["h"]))
    h = recs["h"][order]
    later = np.zeros(h.size, dtype=bool)
    later[1:] = h[1:] == h[:-1]  # not the first of its hash in (doc, line) order
    gone = recs[order][later]
    # Per shard: position << 32 | line of each removed record.
    pos_line = ((gone["doc"] & np.uint64(2**_POS_BITS - 1)) << np.uint64(32)) | gone["line"].astype(np.uint64)
    return _split_by_shard(gone["doc"], pos_line, world), \
        {"records": int(recs.size), "duplicates": int(later.sum())}


def _hash_partition(h: np.ndarray, partitions: int) -> np.ndarray:
    return (h.view(np.uint64) % np.uint64(partitions)).astype(np.int64)


class _HashPartitioned(PartitionedDedup):
    def __init__(self, partitions: int, step: Step):
        super().__init__(partitions)
        self.step = step

    def _records(self, docs: Iterable[Document], shard: int) -> Iterator[tuple[int, int, int]]:
        raise NotImplementedError

    def index(self, docs, shard):
        recs = np.fromiter(self._records(docs, shard), dtype=_HASH)
        return _split_by_partition(recs, _hash_partition(recs["h"], self.partitions), self.partitions), None

    def reduce(self, partition, payloads, world):
        return _first_occurrences(payloads, world)

    @staticmethod
    def _removed(decisions: list[bytes]) -> set[int]:
        return {int(x) for d in decisions for x in _from_bytes(d)}


class ExactPartitioned(_HashPartitioned):
    def _records(self, docs, shard):
        for pos, doc in enumerate(docs):
            yield content_hash(doc.text), shard << _POS_BITS | pos, 0

    def filter(self, decisions):
        return _ExactFilter(self.step, self._removed(decisions))


class _ExactFilter(_Applied):
    def __init__(self, step, removed: set[int]):
        super().__init__(step)
        self.removed = removed

    def run(self, docs, rank=0, world_size=1):
        for pos, doc in enumerate(docs):
            if pos << 32 in self.removed:
                yield Dropped(doc, "exact duplicate of an earlier document")
            else:
                yield doc


class LinePartitioned(_HashPartitioned):
    def _records(self, docs, shard):
        for pos, doc in enumerate(docs):
            g = shard << _POS_BITS | pos
            for i, line in enumerate(doc.text.split("\n")):
                norm = normalize_line(line)
                if norm:  # as LineDedup: blank or punctuation-only lines are never hashed
                    yield content_hash(norm), g, i

    def filter(self, decisions):
        return _LineFilter(self.step, self._removed(decisions))


class _LineFilter(_Applied):
    def __init__(self, step, removed: set[int]):
        super().__init__(step)
        self.removed = removed

    def run(self, docs, rank=0, world_size=1):
        # LineDedup.run's events, with "seen earlier" read from the decisions.
        for pos, doc in enumerate(docs):
            lines = doc.text.split("\n")
            yield from without_lines(doc, lines, ((pos << 32 | i) in self.removed for i in range(len(lines))))


# --- MinHash: candidate pairs per partition, the greedy pass in one merge ---

_EDGE = np.dtype([("a", "<u8"), ("b", "<u8"), ("band", "<u2"), ("twin", "u1")])
_DECISION = np.dtype([("pos", "<u4"), ("match", "<u8")])


class MinHashPartitioned(PartitionedDedup):
    has_merge = True

    def __init__(self, partitions: int, step: MinHashDedup):
        super().__init__(partitions)
        self.step = step
        self.num_perm, self.bands, self.rows = step.num_perm, step.bands, step.rows
        self.threshold = step.threshold
        self.record = np.dtype([("doc", "<u8"), ("band", "<u2"), ("sig", "<u4", (self.num_perm,))])
        # Per band, odd multipliers for a 64-bit hash of the band key (the partition only: equal
        # keys are compared byte for byte in the reduce).
        rng = np.random.default_rng(12345)
        self.mult = rng.integers(1, 2**63, size=(self.bands, self.rows), dtype=np.uint64) | np.uint64(1)

    def _band_partition(self, sigs: np.ndarray, band: int) -> np.ndarray:
        key = sigs[:, band * self.rows:(band + 1) * self.rows].astype(np.uint64)  # (n, rows)
        with np.errstate(over="ignore"):
            h = (key * self.mult[band]).sum(axis=1, dtype=np.uint64) + np.uint64(band) * np.uint64(0x9E3779B97F4A7C15)
            h ^= h >> np.uint64(29)
        return (h % np.uint64(self.partitions)).astype(np.int64)

    def index(self, docs, shard):
        ids, positions, sigs = [], [], []
        for pos, doc in enumerate(docs):
            ids.append(doc.id)
            sig = self.step.take_signature(doc)
            if sig is not None:
                positions.append(pos)
                sigs.append(sig)
        return self._index_arrays(ids, np.array(positions, dtype=np.uint32),
                                  np.array(sigs, dtype=np.uint32).reshape(len(sigs), self.num_perm), shard)

    # The signature stage before the index phase (executor: a stage of MinHashSignatures alone)
    # keeps only this per shard instead of every document again with its signature: the
    # positions of the documents that have one, their signatures, and every document's id.
    # The filter phase then reads the stage's input again (datatrove's shape), so no document
    # is serialised between the stages.

    def pack_signatures(self, ids: list[str], encoded: list[str]) -> list[bytes]:
        """Segments of a signature file, from MinHashSignatures' metadata values ("": none)."""
        positions = np.array([i for i, e in enumerate(encoded) if e], dtype=np.uint32)
        raw = b"".join(base64.b64decode(e) for e in encoded if e)
        sigs = np.frombuffer(raw, dtype="<u4").reshape(positions.size, self.num_perm)
        return [_to_bytes(positions), _to_bytes(sigs), json.dumps(ids, ensure_ascii=False).encode("utf-8")]

    def index_signatures(self, segments: list[bytes], shard: int) -> tuple[list[bytes], bytes]:
        """`index` from a signature file's segments (`pack_signatures`)."""
        positions, sigs, ids = _from_bytes(segments[0]), _from_bytes(segments[1]), segments[2]
        return self._index_arrays(json.loads(ids.decode("utf-8")), positions, sigs, shard)

    def _index_arrays(self, ids: list[str], positions: np.ndarray, sig_arr: np.ndarray,
                      shard: int) -> tuple[list[bytes], bytes]:
        doc_idx = np.uint64(shard) << np.uint64(_POS_BITS) | positions.astype(np.uint64)
        n = positions.size
        recs = np.zeros(n * self.bands, dtype=self.record)
        parts = np.zeros(n * self.bands, dtype=np.int64)
        for b in range(self.bands):  # record b*n + k: document k's band b
            sl = slice(b * n, (b + 1) * n)
            recs["doc"][sl], recs["band"][sl], recs["sig"][sl] = doc_idx, b, sig_arr
            parts[sl] = self._band_partition(sig_arr, b)
        side = json.dumps(ids, ensure_ascii=False).encode("utf-8")
        return _split_by_partition(recs, parts, self.partitions), side

    def _bucket_edges(self, docs: np.ndarray, sigs: np.ndarray, band: int) -> list[np.ndarray]:
        """Verified pairs within one bucket (documents sorted by index)."""
        view = np.ascontiguousarray(sigs).view(np.dtype((np.void, 4 * self.num_perm))).ravel()
        _, first, inverse = np.unique(view, return_index=True, return_inverse=True)
        out = []
        twin = np.flatnonzero(first[inverse] != np.arange(docs.size))  # a later copy of an earlier signature
        if twin.size:
            e = np.zeros(twin.size, dtype=_EDGE)
            e["a"], e["b"], e["band"], e["twin"] = docs[first[inverse[twin]]], docs[twin], band, 1
            out.append(e)
        reps = np.sort(first)  # the first document of each distinct signature, in document order
        rs = sigs[reps]
        for i in range(reps.size - 1):
            # As MinHashDedup.run: float(np.mean(other == sig)) >= threshold (count / num_perm, exact).
            sim = np.mean(rs[i + 1:] == rs[i], axis=1)
            hit = np.flatnonzero(sim >= self.threshold)
            if hit.size:
                e = np.zeros(hit.size, dtype=_EDGE)
                e["a"], e["b"], e["band"] = docs[reps[i]], docs[reps[i + 1 + hit]], band
                out.append(e)
        return out

    def reduce(self, partition, payloads, world):
        recs = np.concatenate([_from_bytes(b) for b in payloads]) if payloads else np.zeros(0, self.record)
        edges: list[np.ndarray] = []
        buckets = 0
        for b in np.unique(recs["band"]):
            sub = recs[recs["band"] == b]
            key = np.ascontiguousarray(sub["sig"][:, b * self.rows:(b + 1) * self.rows])
            _, inv, counts = np.unique(key.view(np.dtype((np.void, 4 * self.rows))).ravel(), return_inverse=True,
                                       return_counts=True)
            shared = counts[inv] > 1
            sub, inv = sub[shared], inv[shared]
            order = np.lexsort((sub["doc"], inv))
            sub, inv = sub[order], inv[order]
            starts = np.flatnonzero(np.r_[True, inv[1:] != inv[:-1]]) if inv.size else np.zeros(0, np.int64)
            for s, e in zip(starts, np.r_[starts[1:], inv.size].astype(np.int64)):
                buckets += 1
                edges += self._bucket_edges(sub["doc"][s:e], sub["sig"][s:e], int(b))
        e = _min_band(np.concatenate(edges) if edges else np.zeros(0, _EDGE))
        return _split_by_shard(e["b"], e, world), {"records": int(recs.size), "buckets_shared": buckets,
                                                   "pairs": int(e.size)}

    def merge(self, reduced, side, world):
        kept_doc: dict[int, bool] = {}  # documents met in a pair: kept or not
        nbrs: dict[int, list[tuple[int, int]]] = {}  # first-of-twins -> [(band, other)] over verified pairs
        parent: dict[int, int] = {}  # union-find, for the cluster count only
        ids: dict[int, list[str]] = {}
        stats = {"pairs": 0, "clusters": 0, "removed": 0}

        def find(x: int) -> int:
            root = x
            while parent.get(root, root) != root:
                root = parent[root]
            while x != root:
                parent[x], x = root, parent[x]
            return root

        def doc_id(g: int) -> str:
            shard = g >> _POS_BITS
            if shard not in ids:
                ids[shard] = json.loads(side(shard).decode("utf-8"))
            return ids[shard][g & (2**_POS_BITS - 1)]

        for shard in range(world):
            e = _min_band(np.concatenate([_from_bytes(b) for b in reduced(shard)]))
            e = e[np.lexsort((e["a"], e["b"]))]
            stats["pairs"] += int(e.size)
            decisions = []
            starts = np.flatnonzero(np.r_[True, e["b"][1:] != e["b"][:-1]]) if e.size else np.zeros(0, np.int64)
            for s, end in zip(starts, np.r_[starts[1:], e.size].astype(np.int64)):
                group = e[s:end]
                j = int(group["b"][0])
                for a in group["a"]:
                    ra, rj = find(int(a)), find(j)
                    if ra != rj:
                        parent[max(ra, rj)] = min(ra, rj)
                twins = group[group["twin"] == 1]
                if twins.size:  # a later copy: its first copy's kept neighbours before it, or the first copy
                    assert twins.size == 1 and group.size == 1, group
                    r = int(twins["a"][0])
                    options = [(band, k) for band, k in nbrs.get(r, ()) if k < j and kept_doc[k]]
                    if kept_doc.setdefault(r, True):
                        options.append((0, r))
                    kept_doc[j] = False
                else:
                    options = [(int(band), int(a)) for a, band in zip(group["a"], group["band"])
                               if kept_doc.setdefault(int(a), True)]
                    kept_doc[j] = not options
                    for a, band in zip(group["a"], group["band"]):
                        nbrs.setdefault(int(a), []).append((int(band), j))
                        nbrs.setdefault(j, []).append((int(band), int(a)))
                if not kept_doc[j]:
                    decisions.append((j & (2**_POS_BITS - 1), min(options)[1]))
            stats["removed"] += len(decisions)
            if shard == world - 1:  # connected groups of documents joined by verified pairs
                stats["clusters"] = len({find(x) for x in kept_doc})
            out = {str(pos): doc_id(match) for pos, match in decisions}
            yield shard, json.dumps(out, ensure_ascii=False).encode("utf-8"), dict(stats)

    def filter(self, decisions):
        (data,) = decisions
        return _MinHashFilter(self.step, {int(k): v for k, v in json.loads(data.decode("utf-8")).items()})


def _min_band(e: np.ndarray) -> np.ndarray:
    """One edge per (a, b): the lowest band it was found in (the single-process step meets the
    match in its first shared band)."""
    if not e.size:
        return e
    e = e[np.lexsort((e["band"], e["b"], e["a"]))]
    first = np.r_[True, (e["a"][1:] != e["a"][:-1]) | (e["b"][1:] != e["b"][:-1])]
    return e[first]


class _MinHashFilter(_Applied):
    def __init__(self, step: MinHashDedup, removed: dict[int, str]):
        super().__init__(step)
        self.removed, self.threshold = removed, step.threshold

    def run(self, docs, rank=0, world_size=1):
        for pos, doc in enumerate(docs):
            if SIGNATURE_KEY in doc.metadata:  # as MinHashDedup.take_signature
                meta = dict(doc.metadata)
                meta.pop(SIGNATURE_KEY)
                doc.metadata = meta
            match = self.removed.get(pos)
            if match is None:
                yield doc
                continue
            doc.metadata = {**doc.metadata, "duplicate_of": match}
            yield Dropped(doc, f"near-duplicate (MinHash Jaccard >= {self.threshold}) of an earlier document")


def partitioned(step: Step, partitions: int) -> PartitionedDedup | None:
    """The step split into phases, or None for a global step that has no split (it runs whole)."""
    if isinstance(step, MinHashDedup):
        return MinHashPartitioned(partitions, step)
    if isinstance(step, LineDedup):
        return LinePartitioned(partitions, step)
    if isinstance(step, ExactDedup):
        return ExactPartitioned(partitions, step)
    return None
