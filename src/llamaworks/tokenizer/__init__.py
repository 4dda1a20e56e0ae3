"""Tokenizers behind one protocol (base.py): SentencePiece (the paper's, sentencepiece.py), its
tokenizer.json twin (hf.py); training (train.py), the SentencePiece protobuf writer
(spm_proto.py) and the `tokenizer` commands (command.py)."""

from llamaworks.tokenizer.base import StreamDecoder, TokenizerProtocol
from llamaworks.tokenizer.sentencepiece import Tokenizer

__all__ = ["StreamDecoder", "Tokenizer", "TokenizerProtocol"]
