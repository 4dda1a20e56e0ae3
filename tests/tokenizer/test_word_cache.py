"""The word cache in front of SentencePiece gives SentencePiece's own ids, document for document (the tests
taking `text_kernels` run with the compiled chunk kernels and with the numpy passes)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamaworks.tokenizer import Tokenizer, native
from llamaworks.tokenizer.word_cache import (
    FlatEncoder,
    _fitted,
    flat_encoder,
    isolated_bytes,
    split_chunks,
    word_cache_refusal,
)

ODD = ["", " ", "  ", "a", " a", "a ", "a  b ", "\u2581", "\u2581a", "a\u2581", "\u2581 \u2581", "\n", " \n ",
       "12345 678", "\U0001f600\U0001f600 x", "\t tab", "<s> and </s> as text", "caf\u00e9 \u4e2d\u6587",
       "\u3000ideographic\u3000space", "nul\x00byte", "a" * 500, " " * 40 + "x"]


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abc de  \n\t\u2581\u2581x\u00e9\u4e2d\U0001f600 0123.,") + [" ", "  ", "\u3000", "\x00", "<s>",
                                                                                 "the", " the", "king "]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def reference(tok, texts, bos, eos) -> tuple[np.ndarray, np.ndarray]:
    ids = [tok.processor.encode(t, add_bos=bos, add_eos=eos) for t in texts]  # one text at a time
    return np.array([i for x in ids for i in x], np.int64), np.array([len(x) for x in ids], np.int64)


@pytest.mark.parametrize("bos, eos", [(True, True), (True, False), (False, False)])
def test_the_ids_are_sentencepieces(text_kernels, tiny_tokenizer, bos, eos):
    assert word_cache_refusal(tiny_tokenizer) is None
    enc = FlatEncoder(tiny_tokenizer)
    texts = ODD + random_texts(2000, seed=1)
    for _ in range(2):  # cold, then every chunk from the cache
        ids, lengths = enc.encode(texts, bos=bos, eos=eos)
        ref_ids, ref_lengths = reference(tiny_tokenizer, texts, bos, eos)
        assert np.array_equal(lengths, ref_lengths) and np.array_equal(ids, ref_ids)
    assert enc.refusal is None and len(enc) > 100


def test_ordinary_texts_split_on_spaces_give_the_same_ids(tiny_tokenizer):
    # No leading, doubled or "▁" space: a text's chunks come from str.split (the fast path), other texts'
    # from the chunk regex, both in one batch. Both agree with SentencePiece.
    rng = random.Random(7)
    plain = ["the king", "a", "caf\u00e9 \u4e2d\u6587\ttab\nnew line", "ends with a space ", "x\u3000y z",
             "12345 678.", "<s> and </s> as text", "\U0001f600\U0001f600 x", "nul\x00byte end"]
    enc = FlatEncoder(tiny_tokenizer)
    for batch in (plain, plain[:3] + ["  doubled"], [" leading"] + plain, plain + [""], plain + ["a\u2581b"],
                  [" ".join(rng.choice(["the", "king", "and", "queen", "x\ny"]) for _ in range(rng.randint(1, 30)))
                   for _ in range(200)]):
        for _ in range(2):
            got = enc.encode(batch, True, True)
            assert all(np.array_equal(a, b) for a, b in zip(got, reference(tiny_tokenizer, batch, True, True))), batch


def test_a_full_cache_is_emptied_and_stays_exact(text_kernels, tiny_tokenizer):
    enc = FlatEncoder(tiny_tokenizer, max_words=50)
    for seed in range(4):
        texts = random_texts(300, seed)
        assert all(np.array_equal(a, b) for a, b in zip(enc.encode(texts, True, True),
                                                       reference(tiny_tokenizer, texts, True, True)))
        assert len(enc) <= max(50, len({w for t in texts for w in t.split()}) * 4)
    for bad in (0, 1 << 40):  # a table entry numbers its chunk in 40 bits
        with pytest.raises(ValueError, match="max_words"):
            FlatEncoder(tiny_tokenizer, max_words=bad)


def test_the_encoder_is_kept_across_loads_of_one_model(tiny_tokenizer):
    first = flat_encoder(tiny_tokenizer)
    assert flat_encoder(Tokenizer(tiny_tokenizer.path)) is first


def test_other_models_and_tokenizers_use_their_own_encoder(tmp_path, tiny_tokenizer):
    # NFKC folds "\u3000" into a space, so a text's chunks are not its normalised chunks: refused.
    docs = random_texts(300, seed=5) + ["the king and the queen"] * 50
    (tmp_path / "docs.txt").write_text("\n".join(d.replace("\n", " ") for d in docs))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "docs.txt"), model_prefix=str(tmp_path / "nfkc"),
                                   vocab_size=60, model_type="bpe", minloglevel=2)
    nfkc = Tokenizer(tmp_path / "nfkc.model")
    assert "normaliser 'nmt_nfkc'" in word_cache_refusal(nfkc)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "docs.txt"), model_prefix=str(tmp_path / "suffix"),
                                   vocab_size=60, model_type="bpe", normalization_rule_name="identity",
                                   treat_whitespace_as_suffix=True, remove_extra_whitespaces=False,
                                   minloglevel=2)
    assert word_cache_refusal(Tokenizer(tmp_path / "suffix.model")) == "whitespace as suffix"
    texts = ODD + docs
    ids, lengths = FlatEncoder(nfkc).encode(texts, True, True)
    assert all(np.array_equal(a, b) for a, b in zip((ids, lengths), reference(nfkc, texts, True, True)))

    class Chars:  # any tokenizer with encode_batch
        bos_id, eos_id = 1, 2

        def encode_batch(self, texts, bos=True, eos=False):
            return [[1] * bos + [ord(c) for c in t] + [2] * eos for t in texts]

    enc = FlatEncoder(Chars())
    assert enc.refusal == "not a SentencePiece model"
    ids, lengths = enc.encode(["ab", ""], True, True)
    assert ids.tolist() == [1, 97, 98, 2, 1, 2] and lengths.tolist() == [4, 2]


def test_a_mismatch_on_the_first_batch_turns_the_cache_off(tiny_tokenizer, monkeypatch, caplog):
    enc = FlatEncoder(tiny_tokenizer)
    real = enc._word_cached
    monkeypatch.setattr(enc, "_word_cached", lambda *a: (real(*a)[0] + 1, real(*a)[1]))
    ids, _ = enc.encode(["the king"], True, True)
    assert enc.refusal.startswith("its ids differed") and "word cache is off" in caplog.text
    assert ids.tolist() == tiny_tokenizer.encode("the king", bos=True, eos=True)


def test_the_model_settings_are_read_without_protobuf(tmp_path, tiny_tokenizer, monkeypatch):
    # protobuf is not a dependency: the refusal reads the model file by hand (spm_proto.read_message).
    import sys

    from llamaworks.tokenizer.spm_proto import read_message

    monkeypatch.setitem(sys.modules, "google.protobuf", None)  # any import of protobuf now fails
    monkeypatch.setitem(sys.modules, "sentencepiece.sentencepiece_model_pb2", None)
    assert word_cache_refusal(tiny_tokenizer) is None
    (tmp_path / "docs.txt").write_text("the king and the queen\n" * 50 + "a b c d e f g h\n")
    for option, refusal in (("add_dummy_prefix", "needs add_dummy_prefix"),
                            ("remove_extra_whitespaces", "needs add_dummy_prefix")):
        # identity normalisation, each setting in turn against the word cache's need
        value = option == "remove_extra_whitespaces"
        kwargs = {"remove_extra_whitespaces": False, option: value}
        spm.SentencePieceTrainer.train(input=str(tmp_path / "docs.txt"), model_prefix=str(tmp_path / option),
                                       vocab_size=40, model_type="bpe", normalization_rule_name="identity",
                                       minloglevel=2, **kwargs)
        assert word_cache_refusal(Tokenizer(tmp_path / f"{option}.model")).startswith(refusal), option
    model = read_message(tiny_tokenizer.processor.serialized_model_proto())
    assert len(model[1]) == tiny_tokenizer.processor.get_piece_size()  # every piece, field 1 repeated
    assert read_message(model[3][-1])[1] == [b"identity"]


def chunk_keys(texts: list[str], isolated: bytes = b"") -> list[list[bytes]]:
    buf, start, length, per_text = split_chunks(texts, isolated)
    keys = [buf[s:s + n] for s, n in zip(start.tolist(), length.tolist())]
    bounds = np.concatenate([[0], np.cumsum(per_text)]).tolist()
    return [keys[a:b] for a, b in zip(bounds, bounds[1:])]


def test_chunks_are_cut_at_runs_of_spaces_after_the_dummy_prefix():
    # A key is its chunk without the first "▁"; "▁" in the text counts as a space (both normalise to "▁").
    assert chunk_keys(["the king", "", " a", "a ", "a  b", "x\u2581y", "\u2581", "caf\u00e9\nnew"]) == [
        [b"the", b"king"], [], [b" a"], [b"a", b""], [b"a", b" b"], [b"x", b"y"], [b" "], ["caf\u00e9\nnew".encode()]]
    assert chunk_keys([]) == []
    # An isolated character (no merge touches it) starts a chunk of its own and stays in its key.
    assert chunk_keys(["a\nb 12", "\n", " \n"], b"\n12") == [[b"a", b"\nb", b"", b"1", b"2"], [b"", b"\n"],
                                                              [b" ", b"\n"]]


def test_isolated_characters_are_those_no_piece_joins(text_kernels, tmp_path, tiny_tokenizer):
    alone = isolated_bytes(tiny_tokenizer)
    assert b"\n" in alone and b" " not in alone and b"e" not in alone  # "\n": byte fallback, in no piece
    (tmp_path / "docs.txt").write_text("the king and the queen 9z 9z\n" * 50 + "a b c d e f g h 1 2 3\n")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "docs.txt"), model_prefix=str(tmp_path / "ud"),
                                   vocab_size=300, model_type="bpe", normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, byte_fallback=True, split_digits=True,
                                   user_defined_symbols=["9z"], minloglevel=2)
    tok = Tokenizer(tmp_path / "ud.model")
    alone = isolated_bytes(tok)
    assert b"9" not in alone and b"z" not in alone and b"1" in alone  # "9z" is a piece: 9 and z may join
    texts = ["9z 19z9 z9z\n9\n\nz", "1 2 3 123 9z", "the 9zking\n and"] + random_texts(300, seed=9)
    got = FlatEncoder(tok).encode(texts, True, True)
    assert all(np.array_equal(a, b) for a, b in zip(got, reference(tok, texts, True, True)))


def test_keys_that_differ_past_eight_bytes_or_in_trailing_nuls_stay_apart(text_kernels, tiny_tokenizer):
    # Short keys are looked up as their bytes packed in two uint64 plus the length; long ones by their bytes.
    words = ["a", "a\x00", "a\x00\x00", "abcdefgh", "abcdefgi", "abcdefghX", "abcdefghY", "p" * 16, "p" * 15 + "q",
             "p" * 17, "p" * 16 + "q", "\U0001f600" * 4, "\U0001f600" * 5, "x" * 100, "x" * 99 + "y"]
    texts = [" ".join(random.Random(k).choices(words, k=12)) for k in range(200)] + words
    enc = FlatEncoder(tiny_tokenizer)
    for _ in range(2):
        got = enc.encode(texts, True, True)
        assert all(np.array_equal(a, b) for a, b in zip(got, reference(tiny_tokenizer, texts, True, True)))


def test_the_table_grows_and_stays_exact(text_kernels, tiny_tokenizer):
    # Tens of thousands of distinct short keys: the open-addressing table doubles several times.
    rng = random.Random(3)
    texts = [" ".join("".join(rng.choices("abcdefghijklmnop\u00e9", k=rng.randint(1, 12))) for _ in range(50))
             for _ in range(800)]
    enc = FlatEncoder(tiny_tokenizer)
    for part in (texts[:400], texts[400:], texts):
        got = enc.encode(part, True, False)
        assert all(np.array_equal(a, b) for a, b in zip(got, reference(tiny_tokenizer, part, True, False)))
    assert len(enc) > 20000 and len(enc._table) >= 2 * 20000


HOSTILE = st.lists(st.sampled_from(list("ab e 9 0 1\u2581\n\t\r\x00\u3000\u00e9\u4e2d\U0001f600\U0001f9d1\u200d"
                                        "\U000e0001\ufeff\uffff.,<>") + ["  ", "    ", "the", "king", "1234567",
                                                                        "\u2581\u2581", "<s>", "</s>", "x" * 9]),
                   max_size=40).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(HOSTILE, max_size=8))
def test_property_any_texts_give_sentencepieces_ids(text_kernels, tiny_tokenizer, texts):
    # Digits, emoji and ZWJ sequences, characters outside the vocabulary (byte fallback), whitespace
    # runs, NUL, "▁" typed in the text, empty texts: the ids SentencePiece gives each text alone.
    enc = flat_encoder(tiny_tokenizer)  # one cache across examples, as across a corpus
    for bos, eos in ((True, True), (False, False)):
        got = enc.encode(texts, bos, eos)
        assert all(np.array_equal(a, b) for a, b in zip(got, reference(tiny_tokenizer, texts, bos, eos))), texts


def test_unpaired_surrogates_are_refused_as_by_sentencepiece(text_kernels, tiny_tokenizer):
    # A lone surrogate (JSON can spell one, "\\ud800") is no UTF-8: both encoders raise, neither guesses.
    bad = ["fine", "half \ud800 a pair"]
    with pytest.raises(UnicodeEncodeError):
        FlatEncoder(tiny_tokenizer).encode(bad, True, True)
    with pytest.raises((UnicodeEncodeError, TypeError, RuntimeError)):
        reference(tiny_tokenizer, bad, True, True)


CORPORA = Path(__file__).resolve().parents[2].parent / "shared" / "corpora"


@pytest.mark.slow
def test_every_corpus_file_gives_sentencepieces_ids(text_kernels, tiny_tokenizer):
    files = sorted(p for p in CORPORA.rglob("*") if p.is_file()) if CORPORA.is_dir() else []
    if not files:
        pytest.skip(f"{CORPORA} is absent (a clone without ../shared)")
    enc = FlatEncoder(tiny_tokenizer)
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        texts = [text, *text.split("\n\n")[:2000]]  # the whole file, and its paragraphs as documents
        got = enc.encode(texts, True, True)
        assert all(np.array_equal(a, b) for a, b in zip(got, reference(tiny_tokenizer, texts, True, True))), f


def test_new_chunks_taken_from_one_encoder_spare_another_sentencepiece(text_kernels, tiny_tokenizer, monkeypatch):
    # The workers of `prepare` share the chunks each sent to SentencePiece (take_new -> put_new): the
    # taker encodes them from its cache, with SentencePiece's ids, and asks SentencePiece only the rest.
    texts = ODD + random_texts(400, seed=11) + ["x" * 40 + " " + "y" * 20]  # long keys too
    a, b = FlatEncoder(tiny_tokenizer), FlatEncoder(tiny_tokenizer)
    assert a.take_new() == b""  # not sharing: nothing kept
    a.sharing = True
    a.encode(texts[:200], True, True)
    records = a.take_new()
    assert records and a.take_new() == b""  # each chunk handed out once
    a.encode(texts[200:], True, True)
    records += a.take_new()
    assert b.put_new(records + records) == len(a) == len(b)  # a chunk in two records: cached once
    asked = []
    add = FlatEncoder._add
    monkeypatch.setattr(FlatEncoder, "_add", lambda self, keys, *x: (asked.append(len(keys)), add(self, keys, *x))[1])
    got = b.encode(texts, True, True)
    assert asked == [] and all(np.array_equal(x, y) for x, y in zip(got, reference(tiny_tokenizer, texts, True, True)))
    assert b.put_new(records) == 0
    full = FlatEncoder(tiny_tokenizer, max_words=10)
    assert full.put_new(records) == 0 and len(full) == 0  # a cache that cannot hold them takes none
    more = ["zz qq " + t for t in random_texts(50, seed=12)]
    got = b.encode(more, True, True)  # chunks nobody shared still go to SentencePiece
    assert asked and all(np.array_equal(x, y) for x, y in zip(got, reference(tiny_tokenizer, more, True, True)))


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_ids_come_in_the_dtype_asked_for(text_kernels, tiny_tokenizer, dtype):
    # prepare asks for its shards' uint16: the gather writes it, no int64 array in between.
    enc = FlatEncoder(tiny_tokenizer)
    texts = ODD + random_texts(300, seed=4)
    ids, lengths = enc.encode(texts, True, True, dtype=dtype)
    want, want_lengths = reference(tiny_tokenizer, texts, True, True)
    assert ids.dtype == dtype and np.array_equal(ids, want) and np.array_equal(lengths, want_lengths)


def test_ids_that_do_not_fit_the_dtype_are_refused(text_kernels, tiny_tokenizer):
    enc = FlatEncoder(tiny_tokenizer)
    enc.encode(["the king"])
    if native.library() is not None:  # the gather checks the largest id the cache holds
        enc._max_id = 70000  # as if a piece had an id past uint16
        with pytest.raises(ValueError, match="does not fit uint16"):
            enc.encode(["the king"], dtype=np.uint16)
    with pytest.raises(ValueError, match="do not fit uint16"):  # the other paths check the ids themselves
        _fitted(np.array([5, 70000]), np.array([2]), np.dtype(np.uint16))
    with pytest.raises(ValueError, match="dtype must be"):
        enc.encode(["the king"], dtype=np.float32)
