"""The compiled BPE of the word cache's new chunks (native.BpeModel, csrc/bpe.cpp) against SentencePiece
itself: the same ids for every key, on models of several sizes; refused where a model is not its kind."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamaworks.tokenizer import load_tokenizer, native, word_cache
from llamaworks.tokenizer.word_cache import FlatEncoder, _flags, bpe_model, bpe_refusal


def train(tmp_path_factory, docs: list[str], **options):
    model = io.BytesIO()
    kw = dict(model_type="bpe", vocab_size=1000, byte_fallback=True, split_digits=True,
              normalization_rule_name="identity", remove_extra_whitespaces=False, character_coverage=0.9995,
              bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=1, minloglevel=2) | options
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_writer=model, **kw)
    path = tmp_path_factory.mktemp("bpe") / "tok.model"
    path.write_bytes(model.getvalue())
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def big_tokenizer(tmp_path_factory, corpus_docs):
    # More merges than the session's 512-piece model; rare characters left to byte fallback.
    return train(tmp_path_factory, [line for doc in corpus_docs for line in doc.splitlines() if line.strip()],
                 vocab_size=2000)


def compiled_and_sentencepiece(lib, tok, keys: list[bytes]):
    enc = FlatEncoder(tok)
    model = native.BpeModel(lib, *bpe_model(tok), enc._lone(), _flags(enc.isolated))
    lengths = np.fromiter(map(len, keys), np.int64, len(keys))
    got = model.encode(b"".join(keys), np.cumsum(lengths) - lengths, lengths)
    counts, ids = enc._sentencepiece(keys)
    return got, (ids, counts)


# Keys as the word cache cuts them (spaces first, then no space), and any other: ASCII, digits (isolated with
# split_digits), newlines, accents, CJK, emoji and a private-use character (byte fallback), runs long
# enough for the heap path (past 64 characters).
KEY = st.lists(st.sampled_from(list("abcdefghij etaoin the king 0123456789\n\t.,;'!?-") +
                               ["\u00e9", "\u4e2d", "\U0001f600", "\ue000", "  ", "th", "ing", "ll", "x" * 70]),
               max_size=30).map(lambda parts: "".join(parts).encode("utf-8"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(KEY, min_size=1, max_size=20, unique=True))
def test_property_the_compiled_bpe_gives_sentencepieces_ids(lib, tiny_tokenizer, big_tokenizer, keys):
    for tok in (tiny_tokenizer, big_tokenizer):
        got, want = compiled_and_sentencepiece(lib, tok, keys)
        assert got is not None
        assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0]), keys


def test_every_word_of_the_corpus_and_long_runs(lib, big_tokenizer, corpus_docs):
    words = sorted({w.encode() for doc in corpus_docs for w in doc.split(" ")})
    words += [b"a" * 300, b"the" * 40, b"\xe4\xb8\xad" * 70, b" " * 90 + b"x", b"", b"7", b"\n\n"]
    got, want = compiled_and_sentencepiece(lib, big_tokenizer, words)
    assert len(words) > 5000 and np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])


def test_models_of_another_kind_are_refused(tmp_path_factory, corpus_docs, big_tokenizer):
    docs = [line for doc in corpus_docs[:2] for line in doc.splitlines() if line.strip()]
    assert bpe_refusal(big_tokenizer) is None
    assert bpe_refusal(train(tmp_path_factory, docs, model_type="unigram", vocab_size=500)) == "not a BPE model"
    assert bpe_refusal(train(tmp_path_factory, docs, vocab_size=500, byte_fallback=False)) == "no byte fallback"
    defined = train(tmp_path_factory, docs, vocab_size=500, user_defined_symbols=["<tag>"])
    assert "user-defined" in bpe_refusal(defined)
    # The encoder still gives SentencePiece's ids there (SentencePiece encodes the new chunks).
    enc = FlatEncoder(defined)
    texts = [d[:300] + " <tag> x" for d in docs[:20]]
    ids, lengths = enc.encode(texts, bos=True, eos=True)
    assert enc._bpe is False or enc.refusal is not None
    want = defined.encode_batch(texts, bos=True, eos=True)
    assert ids.tolist() == [i for row in want for i in row] and lengths.tolist() == [len(r) for r in want]


def test_a_difference_from_sentencepiece_turns_the_compiled_bpe_off(lib, big_tokenizer, corpus_docs, monkeypatch,
                                                                     caplog):
    real = native.BpeModel.encode

    def wrong(self, buf, start, length):
        ids, counts = real(self, buf, start, length)
        return ids + 1, counts  # every id off by one

    monkeypatch.setattr(native.BpeModel, "encode", wrong)
    enc = FlatEncoder(big_tokenizer)
    texts = [d[:2000] for d in corpus_docs]
    with caplog.at_level(logging.WARNING, logger=word_cache.__name__):
        ids, lengths = enc.encode(texts, bos=True, eos=True)
    assert enc._bpe is False and "differed from SentencePiece" in caplog.text
    want = big_tokenizer.encode_batch(texts, bos=True, eos=True)
    assert ids.tolist() == [i for row in want for i in row]
