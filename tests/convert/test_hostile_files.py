"""Checkpoints from outside (GGUF, Hugging Face, Meta): metadata never drives memory before it
is checked against the file, silently wrong weights are refused, and every problem is a
ValueError (or FileNotFoundError) naming the file and the key."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import time
from contextlib import contextmanager
from unittest import mock

import pytest
import torch

from llamaworks.convert.formats import load_checkpoint, save_checkpoint
from llamaworks.model import ModelArgs, build_model

gguf = pytest.importorskip("gguf", reason="the gguf package is an optional extra (pip install gguf)")
from gguf.gguf_writer import GGUFValue  # noqa: E402

from llamaworks.convert.gguf import load_gguf, vocab_for_gguf, write_gguf  # noqa: E402

T = gguf.GGUFValueType
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def small(tiny_tokenizer):
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tiny_tokenizer.vocab_size, multiple_of=32,
                     max_seq_len=64)
    return build_model(args, seed=0).eval(), tiny_tokenizer


@contextmanager
def gguf_changes(meta: dict | None = None, drop=(), tensor_types: dict | None = None):
    """While active, write_gguf writes `meta` ({key: (value, GGUFValueType[, sub type])}) over
    its own metadata, leaves out `drop`, and labels tensors with `tensor_types` without
    converting their data (to write files whose labels lie)."""
    real_header, real_add = gguf.GGUFWriter.write_header_to_file, gguf.GGUFWriter.add_tensor

    def header(self, *a, **kw):
        for k in drop:
            self.kv_data[0].pop(k, None)
        for k, v in (meta or {}).items():
            self.kv_data[0][k] = GGUFValue(v[0], v[1], v[2] if len(v) > 2 else None)
        return real_header(self, *a, **kw)

    def add(self, name, tensor, **kw):
        if tensor_types and name in tensor_types:
            return real_add(self, name, tensor, raw_dtype=tensor_types[name])
        return real_add(self, name, tensor, **kw)

    with mock.patch.object(gguf.GGUFWriter, "write_header_to_file", header), \
            mock.patch.object(gguf.GGUFWriter, "add_tensor", add):
        yield


def write(path, small, state=None, **changes):
    model, tok = small
    with gguf_changes(**changes):
        write_gguf(state if state is not None else model.state_dict(), model.args, tok, path)
    return path


def refused(path, *words, load=load_gguf):
    with pytest.raises(ValueError) as e:
        load(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_a_plain_file_loads(small, tmp_path):
    model, _ = load_gguf(write(tmp_path / "ok.gguf", small))
    assert model.args == small[0].args


def test_ten_million_blocks_are_refused_at_once(small, tmp_path):
    # Before: 112 s and 5.3 GB (a meta-device model of 10M layers) before a MemoryError.
    path = write(tmp_path / "blocks.gguf", small, meta={"llama.block_count": (10_000_000, T.UINT32)})
    start = time.perf_counter()
    refused(path, "'llama.block_count' is 10000000, but the file holds only 12 tensors")
    assert time.perf_counter() - start < 3


def test_context_length_is_checked_and_costs_nothing(small, tmp_path):
    # Before: context_length 3e8 built a 38 GB RoPE table at load.
    refused(write(tmp_path / "ctx.gguf", small, meta={"llama.context_length": (300_000_000, T.UINT32)}),
            "max_seq_len=300000000 exceeds 16777216")
    model, _ = load_gguf(write(tmp_path / "long.gguf", small, meta={"llama.context_length": (1 << 24, T.UINT32)}))
    assert model.args.max_seq_len == 1 << 24 and model.freqs_cis.shape[0] == 4096


@pytest.mark.parametrize("meta,words", [
    ({"llama.attention.head_count": (0, T.UINT32)}, "'llama.attention.head_count' is 0, but must be from 1 to 32"),
    ({"tokenizer.ggml.bos_token_id": (1_000_000_000, T.UINT32)},
     "'tokenizer.ggml.bos_token_id' is 1000000000, but must be from 0 to 511"),
    ({"llama.attention.head_count": ("two", T.STRING)}, "'llama.attention.head_count' is the string b'two'"),
    ({"llama.embedding_length": (32.0, T.FLOAT32)}, "'llama.embedding_length' is 32.0, but must be an integer"),
    ({"llama.rope.freq_base": (-10000.0, T.FLOAT32)}, "rope_theta must be a positive finite number"),
    ({"llama.attention.layer_norm_rms_epsilon": (float("nan"), T.FLOAT32)},
     "'llama.attention.layer_norm_rms_epsilon' is nan, but must be a finite number"),
    ({"llama.attention.head_count_kv": ([2], T.ARRAY, T.UINT32)}, "'llama.attention.head_count_kv' is an array"),
    ({"llama.feed_forward_length": (7, T.UINT32)}, "feed_forward.w1.weight has shape (96, 32) but its llama.* "
                                                  "metadata implies (7, 32)"),
    ({"llama.feed_forward_length": (0, T.UINT32)}, "'llama.feed_forward_length' is 0, but must be at least 1"),
    ({"tokenizer.ggml.token_type": ([1] * 3, T.ARRAY, T.INT32)}, "has 3 entries for 512 tokens"),
    ({"general.alignment": (12, T.UINT32)}, "general.alignment is 12"),
])
def test_bad_metadata_names_the_file_and_key(small, tmp_path, meta, words):
    # Before: head_count 0 raised ZeroDivisionError, bos_token_id 1e9 an IndexError, a string or
    # an array where a number belongs a TypeError: tracebacks without the file's name.
    try:
        path = write(tmp_path / "m.gguf", small, meta=meta)
    except (ValueError, AssertionError):
        pytest.skip("gguf-py will not write this value")
    refused(path, words)


@pytest.mark.parametrize("piece,words", [(b"\xff\xfe", "token 5 of tokenizer.ggml.tokens is not UTF-8"),
                                         (None, "its vocabulary does not make a SentencePiece model")])
def test_bad_token_pieces(small, tmp_path, piece, words):
    pieces = vocab_for_gguf(small[1])[0]
    pieces[5] = piece or pieces[6]  # None: a duplicate piece, which SentencePiece refuses
    msg = refused(write(tmp_path / "p.gguf", small, meta={"tokenizer.ggml.tokens": (pieces, T.ARRAY, T.STRING)}),
                  words)
    assert "tokenizer.model" not in msg  # the rebuilt model's name: no such file exists


def test_f32_data_labelled_q8_0_is_refused(small, tmp_path):
    # Before: read as Q8_0 blocks, i.e. garbage weights, without a word. llama.cpp refuses it:
    # the next tensor (or the end of the file) is not where the label's size puts it.
    path = write(tmp_path / "lie.gguf", small, tensor_types={"blk.0.attn_q.weight": Q.Q8_0})
    refused(path, "('blk.0.attn_q.weight', Q8_0 of shape (32, 32), is 1088 bytes)",
            "a tensor's type or shape does not match its data")
    assert list(small[0].state_dict())[-1] == "output.weight"  # written last: only the file's end can tell
    path = write(tmp_path / "lie_last.gguf", small, tensor_types={"output.weight": Q.Q8_0})
    refused(path, "bytes follow the last tensor")


def test_nan_weights_are_refused(small, tmp_path):
    state = {k: v.clone() for k, v in small[0].state_dict().items()}
    state["layers.0.feed_forward.w1.weight"][0, 0] = math.nan
    refused(write(tmp_path / "nan.gguf", small, state=state), "tensor 'layers.0.feed_forward.w1.weight' holds NaN")


def _kv_offset(data: bytes, key: str) -> int:
    """Offset just after `key`'s string in the metadata (where its type follows)."""
    k = key.encode()
    return data.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)


