from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamaworks.cli import main as cli_main
from llamaworks.tokenizer import Tokenizer
from llamaworks.tokenizer.command import decode_command, encode_command, train_command

ROOT = Path(__file__).resolve().parents[2]
SHAKESPEARE = ROOT.parent / "shared" / "corpora" / "shakespeare"
WORDS = ("the of and to in is that it was for on are with as his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she which do "
         "their time if will way about many then them write would like so these her long make thing see him "
         "café naïve façade über straße señor").split()
N_DOCS = 60


def make_documents(n: int = N_DOCS, seed: int = 0) -> list[str]:
    # ~120 KB of English-like text with numbers, tabs, runs of spaces and blank lines; no CJK
    # and no emoji, so those must fall back to bytes.
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(rng.randrange(10, 30)):
            words = [rng.choice(WORDS) for _ in range(rng.randrange(3, 15))]
            if rng.random() < 0.5:
                words.insert(rng.randrange(len(words)), str(rng.randrange(10 ** rng.randrange(1, 9))))
            sep = rng.choice([" "] * 8 + ["  ", "\t"])
            lines.append(sep.join(words) + rng.choice([".", ",", "!", "?", ""]))
            if rng.random() < 0.1:
                lines.append("")
        docs.append("\n".join(lines) + "\n")
    return docs


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return make_documents()


@pytest.fixture(scope="module")
def tok(tmp_path_factory, docs) -> Tokenizer:
    return Tokenizer.train(tmp_path_factory.mktemp("tok") / "tokenizer.model", documents=docs, vocab_size=512)


def stream(tok: Tokenizer, ids, prefix=()) -> str:
    dec = tok.stream_decoder(prefix)
    return "".join(dec.push(i) for i in ids) + dec.flush()


# Any text except lone surrogates (not encodable as UTF-8) and U+2581, which SentencePiece
# reads as its own space symbol (see test_literal_space_symbol); weighted towards whitespace,
# digits, combining marks, CJK and emoji.
TEXT = st.text(alphabet=st.one_of(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"),
    st.sampled_from(list(" \t\n\r  1234567890abcé\u0301\u200d漢字🦙😀")),
), max_size=60)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_layout_matches_released_llama(tok):
    # Section 2 / the released tokenizer: <unk>=0 <s>=1 </s>=2, bytes <0x00>..<0xFF> at 3-258, no pad.
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert [tok.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert [tok.id_to_piece(3 + b) for b in range(256)] == [f"<0x{b:02X}>" for b in range(256)]
    assert tok.vocab_size == 512 and tok.piece_to_id("<0x0A>") == 13


def test_vocab_size_honoured(tmp_path, docs):
    for n in (320, 600):  # the corpus supports at most 660
        assert Tokenizer.train(tmp_path / f"{n}.model", documents=docs, vocab_size=n).vocab_size == n


def test_digits_are_single_tokens(tok):
    ids = tok.encode("12345", bos=False)
    assert [tok.id_to_piece(i) for i in ids] == ["▁", "1", "2", "3", "4", "5"]
    merged = [tok.id_to_piece(i) for i in range(259, tok.vocab_size)]  # past the specials and <0xNN>
    # The corpus is full of numbers: without split_digits many pieces would hold several digits.
    assert [p for p in merged if sum(c.isdigit() for c in p) >= 2] == []


def test_unseen_characters_fall_back_to_bytes(tok, docs):
    for ch in ("漢", "🦙", "Ж"):
        assert ch not in "".join(docs)
        ids = tok.encode(ch, bos=False)
        assert ids[1:] == [3 + b for b in ch.encode("utf-8")] and tok.unk_id not in ids
        assert tok.decode(ids) == ch


def test_leading_space_rules(tok):
    # add_dummy_prefix puts "▁" before the text and decode drops it again; identity
    # normalisation and remove_extra_whitespaces=False keep every other space.
    for text in ["", " ", "  ", "hello", " hello", "  hello", "hello ", "a  b", "\tx", " \n ", "x\n"]:
        assert tok.decode(tok.encode(text)) == text
    assert [tok.id_to_piece(i) for i in tok.encode(" the", bos=False)] == ["▁", "▁the"]


def test_literal_space_symbol(tok):
    # SentencePiece escapes spaces as U+2581, so a literal U+2581 in the text comes back as a
    # space (the released LLaMA tokenizer does the same). Pinned so a change is noticed.
    assert tok.decode(tok.encode("a\u2581b")) == "a b"


@FAST
@given(text=TEXT)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_bos_eos(tok):
    ids = tok.encode("hello world", bos=False)
    assert tok.encode("hello world") == [1, *ids]
    assert tok.encode("hello world", bos=False, eos=True) == [*ids, 2]
    assert tok.encode("", bos=True, eos=True) == [1, 2]
    assert tok.decode([1, *ids, 2, 1]) == "hello world"  # control ids are invisible


def test_encode_batch(tok):
    texts = ["hello world", "", " 42 ", "漢字\n"]
    assert tok.encode_batch(texts, bos=True, eos=True) == [tok.encode(t, bos=True, eos=True) for t in texts]


def test_decode_accepts_tensors_and_arrays(tok):
    ids = tok.encode("the word 123")
    for form in (torch.tensor(ids), np.array(ids), tuple(ids)):
        assert tok.decode(form) == "the word 123"
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.tensor([ids, ids]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, 99999])


