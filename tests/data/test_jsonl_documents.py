"""The compiled JSONL reader (native.jsonl_docs, csrc/jsonl.cpp) against the Python path it replaces
(parse_line, _document_of, _val_mask, word_cache._joined): the same documents, bit for bit, and the
Python path's own error for every line the kernel leaves to it."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamaworks.data import shards
from llamaworks.tokenizer import native
from llamaworks.tokenizer.word_cache import joined_utf8


def documents(lib, path, lines: list[bytes], seed=3, val_fraction=0.3, lineno=1, name="dir/a.jsonl"):
    """_Documents' (texts as joined_utf8 writes them, val, which, names, kept, empty) of the lines as one span
    of `path`, read by the kernel (lib) or by the Python path (None); or the exception raised."""
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(data)
    span = shards.Span(str(path), "folder", name, lineno, 0, len(data))
    docs = shards._Documents(seed, val_fraction, lib)
    try:
        docs.add(span)
        texts, val, which = docs.done()
        texts = texts if lib is not None else joined_utf8(texts)  # (the encoder's UTF-8 error, if any)
    except Exception as e:  # noqa: BLE001 - compared as they are
        return type(e), str(e)
    return texts, val.tolist(), which.tolist(), list(docs.names), docs.kept, docs.empty


def assert_same(lib, path, lines, **kw):
    want, got = documents(None, path, lines, **kw), documents(lib, path, lines, **kw)
    assert got == want, lines
    return got


# Text pieces that each path must agree on: "▁" (written as " "), Python's whitespace beyond ASCII,
# control characters, escapes of every kind, astral characters, a BOM, bytes JSON must escape.
TEXT = st.lists(st.sampled_from(list("ab e 9\u2581\n\t\r\x00\x1c\x1f\x85\xa0\u1680\u2000\u200a\u2028\u202f\u3000"
                                     "\u00e9\u4e2d\U0001f600\ufeff\uffff\"\\/") + ["  ", "the", "x" * 9]),
                max_size=30).map("".join)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False), TEXT)
VALUE = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(TEXT, inner, max_size=3)), max_leaves=6)
# Mostly records the kernel reads itself (DOC); some that it leaves to the Python path (ODD_DOC: an id that is
# a float, a bool or past 64 bits, a source that is no string, a text that is none or missing).
DOC = st.fixed_dictionaries({"text": TEXT}, optional={
    "id": st.one_of(st.none(), st.integers(-10**18 + 1, 10**18 - 1), TEXT), "source": st.one_of(st.none(), TEXT),
    "meta": VALUE, "\u00e9": VALUE})
ODD_DOC = st.fixed_dictionaries({}, optional={"text": SCALAR, "id": SCALAR, "source": SCALAR, "meta": VALUE})


@st.composite
def lines(draw) -> list[bytes]:
    out = []
    for odd in draw(st.lists(st.sampled_from([False] * 5 + [True]), min_size=1, max_size=10)):
        record = draw(ODD_DOC if odd else DOC)
        keys = draw(st.permutations(list(record)))
        line = json.dumps({k: record[k] for k in keys}, ensure_ascii=draw(st.booleans()),
                          separators=draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,\t", " :\r ")])))
        raw = line.encode("utf-8", "surrogatepass")  # a lone surrogate written raw: invalid UTF-8
        mutation = draw(st.sampled_from(["none"] * 12 + ["cut", "tail", "blank", "dup", "bom", "crlf"]))
        if mutation == "cut":
            raw = raw[:draw(st.integers(0, len(raw)))]
        elif mutation == "tail":
            raw += draw(st.sampled_from([b" ", b"\r", b"\x0b", b"}", b" x", b",", b"\t\t"]))
        elif mutation == "blank":
            raw = draw(st.sampled_from([b"", b" ", b"\t\r", b"\x0b\x0c"]))
        elif mutation == "dup" and raw.startswith(b"{") and len(raw) > 2:  # json keeps a key's last value
            raw = draw(st.sampled_from([b'{"text": "dup", ', b'{"id": "dup", ', b'{"source": "dup", '])) + raw[1:]
        elif mutation == "bom":
            raw = b"\xef\xbb\xbf" + raw
        elif mutation == "crlf":
            raw += b"\r"
        out.append(raw)
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines(), st.integers(0, 5))
def test_property_the_kernel_reads_what_the_python_path_reads(lib, tmp_path, lines, seed):
    assert_same(lib, tmp_path / "a.jsonl", lines, seed=seed)


def test_documents_named_by_id_or_line_number_with_their_sources(lib, tmp_path):
    lines = [b'{"text": "a b", "id": "x1", "source": "web"}', b"", b'{"text": "c", "id": 12}',
             b'{"text": "d", "id": -0, "source": null}', b'{"text": "\\u2581e\xe2\x96\x81", "source": ""}',
             b'{"text": " \\t\\u3000"}', b'{"text": ""}', b'{"id": null, "text": "f", "source": "books"}',
             b'{"text": "g", "source": "web", "id": ""}']
    texts, val, which, names, kept, empty = assert_same(lib, tmp_path / "a.jsonl", lines, val_fraction=0.5,
                                                        lineno=40)
    assert texts == b"\xff a b\xff c\xff d\xff  e \xff f\xff g" and (kept, empty) == (6, 2)
    assert names == ["web", "folder", "books"] and which == [0, 1, 1, 1, 2, 0]
    # The split's rule: blake2b-64 of "{seed}\0{id}", ids from the record or "{name}:{line}".
    ids = ["x1", "12", "0", "dir/a.jsonl:44", "dir/a.jsonl:47", ""]
    assert val == [shards._in_val(i, 3, 0.5) for i in ids] and 0 < sum(val) < 6


def split_digest(doc_id: str, seed: int = 3) -> int:
    return int.from_bytes(shards._split_digest(doc_id, seed), "little")


@pytest.mark.parametrize(("line", "doc_id"), [
    (b'{"text": "a", "id": "x1"}', "x1"), (b'{"text": "a", "id": 12}', "12"), (b'{"id": -0, "text": "a"}', "0"),
    (b'{"text": "a", "id": -123456789012345678}', "-123456789012345678"), (b'{"text": "a", "id": ""}', ""),
    (rb'{"text": "a", "id": "\u00e9\ud83d\ude00 \"q\""}', '\u00e9\U0001f600 "q"'),
    (b'{"text": "a", "id": null}', "dir/a.jsonl:7"), (b'{"text": "a"}', "dir/a.jsonl:7"),
    (rb'{"text": "a", "id": "\u2581"}', "\u2581")])
def test_the_split_hashes_the_id_python_names(lib, line, doc_id):
    # Thresholds on both sides of the expected id's digest: the flag flips there and nowhere else.
    d = split_digest(doc_id)
    flags = [native.jsonl_docs(lib, line, 0, 7, b"dir/a.jsonl", b"3\0", t).val.tolist() for t in (d, d + 1)]
    assert flags == [[False], [True]]


# Lines the kernel leaves to the Python path: with None, a document that path reads (the lines after it keep
# their numbers); else a fragment of the error that path raises, whichever path meets the line.
LEFT_TO_PYTHON = [
    (b'{"text": "x", "id": 1.5}', None), (b'{"text": "x", "id": true}', None),
    (b'{"text": "x", "id": 123456789012345678901}', None), (b'{"text": "x", "source": 7}', None),
    (b'{"text": "x", "id": "a", "id": "b"}', None), (b'{"source": "s", "text": "x", "source": "t"}', None),
    (b'{"a": ' + b"[" * 70 + b"]" * 70 + b', "text": "x"}', None),
    (rb'{"text": "\ud800"}', "surrogates not allowed"), (rb'{"text": "\udfff"}', "surrogates not allowed"),
    (rb'{"text": "\ud800\u0041"}', "surrogates not allowed"),
    (b'{"text": "a\tb"}', "malformed JSON"), (b'{"text": "a\x1fb"}', "malformed JSON"),
    (b'{"text": "x"', "malformed JSON"), (b'{"text": "\xff"}', "malformed JSON"),
    (b'{"text": NaN}', "no string `text`"), (b'["text"]', "no string `text`"),
    (b'{"text": "x", "id": 1' + b"0" * 4400 + b"}", "integer string conversion"),
    (b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b', "text": "x"}', "recursion"),
]


@pytest.mark.parametrize(("bad", "error"), LEFT_TO_PYTHON)
def test_a_line_left_to_python_keeps_its_error_and_the_lines_after_it_their_numbers(lib, tmp_path, bad, error):
    good = [json.dumps({"text": f"t{i}"}).encode() for i in range(5)]
    got = assert_same(lib, tmp_path / "a.jsonl", [*good[:2], bad, *good[2:]])
    if error:
        assert isinstance(got[0], type) and error in got[1], got  # (the exception type, its message)
    else:
        assert got[4] == 6 and len(got[1]) == 6


def test_python_whitespace_decides_empty_documents_for_every_code_point(lib, tmp_path):
    codes = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF and c != 0xFF]
    lines = [json.dumps({"text": chr(c)}).encode() for c in codes]
    data = b"\n".join(lines)
    part = native.jsonl_docs(lib, data, 0, 1, b"n", b"0\0", 0)
    kept = [c for c in codes if not chr(c).isspace()]
    assert part.stop == -1 and part.empty == len(codes) - len(kept) == 29
    assert part.text == joined_utf8([chr(c) for c in kept])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_blake2b_is_hashlibs(data):
    lib = native.library()
    if lib is None:
        pytest.skip("text kernels not built")
    assert native.blake2b_64(lib, data) == int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def test_a_file_name_no_utf8_holds_goes_to_the_python_path(lib, tmp_path):
    got = documents(lib, tmp_path / "a.jsonl", [b'{"text": "a"}'], name="bad\udcffname")
    assert got[0] is UnicodeEncodeError
    assert documents(lib, tmp_path / "a.jsonl", [b'{"text": "a", "id": "k"}'], name="bad\udcffname")[4] == 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from([b"a", b" ", b"~", b"\x7f", b'"', b"\\", b"\x1f", b"\x00", b"\x80", b"\xff", b"x" * 31,
                                 b"y" * 64]), max_size=40).map(b"".join))
def test_plain_runs_end_at_the_first_byte_a_string_scan_must_read(lib, data):
    want = next((i for i, b in enumerate(data) if b < 0x20 or b >= 0x80 or b in b'"\\'), len(data))
    for isa in native.ISAS:
        got = native.plain_run(lib, data, isa)
        assert got in (None, want), (isa, got, want)
    assert native.plain_run(lib, data, "portable") == want
