"""Every conversion path on a tiny random model, and every bad input the converter must name.

native -> Meta (2 shards) -> native -> HF -> native -> GGUF, checking logits at each hop
(transformers for the HF folder, llama.cpp's greedy tokens for GGUF where installed).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from peaked import sharpen

from llamaworks.cli import main as cli_main
from llamaworks.convert.command import convert_command, greedy
from llamaworks.convert.formats import load_any, load_checkpoint, save_checkpoint
from llamaworks.convert.meta import load_meta
from llamaworks.model import ModelArgs, build_model
from llamaworks.modeldir import save_model

transformers = pytest.importorskip("transformers")  # imported once for the module (~6 s)
from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: E402

PROMPTS = [[1, 5, 77, 300, 12], [1, 400, 401, 402, 403, 404, 405, 17]]




def _logits(model):
    with torch.no_grad():
        return [model(torch.tensor([p])) for p in PROMPTS]


def _assert_same_logits(a, b, atol=1e-5):
    for x, y in zip(_logits(a), _logits(b)):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def _greedy_all(model, n=8):
    with torch.no_grad():
        return [greedy(model, p, n) for p in PROMPTS]


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_tokenizer):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tiny_tokenizer.vocab_size,
                     max_seq_len=64)
    model = sharpen(build_model(args, seed=0))
    root = tmp_path_factory.mktemp("parity")
    return model, save_model(model, tiny_tokenizer, root / "native"), root


@pytest.fixture(scope="module")
def chain(source):
    model, native, root = source
    paths = {"native": native}
    convert_command("native", "meta", str(native), str(root / "meta2"), shards=2)
    paths["meta2"] = root / "meta2"
    convert_command("meta", "native", str(paths["meta2"]), str(root / "native2"))
    paths["native2"] = root / "native2"
    convert_command("native", "hf", str(paths["native2"]), str(root / "hf"))
    paths["hf"] = root / "hf"
    convert_command("hf", "native", str(paths["hf"]), str(root / "native3"))
    paths["native3"] = root / "native3"
    return model, paths


def test_meta_two_shards(chain, tiny_tokenizer):
    model, paths = chain
    names = sorted(p.name for p in paths["meta2"].iterdir())
    assert names == ["consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]
    params = json.loads((paths["meta2"] / "params.json").read_text())
    assert params == {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512,
                      "multiple_of": 256, "norm_eps": 1e-6}
    shard = torch.load(paths["meta2"] / "consolidated.01.pth", weights_only=True)
    # fairscale's layout: column-parallel halves rows, row-parallel and embeddings halve columns.
    assert shard["layers.0.attention.wq.weight"].shape == (32, 64)
    assert shard["layers.0.attention.wk.weight"].shape == (16, 64)
    assert shard["layers.0.attention.wo.weight"].shape == (64, 32)
    assert shard["layers.0.feed_forward.w2.weight"].shape == (64, 128)
    assert shard["tok_embeddings.weight"].shape == (512, 32)
    assert shard["output.weight"].shape == (256, 64)
    assert shard["norm.weight"].shape == (64,)
    torch.testing.assert_close(shard["layers.1.attention.wq.weight"],
                               model.state_dict()["layers.1.attention.wq.weight"][32:], atol=0, rtol=0)
    merged, tok = load_meta(paths["meta2"])
    assert tok.model_proto == tiny_tokenizer.model_proto
    _assert_same_logits(model, merged, atol=0)


def test_meta_vocab_minus_one_and_reshard(chain, tmp_path):
    model, paths = chain
    meta = tmp_path / "meta"
    shutil.copytree(paths["meta2"], meta)
    params = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))  # as Meta ships it
    merged, _ = load_meta(meta)
    assert merged.args.vocab_size == 512
    m, tok = load_checkpoint("meta", meta)
    save_checkpoint("meta", m, tok, tmp_path / "meta1", shards=1)
    assert sorted(p.name for p in (tmp_path / "meta1").glob("*.pth")) == ["consolidated.00.pth"]
    _assert_same_logits(model, load_meta(tmp_path / "meta1")[0], atol=0)


def test_native_hops_are_exact(chain):
    model, paths = chain
    for hop in ("native2", "native3"):
        _assert_same_logits(model, load_any(paths[hop])[0], atol=0)


def test_transformers_loads_exported_folder(chain, tiny_tokenizer):
    model, paths = chain
    hf = LlamaForCausalLM.from_pretrained(paths["hf"], dtype=torch.float32).eval()
    with torch.no_grad():
        for p, ours in zip(PROMPTS, _logits(model)):
            torch.testing.assert_close(hf(torch.tensor([p])).logits, ours, atol=1e-5, rtol=0)
        for p, ours in zip(PROMPTS, _greedy_all(model)):
            x = torch.tensor([p])
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
            assert out[0, len(p):].tolist() == ours
    at = AutoTokenizer.from_pretrained(paths["hf"])
    for text in ["Hello world", "  leading spaces", "tab\there\nnewline", "year 1623", "日本 😀"]:
        assert at(text).input_ids == tiny_tokenizer.encode(text), text
        ids = tiny_tokenizer.encode(text)
        assert at.decode(ids, skip_special_tokens=True) == tiny_tokenizer.decode(ids)


def test_hf_sharded_safetensors_and_bin(chain, tmp_path):
    from llamaworks.convert.hf import load_hf, write_hf_files

    model, paths = chain
    m, tok = load_checkpoint("native", paths["native"])
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    write_hf_files(m.state_dict(), m.args, tok, sharded, max_shard_bytes=300_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    _assert_same_logits(model, load_hf(sharded)[0], atol=0)
    # Loadable by transformers too.
    hf = LlamaForCausalLM.from_pretrained(sharded, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([PROMPTS[0]])).logits, _logits(model)[0], atol=1e-5, rtol=0)
    # pytorch_model.bin, as older transformers saved.
    binf = tmp_path / "bin"
    binf.mkdir()
    for name in ("config.json", "tokenizer.model"):
        shutil.copy(paths["hf"] / name, binf / name)
    torch.save(hf.state_dict(), binf / "pytorch_model.bin")
    _assert_same_logits(model, load_hf(binf)[0], atol=0)
    # A shard listed in the index but absent.
    os.remove(sharded / files[-1])
    with pytest.raises(ValueError, match=files[-1]):
        load_hf(sharded)


def test_hf_folder_with_only_tokenizer_json(chain, tmp_path, tiny_tokenizer):
    model, paths = chain
    hf = tmp_path / "hf"
    shutil.copytree(paths["hf"], hf)
    os.remove(hf / "tokenizer.model")
    m, tok = load_checkpoint("hf", hf)
    assert type(tok).__name__ == "HFTokenizer"
    assert tok.encode(" a  b\n") == tiny_tokenizer.encode(" a  b\n")
    convert_command("hf", "hf", str(hf), str(tmp_path / "hf2"))
    assert (tmp_path / "hf2" / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="tokenizer.model"):
        convert_command("hf", "native", str(hf), str(tmp_path / "native"))
    assert not (tmp_path / "native").exists()


# --- GGUF -----------------------------------------------------------------------------------------


def test_gguf_file_layout(chain, tmp_path):
    gguf = pytest.importorskip("gguf", reason="the gguf package is an optional extra (pip install gguf)")
    model, paths = chain
    out = tmp_path / "m.gguf"
    convert_command("native", "gguf", str(paths["native3"]), str(out), dtype="float16")
    r = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 3 + 2 * 9
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert list(tensors["token_embd.weight"].shape) == [64, 512]  # GGUF lists ne0 (columns) first
    # q stays in Meta's interleaved row order (llama.cpp's rope type NORM).
    q = torch.from_numpy(tensors["blk.1.attn_q.weight"].data.copy()).float().reshape(64, 64)
    torch.testing.assert_close(q, model.state_dict()["layers.1.attention.wq.weight"].half().float())
    fields = r.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert int(fields["llama.attention.head_count_kv"].parts[-1][0]) == 2
    assert int(fields["tokenizer.ggml.bos_token_id"].parts[-1][0]) == 1
    assert len(fields["tokenizer.ggml.tokens"].data) == 512


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_llama_cpp_greedy_tokens(chain, tmp_path, dtype, tiny_tokenizer):
    pytest.importorskip("gguf", reason="the gguf package is an optional extra (pip install gguf)")
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional; builds llama.cpp)")
    from llamaworks.convert.command import llama_cpp_greedy

    model, paths = chain
    out = tmp_path / f"m-{dtype}.gguf"
    convert_command("native", "gguf", str(paths["native3"]), str(out), dtype=dtype)
    assert llama_cpp_greedy(out, PROMPTS, 8) == _greedy_all(model)
    from llama_cpp import Llama

    llm = Llama(model_path=str(out), n_ctx=64, verbose=False, vocab_only=True)
    try:
        for text in ["Hello world", "  leading", "tab\tnew\nline 1623"]:
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == tiny_tokenizer.encode(text), text
    finally:
        llm.close()


# --- command line and bad input --------------------------------------------------------------------


def test_cli_convert_with_verify(source, tmp_path, capsys):
    _, native, _ = source
    assert cli_main(["convert", "--from", "native", "--to", "meta", str(native), str(tmp_path / "m"),
                     "--shards", "2", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verify: logits agree" in out
    assert cli_main(["convert", "--from", "meta", "--to", "hf", str(tmp_path / "m"), str(tmp_path / "h"),
                     "--dtype", "bfloat16", "--verify"]) == 0
    assert json.loads((tmp_path / "h" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_cli_rejects_unknown_format_and_existing_destination(source, tmp_path, capsys):
    _, native, _ = source
    with pytest.raises(SystemExit):
        cli_main(["convert", "--from", "onnx", "--to", "hf", str(native), str(tmp_path / "x")])
    assert "invalid choice" in capsys.readouterr().err
    assert cli_main(["convert", "--from", "native", "--to", "hf", str(native), str(native)]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown source format"):
        load_checkpoint("safetensors", native)
    assert cli_main(["convert", "--from", "hf", "--to", "native", str(native), str(tmp_path / "y")]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    assert cli_main(["convert", "--from", "native", "--to", "hf", str(native), str(tmp_path / "z"),
                     "--shards", "2"]) == 2
    assert "--shards applies to --to meta" in capsys.readouterr().err
    assert cli_main(["convert", "--from", "native", "--to", "meta", str(native), str(tmp_path / "z"),
                     "--shards", "3"]) == 2
    assert "--shards 3 does not divide" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


def test_failed_conversion_leaves_nothing(source, tmp_path, monkeypatch):
    import llamaworks.convert.hf as hf

    _, native, _ = source

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hf, "write_hf_tokenizer_files", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_command("native", "hf", str(native), str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []  # neither the destination nor a temporary folder


@pytest.fixture
def meta2(chain, tmp_path):
    d = tmp_path / "meta"
    shutil.copytree(chain[1]["meta2"], d)
    return d


def test_meta_missing_shards(meta2):
    shutil.copy(meta2 / "consolidated.01.pth", meta2 / "consolidated.03.pth")
    with pytest.raises(ValueError, match=r"missing shard\(s\) consolidated.02.pth of 4"):
        load_meta(meta2)
    os.remove(meta2 / "consolidated.03.pth")
    os.remove(meta2 / "consolidated.01.pth")  # the last shard: only the shapes can tell
    with pytest.raises(ValueError, match=r"seems to have 2 shards, so consolidated.01.pth and up are missing"):
        load_meta(meta2)
    for p in meta2.glob("*.pth"):
        os.remove(p)
    with pytest.raises(ValueError, match="no consolidated.NN.pth"):
        load_meta(meta2)


def test_meta_params_disagreeing_with_tensors(meta2):
    params = json.loads((meta2 / "params.json").read_text())
    (meta2 / "params.json").write_text(json.dumps({**params, "multiple_of": 64, "ffn_dim_multiplier": 2.0}))
    with pytest.raises(ValueError, match=r"params.json disagrees with the shards: layers.0.feed_forward.w1"):
        load_meta(meta2)
    (meta2 / "params.json").write_text(json.dumps({**params, "n_layers": 3}))
    with pytest.raises(ValueError, match=r"params.json disagrees with the shards: tensors missing \['layers.2"):
        load_meta(meta2)
    (meta2 / "params.json").write_text(json.dumps({**params, "n_experts": 8}))
    with pytest.raises(ValueError, match=r"params.json: unknown params.json keys \['n_experts'\]"):
        load_meta(meta2)


def test_meta_mixed_dtypes(meta2):
    sd = torch.load(meta2 / "consolidated.01.pth", weights_only=True)
    sd["norm.weight"] = sd["norm.weight"].half()
    torch.save(sd, meta2 / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"mixed dtypes.*torch.float16 in consolidated.01.pth"):
        load_meta(meta2)


def test_meta_truncated_and_corrupt_shards(meta2):
    p = meta2 / "consolidated.01.pth"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"consolidated.01.pth: truncated or corrupt.*re-download"):
        load_meta(meta2)
    p.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError, match=r"consolidated.01.pth: truncated or corrupt"):
        load_meta(meta2)
    torch.save({"a": torch.zeros(2)}, p)
    with pytest.raises(ValueError, match=r"consolidated.01.pth: its tensors differ"):
        load_meta(meta2)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_one_shard_meta_load_maps_the_file(chain, tmp_path):
    # A one-shard folder (7B) is used in place: every parameter lies in a mapping of the
    # .pth file, so loading needs no second copy of the weights.
    _, paths = chain
    m, tok = load_checkpoint("native", paths["native"])
    save_checkpoint("meta", m, tok, tmp_path / "m1", shards=1)
    model, _ = load_meta(tmp_path / "m1")
    shard = str((tmp_path / "m1" / "consolidated.00.pth").resolve())
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(shard):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                ranges.append((lo, hi))
    assert ranges
    for name, p in model.named_parameters():
        assert any(lo <= p.data_ptr() < hi for lo, hi in ranges), name


def test_llama_cpp_rejects_hf_row_order(chain, tmp_path):
    # Control for the GGUF parity test: q/k in transformers' rotate-half order (the classic
    # conversion bug) must change llama.cpp's output, so the test above can see the layout.
    pytest.importorskip("gguf", reason="the gguf package is an optional extra (pip install gguf)")
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional; builds llama.cpp)")
    from llamaworks.convert.command import llama_cpp_greedy
    from llamaworks.convert.gguf import write_gguf
    from llamaworks.convert.hf import permute_for_hf

    model, paths = chain
    m, tok = load_checkpoint("native", paths["native3"])
    sd = dict(m.state_dict())
    for k in sd:
        if k.endswith("attention.wq.weight"):
            sd[k] = permute_for_hf(sd[k], m.args.n_heads)
        elif k.endswith("attention.wk.weight"):
            sd[k] = permute_for_hf(sd[k], m.args.n_kv_heads)
    write_gguf(sd, m.args, tok, tmp_path / "wrong.gguf")
    assert llama_cpp_greedy(tmp_path / "wrong.gguf", PROMPTS, 8) != _greedy_all(model)
