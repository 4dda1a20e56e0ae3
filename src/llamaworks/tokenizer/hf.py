"""Hugging Face `tokenizer.json` for LLaMA-style SentencePiece BPE tokenizers.

`sentencepiece_to_json` writes the `tokenizers` pipeline that reproduces SentencePiece
(add_dummy_prefix, identity normalisation, byte fallback) exactly:
- normaliser: prepend "▁" to non-empty text, then every " " -> "▁" (SentencePiece's dummy
  prefix is unconditional: " a" becomes "▁▁a", which transformers' newer Metaspace
  "first" scheme does not do);
- no pre-tokeniser: SentencePiece keeps runs of "▁" with the following word
  (allow_whitespace_only_pieces), and no piece joins a letter to a following "▁", so BPE
  over the whole text equals SentencePiece's per-word BPE;
- BPE with SentencePiece's merge order (merged piece's score, highest first) and
  byte_fallback; `<unk>`, `<s>`, `</s>` as special tokens; `<s>` prepended by the
  post-processor as SentencePiece's encode(add_bos=True) does.

`HFTokenizer` reads such a file (or the released LLaMA tokenizer.json) with the
interface of `llamaworks.tokenizer.Tokenizer`. Encoding goes through `tokenizers`; text
in the input that spells "<s>" stays text, as in SentencePiece. Decoding follows
SentencePiece's rules through the same exact streaming decoder as the .model backend.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Sequence
from pathlib import Path

from llamaworks.atomic import atomic_write_text
from llamaworks.tokenizer.base import StreamDecoder, as_id_list

SPACE = "\u2581"
UNK_SURFACE = " \u2047 "  # SentencePiece's default unk_surface
_BYTE = re.compile(r"^<0x([0-9A-F]{2})>$")


def sentencepiece_to_json(tok) -> dict:
    """The tokenizer.json dict of a SentencePiece BPE `Tokenizer`."""
    sp = tok.processor
    n = tok.vocab_size
    pieces = [sp.id_to_piece(i) for i in range(n)]
    vocab = {p: i for i, p in enumerate(pieces)}
    special = {i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
    mergeable = {p: i for i, p in enumerate(pieces) if i not in special and not sp.is_byte(i)}
    # Every way to build a piece from two pieces, ranked by the piece's score: SentencePiece's
    # BPE merges the adjacent pair whose union scores highest, which is BPE rank order here.
    merges = []
    for piece, i in mergeable.items():
        score = sp.get_score(i)
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((-score, mergeable[left], mergeable[right], left, right))
    merges.sort()
    specials = [{"id": i, "content": pieces[i], "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for i in sorted(special)]
    bos = pieces[tok.bos_id]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": specials,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": SPACE},
            {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
        ]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": pieces[tok.unk_id], "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": vocab, "merges": [[left, right] for *_, left, right in merges],
        },
    }


def save_tokenizer_json(tok, path: str | os.PathLike) -> None:
    atomic_write_text(Path(path), json.dumps(sentencepiece_to_json(tok), ensure_ascii=False, indent=1) + "\n")


class HFTokenizer:
    """A LLaMA-style tokenizer.json with `llamaworks.tokenizer.Tokenizer`'s interface."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _Tokenizers

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file {self.path} does not exist")
        try:
            self._tk = _Tokenizers.from_file(str(self.path))
        except Exception as e:  # tokenizers raises its own Exception type
            raise ValueError(f"{self.path} is not a Hugging Face tokenizer.json ({e})") from None
        data = json.loads(self.path.read_text(encoding="utf-8"))
        model = data.get("model") or {}
        if model.get("type") != "BPE" or not model.get("byte_fallback"):
            raise ValueError(f"{self.path}: a LLaMA-style tokenizer is BPE with byte_fallback; this one is "
                             f"{model.get('type')} (byte_fallback={model.get('byte_fallback')})")
        # The special pieces of SentencePiece's layout; encode adds <s>/</s> itself, so
        # the file's post-processor (which may or may not add <s>) is bypassed.
        self._tk.encode_special_tokens = True  # "<s>" typed in text is text, as in SentencePiece
        self.vocab_size: int = self._tk.get_vocab_size(with_added_tokens=True)
        self.unk_id: int = self._id(model.get("unk_token") or "<unk>")
        self.bos_id: int = self._id("<s>")
        self.eos_id: int = self._id("</s>")
        self.pad_id: int = -1
        self._control = {t["id"] for t in data.get("added_tokens", []) if t.get("special")} - {self.unk_id}
        self._table: list[str | int | None] | None = None

    def _id(self, piece: str) -> int:
        i = self._tk.token_to_id(piece)
        if i is None:
            raise ValueError(f"{self.path}: no {piece!r} token; not a LLaMA-style tokenizer")
        return i

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset([self.eos_id] if self.eos_id >= 0 else [])

    # allow_special is the protocol's: as in SentencePiece, "<s>" typed in text is text
    # whatever it says (encode_special_tokens is on), so it changes nothing here.
    def encode(self, text: str, bos: bool = True, eos: bool = False,
               allow_special: bool | Collection[str] = False) -> list[int]:
        ids = self._tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False,
                     allow_special: bool | Collection[str] = False) -> list[list[int]]:
        out = self._tk.encode_batch(list(texts), add_special_tokens=False)
        return [[self.bos_id] * bos + e.ids + [self.eos_id] * eos for e in out]

    def decode(self, ids) -> str:
        ids = as_id_list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size][:5]
        if bad:
            raise ValueError(f"token ids {bad} are outside the vocabulary (0..{self.vocab_size - 1})")
        stream = StreamDecoder(self)
        return "".join(stream.push(i) for i in ids) + stream.flush()

    def id_to_piece(self, token_id: int) -> str:
        return self._tk.id_to_token(token_id)

    def piece_to_id(self, piece: str) -> int:
        i = self._tk.token_to_id(piece)
        return self.unk_id if i is None else i

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(Path(path), self.path.read_text(encoding="utf-8"))

    def stream_decoder(self, prefix_ids: Sequence[int] = ()) -> StreamDecoder:
        return StreamDecoder(self, prefix_ids)

    def piece_table(self) -> list[str | int | None]:
        # StreamDecoder's per-id entries: byte value, None for control pieces, or the text.
        if self._table is None:
            table: list[str | int | None] = []
            for i in range(self.vocab_size):
                p = self._tk.id_to_token(i)
                m = _BYTE.match(p)
                table.append(int(m[1], 16) if m else None if i in self._control else p.replace(SPACE, " "))
            self._table = table
        return self._table

    def piece_text(self, token_id: int) -> str:
        # What SentencePiece's decode([id]) gives: the unk surface, or the piece without
        # its dummy-prefix space (only the first visible piece of a text is shown this way).
        if token_id == self.unk_id:
            return UNK_SURFACE
        text = self._tk.id_to_token(token_id).replace(SPACE, " ")
        return text[1:] if text.startswith(" ") else text
