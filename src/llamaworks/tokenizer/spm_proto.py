"""A SentencePiece ModelProto written and read by hand (sentencepiece_model.proto field numbers), so
that protobuf is not a dependency: a vocabulary from elsewhere (a GGUF file) becomes a `.model`, and
the word cache (word_cache.py) reads a model's normaliser settings."""

from __future__ import annotations

import struct


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 values (pad_id -1) take ten bytes, as protobuf writes them
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _pb(field: int, value) -> bytes:
    """One protobuf field: int/bool as a varint, float as fixed32, bytes/str length-delimited."""
    if isinstance(value, float):
        return _varint(field << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, (bool, int)):
        return _varint(field << 3) + _varint(int(value))
    data = value.encode("utf-8") if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        byte = data[i]
        i += 1
        n |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return n, i


def read_message(data: bytes) -> dict[int, list]:
    """One protobuf message's fields: number -> its values in order (varints as int; length-delimited,
    fixed32 and fixed64 as bytes). A singular field's value is the last one (protobuf's rule)."""
    fields: dict[int, list] = {}
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        wire = key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
        elif wire == 2:
            size, i = _read_varint(data, i)
            value, i = data[i:i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = data[i:i + size], i + size
        else:
            raise ValueError(f"protobuf wire type {wire} (groups) is not used by sentencepiece_model.proto: "
                             "not a SentencePiece model file")
        fields.setdefault(key >> 3, []).append(value)
    return fields


def sentencepiece_model(pieces: list[str], scores: list[float], types: list[int], unk_id: int, bos_id: int,
                        eos_id: int) -> bytes:
    """A SentencePiece BPE ModelProto (serialised) with LLaMA's settings: byte fallback, identity
    normalisation, a dummy prefix, whitespace kept as is. Written by hand (sentencepiece_model.proto
    field numbers) so that protobuf is not a dependency. GGUF token types use SentencePiece's
    numbering (1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte)."""
    # llama.cpp's SPM tokenizer never splits digits; SentencePiece's split_digits gives the same
    # pieces when no piece holds two digits (LLaMA's vocabulary), and records the paper's recipe.
    split_digits = not any(sum(c.isdigit() for c in p) > 1 for p in pieces)
    out = b"".join(_pb(1, _pb(1, p) + _pb(2, float(s)) + _pb(3, int(t))) for p, s, t in zip(pieces, scores, types))
    trainer = (_pb(3, 2) + _pb(4, len(pieces)) + _pb(25, split_digits) + _pb(26, True) + _pb(35, True)
               + _pb(40, unk_id) + _pb(41, bos_id) + _pb(42, eos_id) + _pb(43, -1)
               + _pb(45, pieces[unk_id]) + _pb(46, pieces[bos_id]) + _pb(47, pieces[eos_id]))
    normalizer = _pb(1, "identity") + _pb(2, b"") + _pb(3, True) + _pb(4, False) + _pb(5, True)
    return out + _pb(2, trainer) + _pb(3, normalizer)
