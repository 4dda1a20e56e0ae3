"""`llamaworks tokenizer encode | decode | train` with arguments from outside: one error line
naming the problem, never a traceback, never a hang on a FIFO or an endless read of /dev/zero."""

from __future__ import annotations

import os

import pytest

from llamaworks.cli import main as cli_main
from llamaworks.tokenizer.command import decode_command, encode_command, train_command


def test_decode_ids_outside_the_vocabulary(tiny_tokenizer, capsys):
    model = str(tiny_tokenizer.path)
    for bad in (512, 10**9, -1):
        # Before: IndexError from SentencePiece ("piece id is out of range"), a traceback.
        with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary of .*tokenizer.model "
                                             r"\(ids 0 to 511\)"):
            decode_command(model, [1, bad])
    assert cli_main(["tokenizer", "decode", "--model", model, "1", "99999"]) == 2
    assert "token id 99999 is outside the vocabulary" in capsys.readouterr().err


def test_encode_text_that_is_not_utf8(tiny_tokenizer, capsys):
    model = str(tiny_tokenizer.path)
    text = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")  # what Python makes of a latin-1 argument
    with pytest.raises(ValueError, match="not valid UTF-8 \\(byte 0xe9 at character 3\\)"):
        encode_command(model, text)  # before: UnicodeEncodeError, a traceback
    assert cli_main(["tokenizer", "encode", "--model", model, text]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err
    encode_command(model, "café au lait")
    assert capsys.readouterr().out.startswith("1 ")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_model_and_input_paths_that_are_not_files(tmp_path, tiny_tokenizer):
    os.mkfifo(tmp_path / "fifo.model")
    # Before: both read the FIFO, waiting forever for a writer.
    with pytest.raises(ValueError, match=r"fifo.model is a FIFO \(named pipe\), not a regular file"):
        encode_command(str(tmp_path / "fifo.model"), "x")
    with pytest.raises(ValueError, match=r"input .*fifo.model is a FIFO \(named pipe\), not a text file"):
        train_command([str(tmp_path / "fifo.model")], str(tmp_path / "out.model"))
    with pytest.raises(ValueError, match="zero is a character device"):
        train_command(["/dev/zero"], str(tmp_path / "out.model"))  # before: read until memory ran out
    with pytest.raises(FileNotFoundError, match="nope.model is missing"):
        decode_command(str(tmp_path / "nope.model"), [1])
