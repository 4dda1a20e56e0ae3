"""The word cache in front of SentencePiece gives SentencePiece's own ids, document for document."""

from __future__ import annotations

import random

import numpy as np
import pytest
import sentencepiece as spm

from llamaworks.tokenizer import Tokenizer
from llamaworks.tokenizer.word_cache import FlatEncoder, flat_encoder, word_cache_refusal

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
def test_the_ids_are_sentencepieces(tiny_tokenizer, bos, eos):
    assert word_cache_refusal(tiny_tokenizer) is None
    enc = FlatEncoder(tiny_tokenizer)
    texts = ODD + random_texts(2000, seed=1)
    for _ in range(2):  # cold, then every chunk from the cache
        ids, lengths = enc.encode(texts, bos=bos, eos=eos)
        ref_ids, ref_lengths = reference(tiny_tokenizer, texts, bos, eos)
        assert np.array_equal(lengths, ref_lengths) and np.array_equal(ids, ref_ids)
    assert enc.refusal is None and len(enc._index) > 100


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


def test_a_full_cache_is_emptied_and_stays_exact(tiny_tokenizer):
    enc = FlatEncoder(tiny_tokenizer, max_words=50)
    for seed in range(4):
        texts = random_texts(300, seed)
        assert all(np.array_equal(a, b) for a, b in zip(enc.encode(texts, True, True),
                                                       reference(tiny_tokenizer, texts, True, True)))
        assert len(enc._index) <= max(50, len({w for t in texts for w in t.split()}) * 4)


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
    real = enc._cached
    monkeypatch.setattr(enc, "_cached", lambda texts, bos, eos: (real(texts, bos, eos)[0] + 1, real(texts, bos,
                                                                                                   eos)[1]))
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