def test_declared_counts_are_checked_before_loops(small, tmp_path):
    data = bytearray(write(tmp_path / "base.gguf", small).read_bytes())
    at = _kv_offset(data, "tokenizer.ggml.tokens")  # then: type ARRAY, element type, count
    big = bytearray(data)
    big[at + 8:at + 16] = struct.pack("<Q", 10**12)
    (tmp_path / "count.gguf").write_bytes(big)
    refused(tmp_path / "count.gguf", "array 'tokenizer.ggml.tokens' declares 1000000000000 elements")
    nested = bytearray(data)
    nested[at + 4:at + 8] = struct.pack("<I", 9)  # an array of arrays
    (tmp_path / "nested.gguf").write_bytes(nested)
    refused(tmp_path / "nested.gguf", "elements of type 9")
    counts = bytearray(data)
    counts[8:16] = struct.pack("<Q", 2**40)  # tensor count
    (tmp_path / "tensors.gguf").write_bytes(counts)
    refused(tmp_path / "tensors.gguf", "1099511627776 tensors declared")
    (tmp_path / "short.gguf").write_bytes(data[:at + 2])
    refused(tmp_path / "short.gguf", "truncated or corrupt")
    (tmp_path / "v1.gguf").write_bytes(data[:4] + struct.pack("<I", 1) + data[8:])
    refused(tmp_path / "v1.gguf", "GGUF version 1")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_checkpoint_paths_that_are_not_files(tmp_path):
    os.mkfifo(tmp_path / "pipe.gguf")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(ValueError, match=re.escape("pipe.gguf is a FIFO (named pipe), not a regular file")):
        load_gguf(tmp_path / "pipe.gguf")  # before: np.memmap of a FIFO
    with pytest.raises(ValueError, match="loop is a symlink loop: a checkpoint is a folder or a .gguf file"):
        load_checkpoint("native", tmp_path / "loop")  # before: "does not exist"
    with pytest.raises(ValueError, match="is a character device"):
        load_checkpoint("gguf", "/dev/zero")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint("hf", tmp_path / "nowhere")


# --- Hugging Face folders ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_folder(small, tmp_path_factory):
    model, tok = small
    return save_checkpoint("hf", model, tok, tmp_path_factory.mktemp("hf") / "hf")


