"""Training a SentencePiece BPE tokenizer with the paper's recipe (section 2): digits split,
byte fallback, the released LLaMA layout (`<unk>`=0, `<s>`=1, `</s>`=2, bytes at 3-258)."""

from __future__ import annotations

import io
import os
import random
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from llamaworks.atomic import atomic_write_bytes

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


@dataclass
class TrainStats:
    documents: int = 0
    lines: int = 0  # non-empty lines (after cutting very long ones)
    sampled: int = 0  # lines given to SentencePiece: min(lines, input_sentence_size)
    seconds: float = 0.0


def train_sentencepiece(
    output: str | os.PathLike,
    *,
    files: Iterable[str | os.PathLike] | None = None,
    documents: Iterable[str] | None = None,
    vocab_size: int = 32000,
    character_coverage: float = 1.0,
    input_sentence_size: int = DEFAULT_SENTENCES,
    seed: int = 0,
) -> TrainStats:
    """Train a SentencePiece BPE model on `files` or `documents` with the paper's recipe
    (section 2: split digits, byte fallback) and write it atomically to `output`."""
    if (files is None) == (documents is None):
        raise ValueError("pass exactly one of files= or documents= to Tokenizer.train / train_sentencepiece")
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
    return stats


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