def test_invalid_bytes_render_like_sentencepiece(tok):
    def b(*xs: int) -> list[int]:
        return [3 + x for x in xs]

    # One U+FFFD per byte that does not start a complete character (not Python's one per
    # maximal subpart): a truncated 4-byte emoji gives three.
    assert tok.decode(b(0xF0, 0x9F, 0x98)) == "\ufffd" * 3
    assert tok.decode(b(0xE6, 0x41)) == "\ufffdA"
    assert tok.decode(b(0xED, 0xA0, 0x80)) == "\ufffd" * 3  # surrogate
    # A control id ends a byte run: the halves of a character do not join across it.
    assert tok.decode(b(0xC3) + [1] + b(0xA9)) == "\ufffd\ufffd"
    assert tok.decode(b(0xC3, 0xA9)) == "é"


@FAST
@given(text=TEXT, data=st.data())
def test_stream_matches_decode(tok, text, data):
    ids = tok.encode(text, bos=True, eos=data.draw(st.booleans()))
    assert stream(tok, ids) == tok.decode(ids) == text
    # With the prompt as prefix, the stream is the continuation of decode(prompt).
    k = data.draw(st.integers(0, len(ids)))
    full, prompt = tok.decode(ids), tok.decode(ids[:k])
    out = stream(tok, ids[k:], prefix=ids[:k])
    if full.startswith(prompt):  # the prompt ends on a complete character
        assert out == full[len(prompt):]
    else:
        assert full.endswith(out)


BYTE_IDS = st.lists(st.one_of(
    st.integers(3, 258),
    st.sampled_from([3 + x for x in (0x41, 0x80, 0xBF, 0xC0, 0xC3, 0xE0, 0xED, 0xEF, 0xF0, 0xF4, 0xFF)]),
    st.sampled_from([0, 1, 2]),  # unk and control pieces in between
), max_size=16)


@FAST
@given(ids=BYTE_IDS, data=st.data())
def test_stream_matches_decode_on_random_bytes(tok, ids, data):
    words = [tok.piece_to_id("▁the"), tok.piece_to_id("▁")]  # pieces that start with the dummy-prefix space
    ids = ids + data.draw(st.lists(st.sampled_from(words), max_size=2))
    data.draw(st.randoms()).shuffle(ids)
    assert stream(tok, ids) == tok.decode(ids)
    k = data.draw(st.integers(0, len(ids)))
    full, prompt = tok.decode(ids), tok.decode(ids[:k])
    out = stream(tok, ids[k:], prefix=ids[:k])
    if full.startswith(prompt):
        assert out == full[len(prompt):]
    else:
        assert full.endswith(out)


def test_stream_holds_partial_characters(tok):
    dec = tok.stream_decoder(tok.encode("Hi"))
    assert dec.push(tok.piece_to_id("▁the")) == " the"  # a generated "▁the" after a prompt
    assert [dec.push(3 + x) for x in "🦙".encode()] == ["", "", "", "🦙"]
    assert dec.push(3 + 0xE6) == "" and dec.flush() == "\ufffd"
    assert dec.push(3 + 0xE6) == "" and dec.push(3 + 0x41) == "\ufffdA"  # U+FFFD as soon as it is certain
    dec = tok.stream_decoder()
    assert dec.push(1) == "" and dec.push(tok.piece_to_id("▁the")) == "the"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        dec.push(-1)


def test_deterministic_across_processes(tmp_path, docs):
    # input_sentence_size below the line count exercises the (seeded) sampling too.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(docs), encoding="utf-8")
    a = Tokenizer.train(tmp_path / "a.model", files=[corpus], vocab_size=400, input_sentence_size=300)
    b = Tokenizer.train(tmp_path / "b.model", files=[corpus], vocab_size=400, input_sentence_size=300)
    code = ("import sys; from llamaworks.tokenizer import Tokenizer; "
            "Tokenizer.train(sys.argv[2], files=[sys.argv[1]], vocab_size=400, input_sentence_size=300)")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, "-c", code, str(corpus), str(tmp_path / "c.model")], check=True, env=env)
    assert a.train_stats.sampled == 300 < a.train_stats.lines
    assert a.model_proto == b.model_proto == (tmp_path / "c.model").read_bytes()
    c = Tokenizer.train(tmp_path / "d.model", files=[corpus], vocab_size=400, input_sentence_size=300, seed=1)
    assert c.model_proto != a.model_proto  # the seed picks the sample


