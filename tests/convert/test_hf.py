from __future__ import annotations

import pytest
import torch

from llamaworks.convert.hf import (
    args_from_hf_config,
    from_hf_state_dict,
    hf_config_dict,
    key_map,
    permute_for_hf,
    to_hf_state_dict,
    unpermute_from_hf,
)
from llamaworks.model import ModelArgs, apply_rotary_emb, build_model, ffn_hidden_dim, precompute_freqs_cis

transformers = pytest.importorskip("transformers")  # imported once for the module (~6 s)
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

TINY = dict(dim=64, n_layers=2, n_heads=4, vocab_size=256, max_seq_len=64)
VARIANTS = {"mha": ModelArgs(**TINY), "gqa": ModelArgs(**TINY, n_kv_heads=2)}


def _sharpen(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # init_weights' std 0.02 makes attention nearly uniform, so RoPE (and hence the q/k
    # permutation) would barely move the logits; larger random weights make a wrong
    # permutation show up far above the 1e-5 tolerance.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.15 * noise)
    return model


def _hf_model(args: ModelArgs, ours: torch.nn.Module) -> LlamaForCausalLM:
    cfg = LlamaConfig(**hf_config_dict(args))
    cfg._attn_implementation = "eager"
    hf = LlamaForCausalLM(cfg).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), args), strict=True)
    return hf


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request):
    args = VARIANTS[request.param]
    ours = _sharpen(build_model(args, seed=0)).eval()
    return args, ours, _hf_model(args, ours)


# --- permutation -------------------------------------------------------------------------------


@pytest.mark.parametrize("n_heads,head_dim,cols", [(4, 16, 64), (2, 16, 64), (1, 8, 3), (8, 2, 5)])
def test_permutation_round_trip(n_heads, head_dim, cols):
    w = torch.randn(n_heads * head_dim, cols)
    p = permute_for_hf(w, n_heads)
    # With head_dim 2 the single pair already sits at rows (0, head_dim/2): nothing moves.
    assert torch.equal(p, w) == (head_dim == 2)
    assert torch.equal(unpermute_from_hf(p, n_heads), w)
    assert torch.equal(permute_for_hf(unpermute_from_hf(w, n_heads), n_heads), w)


def test_permutation_row_layout():
    # Within each head, Meta row 2i (first of pair i) -> HF row i, row 2i+1 -> HF row i + head_dim/2.
    n_heads, head_dim = 2, 8
    w = torch.arange(n_heads * head_dim, dtype=torch.float32).unsqueeze(1)
    got = permute_for_hf(w, n_heads).squeeze(1).tolist()
    assert got == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]


def test_permutation_rejects_bad_shapes():
    with pytest.raises(ValueError):
        permute_for_hf(torch.zeros(12, 4), 4)  # head_dim 3 is odd
    with pytest.raises(ValueError):
        unpermute_from_hf(torch.zeros(16), 2)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_permutation_means_rope_layout_change(n_heads, n_kv_heads):
    # transformers' own rotate_half RoPE on the permuted projection must give the permuted
    # result of Meta's interleaved RoPE on the original projection, at every position.
    head_dim, dim, seq = 16, 64, 9
    cfg = LlamaConfig(**hf_config_dict(ModelArgs(dim=dim, n_layers=1, n_heads=n_heads, vocab_size=8)))
    wq, wk = torch.randn(n_heads * head_dim, dim), torch.randn(n_kv_heads * head_dim, dim)
    x = torch.randn(1, seq, dim)
    pos = torch.arange(seq).unsqueeze(0)

    q_meta = apply_rotary_emb((x @ wq.T).view(1, seq, n_heads, head_dim), precompute_freqs_cis(head_dim, seq))
    k_meta = apply_rotary_emb(
        (x @ wk.T).view(1, seq, n_kv_heads, head_dim), precompute_freqs_cis(head_dim, seq)
    )

    q_hf = (x @ permute_for_hf(wq, n_heads).T).view(1, seq, n_heads, head_dim)
    k_hf = (x @ permute_for_hf(wk, n_kv_heads).T).view(1, seq, n_kv_heads, head_dim)
    cos, sin = LlamaRotaryEmbedding(cfg)(x, pos)
    q_hf, k_hf = apply_rotary_pos_emb(q_hf, k_hf, cos, sin, unsqueeze_dim=2)

    # Permute each position's rotated vector the way the weight rows were permuted.
    def rows(t, h):
        return permute_for_hf(t.reshape(seq, -1).T, h).T.reshape(t.shape)

    torch.testing.assert_close(q_hf, rows(q_meta, n_heads), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_hf, rows(k_meta, n_kv_heads), atol=1e-5, rtol=1e-5)
    # Attention scores are what matter, and a permutation within each head preserves them.
    g = n_heads // n_kv_heads
    s_meta = torch.einsum("bqhd,bkhd->bhqk", q_meta, k_meta.repeat_interleave(g, dim=2))
    s_hf = torch.einsum("bqhd,bkhd->bhqk", q_hf, k_hf.repeat_interleave(g, dim=2))
    torch.testing.assert_close(s_hf, s_meta, atol=1e-4, rtol=1e-5)
    # Control: without the permutation the HF layout gives different rotated vectors.
    q_wrong = (x @ wq.T).view(1, seq, n_heads, head_dim)
    q_wrong, _ = apply_rotary_pos_emb(q_wrong, q_wrong, cos, sin, unsqueeze_dim=2)
    assert (q_wrong - rows(q_meta, n_heads)).abs().max() > 1e-2


