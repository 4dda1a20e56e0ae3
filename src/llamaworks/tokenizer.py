"""SentencePiece BPE tokenizer with the paper's recipe (section 2): digits split, byte fallback.

Trained models have the released LLaMA layout: `<unk>`=0, `<s>`=1, `</s>`=2, the 256 byte
pieces `<0x00>`..`<0xFF>` at ids 3-258, then the merges. Any SentencePiece `.model` loads,
the released LLaMA `tokenizer.model` included.
"""

from __future__ import annotations

import io
import os
import random
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import sentencepiece as spm

from llamaworks.atomic import atomic_write_bytes
from llamaworks.cli import Arg

__all__ = ["Tokenizer", "StreamDecoder", "TrainStats", "train_command", "encode_command", "decode_command"]

N_SPECIAL = 3  # <unk>, <s>, </s> (section 2; no pad, as in the released tokenizer)
N_BYTES = 256  # byte fallback pieces <0x00>..<0xFF>, ids 3-258
# SentencePiece's default max_sentence_length (4192 bytes) drops longer lines with only a log
# line. We cut lines into chunks of at most this many characters instead (a word cut at a
# chunk edge once per 64K characters is noise) and raise the limit to match, in UTF-8 bytes.
_MAX_LINE_CHARS = 1 << 16
# Lines kept for training; more are reservoir-sampled down to this. LLaMA used 200M lines on
# a large machine; 5M lines (a few hundred MB of text) keeps SentencePiece's BPE trainer in a
# few GB of memory, and piece statistics have long converged by then.
DEFAULT_SENTENCES = 5_000_000
# Recorded in the model file, so a constant (not os.cpu_count()) keeps the bytes identical
# across machines. The BPE trainer's result does not depend on it.
_TRAIN_THREADS = 4
_REPLACEMENT = "\ufffd"
# Lead byte -> UTF-8 sequence length as SentencePiece's DecodeUTF8 reads it; 0: never starts one.
_UTF8_LENGTH = [1] * 0x80 + [0] * 0x40 + [2] * 0x20 + [3] * 0x10 + [4] * 0x08 + [0] * 0x08


@dataclass
class TrainStats:
    documents: int = 0
    lines: int = 0  # non-empty lines (after cutting very long ones)
    sampled: int = 0  # lines given to SentencePiece: min(lines, input_sentence_size)
    seconds: float = 0.0


