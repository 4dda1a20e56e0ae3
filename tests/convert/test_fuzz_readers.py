"""Fuzzing the model-file readers: mutated safetensors headers and bytes, params.json values and
GGUF metadata and bytes. Every outcome is a model or a ValueError / FileNotFoundError naming
the file; never another exception, and never more than a bounded time and memory per file."""

from __future__ import annotations

import copy
import json
import resource
import shutil
import struct
import time
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamaworks.model import ModelArgs, build_model
from llamaworks.modeldir import PARAMS, WEIGHTS, load_model, save_model

gguf = pytest.importorskip("gguf", reason="the gguf package is an optional extra (pip install gguf)")
from gguf.gguf_writer import GGUFValue  # noqa: E402

from llamaworks.convert.gguf import load_gguf, vocab_for_gguf, write_gguf  # noqa: E402

FUZZ = settings(max_examples=100, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SECONDS_PER_FILE = 5.0  # each file is ~70 KB; a few ms when all is well
MAX_GROWTH_BYTES = 512 << 20  # peak RSS growth over a whole fuzz run

INTS = st.one_of(st.integers(-3, 300), st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64, 10**30, -(2**63)]))
SCALARS = st.one_of(st.none(), st.booleans(), INTS, st.floats(width=64), st.text(max_size=6))
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                      max_leaves=6)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer):
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=tiny_tokenizer.vocab_size, multiple_of=16,
                     max_seq_len=32)
    model = build_model(args, seed=0).eval()
    root = tmp_path_factory.mktemp("fuzz")
    d = save_model(model, tiny_tokenizer, root / "base")
    write_gguf(model.state_dict(), args, tiny_tokenizer, root / "base.gguf")
    header_bytes = gguf.GGUFReader(str(root / "base.gguf")).data_offset  # metadata and tensor table
    return model, tiny_tokenizer, d, root / "base.gguf", header_bytes


class Budget:
    """Loads one file at a time and checks the outcome, the time it took, and peak memory."""

    def __init__(self):
        self.start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.outcomes = {"loaded": 0, "refused": 0}

    def load(self, fn, path, *names):
        start = time.perf_counter()
        try:
            fn(path)
            self.outcomes["loaded"] += 1
        except (ValueError, FileNotFoundError) as e:
            assert str(path) in str(e), f"the error does not name {path}: {e}"
            self.outcomes["refused"] += 1
        elapsed = time.perf_counter() - start
        assert elapsed < SECONDS_PER_FILE, f"{elapsed:.1f} s for one small file"
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.start_rss
        assert grown < MAX_GROWTH_BYTES, f"peak memory grew by {grown >> 20} MB"


def _split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


@st.composite
def header_mutations(draw, header: dict):
    h = copy.deepcopy(header)
    names = [k for k in h if k != "__metadata__"]
    name = draw(st.sampled_from(names))
    kind = draw(st.sampled_from(["field", "drop", "offsets", "shape", "dtype", "tensor", "whole", "metadata"]))
    if kind == "field":
        h[name][draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = draw(VALUES)
    elif kind == "drop":
        del h[name][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif kind == "offsets":
        begin, end = h[name]["data_offsets"]
        h[name]["data_offsets"] = [begin + draw(st.integers(-64, 64)), end + draw(st.integers(-64, 64))]
    elif kind == "shape":
        h[name]["shape"] = draw(st.lists(st.one_of(st.integers(0, 40), INTS), max_size=4))
    elif kind == "dtype":
        h[name]["dtype"] = draw(st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "I64", "U8", "BOOL", "F8_E4M3",
                                                 "f32", ""]))
    elif kind == "tensor":
        h[draw(st.text(max_size=12))] = draw(VALUES)
    elif kind == "whole":
        h = draw(VALUES)
    else:
        h["__metadata__"] = draw(VALUES)
    return h


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors(base, tmp_path_factory, data):
    _, _, d, _, _ = base
    work = tmp_path_factory.mktemp("st")
    shutil.copytree(d, work / "m")
    raw = (d / WEIGHTS).read_bytes()
    header, body = _split(raw)
    budget = Budget()
    how = data.draw(st.sampled_from(["header", "bytes", "length"]))
    if how == "header":
        head = json.dumps(data.draw(header_mutations(header))).encode()
        cut = data.draw(st.sampled_from([0, 0, 0, 1, 8, -4]))
        new = struct.pack("<Q", len(head)) + head + (body[:-cut] if cut > 0 else body + b"\0" * -cut)
    elif how == "bytes":
        new = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 8))):
            at = data.draw(st.integers(0, min(len(raw) - 1, 8 + len(json.dumps(header)) + 64)))
            new[at] = data.draw(st.integers(0, 255))
    else:
        new = raw[:data.draw(st.integers(0, len(raw)))]
    (work / "m" / WEIGHTS).write_bytes(bytes(new))
    budget.load(load_model, work / "m")


