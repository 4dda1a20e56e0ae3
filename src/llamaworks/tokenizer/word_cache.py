"""Bulk encoding of many documents to flat token arrays, with a word cache in front of SentencePiece.

Tokenising a corpus (`prepare`, `data mix`) is the slow part of the data pipeline: SentencePiece's
BPE runs at about 4 MB/s per core. Natural text repeats its words (Zipf), and a LLaMA-style model
encodes each word on its own, so the corpus can be encoded from a cache of words:

- SentencePiece normalises a text to "▁" + text with every " " as "▁" (dummy prefix, identity
  normalisation, extra whitespace kept), then merges BPE pieces over the whole string;
- when no piece joins a character to a following "▁" (true of every LLaMA-style model: pieces
  are "▁▁", "▁the", "ing"; never "e▁"), no merge crosses the start of a "▁+[^▁]*" chunk, so the
  text's ids are the concatenation of its chunks' ids, each chunk encoded alone;
- a "▁" typed in the text and a " " normalise to the same "▁", so the text with every "▁" written
  as " " has the same ids: chunks are cut at runs of spaces, in UTF-8 bytes.

`FlatEncoder` cuts a batch of documents into chunks with numpy (one byte buffer, documents
separated by 0xFF, a byte UTF-8 never holds), looks the chunks up in a cache, encodes only the
unseen ones, with SentencePiece itself in one multi-threaded batch call, and assembles the
documents' ids with numpy gathers. SentencePiece stays the authority on every id; the cache only
avoids asking it twice. The lookup is exact, never a bare hash: a chunk key of up to 15 bytes is
held as its bytes and its length packed in two uint64 in an open-addressing table probed with
numpy, a longer one in a dict of its bytes. Models outside those conditions (another normaliser,
whitespace as suffix, a piece with an inner "▁" after a character), and every other tokenizer, go
through their own `encode_batch`. The conditions are read from the model file, and the first
batch is also checked against plain SentencePiece (a mismatch turns the cache off, with a warning).

Where the compiled text kernels are built (tokenizer/native.py), the cut, the packing, the probe
and the gather of the ids are each one C++ pass (`_compiled`) over the same buffer and the same
table; the numpy passes below remain the reference and the fallback. SentencePiece on new chunks
and the cache's bookkeeping of them stay here. Encoders of the same model in several processes
(`prepare`'s workers) can share the chunks each sent to SentencePiece (`take_new` / `put_new`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import re
import struct
from collections.abc import Sequence

import numpy as np

from llamaworks.tokenizer import native
from llamaworks.tokenizer.spm_proto import read_message

log = logging.getLogger(__name__)

SPACE = "\u2581"
_CROSSES = re.compile(f"[^{SPACE}]{SPACE}")  # a piece that joins a character to a following "▁"
# Before each document: 0xFF (never in UTF-8: the documents' boundary) and the dummy-prefix space.
_DOC = b"\xff "
_SHORT = 15  # keys of up to this many bytes are held packed in two uint64 (_packed); longer ones in a dict
_LOW_BYTES = np.array([(1 << (8 * k)) - 1 for k in range(9)], np.uint64)  # [k]: a mask of the low k bytes
_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0xBF58476D1CE4E5B9))
_NO_KEY = np.uint64(0xFF << 56)  # a packed hi whose length byte (255) no short key has
_INT64 = np.dtype(np.int64)


class IdOverflow(ValueError):
    """An id that the dtype `FlatEncoder.encode` was asked for cannot hold."""


def _fitted(ids: np.ndarray, lengths: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(ids as dtype, lengths); IdOverflow when an id is outside dtype's range."""
    if dtype != ids.dtype and len(ids):
        info = np.iinfo(dtype)
        if ids.min() < info.min or ids.max() > info.max:
            raise IdOverflow(f"token ids {int(ids.min())}..{int(ids.max())} do not fit {dtype.name}; "
                             "encode with a wider dtype")
    return ids.astype(dtype, copy=False), lengths


def _aligned_rows(n: int, dtype: np.dtype) -> np.ndarray:
    """(n,) zeroed rows of `dtype` (16 bytes) from a 64-byte boundary: no row across two cache lines."""
    raw = np.zeros(n * dtype.itemsize + 64, np.uint8)
    skip = -raw.ctypes.data % 64
    return raw[skip:skip + n * dtype.itemsize].view(dtype)


def ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """concatenate(arange(s, s + n) for s, n in zip(starts, lengths)), without a Python loop."""
    total = int(lengths.sum())
    ends = np.cumsum(lengths)
    # (total,): each position's offset within its segment, plus the segment's start
    return np.arange(total, dtype=np.int64) + np.repeat(starts - (ends - lengths), lengths)


