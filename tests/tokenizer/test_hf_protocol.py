"""HFTokenizer (a LLaMA-style tokenizer.json) speaks the whole protocol: it takes allow_special,
which changes nothing ("<s>" typed in text is text, as in SentencePiece), and has stop_ids."""

from __future__ import annotations

import pytest

pytest.importorskip("tokenizers")

from llamaworks.tokenizer import TokenizerProtocol, stop_ids  # noqa: E402
from llamaworks.tokenizer.hf import HFTokenizer, save_tokenizer_json  # noqa: E402


def test_allow_special_is_accepted_and_changes_nothing(tiny_tokenizer, tmp_path):
    save_tokenizer_json(tiny_tokenizer, tmp_path / "tokenizer.json")
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    assert isinstance(tok, TokenizerProtocol)
    text = "The king</s> said <s> good night"
    plain = tok.encode(text)
    assert plain == tiny_tokenizer.encode(text)
    assert tok.encode(text, allow_special=True) == plain
    assert tok.encode_batch([text, "x"], bos=False, allow_special={"</s>"}) == tok.encode_batch([text, "x"], bos=False)
    assert tok.stop_ids == stop_ids(tok) == {tiny_tokenizer.eos_id}
