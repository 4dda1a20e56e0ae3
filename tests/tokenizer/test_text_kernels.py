"""The compiled text kernels (tokenizer/native.py) against the numpy passes they replace, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamaworks.tokenizer import native
from llamaworks.tokenizer.word_cache import (
    FlatEncoder,
    _distinct,
    _flags,
    _hash,
    _joined,
    _packed,
    _tag,
    isolated_bytes,
    split_chunks,
)

from .test_word_cache import HOSTILE, ODD, random_texts, reference


def numpy_chunks(texts, isolated, enc: FlatEncoder):
    """split_chunks, _packed and FlatEncoder._lookup: what lw_chunks returns in one pass."""
    buf, start, length, per_text = split_chunks(texts, isolated)
    lo, hi = _packed(buf, start, length)
    found = enc._lookup(buf, start, length, lo, hi)
    return buf, start, length, lo, hi, found, per_text


def compiled_chunks(lib, texts, isolated, enc: FlatEncoder, isa: str | None = None):
    buf = _joined([t.encode("utf-8") for t in texts], texts)
    start, length, lo, hi, found, per_text = native.chunks(lib, buf, _flags(isolated), len(texts), enc._table,
                                                           enc._keys, isa=isa)
    return buf, start, length, lo, hi, found, per_text


def assert_same_chunks(lib, texts, isolated, enc):
    """lw_chunks with every byte classification this CPU runs (portable, AVX2, AVX-512BW) = the numpy passes."""
    want = numpy_chunks(texts, isolated, enc)
    for isa in native.chunk_isas(lib):
        assert_same_as(want, compiled_chunks(lib, texts, isolated, enc, isa), texts)


def assert_same_as(want, got, texts):
    assert got[0] == want[0]
    short = want[2] <= 15  # a long key's (lo, hi) is unused (looked up by its bytes): only the short ones must agree
    for name, g, w in zip(("start", "length"), got[1:3], want[1:3]):
        assert np.array_equal(g, w), (name, texts)
    assert np.array_equal(got[3][short], want[3][short]) and np.array_equal(got[4][short], want[4][short]), texts
    # found: a hit or -1 for short keys; -2 for every long key (the caller's dict lookup)
    assert np.array_equal(got[5][short], want[5][short]) and (got[5][~short] == -2).all(), texts
    assert np.array_equal(got[6], want[6]), texts


@pytest.mark.parametrize("isolated", [b"", b"\n12", None])
def test_chunks_keys_and_probes_are_the_numpy_passes(lib, tiny_tokenizer, isolated):
    isolated = isolated_bytes(tiny_tokenizer) if isolated is None else isolated
    enc = FlatEncoder(tiny_tokenizer)
    texts = ODD + random_texts(500, seed=2) + ["p" * 15, "p" * 16, "\U0001f600" * 4, "\u2581" * 6 + "x"]
    assert_same_chunks(lib, texts, isolated, enc)  # an empty table: every probe misses
    enc.encode(texts[: len(texts) // 2])  # half of the chunks cached: hits, misses and probe runs
    assert_same_chunks(lib, texts, isolated, enc)
    assert_same_chunks(lib, [""], isolated, enc)
    assert_same_chunks(lib, ["", "", "a"], isolated, enc)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(HOSTILE, min_size=1, max_size=8))
def test_property_chunks_are_the_numpy_passes(lib, tiny_tokenizer, texts):
    enc = FlatEncoder(tiny_tokenizer)
    enc.encode(["the king 12 \n and \u00e9"])
    assert_same_chunks(lib, texts, isolated_bytes(tiny_tokenizer), enc)


def test_the_probe_follows_linear_probing_runs(lib, tiny_tokenizer):
    # Keys whose slots collide in a small table: the compiled probe walks the same runs as _probe.
    enc = FlatEncoder(tiny_tokenizer)
    words = [f"w{i}" for i in range(3000)]
    enc.encode([" ".join(words[:1500])])
    buf = _joined([" ".join(words).encode()], [" ".join(words)])
    _, start, length, _ = split_chunks([" ".join(words)], enc.isolated)
    slots = _hash(*_packed(buf, start, length)).view(np.int64) & (len(enc._table) - 1)
    assert len(np.unique(slots)) < len(slots)  # collisions do happen
    assert_same_chunks(lib, [" ".join(words)], enc.isolated, enc)


def test_a_tag_shared_by_another_key_is_not_a_hit(lib, tiny_tokenizer):
    # A table entry's tag is 23 bits of its key's hash: once in 2^23 another key has the same. Forged
    # here: before a cached key's entry, and at an uncached key's home slot, an entry with the key's
    # tag and another chunk. Both probes compare the key itself: the cached key is still found one
    # slot on, the uncached one is still a miss, and the ids are still SentencePiece's.
    enc = FlatEncoder(tiny_tokenizer)
    enc.encode(["alpha beta gamma delta"])
    texts = ["gamma lemon"]
    buf = _joined([t.encode() for t in texts], texts)
    _, start, length, _ = split_chunks(texts, enc.isolated)
    lo, hi = _packed(buf, start, length)
    h = _hash(lo, hi)
    mask = len(enc._table) - 1
    gamma, lemon = enc._probe(lo, hi)
    assert gamma >= 0 and lemon == -1
    other = enc._probe(*_packed(*split_chunks(["alpha"], enc.isolated)[:3]))[0]
    table = np.full_like(enc._table, -1)
    home = h.view(np.int64) & mask
    assert home[0] != home[1] and (home[0] + 1) & mask != home[1]
    table[home[0]] = other | _tag(h[:1])[0]  # gamma's tag, alpha's chunk
    table[(home[0] + 1) & mask] = gamma | _tag(h[:1])[0]
    table[home[1]] = other | _tag(h[1:])[0]  # lemon's tag, alpha's chunk
    enc._table = table
    assert enc._probe(lo, hi).tolist() == [gamma, -1]
    got = native.chunks(lib, buf, _flags(enc.isolated), 1, enc._table, enc._keys)[4]
    assert got.tolist() == [gamma, -1]
    assert np.array_equal(enc.encode(texts, bos=True, eos=True)[0], reference(tiny_tokenizer, texts, True, True)[0])


def test_isas_are_listed_and_an_unknown_one_refused(lib):
    isas = native.chunk_isas(lib)
    assert isas[0] == "portable"
    table, keys = np.full(8, -1, np.int64), np.zeros(2, native.KEY)
    missing = [name for name in native.ISAS if name not in isas]
    for name in missing:  # an ISA this CPU lacks is refused, never run
        with pytest.raises(AssertionError, match="cannot run"):
            native.chunks(lib, b"\xff a", _flags(b""), 1, table, keys, isa=name)


@pytest.mark.parametrize("isolated", [b"", b"\n12", b"\x00\x7f!"])
def test_chunks_across_words_and_blocks_are_the_numpy_passes(lib, tiny_tokenizer, isolated):
    # The vector classifications work on 64-byte words in 4096-byte blocks: space runs, isolated bytes,
    # documents and empty documents on both sides of every boundary, and buffers ending mid-word.
    enc = FlatEncoder(tiny_tokenizer)
    enc.encode(["ab cd 12 \n e"])
    rng = np.random.default_rng(5)
    for total in (62, 63, 64, 65, 127, 4093, 4094, 4095, 4096, 4097, 8191, 8200):
        for _ in range(3):
            texts, size = [], 2  # _joined: 2 bytes before each text
            while size < total:
                n = int(rng.integers(0, min(300, total - size) + 1))
                texts.append("".join(rng.choice(["a", "b", " ", "  ", "\n", "1", "\x00", "!", "\u00e9"],
                                                size=n).tolist())[:n])
                size += len(texts[-1].encode()) + 2
            assert_same_chunks(lib, texts, isolated, enc)
    # A space run of 200 bytes over a word boundary, then one over a block boundary.
    assert_same_chunks(lib, ["x" * 50 + " " * 200 + "y", "z" * 4000 + " " * 300 + "w"], isolated, enc)


def test_a_non_ascii_isolated_byte_takes_the_portable_classes(lib, tiny_tokenizer):
    # The vector classes hold isolated ASCII bytes only (a nibble bitmap); any other set is classified
    # per byte, the same chunks as numpy's. 0xC3 (the lead byte of "é") as isolated: never from a model.
    enc = FlatEncoder(tiny_tokenizer)
    texts = ["caf\u00e9 au lait \u00e9\u00e9", "\n\u00e9x", ""] * 40
    assert split_chunks(texts, b"\n\xc3")[3].sum() > split_chunks(texts, b"\n")[3].sum()  # 0xC3 does cut
    assert_same_chunks(lib, texts, b"\n\xc3", enc)


def test_more_documents_than_texts_are_refused(lib):
    table, keys = np.full(8, -1, np.int64), np.zeros(2, native.KEY)
    with pytest.raises(AssertionError, match="0xFF"):
        native.chunks(lib, b"\xff a\xff b", _flags(b""), 1, table, keys)


def test_the_encoder_gives_sentencepieces_ids_on_both_paths(text_kernels, tiny_tokenizer):
    texts = ODD + random_texts(1000, seed=4)
    for max_words in (1 << 21, 60):  # 60: the cache is emptied in the middle of a batch
        enc = FlatEncoder(tiny_tokenizer, max_words=max_words)
        for bos, eos in ((True, True), (False, True), (False, False), (True, True)):
            got = enc.encode(texts, bos, eos)
            want = reference(tiny_tokenizer, texts, bos, eos)
            assert got[0].dtype == np.int64 and all(np.array_equal(a, b) for a, b in zip(got, want))
        assert enc.refusal is None


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_the_gather_in_one_pass_within_its_bound_or_in_two_past_it(lib, tiny_tokenizer, dtype):
    enc = FlatEncoder(tiny_tokenizer)
    texts = ["", " ", *random_texts(200, seed=5), "x"]
    enc.encode(texts, True, True)  # every chunk cached
    buf = _joined([t.encode("utf-8") for t in texts], texts)
    start, length, _, _, found, per_text = native.chunks(lib, buf, _flags(enc.isolated), len(texts), enc._table,
                                                         enc._keys)
    found = found.copy()
    for c in np.flatnonzero(found == -2).tolist():  # keys over 15 bytes: the encoder looks them up by their bytes
        found[c] = enc._long[buf[start[c]:start[c] + length[c]]]
    want = native.assemble(lib, found, per_text, enc._spans, enc._tokens, 1, 2, dtype)  # sized by a first pass
    total = len(want[0])
    assert total == int(want[1].sum()) and want[1][0] == 2  # the empty text: <s> </s>
    for bound in (0, 1, total - 1, total, total + 7, len(buf) + len(texts)):
        ids, lengths = native.assemble(lib, found, per_text, enc._spans, enc._tokens, 1, 2, dtype, bound=bound)
        assert np.array_equal(ids, want[0]) and np.array_equal(lengths, want[1]) and ids.dtype == dtype
    assert total <= len(buf) + len(texts)  # the bound the encoder gives


def test_the_compiled_insert_gives_the_lookups_of_the_numpy_rounds(lib, tiny_tokenizer, monkeypatch):
    # Many keys sharing home slots in a small table, inserted in batches that make it grow: every key is
    # then found by the numpy probe, as its chunk, on the table of either insert, and held once.
    texts = random_texts(600, seed=7)
    tables = {}
    for path in ("compiled", "numpy"):
        native.set_enabled(path == "compiled")
        enc = FlatEncoder(tiny_tokenizer)
        for k in range(0, len(texts), 50):
            enc.encode(texts[k:k + 50], True, True)
        tables[path] = enc
    native.set_enabled(True)
    a, b = tables["compiled"], tables["numpy"]
    short = np.flatnonzero(a._len[:len(a)] <= 15)
    assert len(a) == len(b) and len(short) > 300
    assert np.array_equal(a._keys[:len(a)], b._keys[:len(b)])  # the same chunks, numbered alike
    for enc in (a, b):
        assert np.array_equal(enc._probe(enc._lo[short], enc._hi[short]), short)
        entries = enc._table[enc._table >= 0]
        assert sorted((entries & ((1 << 40) - 1)).tolist()) == short.tolist()  # each once


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from([b"", b"a", b"ab", b"the", b"x" * 15, b"x" * 16, b"y" * 40, b"y" * 41, b"\x00",
                                 b"\x00\x00", b"a\x00", b"12345678", b"123456789", b"z" * 15 + b"a",
                                 b"z" * 15 + b"b"]), max_size=60),
       st.data())
def test_distinct_keys_are_the_numpy_passes(lib, keys, data):
    # Duplicates, keys equal but for trailing NULs, short and long keys: rows in order of first use.
    buf = b"".join(keys)
    length = np.fromiter(map(len, keys), np.int64, len(keys))
    start = np.cumsum(length) - length
    lo, hi = _packed(buf, start, length)
    chunks = np.array(sorted(data.draw(st.sets(st.integers(0, max(0, len(keys) - 1)), max_size=len(keys)))),
                      np.int64)[:len(keys)]
    got = native.distinct(lib, buf, start, length, lo, hi, chunks)
    native.set_enabled(False)
    try:
        want = _distinct(buf, start, length, lo, hi, chunks)
    finally:
        native.set_enabled(True)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_distinct_long_keys_are_told_apart_by_their_bytes(lib):
    keys = [b"z" * 15 + b"a", b"the", b"z" * 15 + b"b", b"z" * 15 + b"a", b"the"]  # one packing, two keys
    length = np.fromiter(map(len, keys), np.int64, len(keys))
    start = np.cumsum(length) - length
    lo, hi = _packed(b"".join(keys), start, length)
    rows, which = native.distinct(lib, b"".join(keys), start, length, lo, hi, np.arange(len(keys)))
    assert rows.tolist() == [0, 1, 2] and which.tolist() == [0, 1, 2, 0, 1]


def test_not_built_or_turned_off_is_the_numpy_path(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMAWORKS_NATIVE_DIR", str(tmp_path))  # nothing built there
    native.set_enabled(True)
    try:
        assert native.library() is None
        monkeypatch.delenv("LLAMAWORKS_NATIVE_DIR")
        monkeypatch.setenv("LLAMAWORKS_NATIVE", "0")
        native.set_enabled(True)
        assert native.library() is None
    finally:
        monkeypatch.undo()
        native.set_enabled(True)


def test_copy_runs_copies_each_run_and_refuses_one_out_of_bounds(lib):
    rng = np.random.default_rng(0)
    for dtype in (np.uint16, np.uint32):
        src = rng.integers(0, 60000, 10_000).astype(dtype)
        count = rng.integers(0, 50, 300)
        src_at = rng.integers(0, len(src) - 50, 300)
        dst_at = np.cumsum(count) - count
        dst = np.zeros(int(count.sum()), dtype)
        native.copy_runs(lib, src, src_at, count, dst, dst_at)
        assert np.array_equal(dst, np.concatenate([src[a:a + n] for a, n in zip(src_at, count)]))
    with pytest.raises(AssertionError, match="out of bounds"):
        native.copy_runs(lib, src, np.array([len(src) - 5]), np.array([6]), np.zeros(6, src.dtype), np.array([0]))
