"""Bulk encoding of many documents to flat token arrays, with a word cache in front of SentencePiece.

Tokenising a corpus (`prepare`, `data mix`) is the slow part of the data pipeline: SentencePiece's
BPE runs at about 4 MB/s per core. Natural text repeats its words (Zipf), and a LLaMA-style model
encodes each word on its own, so the corpus can be encoded from a cache of words:

- SentencePiece normalises a text to "▁" + text with every " " as "▁" (dummy prefix, identity
  normalisation, extra whitespace kept), then merges BPE pieces over the whole string;
- when no piece joins a character to a following "▁" (true of every LLaMA-style model: pieces
  are "▁▁", "▁the", "ing"; never "e▁"), no merge crosses the start of a "▁+[^▁]*" chunk, so the
  text's ids are the concatenation of its chunks' ids, each chunk encoded alone.

`FlatEncoder` splits the documents into such chunks, looks them up in a dictionary, encodes only
the unseen ones, with SentencePiece itself in one multi-threaded batch call, and assembles the
documents' ids with numpy gathers. SentencePiece stays the authority on every id; the cache only
avoids asking it twice. Models outside those conditions (another normaliser, whitespace as
suffix, a piece with an inner "▁" after a character), and every other tokenizer, go through
their own `encode_batch`. The conditions are read from the model file, and the first batch is
also checked against plain SentencePiece (a mismatch turns the cache off, with a warning).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Sequence

import numpy as np

from llamaworks.tokenizer.spm_proto import read_message

log = logging.getLogger(__name__)

SPACE = "\u2581"
_CHUNK = re.compile(f"{SPACE}+[^{SPACE}]*")  # one chunk: a run of "▁" and the characters up to the next "▁"
_CROSSES = re.compile(f"[^{SPACE}]{SPACE}")  # a piece that joins a character to a following "▁"


def _ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
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
    model = read_message(sp.serialized_model_proto())
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
    for i in range(sp.get_piece_size()):
        if _CROSSES.search(sp.id_to_piece(i)):
            return f"piece {sp.id_to_piece(i)!r} joins a character to a following {SPACE!r}"
    return None


def _keys(text: str) -> list[str]:
    """The cache keys of `text`'s chunks: each chunk without its first "▁"."""
    if text and text[0] != " " and "  " not in text and SPACE not in text:
        # Ordinary text (no leading or doubled space, no "▁"): the chunks are "▁" + each " "-separated
        # word (a trailing space: the lone "▁", key ""). One str.split, not a regex over every character.
        return text.split(" ")
    return [c[1:] for c in _CHUNK.findall(SPACE + text.replace(" ", SPACE))] if text else []