@FUZZ
@given(data=st.data())
def test_fuzz_params_json(base, tmp_path_factory, data):
    _, _, d, _, _ = base
    work = tmp_path_factory.mktemp("params")
    shutil.copytree(d, work / "m")
    params = json.loads((d / PARAMS).read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(params) + ["n_kv_heads", "ffn_dim_multiplier", "bogus"]))
        if data.draw(st.booleans()):
            params[key] = data.draw(VALUES)
        else:
            params.pop(key, None)
    text = json.dumps(params) if data.draw(st.integers(0, 9)) else json.dumps(data.draw(VALUES))
    (work / "m" / PARAMS).write_text(text)
    budget = Budget()
    budget.load(load_model, work / "m")


T = gguf.GGUFValueType
GGUF_KEYS = ["general.architecture", "general.alignment", "llama.context_length", "llama.embedding_length",
             "llama.block_count", "llama.feed_forward_length", "llama.rope.dimension_count",
             "llama.attention.head_count", "llama.attention.head_count_kv", "llama.attention.layer_norm_rms_epsilon",
             "llama.rope.freq_base", "llama.expert_count", "llama.rope.scaling.type", "tokenizer.ggml.model",
             "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
             "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id"]
GGUF_VALUES = st.one_of(
    st.tuples(st.integers(0, 2**32 - 1), st.just(T.UINT32)),
    st.tuples(st.integers(-(2**63), 2**63 - 1), st.just(T.INT64)),
    st.tuples(st.sampled_from([0, 1, 2, 16, 32, 64, 512, 4096, 10**7]), st.sampled_from([T.UINT32, T.UINT64])),
    st.tuples(st.floats(width=32), st.just(T.FLOAT32)),
    st.tuples(st.booleans(), st.just(T.BOOL)),
    st.tuples(st.text(max_size=6), st.just(T.STRING)),
    st.tuples(st.lists(st.integers(0, 600), max_size=4), st.just(T.ARRAY), st.just(T.UINT32)),
    st.tuples(st.lists(st.binary(max_size=4), max_size=4), st.just(T.ARRAY), st.just(T.STRING)),
)


@FUZZ
@given(data=st.data())
def test_fuzz_gguf(base, tmp_path_factory, data):
    model, tok, _, base_gguf, header_bytes = base
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    how = data.draw(st.sampled_from(["metadata", "vocabulary", "bytes"]))
    if how != "bytes":
        if how == "metadata":  # values of any type where the reader expects its own
            changes = data.draw(st.dictionaries(st.sampled_from(GGUF_KEYS), st.one_of(GGUF_VALUES, st.none()),
                                                min_size=1, max_size=3))
        else:  # a few pieces of the vocabulary replaced: what SentencePiece is then handed
            pieces, _, types = vocab_for_gguf(tok)
            for _ in range(data.draw(st.integers(1, 4))):
                i = data.draw(st.integers(0, len(pieces) - 1))
                pieces[i] = data.draw(st.one_of(st.binary(max_size=6), st.sampled_from(pieces),
                                                st.sampled_from([b"", b"<0x41>", b"<0xZZ>", b"<unk>", b"\x00"])))
                types[i] = data.draw(st.integers(1, 6))
            changes = {"tokenizer.ggml.tokens": (pieces, T.ARRAY, T.STRING),
                       "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32)}
        real = gguf.GGUFWriter.write_header_to_file

        def header(self, *a, **kw):
            for k, v in changes.items():
                if v is None:
                    self.kv_data[0].pop(k, None)
                else:
                    self.kv_data[0][k] = GGUFValue(v[0], v[1], v[2] if len(v) > 2 else None)
            return real(self, *a, **kw)

        try:
            with mock.patch.object(gguf.GGUFWriter, "write_header_to_file", header):
                write_gguf(model.state_dict(), model.args, tok, path)
        except (ValueError, OverflowError, TypeError, AssertionError, struct.error):
            return  # a value gguf-py itself will not write
    else:  # raw bytes: a few of the metadata or the tensor table overwritten, or the file cut
        raw = bytearray(base_gguf.read_bytes())
        if data.draw(st.booleans()):
            anywhere, table = st.integers(0, header_bytes + 64), st.integers(header_bytes - 600, header_bytes)
            for _ in range(data.draw(st.integers(1, 6))):
                raw[data.draw(st.one_of(anywhere, table))] = data.draw(st.integers(0, 255))
        else:
            raw = raw[:data.draw(st.integers(0, len(raw)))]
        path.write_bytes(bytes(raw))
    Budget().load(load_gguf, path)