# --- state dicts -------------------------------------------------------------------------------


def test_key_map_is_complete_and_explicit():
    m = key_map(2)
    assert m["tok_embeddings.weight"] == "model.embed_tokens.weight"
    assert m["layers.1.attention.wq.weight"] == "model.layers.1.self_attn.q_proj.weight"
    assert m["layers.1.attention.wk.weight"] == "model.layers.1.self_attn.k_proj.weight"
    assert m["layers.0.attention.wv.weight"] == "model.layers.0.self_attn.v_proj.weight"
    assert m["layers.0.attention.wo.weight"] == "model.layers.0.self_attn.o_proj.weight"
    assert m["layers.0.feed_forward.w1.weight"] == "model.layers.0.mlp.gate_proj.weight"
    assert m["layers.0.feed_forward.w2.weight"] == "model.layers.0.mlp.down_proj.weight"
    assert m["layers.0.feed_forward.w3.weight"] == "model.layers.0.mlp.up_proj.weight"
    assert m["layers.0.attention_norm.weight"] == "model.layers.0.input_layernorm.weight"
    assert m["layers.0.ffn_norm.weight"] == "model.layers.0.post_attention_layernorm.weight"
    assert m["norm.weight"] == "model.norm.weight"
    assert m["output.weight"] == "lm_head.weight"
    assert len(m) == 3 + 2 * 9 and len(set(m.values())) == len(m)


def test_state_dict_keys_and_shapes_match_transformers(pair):
    args, ours, hf = pair
    converted = to_hf_state_dict(ours.state_dict(), args)
    hf_sd = hf.state_dict()
    assert set(converted) == set(hf_sd)
    for k, t in converted.items():
        assert t.shape == hf_sd[k].shape, k


def test_reverse_conversion_gives_identical_tensors(pair):
    args, ours, hf = pair
    back = from_hf_state_dict(hf.state_dict(), args)
    sd = ours.state_dict()
    assert set(back) == set(sd)
    for k, t in sd.items():
        assert torch.equal(back[k], t), k


def test_unknown_and_missing_keys_are_errors():
    args = VARIANTS["gqa"]
    sd = build_model(args, seed=0).state_dict()
    with pytest.raises(ValueError, match="layers.9.attention.wq.weight"):
        to_hf_state_dict({**sd, "layers.9.attention.wq.weight": sd["layers.0.attention.wq.weight"]}, args)
    with pytest.raises(ValueError, match="output.weight"):
        to_hf_state_dict({k: v for k, v in sd.items() if k != "output.weight"}, args)
    hf_sd = to_hf_state_dict(sd, args)
    with pytest.raises(ValueError, match="lm_head.weight"):
        from_hf_state_dict({k: v for k, v in hf_sd.items() if k != "lm_head.weight"}, args)
    with pytest.raises(ValueError, match="model.extra.bias"):
        from_hf_state_dict({**hf_sd, "model.extra.bias": torch.zeros(1)}, args)
    # Checkpoints saved by older transformers carry the RoPE frequencies; they are recomputable.
    inv = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8) for i in range(args.n_layers)}
    assert set(from_hf_state_dict({**hf_sd, **inv}, args)) == set(sd)


# --- numerical parity with transformers ----------------------------------------------------------


