"""Tokenizers behind one protocol (base.py): SentencePiece (the paper's, sentencepiece.py), its
tokenizer.json twin (hf.py), byte-level BPE (Llama 3's, bpe.py); `load_tokenizer` picks the
class from the file; training (train.py), the SentencePiece protobuf writer (spm_proto.py) and
the `tokenizer` commands (command.py)."""

from llamaworks.tokenizer.base import StreamDecoder, TokenizerProtocol, detect_format, stop_ids
from llamaworks.tokenizer.bpe import ByteLevelBPETokenizer, ByteStreamDecoder, llama3_special_tokens
from llamaworks.tokenizer.sentencepiece import Tokenizer, load_tokenizer

__all__ = ["ByteLevelBPETokenizer", "ByteStreamDecoder", "StreamDecoder", "Tokenizer", "TokenizerProtocol",
           "detect_format", "llama3_special_tokens", "load_tokenizer", "stop_ids"]
