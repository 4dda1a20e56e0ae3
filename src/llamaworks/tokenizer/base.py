"""The tokenizer protocol every tokenizer implements, and the pieces they share.

A tokenizer maps text to ids and back: `encode`, `encode_batch`, `decode`, a streaming
decoder whose output equals `decode`, its special ids and vocabulary size, and `save`.
SentencePiece (sentencepiece.py, the paper's) and its tokenizer.json twin (hf.py)
implement it; a new tokenizer family (e.g. byte-level BPE) implements it beside them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

_REPLACEMENT = "\ufffd"
# Lead byte -> UTF-8 sequence length as SentencePiece's DecodeUTF8 reads it; 0: never starts one.
_UTF8_LENGTH = [1] * 0x80 + [0] * 0x40 + [2] * 0x20 + [3] * 0x10 + [4] * 0x08 + [0] * 0x08


@runtime_checkable
class TokenizerProtocol(Protocol):
    """What generation, training, evaluation and serving use of a tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False) -> list[list[int]]: ...

    def decode(self, ids) -> str: ...

    def stream_decoder(self, prefix_ids: Sequence[int] = ()) -> StreamDecoder: ...

    def id_to_piece(self, token_id: int) -> str: ...

    def piece_table(self) -> list[str | int | None]: ...

    def save(self, path) -> None: ...


class StreamDecoder:
    """Turns generated ids into text as they arrive, with exactly `Tokenizer.decode`'s output.

    SentencePiece's decode rules, mirrored here: the first visible piece loses its leading
    dummy-prefix space; a run of byte pieces is decoded one character at a time, each byte that
    does not start a valid UTF-8 character becoming one U+FFFD; control pieces are invisible but
    end a byte run. With `prefix_ids` (a prompt), the output continues `decode(prefix_ids)`.
    """

    def __init__(self, tokenizer: TokenizerProtocol, prefix_ids: Sequence[int] = ()):
        self._tok = tokenizer
        self._table = tokenizer.piece_table()
        self._pending = bytearray()  # bytes of a character not yet complete (at most 3)
        self._at_start = True  # no visible piece yet: the next piece's dummy-prefix space goes
        self._shown = 0  # pending bytes the caller already saw as U+FFFD in decode(prefix_ids)
        for token_id in as_id_list(prefix_ids):
            self.push(token_id)
        self._shown = len(self._pending)

    def push(self, token_id: int) -> str:
        if not 0 <= token_id < len(self._table):
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{len(self._table) - 1})")
        entry = self._table[token_id]
        if isinstance(entry, int):
            self._pending.append(entry)
            self._at_start = False
            return self._drain(final=False)
        out = self._drain(final=True) if self._pending else ""
        if entry is None:
            return out
        if token_id == self._tok.unk_id:
            entry = self._tok.piece_text(token_id)  # the model's unk surface, " ⁇ " by default
        elif self._at_start:
            entry = self._tok.piece_text(token_id)  # applies the model's own leading-space rule
        self._at_start = False
        return out + entry

    def flush(self) -> str:
        return self._drain(final=True)

    def _drain(self, final: bool) -> str:
        buf, out, i = self._pending, [], 0
        while i < len(buf):
            b = buf[i]
            n = _UTF8_LENGTH[b]
            chunk = bytes(buf[i:i + n])
            if n and len(chunk) == n:
                try:
                    out.append(chunk.decode("utf-8"))  # strict: no overlongs, surrogates, > U+10FFFF
                    i += n
                    continue
                except UnicodeDecodeError:
                    pass
            elif n and not final and _may_complete(chunk, n):
                break  # wait for the rest of the character
            if i >= self._shown:
                out.append(_REPLACEMENT)
            i += 1
        del buf[:i]
        self._shown = max(0, self._shown - i)
        return "".join(out)


def _may_complete(head: bytes, n: int) -> bool:
    # Some continuation makes a valid character; the second byte has the tightest range
    # (E0: A0-BF, ED: 80-9F, F0: 90-BF, F4: 80-8F), so these three probes cover every case.
    pad = b"\x80" * (n - len(head) - 1)
    for c in (0x80, 0x90, 0xA0):
        try:
            (head + bytes([c]) + pad).decode("utf-8")
            return True
        except UnicodeDecodeError:
            pass
    return False


def as_id_list(ids) -> list[int]:
    if hasattr(ids, "tolist"):  # torch.Tensor, numpy.ndarray
        ids = ids.tolist()
    if isinstance(ids, int):
        ids = [ids]
    ids = list(ids)
    if ids and isinstance(ids[0], list):
        raise ValueError("decode takes one sequence of ids (1-D); decode each row of a batch separately")
    return [int(i) for i in ids]
