"""Safetensors files from outside: every malformed header is a ValueError naming the file,
values that would load as silently wrong weights (header bytes, NaN) are refused, and sizes a
header declares are checked against the bytes present before anything is built from them."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import time

import pytest
import torch
from safetensors.torch import save_file

from llamaworks.model import ModelArgs, build_model
from llamaworks.modeldir import PARAMS, WEIGHTS, load_model, save_model
from llamaworks.paths import path_kind, require_file
from llamaworks.weights import StateLayout, check_finite, read_safetensors


def split(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(path, header, body: bytes, raw: bytes | None = None):
    head = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + body)


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(4, dtype=torch.float16)},
              str(path))
    return path


def test_a_valid_file_reads(small):
    t = read_safetensors(small)
    assert torch.equal(t["a"], torch.arange(6.0).view(2, 3)) and t["b"].dtype == torch.float16


HEADER_CASES = [
    # (mutation of the parsed header, words the error must contain)
    (lambda h: list(h.values()), "is a JSON array, not an object of tensors"),
    (lambda h: {**h, "a": {k: v for k, v in h["a"].items() if k != "data_offsets"}}, "has no data_offsets"),
    (lambda h: {**h, "a": {**h["a"], "data_offsets": [-8, 16]}}, "data_offsets [-8, 16]"),
    (lambda h: {**h, "a": {**h["a"], "data_offsets": [0, 20]}}, "span 20"),
    (lambda h: {**h, "a": {**h["a"], "shape": [3, 3]}}, "is 36 bytes but data_offsets"),
    (lambda h: {**h, "a": {**h["a"], "dtype": "F8_E4M3"}}, "unsupported dtype 'F8_E4M3'"),
    (lambda h: {**h, "a": {**h["a"], "dtype": ["F32"]}}, "unsupported dtype"),
    (lambda h: {**h, "a": {**h["a"], "shape": [2.0, 3]}}, "shape [2.0, 3] is not a list"),
    (lambda h: {**h, "a": {**h["a"], "shape": [-2, -3]}}, "is not a list"),
    (lambda h: {**h, "a": {**h["a"], "shape": [1] * 40}}, "is not a list of at most 8"),
    (lambda h: {**h, "a": {**h["a"], "data_offsets": [0, True]}}, "is not [begin, end]"),
    (lambda h: {**h, "a": 7}, "expected an object with dtype, shape and data_offsets"),
    (lambda h: {**h, "b": {**h["b"], "data_offsets": [0, 8]}}, "overlaps the tensor before it"),
    (lambda h: {**h, "__metadata__": {"format": 1}}, "__metadata__ must map strings to strings"),
]


@pytest.mark.parametrize("mutate,words", HEADER_CASES)
def test_malformed_headers_name_the_file(small, mutate, words):
    header, body = split(small)
    join(small, mutate(header), body)
    with pytest.raises(ValueError) as e:
        read_safetensors(small)
    assert str(small) in str(e.value) and words in str(e.value)


def test_negative_offsets_do_not_read_the_header_as_weights(small):
    # Before: begin -24 put tensor "b" inside the JSON header, which loaded as float16 weights.
    header, body = split(small)
    header["b"]["data_offsets"] = [-24, -16]
    join(small, header, body)
    with pytest.raises(ValueError, match=r"w.safetensors: tensor 'b': data_offsets \[-24, -16\]"):
        read_safetensors(small)


def test_bytes_not_described_by_the_header(small):
    header, body = split(small)
    join(small, header, body + b"\0" * 16)
    with pytest.raises(ValueError, match="16 bytes follow the last tensor"):
        read_safetensors(small)
    header["b"]["data_offsets"] = [28, 36]  # a 4-byte hole between a and b
    join(small, header, body + b"\0" * 4)
    with pytest.raises(ValueError, match="leaves 4 unused bytes before it"):
        read_safetensors(small)


@pytest.mark.parametrize("raw,words", [
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', "appears twice"),
    (b"[" * 100_000 + b"]" * 100_000, "corrupt safetensors header"),
    (b'{"a": NaN}', "NaN is not JSON"),
    (b'\xff\xfe{"a": 1}', "not UTF-8 text: byte 0xff at offset 0"),
])
def test_header_json_is_strict(small, raw, words):
    # Duplicate keys: json.loads keeps the last, another reader the first; two programs would
    # see different tensors in one file. Deep nesting raised RecursionError, a traceback.
    _, body = split(small)
    join(small, None, body, raw=raw)
    with pytest.raises(ValueError) as e:
        read_safetensors(small)
    assert str(small) in str(e.value) and words in str(e.value)


def test_nan_and_inf_weights_are_refused(small):
    for bad in (math.nan, math.inf, -math.inf):
        save_file({"a": torch.tensor([1.0, bad, 3.0]), "b": torch.zeros(2, dtype=torch.bfloat16)}, str(small))
        with pytest.raises(ValueError, match=r"w.safetensors: tensor 'a' holds NaN or infinite values"):
            read_safetensors(small)
        assert read_safetensors(small, check_values=False)["a"].shape == (3,)
    # Huge but finite values overflow a float32 sum; the check confirms element by element.
    save_file({"a": torch.full((4,), 3e38), "b": torch.tensor([6e4, 6e4], dtype=torch.float16)}, str(small))
    assert read_safetensors(small)["a"][0] == pytest.approx(3e38)
    check_finite({"x": torch.full((10,), 3e38)}, "src")
    with pytest.raises(ValueError, match="src: tensor 'x'"):
        check_finite({"x": torch.tensor([0.0, math.nan], dtype=torch.bfloat16)}, "src")


def test_nan_weights_in_a_model_directory(tmp_path, tiny_model, tiny_tokenizer):
    d = save_model(tiny_model, tiny_tokenizer, tmp_path / "m")
    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    sd["layers.1.feed_forward.w2.weight"][3, 5] = math.nan
    save_file(sd, str(d / WEIGHTS))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'layers.1.feed_forward.w2.weight' holds NaN"):
        load_model(d)


def test_the_finiteness_check_is_cheap(tmp_path):
    # ~64 MB of fp32: the check streams the file through a 1 MB buffer (0.1-0.2 s per GB from the
    # page cache, measured) and leaves the memory map unread.
    path = tmp_path / "big.safetensors"
    save_file({f"t{i}": torch.randn(1024, 2048) for i in range(8)}, str(path))
    read_safetensors(path)  # page cache warm
    start = time.perf_counter()
    read_safetensors(path)
    assert time.perf_counter() - start < 2.0


def test_integer_weights_for_float_parameters(tmp_path, tiny_model, tiny_tokenizer):
    d = save_model(tiny_model, tiny_tokenizer, tmp_path / "m")
    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    sd["norm.weight"] = torch.ones(sd["norm.weight"].shape, dtype=torch.int32)
    save_file(sd, str(d / WEIGHTS))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor norm.weight is torch.int32, but the model's"):
        load_model(d)


def test_declared_layers_are_checked_before_the_model_is_built(tmp_path, tiny_model, tiny_tokenizer):
    # Before: a params.json of ten million layers built them (on the meta device) first, which
    # ran for minutes and took gigabytes before the weights were compared.
    d = save_model(tiny_model, tiny_tokenizer, tmp_path / "m")
    params = json.loads((d / PARAMS).read_text())
    (d / PARAMS).write_text(json.dumps({**params, "n_layers": 10_000_000}))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"model.safetensors: weights do not match .*params.json: missing "
                                         r"\['layers.2.attention.wq.weight'"):
        load_model(d)
    assert time.perf_counter() - start < 5
    layout = StateLayout(ModelArgs(dim=64, n_layers=10_000_000, n_heads=4, vocab_size=8))
    assert layout.expected("layers.9999999.attention.wq.weight").shape == (64, 64)
    assert layout.expected("layers.10000000.attention.wq.weight") is None
    assert layout.expected("layers.01.attention.wq.weight") is None  # one spelling per name


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_paths_say_what_they_are(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "zero").symlink_to("/dev/zero")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "file").write_bytes(b"x")
    assert path_kind(tmp_path / "file") == "file" and path_kind(tmp_path) == "directory"
    assert path_kind(tmp_path / "nowhere") == "missing"
    expect = {"loop": "a symlink loop", "fifo": "a FIFO (named pipe)", "zero": "a character device",
              "dangling": "a broken symlink to"}
    for name, words in expect.items():
        assert path_kind(tmp_path / name).startswith(words), name
        with pytest.raises(ValueError, match=re.escape(f"{name} is {words}")):
            read_safetensors(tmp_path / name)  # before: the FIFO blocked, /dev/zero was mapped
    with pytest.raises(FileNotFoundError, match="nowhere is missing: check"):
        require_file(tmp_path / "nowhere", "check")
    with pytest.raises(ValueError, match="is a directory, not a regular file"):
        read_safetensors(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_model_directory_files_that_are_not_files(tmp_path, tiny_model_dir):
    cases = {PARAMS: lambda p: p.symlink_to(p), WEIGHTS: lambda p: os.mkfifo(p),
             "tokenizer.model": lambda p: p.symlink_to("/dev/zero")}
    words = {PARAMS: "a symlink loop", WEIGHTS: "a FIFO", "tokenizer.model": "a character device"}
    for name, make in cases.items():
        d = tmp_path / name
        shutil.copytree(tiny_model_dir, d)
        (d / name).unlink()
        make(d / name)
        with pytest.raises(ValueError, match=f"{name} is {words[name]}.*a model directory holds"):
            load_model(d)  # before: "... is missing" for all three


def test_small_models_still_load(tmp_path, tiny_tokenizer):
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=tiny_tokenizer.vocab_size, multiple_of=16,
                     max_seq_len=32)
    d = save_model(build_model(args, seed=0), tiny_tokenizer, tmp_path / "m")
    model, _ = load_model(d)
    assert model.args == args


def test_written_weights_start_on_64_byte_boundaries_and_any_reader_reads_them(tmp_path):
    from safetensors.torch import load_file

    from llamaworks.weights import WRITE_ALIGN, save_safetensors

    state = {"w8": torch.randint(-127, 128, (64, 96), dtype=torch.int8), "odd": torch.randn(3, 5),
             "bf": torch.randn(40, 8).to(torch.bfloat16), "empty": torch.empty(0), "half": torch.randn(7).half()}
    path = tmp_path / "x.safetensors"
    save_safetensors(state, path, metadata={"format": "pt"})
    ours, reference = read_safetensors(path), load_file(path)
    for k, t in state.items():
        assert torch.equal(ours[k], t) and torch.equal(reference[k], t), k
    # every tensor whose size is a multiple of the alignment is mapped on a boundary
    whole = [k for k, t in state.items() if t.numel() * t.element_size() % WRITE_ALIGN == 0]
    assert {"w8", "bf"} <= set(whole)
    assert all(ours[k].data_ptr() % WRITE_ALIGN == 0 for k in whole if ours[k].numel())
