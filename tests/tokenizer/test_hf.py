"""tokenizer.json export and the `tokenizers` backend: identical to SentencePiece, id for id."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("tokenizers")

from llamaworks.tokenizer import Tokenizer  # noqa: E402
from llamaworks.tokenizer.hf import HFTokenizer, save_tokenizer_json  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tokjson") / "tokenizer.json"
    save_tokenizer_json(tiny_tokenizer, path)
    return tiny_tokenizer, Tokenizer.from_file(path)


# Characters the property tests draw from: ASCII, every whitespace SentencePiece might treat
# specially, digits, accents, CJK, emoji (4-byte UTF-8, byte fallback) and marker look-alikes.
ALPHABET = st.one_of(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),
    st.sampled_from(list(" \n\t\r\x0b\x0c\u00a0\u3000\u2581\u2047<>/s0123456789")),
    st.sampled_from(list("éüßñçø日本語中文字한국어こんにちは")),
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),
    st.characters(blacklist_categories=("Cs",)),  # anything encodable, including unassigned code points
)
TEXTS = st.text(alphabet=ALPHABET, max_size=40) | st.sampled_from(
    ["", " ", "  leading", "\n", "\tx", "<s>", "</s>", "<unk>", "12345", "a  b", "😀", "\u2581x", " \u2047 "])


def test_from_file_dispatches_on_format(pair, tiny_tokenizer):
    sp, hf = pair
    assert isinstance(Tokenizer.from_file(tiny_tokenizer.path), Tokenizer)
    assert isinstance(hf, HFTokenizer)
    assert (hf.vocab_size, hf.bos_id, hf.eos_id, hf.unk_id) == (sp.vocab_size, sp.bos_id, sp.eos_id, sp.unk_id)
    assert [hf.id_to_piece(i) for i in range(sp.vocab_size)] == [sp.id_to_piece(i) for i in range(sp.vocab_size)]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS, bos=st.booleans(), eos=st.booleans())
def test_same_ids_and_text_for_any_string(pair, text, bos, eos):
    sp, hf = pair
    ids = sp.encode(text, bos=bos, eos=eos)
    assert hf.encode(text, bos=bos, eos=eos) == ids
    assert hf.decode(ids) == sp.decode(ids)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 511) | st.integers(3, 3 + 255), max_size=12))
def test_same_text_for_any_ids(pair, ids):
    # Arbitrary ids include byte pieces that form invalid UTF-8 (lone continuation bytes,
    # truncated sequences, surrogates, > U+10FFFF), control and unk pieces.
    sp, hf = pair
    want = sp.decode(ids)
    assert hf.decode(ids) == want
    stream = hf.stream_decoder()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == want


def test_batch_and_errors(pair, tmp_path):
    sp, hf = pair
    texts = ["hello", " world\n", ""]
    assert hf.encode_batch(texts, bos=True, eos=True) == sp.encode_batch(texts, bos=True, eos=True)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        hf.decode([sp.vocab_size])
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_file(bad)
    wordpiece = {"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}
    bad.write_text(json.dumps(wordpiece))
    with pytest.raises(ValueError, match="BPE with byte_fallback"):
        HFTokenizer(bad)


def test_exported_file_is_read_by_plain_tokenizers(pair, tiny_tokenizer, tmp_path):
    # Third-party readers use the file's own pipeline (normaliser, post-processor adding <s>,
    # decoders): it must agree with SentencePiece on ordinary text too.
    from tokenizers import Tokenizer as RawTokenizer

    sp, _ = pair
    save_tokenizer_json(tiny_tokenizer, tmp_path / "t.json")
    raw = RawTokenizer.from_file(str(tmp_path / "t.json"))
    for text in ["Hello world", "  two leading spaces", "tabs\tand\nnewlines", "digits 2024", "日本語 😀", ""]:
        assert raw.encode(text).ids == sp.encode(text), text
        ids = sp.encode(text, bos=False)
        assert raw.decode(ids) == sp.decode(ids), text