class Tokenizer:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"tokenizer model {self.path} does not exist")
        if self.path.is_dir():
            raise ValueError(f"tokenizer model {self.path} is a directory: pass the .model file inside it")
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

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return self._sp.encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False) -> list[list[int]]:
        return self._sp.encode(list(texts), add_bos=bos, add_eos=eos, num_threads=os.cpu_count() or 1)

    def decode(self, ids) -> str:
        ids = _as_id_list(ids)
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
    def from_file(cls, path: str | os.PathLike):
        """A SentencePiece `.model`, or a Hugging Face `tokenizer.json` (an `HFTokenizer`, same interface)."""
        path = Path(path)
        if path.suffix == ".json" or (path.is_file() and path.read_bytes()[:1] == b"{"):
            from llamaworks.convert.hf_tokenizer import HFTokenizer

            return HFTokenizer(path)
        return cls(path)

    def save_json(self, path: str | os.PathLike) -> None:
        """Write the Hugging Face `tokenizer.json` form (same ids and text as this model)."""
        from llamaworks.convert.hf_tokenizer import save_tokenizer_json

        save_tokenizer_json(self, path)

    def _piece_text(self, token_id: int) -> str:
        return self._sp.decode([token_id])

    def stream_decoder(self, prefix_ids: Sequence[int] = ()) -> StreamDecoder:
        return StreamDecoder(self, prefix_ids)

    def _piece_table(self) -> list[str | int | None]:
        # Per id: a byte value, None for control pieces (<s>, </s>: invisible), or the text.
        if self._table is None:
            sp = self._sp
            self._table = [
                int(p[3:5], 16) if sp.is_byte(i) else None if sp.is_control(i) else p.replace("\u2581", " ")
                for i, p in enumerate(sp.id_to_piece(i) for i in range(self.vocab_size))
            ]
        return self._table

    @classmethod
    def train(
        cls,
        output: str | os.PathLike,
        *,
        files: Iterable[str | os.PathLike] | None = None,
        documents: Iterable[str] | None = None,
        vocab_size: int = 32000,
        character_coverage: float = 1.0,
        input_sentence_size: int = DEFAULT_SENTENCES,
        seed: int = 0,
    ) -> Tokenizer:
        if (files is None) == (documents is None):
            raise ValueError("pass exactly one of files= or documents= to Tokenizer.train")
        if isinstance(documents, str):
            raise ValueError("documents= takes an iterable of strings, not one string: wrap it in a list")
        if vocab_size <= N_SPECIAL + N_BYTES:
            raise ValueError(f"vocab_size={vocab_size} is too small: byte fallback alone takes "
                             f"{N_SPECIAL + N_BYTES} ids (3 special, 256 bytes); use --vocab-size 512 or up")
        if not 0.0 < character_coverage <= 1.0:
            raise ValueError(f"character_coverage={character_coverage} must be in (0, 1]; the recipe has 1.0")
        if input_sentence_size <= 0:
            raise ValueError(f"input_sentence_size={input_sentence_size} must be positive")
        if Path(output).is_dir():
            raise ValueError(f"output {output} is a directory: name a file, e.g. {output}/tokenizer.model")
        stats = TrainStats()
        start = time.perf_counter()
        if isinstance(files, (str, os.PathLike)):
            files = [files]
        docs = documents if documents is not None else (_read_text(Path(f)) for f in files)
        lines = _sample_lines(docs, input_sentence_size, seed, stats)
        if not lines:
            raise ValueError("no training text: the input has no non-empty lines")
        model = _train_bpe(lines, vocab_size, character_coverage)
        atomic_write_bytes(Path(output), model)
        stats.seconds = time.perf_counter() - start
        tok = cls(output)
        tok.train_stats = stats
        return tok