def word_cache_refusal(tokenizer) -> str | None:
    """Why `tokenizer`'s ids cannot be assembled from cached chunks, or None when they can."""
    sp = getattr(tokenizer, "processor", None)
    if sp is None or not hasattr(sp, "serialized_model_proto"):
        return "not a SentencePiece model"
    # Read by hand (spm_proto.read_message): sentencepiece_model_pb2 would need protobuf installed.
    model = _model_message(sp.serialized_model_proto())
    norm = read_message(model.get(3, [b""])[-1])  # ModelProto.normalizer_spec
    trainer = read_message(model.get(2, [b""])[-1])  # ModelProto.trainer_spec

    def flag(message: dict, field: int, default: bool) -> bool:  # proto2 defaults of sentencepiece_model.proto
        return bool(message[field][-1]) if field in message else default

    name = norm.get(1, [b""])[-1].decode("utf-8")
    if name != "identity" or norm.get(2, [b""])[-1]:  # name, precompiled_charsmap
        return f"normaliser {name!r} (not identity) may change text across chunks"
    # add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces
    if not flag(norm, 3, True) or flag(norm, 4, True) or not flag(norm, 5, True):
        return "needs add_dummy_prefix, escaped whitespace and extra whitespace kept"
    if flag(trainer, 24, False):  # treat_whitespace_as_suffix
        return "whitespace as suffix"
    for piece in sp.id_to_piece(list(range(sp.get_piece_size()))):  # one call: ~1 us a piece one by one
        if _CROSSES.search(piece):
            return f"piece {piece!r} joins a character to a following {SPACE!r}"
    return None


def isolated_bytes(tokenizer) -> bytes:
    """The ASCII characters no merge can touch: no piece of two or more characters holds one, and
    each encodes alone (a piece of its own, or its byte with byte fallback). BPE never merges across
    one, so a text's ids are also the concatenation of the ids of its parts cut before each (digits
    with split_digits, "\n" in most models: far fewer distinct chunks in text of many lines)."""
    sp = tokenizer.processor
    model = _model_message(sp.serialized_model_proto())
    byte_fallback = bool(read_message(model.get(2, [b""])[-1]).get(35, [0])[-1])  # TrainerSpec.byte_fallback
    joined = set()
    ids = list(range(sp.get_piece_size()))
    for piece, byte, control, unknown in zip(sp.id_to_piece(ids), sp.is_byte(ids), sp.is_control(ids),
                                             sp.is_unknown(ids)):
        if len(piece) > 1 and not (byte or control or unknown):
            joined.update(piece)
    alone = [c for c in map(chr, range(0x80)) if c != " " and c not in joined
             and (byte_fallback or not sp.is_unknown(sp.piece_to_id(c)))]
    return "".join(alone).encode("ascii")


# SentencePiece's piece types (sentencepiece_model.proto) the compiled BPE handles.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


@functools.lru_cache(maxsize=4)
def _model_message(proto: bytes) -> dict[int, list]:
    """A serialized ModelProto's fields (read once for the word cache's several questions about it)."""
    return read_message(proto)


def _piece(raw: bytes) -> tuple[bytes, float, int]:
    """(piece, score, type) of a serialized ModelProto.SentencePiece {piece = 1, score = 2, type = 3}."""
    n = raw[1] if len(raw) > 1 else 0x80
    end = 2 + n
    if raw[0] == 0x0A and n < 0x80 and raw[end:end + 1] == b"\x15":  # the usual layout, read without a parser
        if len(raw) == end + 5:
            return raw[2:end], struct.unpack_from("<f", raw, end + 1)[0], _NORMAL
        if len(raw) == end + 7 and raw[end + 5] == 0x18 and raw[end + 6] < 0x80:
            return raw[2:end], struct.unpack_from("<f", raw, end + 1)[0], raw[end + 6]
    p = read_message(raw)
    return p.get(1, [b""])[-1], struct.unpack("<f", p[2][-1])[0] if 2 in p else 0.0, p.get(3, [_NORMAL])[-1]


def _pieces(tokenizer) -> tuple[dict, list[tuple[bytes, float, int]]]:
    """(TrainerSpec fields, [(piece, score, type)]) of the tokenizer's model file."""
    model = _model_message(tokenizer.processor.serialized_model_proto())
    pieces = [_piece(raw) for raw in model.get(1, [])]  # ModelProto.pieces
    return read_message(model.get(2, [b""])[-1]), pieces


def bpe_refusal(tokenizer, parsed: tuple | None = None) -> str | None:
    """Why the compiled BPE (csrc/bpe.cpp) cannot encode `tokenizer`'s new chunks, or None when it can (on
    top of word_cache_refusal's conditions): a BPE model with byte fallback and a piece for every byte,
    no user-defined or unused pieces (SentencePiece matches or splits those apart from the merges).
    `parsed`: _pieces(tokenizer), when read already (~0.1 s for 32k pieces)."""
    trainer, pieces = parsed or _pieces(tokenizer)
    if trainer.get(3, [1])[-1] != 2:  # TrainerSpec.model_type: UNIGRAM = 1, BPE = 2
        return "not a BPE model"
    if not trainer.get(35, [0])[-1]:  # TrainerSpec.byte_fallback
        return "no byte fallback"
    odd = {t for _, _, t in pieces} - {_NORMAL, _UNKNOWN, _CONTROL, _BYTE}
    if odd:
        return f"piece types {sorted(odd)} (user-defined or unused pieces)"
    if sum(t == _BYTE for _, _, t in pieces) != 256:
        return "not every byte has a piece"
    return None