def test_files_and_documents_give_the_same_model(tmp_path, docs, tok):
    paths = []
    for i, d in enumerate(docs):
        paths.append(tmp_path / f"{i}.txt")
        paths[-1].write_bytes(d.encode("utf-8"))
    from_files = Tokenizer.train(tmp_path / "f.model", files=paths, vocab_size=512)
    assert from_files.model_proto == tok.model_proto == tok.path.read_bytes()
    assert from_files.train_stats.documents == N_DOCS


def test_save_and_atomic_write(tmp_path, tok):
    out = tmp_path / "sub" / "copy.model"
    out.parent.mkdir()
    out.write_bytes(b"old")
    tok.save(out)
    assert out.read_bytes() == tok.model_proto and os.listdir(out.parent) == ["copy.model"]
    assert Tokenizer(out).encode("the word") == tok.encode("the word")


def test_train_errors(tmp_path, docs):
    out = tmp_path / "x.model"
    with pytest.raises(ValueError, match="vocab_size=100 is too small.*259"):
        Tokenizer.train(out, documents=docs, vocab_size=100)
    with pytest.raises(ValueError, match="more than this text supports.*--vocab-size or train on more text"):
        Tokenizer.train(out, documents=["a tiny text"], vocab_size=5000)
    cjk = ["".join(chr(0x4E00 + i) for i in range(j, j + 50)) for j in range(0, 400, 50)]
    with pytest.raises(ValueError, match="too small for this text.*need 660; raise --vocab-size"):
        Tokenizer.train(out, documents=cjk, vocab_size=300)
    with pytest.raises(ValueError, match="no training text"):
        Tokenizer.train(out, documents=["", "\n\n"], vocab_size=300)
    with pytest.raises(ValueError, match="not one string"):
        Tokenizer.train(out, documents="some text", vocab_size=300)
    with pytest.raises(ValueError, match="exactly one of"):
        Tokenizer.train(out, vocab_size=300)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        Tokenizer.train(out, files=[tmp_path / "latin1.txt"], vocab_size=300)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model does not exist"):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "bad.model").write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="bad.model is not a SentencePiece model"):
        Tokenizer(tmp_path / "bad.model")
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.model is empty"):
        Tokenizer(tmp_path / "empty.model")
    with pytest.raises(ValueError, match="is a directory"):
        Tokenizer(tmp_path)


def test_cli(tmp_path, docs, capsys):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / ".git").mkdir()
    (data / "a.txt").write_text("".join(docs[:30]), encoding="utf-8")
    (data / "sub" / "b.md").write_text("".join(docs[30:]), encoding="utf-8")
    (data / "sub" / "blob.bin").write_bytes(bytes(range(256)))
    (data / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    model = tmp_path / "tok.model"
    train = ["tokenizer", "train", "--input", str(data), "--output", str(model), "--vocab-size"]
    assert cli_main([*train, "512"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 binary or non-UTF-8 files" in out and "512 pieces from 2 documents" in out

    encode_command(str(model), "the 42", bos=True, eos=False)
    ids_line, pieces_line = capsys.readouterr().out.splitlines()
    assert pieces_line == "<s> ▁the ▁ 4 2"
    assert cli_main(["tokenizer", "decode", "--model", str(model), *ids_line.split()]) == 0
    assert capsys.readouterr().out == "the 42\n"
    assert cli_main(["tokenizer", "encode", "--model", str(model), "--no-bos", "x"]) == 0
    assert not capsys.readouterr().out.startswith("1 ")

    decode_command(str(model), [1, 3 + 0x41])
    assert capsys.readouterr().out == "A\n"
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        train_command([str(tmp_path / "missing")], str(model))
    assert cli_main([*train, "100"]) == 2
    assert "--vocab-size" in capsys.readouterr().err


def test_shakespeare(tmp_path):
    if not SHAKESPEARE.is_dir():
        pytest.skip(f"real-text corpus {SHAKESPEARE} is absent (it comes with the project's shared/ folder)")
    files = sorted(SHAKESPEARE.glob("*_gut.txt"))[:2]
    tok = Tokenizer.train(tmp_path / "s.model", files=files, vocab_size=2000)
    text = files[0].read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert tok.decode(ids) == text and stream(tok, ids) == text
    assert len(text) / len(ids) > 2.5  # BPE merges: several characters per token on English
    for word in ("▁the", "▁and", "▁my"):
        assert tok.piece_to_id(word) != tok.unk_id


def test_a_tokenizer_path_that_is_a_fifo_is_named_not_read(tmp_path):
    fifo = tmp_path / "tokenizer.model"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="FIFO"):
        Tokenizer(fifo)
