"""`llamaworks tokenizer train | encode | decode`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from llamaworks.args import Arg
from llamaworks.tokenizer.sentencepiece import Tokenizer
from llamaworks.tokenizer.train import DEFAULT_SENTENCES


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
