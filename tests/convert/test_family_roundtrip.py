"""A Llama-3-shaped tiny model (GQA, scaled RoPE, and Llama 3.2's tied embeddings) through every
format: native -> Meta -> native -> HF -> native -> Meta with more shards than key/value heads
-> native, logits checked at each hop; and Meta's shard layouts of the later families (issue 15).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peaked import sharpen

from llamaworks.convert.command import convert_command
from llamaworks.convert.formats import load_checkpoint
from llamaworks.convert.meta import check_shardable, load_meta, write_meta_files
from llamaworks.inference.load import load_model
from llamaworks.model import ModelArgs, build_model
from llamaworks.modeldir import save_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SEQ = 48  # past rope_old_context_len=16




def _llama32(vocab_size, **overrides):
    return ModelArgs(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, max_seq_len=64,
                               multiple_of=32, ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0,
                               use_scaled_rope=True, rope_scaling_factor=32.0, rope_old_context_len=16,
                               tie_word_embeddings=True), **overrides})


def _logits(model, vocab_size):
    x = torch.randint(0, vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_tokenizer):
    args = _llama32(tiny_tokenizer.vocab_size)
    model = sharpen(build_model(args, seed=0))
    root = tmp_path_factory.mktemp("family")
    save_model(model, tiny_tokenizer, root / "native")
    hops = [("native", "meta", "meta2", dict(shards=2)), ("meta", "native", "native2", {}),
            ("native", "hf", "hf", {}), ("hf", "native", "native3", {}),
            ("native", "meta", "meta4", dict(shards=4)), ("meta", "native", "native4", {})]
    src = root / "native"
    for frm, to, name, kw in hops:
        convert_command(frm, to, str(src), str(root / name), **kw)
        src = root / name
    return model, args, root


@pytest.mark.parametrize("hop", ["meta2", "native2", "hf", "native3", "meta4", "native4"])
def test_every_hop_keeps_the_model(chain, hop):
    model, args, root = chain
    got, _ = load_checkpoint(hop.rstrip("0123456789"), root / hop)
    assert got.output.weight is got.tok_embeddings.weight  # still one tensor
    assert got.args.use_scaled_rope and got.args.rope_scaling_factor == 32.0 and got.args.rope_old_context_len == 16
    assert got.args.hidden_dim == args.hidden_dim and got.args.n_kv_heads == 2
    torch.testing.assert_close(_logits(got, args.vocab_size), _logits(model, args.vocab_size), atol=0, rtol=0)


def test_transformers_runs_the_exported_folder(chain):
    transformers = pytest.importorskip("transformers")
    model, args, root = chain
    hf = transformers.LlamaForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    x = torch.randint(0, args.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, _logits(model, args.vocab_size), atol=1e-5, rtol=0)


def test_meta_params_and_shard_layout(chain):
    model, args, root = chain
    params = json.loads((root / "meta2" / "params.json").read_text())
    # Meta's Llama 3.1 keys, plus what its code hard-codes but this model changes.
    assert params == {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512, "multiple_of": 32,
                      "ffn_dim_multiplier": 1.5, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True,
                      "rope_scaling_factor": 32.0, "rope_old_context_len": 16, "tie_word_embeddings": True}
    sd = model.state_dict()
    two = [torch.load(root / "meta2" / f"consolidated.0{i}.pth", weights_only=True) for i in range(2)]
    # Llama 3's VocabParallelEmbedding: each shard a slice of the vocabulary; the output layer
    # written out (Meta's code has no tied output), sliced the same way.
    assert two[1]["tok_embeddings.weight"].shape == (256, 64)
    assert torch.equal(two[1]["tok_embeddings.weight"], sd["tok_embeddings.weight"][256:])
    assert torch.equal(two[1]["output.weight"], sd["tok_embeddings.weight"][256:])
    assert torch.equal(two[1]["layers.0.attention.wk.weight"], sd["layers.0.attention.wk.weight"][16:])
    # Four shards, two key/value heads: each head on two consecutive shards, as Meta reshards.
    four = [torch.load(root / "meta4" / f"consolidated.0{i}.pth", weights_only=True) for i in range(4)]
    wk = sd["layers.1.attention.wk.weight"]
    for i, shard in enumerate(four):
        assert torch.equal(shard["layers.1.attention.wk.weight"], wk[16 * (i // 2):16 * (i // 2 + 1)])
        assert shard["layers.1.attention.wq.weight"].shape == (16, 64)  # one query head per shard


def test_meta_kv_heads_as_many_as_shards(tmp_path):
    # Llama 2/3 70B: 8 key/value heads over 8 shards, one head per shard.
    args = ModelArgs(dim=256, n_layers=1, n_heads=16, n_kv_heads=8, vocab_size=64, multiple_of=64,
                     rope_theta=500000.0)
    model = sharpen(build_model(args, seed=1))
    write_meta_files(model.state_dict(), args, None, tmp_path, shards=8)
    shard = torch.load(tmp_path / "consolidated.05.pth", weights_only=True)
    assert shard["layers.0.attention.wk.weight"].shape == (16, 256)  # head 5 of 8
    assert torch.equal(shard["layers.0.attention.wv.weight"], model.state_dict()["layers.0.attention.wv.weight"][80:96])
    assert shard["tok_embeddings.weight"].shape == (8, 256)
    merged, _ = load_meta(tmp_path)
    torch.testing.assert_close(_logits(merged, 64), _logits(model, 64), atol=0, rtol=0)
    # Sixteen shards of eight heads: replicated, merged back to eight.
    sixteen = tmp_path / "sixteen"
    sixteen.mkdir()
    write_meta_files(model.state_dict(), args, None, sixteen, shards=16)
    assert torch.equal(torch.load(sixteen / "consolidated.10.pth", weights_only=True)["layers.0.attention.wk.weight"],
                       shard["layers.0.attention.wk.weight"])
    torch.testing.assert_close(_logits(load_meta(sixteen)[0], 64), _logits(model, 64), atol=0, rtol=0)


def test_shard_counts(tmp_path):
    args = _llama32(512)
    check_shardable(args, 4)  # 2 kv heads, each on 2 shards
    with pytest.raises(ValueError, match=r"--shards 3 does not divide n_heads=4, n_kv_heads=2"):
        check_shardable(args, 3)
    with pytest.raises(ValueError, match="--shards 8 does not divide n_heads=4"):
        check_shardable(args, 8)


@pytest.fixture
def meta4(chain, tmp_path):
    d = tmp_path / "meta4"
    shutil.copytree(chain[2] / "meta4", d)
    return d


def test_meta_replicas_that_differ_are_refused(meta4):
    p = meta4 / "consolidated.03.pth"
    sd = torch.load(p, weights_only=True)
    sd["layers.0.attention.wv.weight"] = sd["layers.0.attention.wv.weight"] + 1
    torch.save(sd, p)
    with pytest.raises(ValueError, match=r"consolidated.03.pth: layers.0.attention.wv.weight should repeat key/value "
                                         r"head 1 of consolidated.02.pth \(4 shards, n_kv_heads=2\) but differs"):
        load_meta(meta4)


def test_meta_tied_output_that_differs_is_refused(meta4):
    p = meta4 / "consolidated.01.pth"
    sd = torch.load(p, weights_only=True)
    sd["output.weight"] = sd["output.weight"] * 2
    torch.save(sd, p)
    with pytest.raises(ValueError, match=r"params.json: tie_word_embeddings is true but the shards' output.weight "
                                         "differs"):
        load_meta(meta4)
    # Without the key (as Meta ships Llama 3.2), the same shards are an untied model.
    params = json.loads((meta4 / "params.json").read_text())
    del params["tie_word_embeddings"]
    (meta4 / "params.json").write_text(json.dumps(params))
    untied, _ = load_meta(meta4)
    assert untied.output.weight is not untied.tok_embeddings.weight


def test_metas_llama31_params_json_loads(tmp_path, chain):
    # Meta's own 3.1 params.json has use_scaled_rope and no scaling values: Meta's 8/1/4/8192.
    _, _, root = chain
    shutil.copytree(root / "meta2", tmp_path / "m")
    params = json.loads((tmp_path / "m" / "params.json").read_text())
    for k in ("rope_scaling_factor", "rope_old_context_len", "tie_word_embeddings"):
        del params[k]
    (tmp_path / "m" / "params.json").write_text(json.dumps(params))
    m, _ = load_meta(tmp_path / "m")
    a = m.args
    assert (a.rope_scaling_factor, a.rope_low_freq_factor, a.rope_high_freq_factor, a.rope_old_context_len) == (
        8.0, 1.0, 4.0, 8192)
    assert load_model(root / "native4")[0].args.rope_scaling_factor == 32.0
    # Meta gives the context at run time: Llama 3.1's 131072 unless the caller says, Llama 3's 8192.
    assert a.max_seq_len == 131072 and load_meta(tmp_path / "m", max_seq_len=4096)[0].args.max_seq_len == 4096
    del params["use_scaled_rope"]
    (tmp_path / "m" / "params.json").write_text(json.dumps(params))
    assert load_meta(tmp_path / "m")[0].args.max_seq_len == 8192
