from __future__ import annotations

import json
import shutil

import pytest
import torch

from llamaworks.inference.load import load_model
from llamaworks.model import ModelArgs, build_model
from llamaworks.modeldir import PARAMS, TOKENIZER, WEIGHTS, save_model
from llamaworks.modeldir import load_model as modeldir_load_model
from llamaworks.weights import read_safetensors


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_round_trip_same_logits(tiny_model, tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    x = torch.randint(0, tok.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), tiny_model(x))
    assert model.args == tiny_model.args and not model.training
    params = json.loads((tiny_model_dir / PARAMS).read_text())
    assert params["dim"] == 128 and "n_layers" in params and "ffn_dim_multiplier" not in params  # Meta's keys


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.fixture
def mid_model_dir(tmp_path, tiny_tokenizer):
    """A model directory with ~37 MB of fp32 weights: enough to tell a copy from a mapping."""
    args = ModelArgs(dim=512, n_layers=4, n_heads=8, vocab_size=tiny_tokenizer.vocab_size, max_seq_len=64)
    return save_model(build_model(args, seed=0), tiny_tokenizer, tmp_path / "m")


def test_weights_are_memory_mapped_not_copied(mid_model_dir):
    # Loading must not read the weights into fresh memory.
    size = (mid_model_dir / WEIGHTS).stat().st_size
    before = _rss()
    model, _ = modeldir_load_model(mid_model_dir)
    grown = _rss() - before
    assert grown < size / 4, (grown, size)
    w_again = read_safetensors(mid_model_dir / WEIGHTS)["layers.0.attention.wq.weight"]
    assert torch.equal(model.layers[0].attention.wq.weight, w_again)


def test_inference_load_holds_one_copy_of_the_weights(mid_model_dir):
    # inference.load_model moves the mapped weights into one huge-page arena where the kernel has
    # transparent huge pages (inference/hugepages.py): one copy, never the file's pages and the arena both.
    size = (mid_model_dir / WEIGHTS).stat().st_size
    before = _rss()
    model, _ = load_model(mid_model_dir, fuse=False)  # fusion (on by default) concatenates wq/wk/wv, w1/w3: copies
    grown = _rss() - before
    assert grown < size * 1.25, (grown, size)
    w_again = read_safetensors(mid_model_dir / WEIGHTS)["layers.0.attention.wq.weight"]
    assert torch.equal(model.layers[0].attention.wq.weight, w_again)


@pytest.mark.parametrize("hardware_bf16", [True, False])
def test_dtype_conversion_on_load(monkeypatch, tiny_model_dir, hardware_bf16):
    from llamaworks.inference import kernels, native

    monkeypatch.setattr(kernels, "bf16_matmul", lambda: hardware_bf16)
    model, _ = load_model(tiny_model_dir, dtype="bfloat16")
    assert model.output.weight.dtype == torch.bfloat16 and model.freqs_cis.dtype == torch.float32
    # Without hardware bf16 (and with the native kernels) the activations are fp32: use_fp32_activations
    fp32_activations = not hardware_bf16 and native.available()
    assert model.tok_embeddings.weight.dtype == (torch.float32 if fp32_activations else torch.bfloat16)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_meta_vocab_size_minus_one_comes_from_tokenizer(tmp_path, tiny_model_dir, tiny_tokenizer):
    d = _copy(tiny_model_dir, tmp_path / "m")
    params = json.loads((d / PARAMS).read_text())
    params["vocab_size"] = -1
    (d / PARAMS).write_text(json.dumps(params))
    model, _ = load_model(d)
    assert model.args.vocab_size == tiny_tokenizer.vocab_size


