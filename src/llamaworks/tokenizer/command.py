"""`llamaworks tokenizer train | encode | decode`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from llamaworks.args import Arg
from llamaworks.paths import path_kind, require_file
from llamaworks.tokenizer.sentencepiece import Tokenizer
from llamaworks.tokenizer.train import DEFAULT_SENTENCES


def _walk_documents(paths: list[str], skipped: list[Path]) -> Iterator[str]:
    for p in map(Path, paths):
        kind = path_kind(p)
        if kind == "missing":
            raise FileNotFoundError(f"input {p} does not exist")
        if kind not in ("file", "directory"):  # a FIFO or a device would block or never end
            raise ValueError(f"input {p} is {kind}, not a text file or a folder")
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


def _load(model: str) -> Tokenizer:
    # Checked first: a FIFO or /dev/zero given as the model would otherwise block or be read forever.
    return Tokenizer(require_file(model, "pass a SentencePiece .model file (llamaworks tokenizer train writes one)"))


def encode_command(
    model: Annotated[str, Arg("the tokenizer .model file", metavar="FILE")],
    text: Annotated[str, Arg("text to encode", positional=True)],
    bos: Annotated[bool, Arg("add <s>")] = True,
    eos: Annotated[bool, Arg("add </s>")] = False,
) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        # Python hands undecodable argument bytes over as lone surrogates (U+DC80..U+DCFF).
        ch = ord(text[e.start])
        byte = f"byte {ch - 0xDC00:#04x}" if 0xDC80 <= ch <= 0xDCFF else f"U+{ch:04X}"
        raise ValueError(f"the text to encode is not valid UTF-8 ({byte} at character {e.start}); pass UTF-8 "
                         "text (check the terminal's or the shell's encoding)") from None
    tok = _load(model)
    ids = tok.encode(text, bos=bos, eos=eos)
    print(" ".join(map(str, ids)))
    print(" ".join(tok.id_to_piece(i) for i in ids))


def decode_command(
    model: Annotated[str, Arg("the tokenizer .model file", metavar="FILE")],
    ids: Annotated[list[int], Arg("token ids", positional=True)],
) -> None:
    tok = _load(model)
    bad = [i for i in ids if not 0 <= i < tok.vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary of {model} (ids 0 to {tok.vocab_size - 1}); "
                         "were these ids made with another tokenizer?")
    print(tok.decode(ids))