def bpe_model(tokenizer, parsed: tuple | None = None) -> tuple[list[bytes], list[int], list[float], list[int]]:
    """(normal pieces, their ids, their scores, each byte's piece id) for native.BpeModel."""
    _, pieces = parsed or _pieces(tokenizer)
    normal = [(p, i, s) for i, (p, s, t) in enumerate(pieces) if t == _NORMAL]
    byte_ids = [-1] * 256
    for i, (p, _, t) in enumerate(pieces):
        if t == _BYTE:  # "<0x41>"
            byte_ids[int(p[3:-1], 16)] = i
    return [p for p, _, _ in normal], [i for _, i, _ in normal], [s for _, _, s in normal], byte_ids


@functools.lru_cache(maxsize=8)
def _flags(isolated: bytes) -> bytes:
    """A bytes.translate table: 1 for the bytes of `isolated`, 0 for every other."""
    return bytes(int(b in isolated) for b in range(256))


def _utf8(texts: Sequence[str]) -> list[bytes]:
    return [t.encode("utf-8") for t in texts]  # an unpaired surrogate raises, as in SentencePiece


def _joined(encoded: list[bytes], texts: Sequence[str]) -> bytes:
    """The texts' UTF-8 (`encoded`) in one buffer, each after 0xFF and its dummy-prefix space, "▁" as " "."""
    buf = _DOC + _DOC.join(encoded)
    # "▁" and " " normalise alike (see the module docstring). Asked of the str: a text without a
    # character past Latin-1 answers at once, where a search of the bytes read them all (5% of an encode).
    if any(SPACE in t for t in texts):
        buf = buf.replace(SPACE.encode(), b" ")
    return buf


def joined_utf8(texts: Sequence[str]) -> bytes:
    """The buffer FlatEncoder.encode_joined takes: each text's UTF-8 after 0xFF and " ", "▁" as " "
    (what the compiled JSONL reader, native.jsonl_docs, writes); b"" for no text."""
    return _joined(_utf8(texts), texts) if len(texts) else b""


def split_chunks(texts: Sequence[str], isolated: bytes = b"") -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
    """(buffer, start, length, chunks per text): each chunk's key is buffer[start:start + length].

    A chunk is a run of spaces and the bytes up to the next space (its key: the bytes after its first
    space, the one "▁" SentencePiece adds back when it encodes the key alone); a text's first chunk
    starts at its dummy prefix. An `isolated` byte (isolated_bytes) also starts a chunk, whose key
    starts with it. The empty text has none (SentencePiece adds no prefix to it). A text holding an
    unpaired surrogate is no UTF-8: UnicodeEncodeError, as from SentencePiece itself.
    """
    if not len(texts):
        return b"", np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    encoded = _utf8(texts)
    buf = _joined(encoded, texts)
    a = np.frombuffer(buf, np.uint8)
    space, doc = a == 0x20, a == 0xFF
    cut = doc.copy()  # (bytes,) where a document or a chunk starts
    cut[1:] |= space[1:] & ~space[:-1]  # the first space of a run (a[0] is 0xFF)
    if isolated:  # bytes.translate: one C pass, several times faster than a numpy lookup per byte
        cut |= np.frombuffer(buf.translate(_flags(isolated)), np.bool_)
    at = np.flatnonzero(cut)
    is_doc = doc[at]
    end = np.append(at[1:], len(a))
    which = np.cumsum(is_doc) - 1  # (cuts,) the text each cut belongs to
    empty = np.fromiter(map(len, encoded), np.int64, len(encoded)) == 0
    keep = ~is_doc & ~empty[which]  # an empty text's lone dummy-prefix space is no chunk
    start = at[keep] + space[at[keep]]  # after the first space; an isolated byte stays in its key
    return buf, start, end[keep] - start, np.bincount(which[keep], minlength=len(texts))


def _packed(buf: bytes, start: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi): bytes 0-7 and 8-14 of each key as little-endian uint64, zero past its length, and the
    length in hi's top byte: an exact stand-in for keys of up to 15 bytes (_SHORT)."""
    padded = np.zeros(len(buf) + 16, np.uint8)
    padded[:len(buf)] = np.frombuffer(buf, np.uint8)
    # (bytes + 9,) the 8 bytes from every offset: an overlapping, unaligned view, not a copy
    words = np.ndarray((len(buf) + 9,), "<u8", padded, 0, (1,))
    lo = words[start] & _LOW_BYTES[np.minimum(length, 8)]
    hi = words[start + 8] & _LOW_BYTES[np.clip(length - 8, 0, 7)] | length.astype(np.uint64) << np.uint64(56)
    return lo, hi


