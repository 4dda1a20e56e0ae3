"""The fast JSON path of parse_line (orjson, with json deciding every line orjson refuses) gives json's
objects and json's errors, and the batched val-split mask is _in_val's, on hostile input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamaworks.data import document, shards
from llamaworks.data.document import MalformedInput, parse_line

orjson = pytest.importorskip("orjson")


def same(a, b) -> bool:
    """a and b are the same Python objects: types, dict order, float bits (-0.0, nan) included."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return repr(a) == repr(b)
    return a == b


NUMBER = st.from_regex(r"-?(0|[1-9][0-9]{0,24})(\.[0-9]{1,19})?([eE][-+]?[0-9]{1,3})?", fullmatch=True)
LITERAL = st.sampled_from(["true", "false", "null", "NaN", "Infinity", "-Infinity", "nul", "01", "-", "1.", ".5"])
PIECE = st.sampled_from(["a", "text", " ", "\u00e9", "\u4e2d", "\U0001f600", "\u2581", "\\n", "\\\"", "\\\\", "\\/",
                         "\\b", "\\f", "\\r", "\\t", "\\u0041", "\\u00e9", "\\ud83d\\ude00", "\\ud800", "\\udfff",
                         "\\ud800x", "\\u12", "\\x", "\t", "\x00", "\x1f", "\x7f", "'"])
STRING = st.lists(PIECE, max_size=8).map(lambda p: '"' + "".join(p) + '"')
WS = st.sampled_from(["", " ", "\t", "\r\n ", "\x0c"])
KEY = st.one_of(st.sampled_from(['"id"', '"text"', '"source"', '"metadata"', '"te\\u0078t"', '"a"']), STRING)


def values(depth: int = 3):
    scalar = st.one_of(NUMBER, LITERAL, STRING)
    if depth == 0:
        return scalar
    inner = values(depth - 1)
    array = st.lists(st.tuples(WS, inner), max_size=4).map(lambda xs: "[" + ",".join(w + v for w, v in xs) + "]")
    obj = st.lists(st.tuples(WS, KEY, inner), max_size=5).map(
        lambda xs: "{" + ",".join(f"{w}{k}:{v}" for w, k, v in xs) + "}")
    return st.one_of(scalar, array, obj)