def test_logits_match_transformers(pair):
    args, ours, hf = pair
    tokens = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(tokens)
        b = hf(tokens).logits.float()
    assert a.abs().max() > 1.0  # logits far from zero, so 1e-5 is a real constraint
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_unpermuted_weights_do_not_match(pair):
    # Control for the parity test: loading without the q/k permutation must break it.
    args, ours, _ = pair
    cfg = LlamaConfig(**hf_config_dict(args))
    cfg._attn_implementation = "eager"
    hf = LlamaForCausalLM(cfg).eval()
    names = key_map(args.n_layers)
    hf.load_state_dict({names[k]: v for k, v in ours.state_dict().items()}, strict=True)
    tokens = torch.randint(0, args.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max() > 1e-3


def test_greedy_generation_matches_transformers(pair):
    args, ours, hf = pair
    prompt = torch.randint(0, args.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    n_new = 10
    with torch.no_grad():
        seq = prompt
        for _ in range(n_new):
            nxt = ours(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        ref = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n_new,
            do_sample=False,
            eos_token_id=None,  # random weights may emit id 2; generation must not stop early
            pad_token_id=0,
        )
    assert ref.shape == seq.shape
    assert ref.tolist() == seq.tolist()


# --- config ------------------------------------------------------------------------------------


def test_hf_config_is_read_back_by_transformers():
    args = ModelArgs(**TINY, n_kv_heads=2, rope_theta=500000.0, norm_eps=1e-5)
    cfg = LlamaConfig(**hf_config_dict(args))
    assert cfg.hidden_size == 64 and cfg.intermediate_size == args.hidden_dim == 256
    assert cfg.num_hidden_layers == 2 and cfg.num_attention_heads == 4 and cfg.num_key_value_heads == 2
    assert cfg.head_dim == 16 and cfg.rms_norm_eps == 1e-5 and cfg.max_position_embeddings == 64
    assert cfg.rope_parameters["rope_theta"] == 500000.0 and cfg.rope_parameters["rope_type"] == "default"
    assert cfg.vocab_size == 256 and cfg.bos_token_id == 1 and cfg.eos_token_id == 2
    assert cfg.tie_word_embeddings is False and cfg.dtype == torch.float32
    assert cfg.architectures == ["LlamaForCausalLM"]
    # What transformers writes back (save_pretrained's form) converts to the same model.
    assert args_from_hf_config(cfg.to_dict()) == args
    assert hf_config_dict(args, dtype=torch.bfloat16)["torch_dtype"] == "bfloat16"


def test_config_round_trip_including_transformers_4_form():
    args = ModelArgs.from_name("7B")
    assert args_from_hf_config(hf_config_dict(args)) == args
    v4 = {k: v for k, v in hf_config_dict(args).items() if k not in ("rope_parameters", "dtype", "head_dim")}
    v4["rope_scaling"] = None
    assert args_from_hf_config(v4) == args
    with pytest.raises(ValueError, match="unresolved"):
        hf_config_dict(ModelArgs(**{**TINY, "vocab_size": -1}))


@pytest.mark.parametrize(
    "dim,intermediate",
    [
        (4096, 11008),
        (5120, 13824),
        (8192, 28672),
        (4096, 14336),
        (8192, 22016),
        (64, 172),
        (64, 171),
        (768, 3072),
    ],
)
def test_intermediate_size_is_reproduced_exactly(dim, intermediate):
    cfg = {
        **hf_config_dict(ModelArgs(dim=dim, n_layers=1, n_heads=dim // 64 or 1)),
        "intermediate_size": intermediate,
    }
    args = args_from_hf_config(cfg)
    assert args.hidden_dim == intermediate
    assert ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier) == intermediate
    if intermediate in (11008, 13824, 22016):  # plain LLaMA widths need no multiplier
        assert args.multiple_of == 256 and args.ffn_dim_multiplier is None


@pytest.mark.parametrize(
    "change",
    [
        # Linear and Llama 3.1 scaling and tied embeddings are read since issue 15 (test_llama3_hf.py).
        {"rope_scaling": {"type": "yarn", "factor": 2.0}},
        {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 8.0}},
        {"attention_bias": True},
        {"mlp_bias": True},
        {"num_local_experts": 8},
        {"sliding_window": 4096},
        {"hidden_act": "gelu"},
        {"head_dim": 32},
        {"model_type": "mistral"},
    ],
)
def test_unsupported_configs_are_rejected(change):
    with pytest.raises(ValueError, match="unsupported"):
        args_from_hf_config({**hf_config_dict(VARIANTS["mha"]), **change})