def test_missing_files(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nothing")
    for name in (PARAMS, WEIGHTS, TOKENIZER):
        d = _copy(tiny_model_dir, tmp_path / name)
        (d / name).unlink()
        with pytest.raises(FileNotFoundError, match=f"{name} is missing"):
            load_model(d)


def test_truncated_and_corrupt_weights(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir, tmp_path / "t")
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: truncated.*re-copy"):
        load_model(d)
    (d / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + data[24:100])
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        load_model(d)
    (d / WEIGHTS).write_bytes(b"abc")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_model(d)


def test_params_disagreeing_with_weights(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir, tmp_path / "p")
    params = json.loads((d / PARAMS).read_text())
    (d / PARAMS).write_text(json.dumps({**params, "dim": 256}))
    with pytest.raises(ValueError, match=r"tok_embeddings.weight has shape \(\d+, 128\).*disagree"):
        load_model(d)
    (d / PARAMS).write_text(json.dumps({**params, "n_layers": 3}))
    with pytest.raises(ValueError, match=r"missing \['layers.2"):
        load_model(d)
    (d / PARAMS).write_text(json.dumps({**params, "n_layer": 3}))
    with pytest.raises(ValueError, match=r"params.json: unknown params.json keys \['n_layer'\]"):
        load_model(d)
    (d / PARAMS).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(d)


def test_vocab_mismatch_names_both_files(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir, tmp_path / "v")
    params = json.loads((d / PARAMS).read_text())
    (d / PARAMS).write_text(json.dumps({**params, "vocab_size": params["vocab_size"] + 1}))
    with pytest.raises(ValueError, match=r"vocabulary mismatch.*params.json.*tokenizer.model"):
        load_model(d)


def test_mixed_dtypes_rejected(tmp_path, tiny_model, tiny_tokenizer):
    from safetensors.torch import save_file

    d = save_model(tiny_model, tiny_tokenizer, tmp_path / "mixed")
    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    sd["norm.weight"] = sd["norm.weight"].half()
    save_file(sd, str(d / WEIGHTS))
    with pytest.raises(ValueError, match="mixed dtypes"):
        load_model(d)


def test_failed_save_keeps_the_old_directory(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    d = save_model(tiny_model, tiny_tokenizer, tmp_path / "keep")
    before = (d / WEIGHTS).read_bytes()
    import llamaworks.modeldir

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(llamaworks.modeldir, "save_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(tiny_model, tiny_tokenizer, d)
    assert (d / WEIGHTS).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]  # no temporary folder left behind


@pytest.mark.parametrize("change,words", [
    ({"dim": 128.0}, "dim must be an integer, got 128.0 (write 128)"),
    ({"n_layers": True}, "n_layers must be an integer, got True"),
    ({"norm_eps": "1e-6"}, "norm_eps must be a positive finite number, got '1e-6'"),
    ({"norm_eps": -1e-6}, "norm_eps must be a positive finite number"),
    ({"rope_theta": 0}, "rope_theta must be a positive finite number, got 0"),
    ({"rope_theta": -10000.0}, "rope_theta must be a positive finite number"),
    ({"max_seq_len": 300_000_000}, "max_seq_len=300000000 exceeds 16777216"),
    ({"multiple_of": [256]}, "multiple_of must be an integer"),
    ({"n_heads": 0}, "n_heads must be positive"),
    ({"multiple_of": 2**70}, "make tensors larger than any that torch can hold"),  # before: TypeError
    ({"dim": 10**400}, "make tensors larger than any that torch can hold"),  # before: OverflowError
])
def test_bad_params_values_name_the_file_and_key(tmp_path, tiny_model_dir, change, words):
    # Before: 128.0 and "1e-6" failed deep inside torch with a traceback; rope_theta <= 0 and a
    # negative norm_eps loaded and computed NaN or wrong logits; max_seq_len 3e8 asked for 38 GB.
    d = _copy(tiny_model_dir, tmp_path / "p")
    params = json.loads((d / PARAMS).read_text())
    (d / PARAMS).write_text(json.dumps({**params, **change}))
    with pytest.raises(ValueError) as e:
        load_model(d)
    assert str(d / PARAMS) in str(e.value) and words in str(e.value)


def test_params_json_bytes(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir, tmp_path / "b")
    (d / PARAMS).write_bytes(b'{"dim": 128, "n_layers": 2\xff}')
    with pytest.raises(ValueError, match=r"params.json: not valid JSON \(not UTF-8 text: byte 0xff at offset 26\)"):
        load_model(d)
    (d / PARAMS).write_bytes(b"[" * 50_000 + b"]" * 50_000)
    with pytest.raises(ValueError, match="params.json: not valid JSON"):
        load_model(d)
    (d / PARAMS).write_bytes(b" " * (2 << 20) + b"{}")
    with pytest.raises(ValueError, match=r"params.json: 2097154 bytes, but params.json is a small JSON file"):
        load_model(d)
    (d / PARAMS).write_text("[1, 2]")
    with pytest.raises(ValueError, match="params.json: expected a JSON object"):
        load_model(d)
    params = json.loads((tiny_model_dir / PARAMS).read_text())
    (d / PARAMS).write_text(json.dumps({**params, "rope_theta": "X"}).replace('"X"', "1e400"))  # read as inf
    with pytest.raises(ValueError, match="params.json: rope_theta must be a positive finite number, got inf"):
        load_model(d)


def test_a_long_declared_context_costs_nothing_until_used(tmp_path, tiny_model_dir):
    # The RoPE table used to be built for max_seq_len at load: 2^24 positions of head_dim 32 is
    # 2 GB. Now it holds 4096 rows and grows to what a cache or an input needs.
    d = _copy(tiny_model_dir, tmp_path / "long")
    params = json.loads((d / PARAMS).read_text())
    (d / PARAMS).write_text(json.dumps({**params, "max_seq_len": 1 << 24}))
    model, _ = load_model(d)
    assert model.freqs_cis.shape[0] == 4096
    model.setup_caches(1, 5000)
    assert model.freqs_cis.shape[0] == 8192
    model.clear_caches()


def test_vocab_size_minus_one_without_a_tokenizer(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir, tmp_path / "v")
    params = json.loads((d / PARAMS).read_text())
    (d / PARAMS).write_text(json.dumps({**params, "vocab_size": -1}))
    with pytest.raises(ValueError, match=r"params.json: vocab_size is -1 .*load the tokenizer too"):
        load_model(d, tokenizer=False)


def test_a_model_directory_that_is_a_file(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match=r"model.safetensors is a file, not a directory: a model directory holds"):
        load_model(tiny_model_dir / WEIGHTS)


# --- Llama 3 style directories: a tiktoken tokenizer.model and a chat template ----------------


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory, corpus_docs):
    from tiny_llama3 import make_model_dir, write_tokenizer

    root = tmp_path_factory.mktemp("llama3")
    return make_model_dir(root / "model", write_tokenizer(root / "tok", corpus_docs))


def test_a_llama3_directory_loads_its_tokenizer_and_chat_template(tmp_path, llama3_dir):
    from llamaworks.modeldir import CHAT_TEMPLATE
    from llamaworks.tokenizer import ByteLevelBPETokenizer, detect_format
    from llamaworks.tokenizer.base import TIKTOKEN
    from llamaworks.tokenizer.chat import LLAMA3_TEMPLATE

    model, tok = load_model(llama3_dir)
    assert isinstance(tok, ByteLevelBPETokenizer) and tok.vocab_size == model.args.vocab_size
    assert detect_format(llama3_dir / TOKENIZER) == TIKTOKEN  # saved in the format it was read from
    assert tok.chat_template.source == LLAMA3_TEMPLATE
    assert (tok.chat_template.bos_token, tok.chat_template.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    # Saved again, the directory is the same: tokenizer file byte for byte, the template with it.
    again = save_model(model, tok, tmp_path / "again")
    for name in (TOKENIZER, CHAT_TEMPLATE):
        assert (again / name).read_bytes() == (llama3_dir / name).read_bytes()
    # A base model has no template; its tokenizer says so.
    (again / CHAT_TEMPLATE).unlink()
    _, base_tok = load_model(again)
    assert base_tok.chat_template is None
    assert not (save_model(model, base_tok, tmp_path / "base") / CHAT_TEMPLATE).exists()


def test_a_tokenizer_json_is_saved_as_json(tmp_path, llama3_dir):
    from llamaworks.tokenizer import detect_format, load_tokenizer
    from llamaworks.tokenizer.base import JSON_BYTE_LEVEL

    model, tok = load_model(llama3_dir)
    (tmp_path / "tokenizer.json").write_text(tok.to_json())
    as_json = load_tokenizer(tmp_path / "tokenizer.json")
    d = save_model(model, as_json, tmp_path / "json")
    assert detect_format(d / TOKENIZER) == JSON_BYTE_LEVEL
    _, back = load_model(d)
    text = "naïve café 日本語 <|eot_id|>"
    assert back.encode(text) == tok.encode(text) and back.stop_ids == tok.stop_ids


def test_llama3_vocab_mismatch_and_bad_template_name_the_files(tmp_path, llama3_dir):
    from llamaworks.modeldir import CHAT_TEMPLATE

    d = _copy(llama3_dir, tmp_path / "v")
    params = json.loads((d / PARAMS).read_text())
    (d / PARAMS).write_text(json.dumps({**params, "vocab_size": params["vocab_size"] - 256}))
    with pytest.raises(ValueError) as e:
        load_model(d)
    assert str(d / PARAMS) in str(e.value) and str(d / TOKENIZER) in str(e.value)
    assert f"has {params['vocab_size']} tokens" in str(e.value)
    (d / PARAMS).write_text(json.dumps(params))
    (d / CHAT_TEMPLATE).write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ValueError, match=rf"{CHAT_TEMPLATE}.*not a valid Jinja2 template"):
        load_model(d)