def _hash(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    # Only spreads keys over the table's slots; equality is always checked on (lo, hi).
    h = lo * _MIX[0] ^ hi * _MIX[1]
    h ^= h >> np.uint64(29)
    h *= _MIX[2]
    return h ^ (h >> np.uint64(32))


# A table entry: the chunk in bits 0..39 and a tag, bits 41..63 of its key's hash, in bits 40..62 (never
# negative: -1 is an empty slot). A probe compares tags before it reads a chunk's key: a slot holding
# another key is passed over without a read of that key's row (a cache miss each, in the kernels).
_CHUNK = np.int64((1 << 40) - 1)


def _tag(h: np.ndarray) -> np.ndarray:
    """(keys,) int64: the table entries' tag bits of keys hashing to `h` (_hash)."""
    return ((h >> np.uint64(41)) << np.uint64(40)).view(np.int64)


def _entry_chunk(entry: np.ndarray) -> np.ndarray:
    """The chunk of each table entry, -1 for an empty slot."""
    return np.where(entry >= 0, entry & _CHUNK, -1)


def _distinct(buf: bytes, start: np.ndarray, length: np.ndarray, lo: np.ndarray, hi: np.ndarray,
              chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, which): the first of `chunks` holding each distinct key, in order, and for each of `chunks`
    its key's index in rows. Short keys are told apart by (lo, hi) with np.unique (exact: _packed), long
    ones by their bytes: Python sees each new key once, not each of its occurrences in a batch. The
    compiled kernel (native.distinct) where built: one hash-map pass, the same answer."""
    lib = native.library()
    if lib is not None:
        return native.distinct(lib, buf, start, length, lo, hi, chunks)
    short = length[chunks] <= _SHORT
    at_short, at_long = np.flatnonzero(short), np.flatnonzero(~short)
    pairs = np.stack([lo[chunks[at_short]], hi[chunks[at_short]]], axis=1)
    _, first, inverse = np.unique(pairs.view(np.dtype((np.void, 16))).reshape(-1), return_index=True,
                                  return_inverse=True)
    keys = [buf[s:s + n] for s, n in zip(start[chunks[at_long]].tolist(), length[chunks[at_long]].tolist())]
    seen: dict[bytes, int] = {}  # each long key -> its number among the distinct long keys
    long_which = np.fromiter((seen.setdefault(k, len(seen)) for k in keys), np.int64, len(keys))
    long_first = np.zeros(len(seen), np.int64)
    long_first[long_which[::-1]] = at_long[::-1]  # the last write wins: each key's first occurrence
    rows = np.concatenate([chunks[at_short[first]], chunks[long_first]])
    which = np.empty(len(chunks), np.int64)
    which[at_short] = inverse.reshape(-1)
    which[at_long] = len(first) + long_which
    order = np.argsort(rows, kind="stable")  # numbered in order of first occurrence, as they are met
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rows[order], rank[which]


class FlatEncoder:
    """`encode(texts, bos, eos)` -> (ids, lengths): every text's ids concatenated (int64) and each one's count.

    `max_words`: the cache is emptied when it holds more distinct chunks (memory stays bounded on
    corpora with endless rare strings; frequent words come back at once).
    """

    def __init__(self, tokenizer, max_words: int = 1 << 21, threads: int | None = None):
        self.tokenizer = tokenizer
        if not 0 < max_words < 1 << 40:  # a table entry holds its chunk's number in 40 bits (_tag)
            raise ValueError(f"max_words must be in [1, 2**40), got {max_words}")
        self.max_words = max_words
        self.threads = threads or os.cpu_count() or 1
        self.refusal = word_cache_refusal(tokenizer)
        self.isolated = isolated_bytes(tokenizer) if self.refusal is None else b""
        self._checked = False
        self.sharing = False  # keep the chunks sent to SentencePiece for take_new
        self._new: list[tuple] = []
        self._scratch = native.Scratch()  # the compiled cut's outputs, reused batch after batch
        self._bpe: native.BpeModel | bool | None = None  # the compiled BPE; None: not made yet; False: off
        self._lone_ids: list[int] | None = None
        self._clear()

    def __len__(self) -> int:
        """Distinct chunks in the cache."""
        return self._words

    # The fields of the rows (strided views).
    _lo = property(lambda self: self._keys["lo"])
    _hi = property(lambda self: self._keys["hi"])
    _start = property(lambda self: self._spans["start"])
    _count = property(lambda self: self._spans["count"])

    def _clear(self) -> None:
        self._words = 0  # chunks cached, numbered 0..: the rows of the arrays below
        self._tokens = np.zeros(1 << 16, np.int32)  # every cached chunk's ids, back to back
        # chunk -> its key packed (_packed; long keys: unused), read by a probe; chunk -> its first id in
        # _tokens and how many ids, read by the gather: rows of 16 bytes, a cache line each where an
        # array per field was a miss per field.
        self._keys = _aligned_rows(1 << 12, native.KEY)
        self._spans = _aligned_rows(1 << 12, native.SPAN)
        self._len = np.zeros(1 << 12, np.int64)  # chunk -> its key's length in bytes
        self._hi[-1] = _NO_KEY  # the last row is never a chunk (_grow keeps it spare): what an empty slot reads
        self._used = 0  # ids stored in _tokens
        self._max_id = 0  # the largest of them
        self._table = np.full(1 << 13, -1, np.int64)  # open addressing (linear probing): slot -> entry or -1
        self._in_table = 0
        self._long: dict[bytes, int] = {}  # keys over _SHORT bytes -> chunk

    def encode(self, texts: Sequence[str], bos: bool = True, eos: bool = False,
               dtype: np.dtype | type = np.int64) -> tuple[np.ndarray, np.ndarray]:
        """(ids, lengths): every text's ids back to back, as `dtype` (int64, int32 or uint16: IdOverflow
        when an id does not fit it), and each text's count."""
        dtype = np.dtype(dtype)
        if dtype not in (np.int64, np.int32, np.uint16):
            raise ValueError(f"dtype must be int64, int32 or uint16, got {dtype}")
        if self.refusal is None and not self._checked and len(texts):
            self._checked = True
            self._check(texts[:64])
        if self.refusal is not None:
            return _fitted(*self._plain(texts, bos, eos), dtype)
        return self._word_cached(texts, bos, eos, dtype)

    @property
    def takes_joined(self) -> bool:
        """Whether encode_joined can be called: the word cache is on, checked, and compiled."""
        return self.refusal is None and self._checked and native.library() is not None

    def encode_joined(self, buf: bytes, texts: int, bos: bool = True, eos: bool = False,
                      dtype: np.dtype | type = np.int64) -> tuple[np.ndarray, np.ndarray]:
        """encode() of the `texts` texts that `buf` holds as joined_utf8 writes them (only when
        takes_joined: the texts as str are not at hand for SentencePiece's own encoder)."""
        assert self.takes_joined, "encode_joined needs the word cache on, checked by encode() and compiled"
        dtype = np.dtype(dtype)
        assert dtype in (np.int64, np.int32, np.uint16), dtype
        if not texts:
            return np.zeros(0, dtype), np.zeros(0, np.int64)
        return self._compiled(native.library(), buf, texts, bos, eos, dtype)

    def _word_cached(self, texts, bos, eos, dtype: np.dtype = _INT64) -> tuple[np.ndarray, np.ndarray]:
        lib = native.library()
        if lib is None or not len(texts):
            return _fitted(*self._cached(texts, bos, eos), dtype)
        return self._compiled(lib, _joined(_utf8(texts), texts), len(texts), bos, eos, dtype)

    def _plain(self, texts, bos, eos) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tokenizer.encode_batch(list(texts), bos=bos, eos=eos)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        return np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(lengths.sum())), lengths

    def _check(self, texts) -> None:
        fast, reference = self._word_cached(texts, True, True), self._plain(texts, True, True)
        if not all(np.array_equal(a, b) for a, b in zip(fast, reference)):
            self.refusal = "its ids differed from SentencePiece's on the first documents"
            log.warning("the word cache is off for %s: %s", getattr(self.tokenizer, "path", "this tokenizer"),
                        self.refusal)

    # ------------------------------------------------------------------------ the table of short keys

    def _probe(self, lo, hi) -> np.ndarray:
        """(keys,) the chunk of each short key, or -1 where it is not cached."""
        mask = len(self._table) - 1
        h = _hash(lo, hi)
        slot, tag = h.view(np.int64) & mask, _tag(h)
        todo = np.arange(len(lo))
        found = np.full(len(lo), -1, np.int64)
        while len(todo):  # each round: one slot further for the keys whose slot held another key
            entry = self._table[slot[todo]]
            chunk = _entry_chunk(entry)
            # An empty slot's chunk (-1) reads the rows' last one, whose hi matches no key: no special case.
            hit = ((entry & ~_CHUNK) == tag[todo]) & (self._hi[chunk] == hi[todo]) & (self._lo[chunk] == lo[todo])
            found[todo[hit]] = chunk[hit]
            todo = todo[~hit & (entry >= 0)]
            slot[todo] = (slot[todo] + 1) & mask
        return found

    def _place(self, chunks: np.ndarray) -> None:
        """Put `chunks` (short keys, distinct, not in the table yet) into the table."""
        if 2 * (self._in_table + len(chunks)) > len(self._table):  # load <= 1/2: short probe runs
            size = len(self._table)
            while 2 * (self._in_table + len(chunks)) > size:
                size *= 2
            self._table = np.full(size, -1, np.int64)
            chunks = np.concatenate([np.flatnonzero(self._len[:self._words] <= _SHORT), chunks])
            chunks = np.unique(chunks)  # the new ones are numbered already, so may be among the old
            self._in_table = 0
        lib = native.library()
        if lib is not None:  # one linear-probing insert per chunk (the same lookups as the rounds below)
            native.place(lib, self._table, self._keys, chunks)
            self._in_table += len(chunks)
            return
        mask = len(self._table) - 1
        h = _hash(self._lo[chunks], self._hi[chunks])
        slot, entries = h.view(np.int64) & mask, chunks | _tag(h)
        todo = np.arange(len(chunks))
        while len(todo):  # each round: every free slot wanted goes to its first claimant; the rest move on
            free = todo[self._table[slot[todo]] < 0]
            _, first = np.unique(slot[free], return_index=True)
            won = free[first]
            self._table[slot[won]] = entries[won]
            placed = np.zeros(len(chunks), bool)
            placed[won] = True
            todo = todo[~placed[todo]]
            slot[todo] = (slot[todo] + 1) & mask
        self._in_table += len(chunks)

    # ------------------------------------------------------------------------ adding chunks

    def _grow(self, words: int, tokens: int) -> None:
        if words >= len(self._keys):
            size = max(words + 1, 2 * len(self._keys))
            for name in ("_keys", "_spans"):
                old = getattr(self, name)
                rows = _aligned_rows(size, old.dtype)
                rows[:len(old)] = old
                setattr(self, name, rows)
            self._len = np.resize(self._len, size)
            self._hi[-1] = _NO_KEY
        if tokens > len(self._tokens):
            self._tokens = np.resize(self._tokens, max(tokens, 2 * len(self._tokens)))

    def _add(self, keys: list[bytes], lo: np.ndarray, hi: np.ndarray, length: np.ndarray) -> int:
        """Encode `keys` (distinct, not cached) and store them; return the first's chunk number (the others
        follow in order). A key is its chunk without the first "▁": what SentencePiece encodes it from (it
        adds that "▁"). The compiled BPE (native.BpeModel) where the model allows it, else SentencePiece."""
        got = self._compiled_bpe(keys) if self._bpe is not False else None
        counts, flat = got if got is not None else self._sentencepiece(keys)
        if self.sharing:
            self._new.append((length.astype(np.int64), b"".join(keys), counts, flat))
        return self._store(keys, lo, hi, length, counts, flat)

    def _sentencepiece(self, keys: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """(counts, ids) of `keys` from SentencePiece itself, back to back."""
        sp = self.tokenizer.processor
        # The chunk "▁▁x" (key " x") is the text " x" encoded alone. The lone "▁" (key "") would be
        # the empty text: it is the ids that " " adds after a character.
        lone = self._lone()
        texts = [k.decode("utf-8") for k in keys]
        # A few keys (the compiled BPE's check) one call each: a batch call costs ~80 us before its first key.
        ids = sp.encode(texts, num_threads=self.threads) if len(keys) > 64 else [sp.encode(t) for t in texts]
        for k, key in enumerate(keys):
            if not key:
                ids[k] = lone
            elif key[0] in self.isolated:
                # A chunk cut before an isolated character has no "▁" of its own: SentencePiece's dummy
                # prefix, which no merge joins to that character, is dropped.
                assert ids[k][:len(lone)] == lone, (key, ids[k], lone)
                ids[k] = ids[k][len(lone):]
        counts = np.fromiter(map(len, ids), np.int64, len(ids))
        return counts, np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(counts.sum()))

    def _lone(self) -> list[int]:
        """The ids " " adds after a character: a lone "▁" chunk's (asked of SentencePiece once)."""
        if self._lone_ids is None:
            sp = self.tokenizer.processor
            with_space, without = sp.encode("a "), sp.encode("a")
            assert with_space[:len(without)] == without, (with_space, without)
            self._lone_ids = with_space[len(without):]
        return self._lone_ids

    # Keys of each call to the compiled BPE also encoded by SentencePiece and compared: one in every
    # _KEYS_PER_CHECK, at least one. A key costs ~30 us of SentencePiece's Python call; 8 keys a call
    # cost ~0.25 ms in every batch of a mix, more than the compiled BPE took for the batch's ~150 keys.
    _KEYS_PER_CHECK = 256

    def _compiled_bpe(self, keys: list[bytes]) -> tuple[np.ndarray, np.ndarray] | None:
        """(counts, ids) of `keys` from the compiled BPE, or None where it cannot run (not built, another
        kind of model, a key it leaves to SentencePiece). A few keys of every call are also encoded by
        SentencePiece: a difference turns the compiled BPE off for good, with a warning."""
        if self._bpe is None:
            lib = native.library()
            parsed = _pieces(self.tokenizer) if lib is not None else None
            refusal = "the text kernels are not built" if lib is None else bpe_refusal(self.tokenizer, parsed)
            self._bpe = False if refusal else native.BpeModel(lib, *bpe_model(self.tokenizer, parsed), self._lone(),
                                                              _flags(self.isolated))
            if refusal:
                log.info("word cache: new chunks go to SentencePiece (%s)", refusal)
                return None
        lengths = np.fromiter(map(len, keys), np.int64, len(keys))
        got = self._bpe.encode(b"".join(keys), np.cumsum(lengths) - lengths, lengths)
        if got is None:
            return None
        ids, counts = got
        m = 1 + len(keys) // self._KEYS_PER_CHECK
        check = (2 * np.arange(m) + 1) * len(keys) // (2 * m)  # (m,) the middles of m equal parts: distinct
        want_counts, want = self._sentencepiece([keys[i] for i in check.tolist()])
        first = np.cumsum(counts) - counts
        mine = ids[ragged_arange(first[check], counts[check])]
        if not (np.array_equal(counts[check], want_counts) and np.array_equal(mine, want)):
            log.warning("word cache: the compiled BPE differed from SentencePiece on %r; SentencePiece encodes "
                        "from now on", [keys[i] for i in check.tolist()])
            self._bpe = False
            return None
        return counts, ids

    def _store(self, keys: list[bytes], lo: np.ndarray, hi: np.ndarray, length: np.ndarray, counts: np.ndarray,
               flat: np.ndarray) -> int:
        """Cache `keys` (distinct, not cached) with their ids (`counts` of them each, back to back in
        `flat`); return the first's chunk number (the others follow in order)."""
        first = self._words
        need_words, need_tokens = first + len(keys), self._used + len(flat)
        self._grow(need_words, need_tokens)
        self._tokens[self._used:need_tokens] = flat
        self._count[first:need_words] = counts
        self._start[first:need_words] = self._used + np.cumsum(counts) - counts
        self._lo[first:need_words], self._hi[first:need_words], self._len[first:need_words] = lo, hi, length
        self._used, self._words = need_tokens, need_words
        self._max_id = max(self._max_id, int(flat.max(initial=0)))
        numbers = np.arange(first, need_words)
        short = length <= _SHORT
        self._place(numbers[short])
        self._long.update((k, n) for k, n, s in zip(keys, numbers.tolist(), short.tolist()) if not s)
        return first

    # ------------------------------------------------------------------------ sharing new chunks

    def take_new(self) -> bytes:
        """The chunks this encoder sent to SentencePiece since the last call (with `sharing` on), as one
        record for another encoder of the same model to `put_new` (b"" when none): encoding processes
        that each meet the same new words pay SentencePiece once between them instead of once each."""
        if not self._new:
            return b""
        new, self._new = self._new, []
        lengths, counts, ids = (np.concatenate([x[k] for x in new]) for k in (0, 2, 3))
        keys = b"".join(x[1] for x in new)
        head = np.array([len(lengths), len(keys), len(ids)], np.int64)
        return b"".join([head.tobytes(), lengths.astype("<i8").tobytes(), keys, counts.astype("<i8").tobytes(),
                         ids.astype("<i4").tobytes()])

    def put_new(self, records: bytes) -> int:
        """Cache the chunks of `take_new` records (back to back) that this encoder lacks, without
        SentencePiece; return how many. Only for records of an encoder of the same model file."""
        if self.refusal is not None or not records:
            return 0
        parts, at = [], 0
        while at < len(records):  # each record: its sizes, then its arrays
            n, key_bytes, n_ids = np.frombuffer(records, "<i8", 3, at).tolist()
            at += 24
            length = np.frombuffer(records, "<i8", n, at)
            keys = records[at + 8 * n:at + 8 * n + key_bytes]
            at += 8 * n + key_bytes
            counts = np.frombuffer(records, "<i8", n, at)
            ids = np.frombuffer(records, "<i4", n_ids, at + 8 * n)
            at += 8 * n + 4 * n_ids
            parts.append((length, keys, counts, ids))
        length = np.concatenate([x[0] for x in parts]).astype(np.int64)
        buf = b"".join(x[1] for x in parts)
        counts = np.concatenate([x[2] for x in parts]).astype(np.int64)
        ids = np.concatenate([x[3] for x in parts])
        start = np.cumsum(length) - length
        lo, hi = _packed(buf, start, length)
        missing = np.flatnonzero(self._lookup(buf, start, length, lo, hi) < 0)
        rows, _ = _distinct(buf, start, length, lo, hi, missing)  # a chunk both of two others encoded: once
        if not len(rows) or self._words + len(rows) > self.max_words:  # a full cache takes none
            return 0
        keys = [buf[s:s + n] for s, n in zip(start[rows].tolist(), length[rows].tolist())]
        first_id = np.cumsum(counts) - counts
        self._store(keys, lo[rows], hi[rows], length[rows], counts[rows],
                    ids[ragged_arange(first_id[rows], counts[rows])])
        return len(rows)

    def _lookup(self, buf, start, length, lo, hi) -> np.ndarray:
        """(chunks,) the cache number of each chunk; -1 where not cached."""
        found = np.full(len(start), -1, np.int64)
        short = length <= _SHORT
        at = np.flatnonzero(short)
        found[at] = self._probe(lo[at], hi[at])
        if not short.all():
            at = np.flatnonzero(~short)
            keys = [buf[s:s + n] for s, n in zip(start[at].tolist(), length[at].tolist())]
            found[at] = np.fromiter(map(self._long.get, keys, itertools.repeat(-1)), np.int64, len(keys))
        return found

    def _fill(self, buf, start, length, lo, hi, found: np.ndarray) -> None:
        """Cache the chunks `found` lacks (-1) and write their numbers into it."""
        missing = np.flatnonzero(found < 0)
        rows, which = _distinct(buf, start, length, lo, hi, missing)
        if self._words + len(rows) > self.max_words:  # the batch's own chunks must survive a clear
            self._clear()
            missing = np.arange(len(found))
            rows, which = _distinct(buf, start, length, lo, hi, missing)
        keys = [buf[s:s + n] for s, n in zip(start[rows].tolist(), length[rows].tolist())]
        found[missing] = self._add(keys, lo[rows], hi[rows], length[rows]) + which

    def _cached(self, texts, bos, eos) -> tuple[np.ndarray, np.ndarray]:
        """The numpy path of the word cache (the compiled one: _compiled)."""
        if not len(texts):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        buf, start, length, n_words = split_chunks(texts, self.isolated)
        lo, hi = _packed(buf, start, length)
        found = self._lookup(buf, start, length, lo, hi)
        if (found < 0).any():
            self._fill(buf, start, length, lo, hi, found)
        counts = self._count[found]  # (chunks,) ids per chunk
        body = self._tokens[ragged_arange(self._start[found], counts)]  # (body tokens,) every chunk's ids in order
        cum = np.concatenate([[0], np.cumsum(counts)])  # (chunks + 1,) body tokens before each chunk
        doc_end = np.cumsum(n_words)  # (documents,) chunks up to the end of each document
        first, last = cum[doc_end - n_words], cum[doc_end]  # (documents,) each one's span of body
        lengths = last - first + int(bos) + int(eos)
        marks = [(first, self.tokenizer.bos_id)] * bos + [(last, self.tokenizer.eos_id)] * eos
        if not marks:
            return body.astype(np.int64), lengths
        # (documents * marks,) where <s> and </s> go in body, nondecreasing: one document's </s> comes
        # before the next one's <s> at the same place (np.insert keeps equal places in order)
        where = np.stack([m[0] for m in marks], axis=1).reshape(-1)
        return np.insert(body.astype(np.int64), where, [m[1] for m in marks] * len(first)), lengths

    def _compiled(self, lib, buf: bytes, texts: int, bos, eos, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """_cached's numpy passes as compiled ones (tokenizer/native.py) over `texts` texts joined in `buf`
        (_joined): the same chunks, keys and ids, written as `dtype` by the gather itself."""
        start, length, lo, hi, found, per_text = native.chunks(lib, buf, _flags(self.isolated), texts,
                                                               self._table, self._keys, self._scratch)
        long = np.flatnonzero(found == -2)  # keys over _SHORT bytes: looked up by their bytes
        if len(long):
            keys = [buf[s:s + n] for s, n in zip(start[long].tolist(), length[long].tolist())]
            found[long] = np.fromiter(map(self._long.get, keys, itertools.repeat(-1)), np.int64, len(keys))
        if (found < 0).any():
            self._fill(buf, start, length, lo, hi, found)
        bos_id, eos_id = self.tokenizer.bos_id if bos else None, self.tokenizer.eos_id if eos else None
        top = max(self._max_id, bos_id or 0, eos_id or 0)  # every id the gather can write
        if top > np.iinfo(dtype).max:
            raise IdOverflow(f"token id {top} does not fit {dtype.name}; encode with a wider dtype")
        # A piece covers at least one byte (a byte-fallback id exactly one): a text's ids are at most its
        # bytes, its dummy prefix's "▁" included, plus <s> and </s>: fewer than len(buf) + texts.
        return native.assemble(lib, found, per_text, self._spans, self._tokens, bos_id, eos_id, dtype,
                               bound=len(buf) + texts)


_LAST: tuple[object, FlatEncoder] | None = None


def flat_encoder(tokenizer) -> FlatEncoder:
    """The FlatEncoder of `tokenizer`, kept across calls and across loads of the same model file
    (its cache warms up over a corpus, not over one source of it)."""
    global _LAST
    if _LAST is not None and _LAST[1].tokenizer is tokenizer:  # the same object: no model serialised (~1 ms)
        return _LAST[1]
    sp = getattr(tokenizer, "processor", None)
    key = (type(tokenizer), sp.serialized_model_proto()) if hasattr(sp, "serialized_model_proto") else tokenizer
    if _LAST is None or not (_LAST[0] is key or (isinstance(key, tuple) and _LAST[0] == key)):
        _LAST = (key, FlatEncoder(tokenizer))
    encoder = _LAST[1]
    encoder.tokenizer = tokenizer  # the same model: its bos/eos ids and processor are the same
    return encoder