class StreamDecoder:
    """Turns generated ids into text as they arrive, with exactly `Tokenizer.decode`'s output.

    SentencePiece's decode rules, mirrored here: the first visible piece loses its leading
    dummy-prefix space; a run of byte pieces is decoded one character at a time, each byte that
    does not start a valid UTF-8 character becoming one U+FFFD; control pieces are invisible but
    end a byte run. With `prefix_ids` (a prompt), the output continues `decode(prefix_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, prefix_ids: Sequence[int] = ()):
        self._tok = tokenizer
        self._table = tokenizer._piece_table()
        self._pending = bytearray()  # bytes of a character not yet complete (at most 3)
        self._at_start = True  # no visible piece yet: the next piece's dummy-prefix space goes
        self._shown = 0  # pending bytes the caller already saw as U+FFFD in decode(prefix_ids)
        for token_id in _as_id_list(prefix_ids):
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
            entry = self._tok._piece_text(token_id)  # the model's unk surface, " ⁇ " by default
        elif self._at_start:
            entry = self._tok._piece_text(token_id)  # applies the model's own leading-space rule
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


def _as_id_list(ids) -> list[int]:
    if hasattr(ids, "tolist"):  # torch.Tensor, numpy.ndarray
        ids = ids.tolist()
    if isinstance(ids, int):
        ids = [ids]
    ids = list(ids)
    if ids and isinstance(ids[0], list):
        raise ValueError("decode takes one sequence of ids (1-D); decode each row of a batch separately")
    return [int(i) for i in ids]


def _read_text(path: Path) -> str:
    if path.is_dir():
        raise ValueError(f"{path} is a directory: pass its text files (the CLI walks folders)")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}): convert it or leave it out") from None


def _sample_lines(docs: Iterable[str], k: int, seed: int, stats: TrainStats) -> list[str]:
    # Documents go to SentencePiece line by line (a "sentence" is a line). We sample here, with
    # our own seeded reservoir, because SentencePiece's shuffle_input_sentence draws from the OS
    # even after set_random_generator_seed (we measured different models across processes).
    rng, sample = random.Random(seed), []
    for doc in docs:
        stats.documents += 1
        for line in doc.split("\n"):
            for j in range(0, len(line), _MAX_LINE_CHARS):
                if stats.lines < k:
                    sample.append(line[j:j + _MAX_LINE_CHARS])
                else:
                    r = rng.randrange(stats.lines + 1)
                    if r < k:
                        sample[r] = line[j:j + _MAX_LINE_CHARS]
                stats.lines += 1
    stats.sampled = len(sample)
    return sample


def _train_bpe(lines: list[str], vocab_size: int, character_coverage: float) -> bytes:
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
            split_digits=True,  # section 2: "we split all numbers into individual digits"
            byte_fallback=True,  # section 2: "fallback to bytes to decompose unknown UTF-8 characters"
            character_coverage=character_coverage, normalization_rule_name="identity",
            # As the released tokenizer: a dummy space before each text, runs of spaces kept.
            add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            input_sentence_size=0, shuffle_input_sentence=False,  # sampled by _sample_lines
            max_sentence_length=4 * _MAX_LINE_CHARS, num_threads=_TRAIN_THREADS, minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e)
        if m := re.search(r"value <= (\d+)", msg):
            raise ValueError(f"vocab_size={vocab_size} is more than this text supports (at most {m[1]} "
                             f"pieces): use a smaller --vocab-size or train on more text") from None
        if m := re.search(r"required_chars\. \d+ vs (\d+)", msg):
            raise ValueError(f"vocab_size={vocab_size} is too small for this text: its distinct characters "
                             f"plus the {N_SPECIAL + N_BYTES} special and byte pieces need {m[1]}; raise "
                             "--vocab-size or lower --character-coverage") from None
        raise
    return buf.getvalue()


# ---------------------------------------------------------------------------- command line


def _walk_documents(paths: list[str], skipped: list[Path]) -> Iterator[str]:
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"input {p} does not exist")
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            if any(part.startswith(".") for part in f.relative_to(p).parts):
                continue  # .git and other hidden folders
            data = f.read_bytes()  # a file is one document, so it is read whole
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = None
            if text is None or "\0" in text:  # NUL bytes: a binary file that happens to be valid UTF-8
                skipped.append(f)
            else:
                yield text


def train_command(
    input: Annotated[list[str], Arg("text files or folders (walked recursively; binary and non-UTF-8 files "
                                    "are skipped); each file is one document", metavar="PATH")],
    output: Annotated[str, Arg("where to write the model, e.g. tokenizer.model", metavar="FILE")],
    vocab_size: Annotated[int, Arg("number of pieces, special and byte pieces included")] = 32000,
    character_coverage: Annotated[float, Arg("share of characters given their own piece; the rest "
                                             "fall back to bytes")] = 1.0,
    input_sentence_size: Annotated[int, Arg("lines sampled for training, at most")] = DEFAULT_SENTENCES,
    seed: Annotated[int, Arg("seed of the line sampling")] = 0,
) -> None:
    """Train a SentencePiece BPE tokenizer with the paper's recipe (section 2)."""
    skipped: list[Path] = []
    tok = Tokenizer.train(output, documents=_walk_documents(input, skipped), vocab_size=vocab_size,
                          character_coverage=character_coverage, input_sentence_size=input_sentence_size,
                          seed=seed)
    if skipped:
        print(f"skipped {len(skipped)} binary or non-UTF-8 files (first: {skipped[0]})")
    s = tok.train_stats
    print(f"wrote {output}: {tok.vocab_size} pieces from {s.documents} documents, {s.lines} lines "
          f"({s.sampled} used) in {s.seconds:.1f} s")


def encode_command(
    model: Annotated[str, Arg("the tokenizer .model file", metavar="FILE")],
    text: Annotated[str, Arg("text to encode", positional=True)],
    bos: Annotated[bool, Arg("add <s>")] = True,
    eos: Annotated[bool, Arg("add </s>")] = False,
) -> None:
    tok = Tokenizer(model)
    ids = tok.encode(text, bos=bos, eos=eos)
    print(" ".join(map(str, ids)))
    print(" ".join(tok.id_to_piece(i) for i in ids))


def decode_command(
    model: Annotated[str, Arg("the tokenizer .model file", metavar="FILE")],
    ids: Annotated[list[int], Arg("token ids", positional=True)],
) -> None:
    print(Tokenizer(model).decode(ids))