def to_bytes(text: str, how: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return {"plain": raw + b"\n", "bom": b"\xef\xbb\xbf" + raw, "utf16": text.encode("utf-16", "surrogatepass"),
            "cut": raw[: len(raw) // 2], "bad utf-8": raw.replace(b"a", b"\xff", 1),
            "surrogate bytes": raw.replace(b"a", b"\xed\xa0\x80", 1), "trailing": raw + b" x"}[how]


LINES = st.tuples(values(), st.sampled_from(["plain"] * 6 + ["bom", "utf16", "cut", "bad utf-8", "surrogate bytes",
                                                             "trailing"])).map(lambda t: to_bytes(*t))


def parsed(line: bytes, fast: bool):
    document.set_fast_json(fast)
    try:
        return "ok", parse_line("f.jsonl", 3, line)
    except MalformedInput as e:
        return "malformed", str(e)
    except Exception as e:  # noqa: BLE001  json's other errors (RecursionError): the same on both paths
        return type(e).__name__, str(e)
    finally:
        document.set_fast_json(True)


@settings(max_examples=1500, deadline=None)
@given(LINES)
def test_property_the_fast_path_parses_as_json(line):
    try:
        fast = orjson.loads(line)
    except orjson.JSONDecodeError:
        pass
    else:  # what orjson accepts, json accepts as the same objects, but for integers past 64 bits (floats)
        assert same(fast, json.loads(line)) or document._LONG_DIGITS.search(line), line
    a, b = parsed(line, True), parsed(line, False)
    assert a[0] == b[0] and (same(a[1], b[1]) if a[0] == "ok" else a[1] == b[1]), (line, a, b)


@pytest.mark.parametrize("line", [
    b'{"id": 1, "id": "x", "text": "a\\nb", "source": null}\n',  # a duplicate key: the last one, json's order
    b'{"text": "\\ud83d\\ude00 \\u00e9", "n": 1e400, "m": -0.0, "k": 123456789012345678901234567890}\n',
    b'{"text": NaN}', b'\xef\xbb\xbf{"text": "bom"}', b'{"text": "\\ud800"}', b'{"text": "a"} x',
    b'{"text": "\x01"}', b'{"text": "\xed\xa0\x80"}', b'[' * 5000 + b']' * 5000, b'"just a string"',
    b'{"id": 20000000000000000000, "text": "x"}', b'{"id": -9223372036854775809}',  # orjson: floats; json: ints
    b'{"meta": {"ids": [1, [{"n": 20000000000000000000}]]}, "text": "x"}',  # nested
    b'{"text": "call 12345678901234567890123", "score": 1.5}',  # a float and a digit run in the text
    b'[' * 1000 + b'1e999' + b']' * 1000 + b'\n',  # orjson's deepest value, an infinite float in it
])
def test_the_fast_path_gives_jsons_objects_and_errors(line):
    a, b = parsed(line, True), parsed(line, False)
    assert a[0] == b[0] and (same(a[1], b[1]) if a[0] == "ok" else a[1] == b[1]), (a, b)


def test_a_records_digits_do_not_send_it_to_json(monkeypatch):
    # A document with a run of 19 digits in its text (phone numbers, hashes, tables) and no float
    # stays on orjson: json is asked only where orjson made a float that could be a long integer.
    def refuse(line):
        raise AssertionError(f"json.loads called on {line!r}")

    monkeypatch.setattr(json, "loads", refuse)
    line = b'{"id": "a", "text": "card 1234567890123456789012 and 20000000000000000000", "n": [1, 2]}\n'
    assert parse_line("f.jsonl", 1, line)["text"].startswith("card 1234567890123456789012")
    with pytest.raises(AssertionError, match="json.loads called"):
        parse_line("f.jsonl", 2, b'{"id": 20000000000000000000, "text": "x"}\n')


def test_the_fast_path_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("LLAMAWORKS_FAST_JSON", "0")
    document.set_fast_json(True)
    try:
        assert document._FAST_LOADS is None
        monkeypatch.delenv("LLAMAWORKS_FAST_JSON")
        document.set_fast_json(True)
        assert document._FAST_LOADS is orjson.loads
    finally:
        monkeypatch.undo()
        document.set_fast_json(True)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=12), max_size=30), st.integers(0, 2**40),
       st.one_of(st.floats(0, 1, exclude_max=True), st.sampled_from([0.0, 0.5, 1 - 2**-53, 2**-64, 5e-324])))
def test_property_the_val_mask_is_in_val(ids, seed, val_fraction):
    ids = [i.encode("utf-8", "replace").decode() for i in ids]
    want = np.array([shards._in_val(i, seed, val_fraction) for i in ids], bool)
    assert np.array_equal(shards._val_mask(ids, seed, val_fraction), want)


def test_the_val_mask_is_exact_at_a_digest():
    # val_fraction * 2**64 landing exactly on a document's hash, and one float step either side:
    # an int compared with a float must not be rounded (a uint64 -> float64 comparison would be).
    import hashlib

    ids = [f"doc-{k}" for k in range(2000)]
    h = [int.from_bytes(hashlib.blake2b(f"0\0{i}".encode(), digest_size=8).digest(), "little") for i in ids]
    exact = [k for k, x in enumerate(h) if float(x) == x]  # hashes a float holds exactly (low bits zero)
    probes = [h[k] / 2**64 for k in exact] + [x / 2**64 for x in h[:200]]
    probes += [math.nextafter(p, 0) for p in probes] + [math.nextafter(p, 1) for p in probes]
    for f in probes:
        want = np.array([shards._in_val(i, 0, f) for i in ids], bool)
        assert np.array_equal(shards._val_mask(ids, 0, f), want), f
