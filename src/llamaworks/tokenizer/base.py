"""The tokenizer protocol every tokenizer implements, and the pieces they share.

A tokenizer maps text to ids and back: `encode`, `encode_batch`, `decode`, a streaming
decoder whose output equals `decode`, its special ids and vocabulary size, and `save`.
SentencePiece (sentencepiece.py, the paper's) and its tokenizer.json twin (hf.py)
implement it, and byte-level BPE (bpe.py, Llama 3's) beside them. `detect_format` tells the
kinds of file apart; `Tokenizer.from_file` loads any of them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Sequence
from pathlib import Path
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

    # allow_special: text spelling a special token ("<|eot_id|>") stays text unless this is
    # True or names it; SentencePiece has no such tokens and ignores it.
    def encode(self, text: str, bos: bool = True, eos: bool = False,
               allow_special: bool | Collection[str] = False) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False,
                     allow_special: bool | Collection[str] = False) -> list[list[int]]: ...

    def decode(self, ids) -> str: ...

    def stream_decoder(self, prefix_ids: Sequence[int] = ()) -> StreamDecoder: ...

    def id_to_piece(self, token_id: int) -> str: ...

    def piece_table(self) -> list[str | int | None]: ...

    def save(self, path) -> None: ...


def stop_ids(tokenizer) -> frozenset[int]:
    """The ids that end generation: the tokenizer's `stop_ids` (Llama 3: <|end_of_text|>,
    <|eot_id|> that ends an instruct turn, <|eom_id|>), else its end-of-sequence id."""
    ids = getattr(tokenizer, "stop_ids", None)
    if ids is None:
        ids = [tokenizer.eos_id]
    return frozenset(i for i in ids if i >= 0)


# What detect_format answers.
SENTENCEPIECE, TIKTOKEN = "sentencepiece", "tiktoken"
JSON_SENTENCEPIECE, JSON_BYTE_LEVEL = "json-sentencepiece", "json-byte-level"


def detect_format(path: str | os.PathLike) -> str:
    """The kind of tokenizer file `path` is, from its content: SENTENCEPIECE (a protobuf
    `.model`, LLaMA 1/2), TIKTOKEN (Llama 3's `tokenizer.model`: "base64 rank" lines),
    JSON_SENTENCEPIECE (a tokenizer.json of BPE with byte fallback) or JSON_BYTE_LEVEL (a
    tokenizer.json of byte-level BPE, Llama 3's). A file that is none of these is answered
    SENTENCEPIECE, whose reader says what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        return SENTENCEPIECE
    with open(path, "rb") as f:
        head = f.read(4096)
    if path.suffix == ".json" or head.lstrip()[:1] == b"{":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({str(e)[:200]})") from None
        kind = json_tokenizer_kind(data) if isinstance(data, dict) else None
        if kind is None:
            model = data.get("model") if isinstance(data, dict) else None
            decoder = data.get("decoder") if isinstance(data, dict) else None
            raise ValueError(
                f"{path}: a tokenizer.json here is BPE with byte_fallback (LLaMA 1/2) or byte-level BPE "
                f"(Llama 3, a ByteLevel decoder); this one has model {(model or {}).get('type')} and decoder "
                f"{(decoder or {}).get('type') if isinstance(decoder, dict) else decoder}")
        return kind
    first = head.split(b"\n", 1)[0].rstrip(b"\r")
    if first and _TIKTOKEN_LINE.match(first):
        return TIKTOKEN
    return SENTENCEPIECE


# A tiktoken line: base64 of the token's bytes, a space, its rank.
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+$")


def json_tokenizer_kind(data: dict) -> str | None:
    """JSON_BYTE_LEVEL for a tokenizer.json of byte-level BPE (BPE model and a ByteLevel
    decoder or pre-tokeniser), JSON_SENTENCEPIECE for BPE with byte fallback, else None."""
    model = data.get("model") or {}
    if not isinstance(model, dict) or model.get("type") != "BPE":
        return None

    def types(node) -> set:
        if not isinstance(node, dict):
            return set()
        out = {node.get("type")}
        for key in ("decoders", "pretokenizers"):
            for child in node.get(key) or []:
                out |= types(child)
        return out

    if "ByteLevel" in types(data.get("decoder")) | types(data.get("pre_tokenizer")):
        return JSON_BYTE_LEVEL
    if model.get("byte_fallback"):
        return JSON_SENTENCEPIECE
    return None


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
