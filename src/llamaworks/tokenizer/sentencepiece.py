"""The SentencePiece BPE tokenizer of the paper (section 2): digits split, byte fallback.

Trained models (tokenizer/train.py) have the released LLaMA layout: `<unk>`=0, `<s>`=1, `</s>`=2, the 256 byte
pieces `<0x00>`..`<0xFF>` at ids 3-258, then the merges. Any SentencePiece `.model` loads,
the released LLaMA `tokenizer.model` included.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from llamaworks.atomic import atomic_write_bytes
from llamaworks.paths import path_kind
from llamaworks.tokenizer.base import (
    JSON_BYTE_LEVEL,
    JSON_SENTENCEPIECE,
    TIKTOKEN,
    StreamDecoder,
    as_id_list,
    detect_format,
)
from llamaworks.tokenizer.bpe import ByteLevelBPETokenizer
from llamaworks.tokenizer.hf import HFTokenizer
from llamaworks.tokenizer.train import TrainStats, train_sentencepiece

__all__ = ["Tokenizer", "StreamDecoder", "TrainStats", "load_tokenizer"]


class Tokenizer:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        kind = path_kind(self.path)
        if kind == "missing":
            raise FileNotFoundError(f"tokenizer model {self.path} does not exist")
        if kind == "directory":
            raise ValueError(f"tokenizer model {self.path} is a directory: pass the .model file inside it")
        if kind != "file":  # a FIFO or a device would be read forever
            raise ValueError(f"tokenizer model {self.path} is {kind}, not a regular file: pass the .model file")
        proto = self.path.read_bytes()
        if not proto:
            raise ValueError(f"tokenizer model {self.path} is empty: retrain or copy it again")
        self._load(proto)

    @classmethod
    def from_proto(cls, proto: bytes, path: str | os.PathLike = "tokenizer.model") -> Tokenizer:
        """A tokenizer from a serialised SentencePiece model held in memory (e.g. rebuilt from a
        GGUF file's vocabulary); `path` is the name it is known by, not read."""
        tok = cls.__new__(cls)
        tok.path = Path(path)
        tok._load(proto)
        return tok

    def _load(self, proto: bytes) -> None:
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
        except RuntimeError as e:
            try:  # another kind of tokenizer file passed to this class: say which, and how to load it
                kind = detect_format(self.path) if proto[:1] != b"\n" else None
            except ValueError:
                kind = None
            if kind in (TIKTOKEN, JSON_BYTE_LEVEL, JSON_SENTENCEPIECE):
                what = "a tiktoken BPE model (Llama 3)" if kind == TIKTOKEN else "a Hugging Face tokenizer.json"
                raise ValueError(f"{self.path} is {what}, not a SentencePiece model: load it with "
                                 f"Tokenizer.from_file or load_tokenizer") from None
            raise ValueError(f"{self.path} is not a SentencePiece model ({e})") from None
        self._proto = proto  # the file's own bytes, so save() copies the released model exactly
        self.vocab_size: int = self._sp.vocab_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.pad_id: int = self._sp.pad_id()
        self.unk_id: int = self._sp.unk_id()
        self.train_stats: TrainStats | None = None
        self._table: list[str | int | None] | None = None  # built by the first stream_decoder()

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    @property
    def model_proto(self) -> bytes:
        return self._proto

    @property
    def processor(self) -> spm.SentencePieceProcessor:
        """The underlying SentencePieceProcessor (tokenizer.json export reads its pieces)."""
        return self._sp

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset([self.eos_id] if self.eos_id >= 0 else [])

    # allow_special is the protocol's; SentencePiece has no special tokens spelled in text
    # ("<s>" typed by a user is text either way), so it changes nothing here.
    def encode(self, text: str, bos: bool = True, eos: bool = False,
               allow_special: bool | Collection[str] = False) -> list[int]:
        return self._sp.encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False,
                     allow_special: bool | Collection[str] = False) -> list[list[int]]:
        return self._sp.encode(list(texts), add_bos=bos, add_eos=eos, num_threads=os.cpu_count() or 1)

    def decode(self, ids) -> str:
        ids = as_id_list(ids)
        try:
            return self._sp.decode(ids)
        except IndexError:
            bad = [i for i in ids if not 0 <= i < self.vocab_size][:5]
            raise ValueError(
                f"token ids {bad} are outside the vocabulary (0..{self.vocab_size - 1})"
            ) from None

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_bytes(Path(path), self._proto)

    @classmethod
    def from_file(cls, path: str | os.PathLike, specials: str | None = None):
        """The tokenizer in `path`, its class picked from the content (base.detect_format): a
        SentencePiece `.model` (this class), a tiktoken `tokenizer.model` (Llama 3) or a
        byte-level tokenizer.json (`ByteLevelBPETokenizer`), a SentencePiece-style
        tokenizer.json (`HFTokenizer`). All have the same interface. `specials` names the
        special-token table a tiktoken file gets ("llama3.1", the default, or "llama3"; see
        bpe.llama3_special_tokens); the other formats carry their own."""
        kind = detect_format(path)
        if kind == TIKTOKEN:
            return ByteLevelBPETokenizer(path, specials=specials or "llama3.1")
        if kind == JSON_BYTE_LEVEL:
            return ByteLevelBPETokenizer(path)
        if kind == JSON_SENTENCEPIECE:
            return HFTokenizer(path)
        return cls(path)

    def piece_text(self, token_id: int) -> str:
        return self._sp.decode([token_id])

    def stream_decoder(self, prefix_ids: Sequence[int] = ()) -> StreamDecoder:
        return StreamDecoder(self, prefix_ids)

    def piece_table(self) -> list[str | int | None]:
        # Per id: a byte value, None for control pieces (<s>, </s>: invisible), or the text.
        if self._table is None:
            sp = self._sp
            self._table = [
                int(p[3:5], 16) if sp.is_byte(i) else None if sp.is_control(i) else p.replace("\u2581", " ")
                for i, p in enumerate(sp.id_to_piece(i) for i in range(self.vocab_size))
            ]
        return self._table

    @classmethod
    def train(cls, output: str | os.PathLike, **options: Any) -> Tokenizer:
        """Train with the paper's recipe, write `output` and load it; `options` are
        train_sentencepiece's (files= or documents=, vocab_size, character_coverage,
        input_sentence_size, seed: tokenizer/train.py)."""
        stats = train_sentencepiece(output, **options)
        tok = cls(output)
        tok.train_stats = stats
        return tok


def load_tokenizer(path: str | os.PathLike, specials: str | None = None):
    """Any tokenizer file llamaworks reads, as the class its content calls for (Tokenizer.from_file)."""
    return Tokenizer.from_file(path, specials=specials)