class FlatEncoder:
    """`encode(texts, bos, eos)` -> (ids, lengths): every text's ids concatenated (int64) and each one's count.

    `max_words`: the cache is emptied when it holds more distinct chunks (memory stays bounded on
    corpora with endless rare strings; frequent words come back at once).
    """

    def __init__(self, tokenizer, max_words: int = 1 << 21, threads: int | None = None):
        self.tokenizer = tokenizer
        self.max_words = max_words
        self.threads = threads or os.cpu_count() or 1
        self.refusal = word_cache_refusal(tokenizer)
        self._checked = False
        self._clear()

    def _clear(self) -> None:
        self._index: dict[str, int] = {}
        self._tokens = np.zeros(1 << 16, np.int32)  # every cached chunk's ids, back to back
        self._start = np.zeros(1 << 12, np.int64)  # chunk index -> its first id in _tokens
        self._count = np.zeros(1 << 12, np.int64)  # chunk index -> how many ids
        self._used = 0  # ids stored in _tokens

    def encode(self, texts: Sequence[str], bos: bool = True, eos: bool = False) -> tuple[np.ndarray, np.ndarray]:
        if self.refusal is None and not self._checked:
            self._checked = True
            self._check(texts[:64])
        if self.refusal is not None:
            return self._plain(texts, bos, eos)
        return self._cached(texts, bos, eos)

    def _plain(self, texts, bos, eos) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tokenizer.encode_batch(list(texts), bos=bos, eos=eos)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        return np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(lengths.sum())), lengths

    def _check(self, texts) -> None:
        fast, reference = self._cached(texts, True, True), self._plain(texts, True, True)
        if not all(np.array_equal(a, b) for a, b in zip(fast, reference)):
            self.refusal = "its ids differed from SentencePiece's on the first documents"
            log.warning("the word cache is off for %s: %s", getattr(self.tokenizer, "path", "this tokenizer"),
                        self.refusal)

    def _add(self, chunks: list[str]) -> None:
        """Encode `chunks` (distinct keys, not cached) with SentencePiece and store them. A chunk's key
        is its text without the first "▁": what SentencePiece encodes it from (it adds that "▁")."""
        if len(self._index) + len(chunks) > self.max_words:
            self._clear()
        sp = self.tokenizer.processor
        # The chunk "▁▁x" (key "▁x") is the text " x" encoded alone. The lone "▁" (key "") would be
        # the empty text: it is the ids that " " adds after a character.
        ids = sp.encode(chunks, num_threads=self.threads)
        for k, c in enumerate(chunks):
            if not c:
                with_space, without = sp.encode("a "), sp.encode("a")
                assert with_space[:len(without)] == without, (with_space, without)
                ids[k] = with_space[len(without):]
        counts = np.fromiter(map(len, ids), np.int64, len(ids))
        first = len(self._index)
        need_words, need_tokens = first + len(chunks), self._used + int(counts.sum())
        if need_words > len(self._start):
            size = max(need_words, 2 * len(self._start))
            self._start, self._count = np.resize(self._start, size), np.resize(self._count, size)
        if need_tokens > len(self._tokens):
            self._tokens = np.resize(self._tokens, max(need_tokens, 2 * len(self._tokens)))
        self._tokens[self._used:need_tokens] = np.fromiter(itertools.chain.from_iterable(ids), np.int32,
                                                           need_tokens - self._used)
        self._count[first:need_words] = counts
        self._start[first:need_words] = self._used + np.cumsum(counts) - counts
        self._used = need_tokens
        self._index.update(zip(chunks, range(first, need_words)))

    def _cached(self, texts, bos, eos) -> tuple[np.ndarray, np.ndarray]:
        # (documents,) lists of chunk keys; the empty text has none (SentencePiece adds no dummy prefix to it)
        per_doc = [_keys(t) for t in texts]
        words = list(itertools.chain.from_iterable(per_doc))
        n_words = np.fromiter(map(len, per_doc), np.int64, len(per_doc))  # (documents,)
        index = self._index
        ids = np.fromiter(map(index.get, words, itertools.repeat(-1)), np.int64, len(words))  # (words,)
        missing = np.flatnonzero(ids < 0)
        if len(missing):
            unseen = [words[i] for i in missing.tolist()]
            new = list(dict.fromkeys(unseen))
            if len(index) + len(new) > self.max_words:  # the batch's own chunks must survive a clear
                self._clear()
                self._add(list(dict.fromkeys(words)))
                ids = np.fromiter(map(self._index.__getitem__, words), np.int64, len(words))
            else:
                self._add(new)
                ids[missing] = np.fromiter(map(self._index.__getitem__, unseen), np.int64, len(unseen))
        counts = self._count[ids]  # (words,) ids per chunk
        body = self._tokens[_ragged_arange(self._start[ids], counts)]  # (body tokens,) every chunk's ids in order
        cum = np.concatenate([[0], np.cumsum(counts)])  # (words + 1,) body tokens before each chunk
        doc_end = np.cumsum(n_words)  # (documents,) chunks up to the end of each document
        doc_body = cum[doc_end] - cum[doc_end - n_words]  # (documents,) body tokens of each document
        lengths = doc_body + int(bos) + int(eos)
        out = np.empty(int(lengths.sum()), np.int64)
        doc_start = np.cumsum(lengths) - lengths  # (documents,) where each document begins in out
        body_pos = _ragged_arange(doc_start + int(bos), doc_body)
        out[body_pos] = body
        if bos:
            out[doc_start] = self.tokenizer.bos_id
        if eos:
            out[doc_start + lengths - 1] = self.tokenizer.eos_id
        return out, lengths


_LAST: tuple[object, FlatEncoder] | None = None


def flat_encoder(tokenizer) -> FlatEncoder:
    """The FlatEncoder of `tokenizer`, kept across calls and across loads of the same model file
    (its cache warms up over a corpus, not over one source of it)."""
    global _LAST
    sp = getattr(tokenizer, "processor", None)
    key = (type(tokenizer), sp.serialized_model_proto()) if hasattr(sp, "serialized_model_proto") else tokenizer
    if _LAST is None or not (_LAST[0] is key or (isinstance(key, tuple) and _LAST[0] == key)):
        _LAST = (key, FlatEncoder(tokenizer))
    encoder = _LAST[1]
    encoder.tokenizer = tokenizer  # the same model: its bos/eos ids and processor are the same
    return encoder