def _hf_copy(hf_folder, tmp_path, **config):
    d = tmp_path / "hf"
    shutil.copytree(hf_folder, d)
    if config:
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **config}))
    return d


def _load_hf(d):
    return load_checkpoint("hf", d)


@pytest.mark.parametrize("config,words", [
    ({"hidden_size": "32"}, "hidden_size must be a positive integer, got '32'"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ({"rms_norm_eps": -1.0}, "norm_eps must be a positive finite number"),
    ({"rope_parameters": [1]}, "rope_parameters=[1]"),
    ({"max_position_embeddings": 300_000_000}, "exceeds 16777216"),
])
def test_bad_hf_config_values(hf_folder, tmp_path, config, words):
    d = _hf_copy(hf_folder, tmp_path, **config)
    msg = refused(d / "config.json", words, load=lambda _: _load_hf(d))
    assert "config.json" in msg


def test_hf_config_that_is_not_an_object(hf_folder, tmp_path):
    d = _hf_copy(hf_folder, tmp_path)
    (d / "config.json").write_text("[1, 2, 3]")  # before: AttributeError 'list' object has no attribute 'get'
    refused(d / "config.json", "expected a JSON object", load=lambda _: _load_hf(d))


def test_hf_layer_count_is_checked_before_listing_names(hf_folder, tmp_path):
    # Before: key_map listed 9 names for each of ten million declared layers first.
    d = _hf_copy(hf_folder, tmp_path, num_hidden_layers=10_000_000)
    start = time.perf_counter()
    refused(d / "config.json", "num_hidden_layers=10000000, but the weights hold only", load=lambda _: _load_hf(d))
    assert time.perf_counter() - start < 3


def test_hf_index_names_stay_in_the_folder(hf_folder, tmp_path):
    d = _hf_copy(hf_folder, tmp_path)
    outside = tmp_path / "outside.safetensors"
    shutil.move(d / "model.safetensors", outside)
    names = json.loads(json.dumps({"weight_map": {"lm_head.weight": "../outside.safetensors"}}))
    (d / "model.safetensors.index.json").write_text(json.dumps(names))
    refused(d / "model.safetensors.index.json", "lists '../outside.safetensors', which is not a file name in",
            load=lambda _: _load_hf(d))  # before: read the file outside the folder
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": 3}}))
    refused(d / "model.safetensors.index.json", "not a valid weight index", load=lambda _: _load_hf(d))


# --- Meta folders ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def meta_folder(small, tmp_path_factory):
    model, tok = small
    return save_checkpoint("meta", model, tok, tmp_path_factory.mktemp("meta") / "meta", shards=2)


def test_meta_layer_count_is_checked_before_building(meta_folder, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(meta_folder, d)
    params = json.loads((d / "params.json").read_text())
    (d / "params.json").write_text(json.dumps({**params, "n_layers": 10_000_000}))
    start = time.perf_counter()
    refused(d / "params.json", "disagrees with the shards: tensors missing ['layers.1.",
            load=lambda _: load_checkpoint("meta", d))
    assert time.perf_counter() - start < 3


def test_meta_shards_with_disagreeing_shapes(meta_folder, tmp_path):
    # Before: torch.cat raised "Sizes of tensors must match", a traceback.
    d = tmp_path / "m"
    shutil.copytree(meta_folder, d)
    sd = torch.load(d / "consolidated.01.pth", weights_only=True)
    sd["layers.0.attention.wq.weight"] = sd["layers.0.attention.wq.weight"][:, :5].clone()
    torch.save(sd, d / "consolidated.01.pth")
    refused(d, "the shards hold layers.0.attention.wq.weight in shapes", load=lambda _: load_checkpoint("meta", d))


def test_meta_nan_weights(meta_folder, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(meta_folder, d)
    sd = torch.load(d / "consolidated.00.pth", weights_only=True)
    sd["norm.weight"][0] = math.inf
    torch.save(sd, d / "consolidated.00.pth")
    refused(d, "tensor 'norm.weight' holds NaN or infinite values", load=lambda _: load_checkpoint("meta", d))


def test_meta_pickles_cannot_run_code(meta_folder, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(meta_folder, d)

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"norm.weight": Boom()}, d / "consolidated.00.pth")
    refused(d / "consolidated.00.pth", "truncated or corrupt checkpoint shard",
            load=lambda _: load_checkpoint("meta", d))
    assert not (tmp_path / "pwned").exists()


def test_tensor_shapes_past_int64(small, tmp_path):
    data = bytearray(write(tmp_path / "base.gguf", small).read_bytes())
    name = b"token_embd.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)  # then: n_dims, dims
    data[at + 4:at + 12] = struct.pack("<Q", 2**63)
    (tmp_path / "huge.gguf").write_bytes(data)
    refused(tmp_path / "huge.gguf", "tensor 'token_embd.weight' has shape [9223372036854775808, 512]")
