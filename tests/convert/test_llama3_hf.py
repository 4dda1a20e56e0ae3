"""The later Llama families against transformers' LlamaForCausalLM (issue 15): GQA with Llama 2
70B's ffn_dim_multiplier, Code Llama's theta, Llama 3.1's scaled RoPE far past its original
context, linear scaling and Llama 3.2's tied embeddings, each written as a Hugging Face folder,
loaded by transformers and read back; and the config.json forms that are refused by name."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from peaked import sharpen

from llamaworks.convert.hf import args_from_hf_config, hf_config_dict, load_hf, write_hf_files
from llamaworks.model import ModelArgs, build_model, model_inv_freq

transformers = pytest.importorskip("transformers")  # imported once for the module (~6 s)
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BASE = dict(dim=64, n_layers=2, n_heads=4, vocab_size=256, max_seq_len=128, norm_eps=1e-5)
L3 = dict(BASE, n_kv_heads=2, rope_theta=500000.0)
# Original context 16 with sequences of 64: most positions lie where the scaling acts.
FAMILIES = {
    "llama2-70b-shape": ModelArgs(**BASE, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=1.3),
    "codellama-theta": ModelArgs(**BASE, rope_theta=1e6),
    "llama3.1": ModelArgs(**L3, use_scaled_rope=True, rope_old_context_len=16),
    "linear": ModelArgs(**BASE, rope_scaling_factor=4.0),
    "llama3.2-tied": ModelArgs(**L3, use_scaled_rope=True, rope_old_context_len=16, rope_scaling_factor=32.0,
                               tie_word_embeddings=True),
}
SEQ = 64


def _sharpen(model, seed=0):
    # Larger weights than for greedy parity: attention far from uniform, so RoPE matters.
    return sharpen(model, seed, std=0.15, norm_std=0.2)


def _same_model(a: ModelArgs, b: ModelArgs) -> bool:
    # config.json stores the SwiGLU width, not Meta's (multiple_of, ffn_dim_multiplier) pair.
    return a.hidden_dim == b.hidden_dim and replace(a, multiple_of=1, ffn_dim_multiplier=None) == replace(
        b, multiple_of=1, ffn_dim_multiplier=None)


def _tokens(args, n=2, seq=SEQ, seed=1):
    return torch.randint(0, args.vocab_size, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    args = FAMILIES[request.param]
    ours = _sharpen(build_model(args, seed=0))
    folder = tmp_path_factory.mktemp(request.param)
    write_hf_files(ours.state_dict(), args, None, folder)
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    return request.param, args, ours, folder, hf


def test_config_json_carries_the_family(family):
    name, args, _, folder, hf = family
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["head_dim"] == 16 and cfg["num_key_value_heads"] == args.n_kv_heads
    assert cfg["rope_theta"] == args.rope_theta == hf.config.rope_parameters["rope_theta"]
    assert cfg["tie_word_embeddings"] is args.tie_word_embeddings is hf.config.tie_word_embeddings
    if name.startswith("llama3"):
        factor = 32.0 if name == "llama3.2-tied" else 8.0
        want = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}
        assert cfg["rope_scaling"] == want and cfg["rope_parameters"] == {**want, "rope_theta": 500000.0}
    elif name == "linear":
        assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    else:
        assert "rope_scaling" not in cfg and cfg["rope_parameters"]["rope_type"] == "default"
    assert hf.config.rope_parameters["rope_type"] == cfg["rope_parameters"]["rope_type"]
    # transformers computes the very frequencies ours does.
    assert torch.equal(LlamaRotaryEmbedding(hf.config).inv_freq, model_inv_freq(args))
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) != args.tie_word_embeddings  # a tied model's one tensor, written once
    if args.tie_word_embeddings:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight


def test_logits_match_transformers(family):
    _, args, ours, _, hf = family
    x = _tokens(args)
    with torch.no_grad():
        a, b = ours(x), hf(x).logits.float()
    assert a.abs().max() > 1.0  # logits far from zero, so 1e-5 is a real constraint
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_greedy_tokens_match_transformers(family):
    _, args, ours, _, hf = family
    prompt = _tokens(args, n=1, seq=40, seed=2)
    with torch.no_grad():
        seq = prompt
        for _ in range(10):  # positions 40..49: past the scaled models' original context of 16
            seq = torch.cat([seq, ours(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert ref.tolist() == seq.tolist()


def test_rope_settings_matter(family):
    # Control: the same weights under plain RoPE (theta 10000, no scaling) give other logits in
    # transformers too, so the parity above rests on theta and the scaling being carried over.
    name, args, ours, folder, hf = family
    if name == "llama2-70b-shape":
        pytest.skip("plain RoPE")
    cfg = {k: v for k, v in json.loads((folder / "config.json").read_text()).items()
           if k not in ("rope_scaling", "rope_parameters", "rope_theta")}
    plain = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="eager")).eval()
    plain.load_state_dict(hf.state_dict(), strict=True)
    x = _tokens(args)
    with torch.no_grad():
        assert (plain(x).logits - ours(x)).abs().max() > 1e-2


def test_folder_reads_back_exactly(family, tmp_path):
    _, args, ours, folder, hf = family
    back, tok = load_hf(folder)
    assert _same_model(back.args, args) and tok is None
    assert (back.output.weight is back.tok_embeddings.weight) == args.tie_word_embeddings
    x = _tokens(args)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x), atol=0, rtol=0)
    # What transformers 5 writes itself (rope_parameters only; no lm_head when tied) reads the same.
    hf.save_pretrained(tmp_path / "saved")
    again, _ = load_hf(tmp_path / "saved")
    assert _same_model(again.args, args)
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours(x), atol=0, rtol=0)


def test_kv_cache_decode_past_the_original_context_matches_transformers():
    args = FAMILIES["llama3.2-tied"]
    ours = _sharpen(build_model(args, seed=0))
    hf = LlamaForCausalLM(LlamaConfig(**hf_config_dict(args), attn_implementation="eager")).eval()
    from llamaworks.convert.hf import to_hf_state_dict

    missing = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), args), strict=False).missing_keys
    assert missing in ([], ["lm_head.weight"]) and hf.lm_head.weight is hf.model.embed_tokens.weight
    x = _tokens(args, n=1)
    with torch.no_grad():
        ours.setup_caches(1, SEQ)
        steps = [ours(x[:, :8], torch.arange(8))] + [ours(x[:, p:p + 1], torch.tensor([p])) for p in range(8, SEQ)]
        ref = hf(x).logits
    torch.testing.assert_close(torch.cat(steps, dim=1), ref, atol=1e-5, rtol=0)


# --- config.json as released ------------------------------------------------------------------------

LLAMA31_8B = {  # meta-llama/Llama-3.1-8B's config.json (transformers 4.43 form)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}  # fmt: skip


def test_released_configs_read_as_the_presets():
    assert args_from_hf_config(LLAMA31_8B) == ModelArgs.from_name("llama3.1-8b")
    l32 = {**LLAMA31_8B, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "head_dim": 64,
           "tie_word_embeddings": True, "rope_scaling": {**LLAMA31_8B["rope_scaling"], "factor": 32.0}}
    assert args_from_hf_config(l32) == ModelArgs.from_name("llama3.2-1b")
    l3 = {**LLAMA31_8B, "max_position_embeddings": 8192, "rope_scaling": None}
    assert args_from_hf_config(l3) == ModelArgs.from_name("llama3-8b")
    code = {**LLAMA31_8B, "intermediate_size": 11008, "num_key_value_heads": 32, "vocab_size": 32016,
            "rope_theta": 1000000, "rope_scaling": None, "max_position_embeddings": 16384}
    assert args_from_hf_config(code) == ModelArgs.from_name("codellama-7b")
    # transformers before 4.43 wrote "type"; both spellings, and the 5.x rope_parameters form, agree.
    older = {**LLAMA31_8B, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert args_from_hf_config(older).rope_scaling_factor == 2.0 and not args_from_hf_config(older).use_scaled_rope
    v5 = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**LLAMA31_8B["rope_scaling"], "rope_theta": 500000.0}
    assert args_from_hf_config(v5) == ModelArgs.from_name("llama3.1-8b")


@pytest.mark.parametrize("change,match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
     r"unsupported Hugging Face config: rope_scaling rope_type 'yarn' is not implemented; llamaworks runs"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}},
     r"rope_type 'dynamic' is not implemented.*rope_scaling null runs the model exactly up to that length"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}}, "'longrope'"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 2.0}},
     r"rope_parameters rope_type 'yarn' is not implemented"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"rope_scaling of rope_type 'llama3' lacks \["),
    ({"rope_scaling": {**LLAMA31_8B["rope_scaling"], "attention_factor": 1.0}}, r"has unknown keys \['attention_fa"),
    ({"rope_scaling": {**LLAMA31_8B["rope_scaling"], "factor": "8"}}, "rope_scaling factor must be a number"),
    ({"rope_scaling": {**LLAMA31_8B["rope_scaling"], "original_max_position_embeddings": 8192.5}},
     "original_max_position_embeddings must be an integer"),
    ({"rope_scaling": {**LLAMA31_8B["rope_scaling"], "rope_type": "llama3", "type": "linear"}},
     "gives rope_type 'llama3' and type 'linear'"),
    ({"rope_scaling": [8.0]}, r"rope_scaling=\[8.0\]: expected an object or null"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}, "disagree; keep one of them"),
    ({"rope_parameters": {**LLAMA31_8B["rope_scaling"], "rope_theta": 10000.0}}, "rope_theta is given as"),
    ({"head_dim": 128 + 64}, r"head_dim=192, but hidden_size/num_attention_heads is 4096/32.*head_dim 128"),
    ({"num_local_experts": 8}, "num_local_experts=8 .mixture of experts"),
    ({"sliding_window": 4096}, "sliding_window=4096 .sliding-window attention"),
    ({"attention_bias": True}, "unsupported Hugging Face config: attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"model_type": "mixtral"}, "model_type='mixtral'"),
    ({"tie_word_embeddings": "true"}, "tie_word_embeddings must be true or false"),
])  # fmt: skip
def test_configs_we_do_not_run_are_refused_by_name(change, match):
    with pytest.raises(ValueError, match=match):
        args_from_hf_config({**LLAMA31_8B, **change})


def test_refusals_name_config_json(tmp_path):
    args = FAMILIES["llama3.1"]
    write_hf_files(build_model(args, seed=0).state_dict(), args, None, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 2.0},
                                                      "rope_parameters": None}))
    with pytest.raises(ValueError, match=r"config.json: unsupported Hugging Face config: rope_scaling rope_type 'yar"):
        load_hf(tmp_path)


def test_tied_checkpoint_with_lm_head_written_too(tmp_path):
    # Some exports write the shared tensor under both names: accepted when equal, refused if not.
    from safetensors.torch import load_file, save_file

    args = FAMILIES["llama3.2-tied"]
    ours = _sharpen(build_model(args, seed=0))
    write_hf_files(ours.state_dict(), args, None, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    save_file({**sd, "lm_head.weight": sd["model.embed_tokens.weight"].clone()}, tmp_path / "model.safetensors")
    back, _ = load_hf(tmp_path)
    assert back.output.weight is back.tok_embeddings.weight
    save_file({**sd, "lm_head.weight": sd["model.embed_tokens.weight"] + 1}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight; set tie_word_emb"):
        load_hf(tmp_path)
    # An untied config over weights without lm_head: the missing tensor is named.
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_hf(tmp_path)
