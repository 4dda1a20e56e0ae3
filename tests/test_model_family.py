"""The later Llama families in the one model: rope_theta, Llama 3.1's and linear RoPE scaling,
tied embeddings, and the released sizes as presets (issue 15)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llamaworks.model import ModelArgs, Transformer, build_model, count_parameters
from llamaworks.modeldir import load_model, save_model
from llamaworks.rope import (
    LLAMA31_ROPE_SCALING,
    linear_scaled_inv_freq,
    llama31_scaled_inv_freq,
    model_inv_freq,
    precompute_freqs_cis,
    rope_inv_freq,
    rope_table,
)

# A Llama-3-shaped tiny model: GQA, theta 500000, scaled RoPE whose original context (16) is
# far inside the sequences used (64), and a Llama 3.2 variant with tied embeddings.
TINY3 = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=128, rope_theta=500000.0,
             norm_eps=1e-5, use_scaled_rope=True, rope_old_context_len=16)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sharpen(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # Larger weights than init_weights' 0.02: attention far from uniform, so positions matter.
    g = _gen(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.15 * noise)
    return model.eval()


# --- presets ------------------------------------------------------------------------------------

COUNTS = {
    "7B": 6_738_415_616, "13B": 13_015_864_320, "33B": 32_528_943_616, "65B": 65_285_660_672,
    "llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320, "llama2-70b": 68_976_648_192,
    "codellama-7b": 6_738_546_688,
    "llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496,
    "llama3.1-8b": 8_030_261_248, "llama3.1-70b": 70_553_706_496, "llama3.1-405b": 405_853_388_800,
    "llama3.2-1b": 1_235_814_400, "llama3.2-3b": 3_212_749_824,
}  # fmt: skip


@pytest.mark.parametrize("name", list(COUNTS))
def test_released_sizes_have_exact_parameter_counts(name):
    assert count_parameters(ModelArgs.from_name(name)) == COUNTS[name]


def test_family_presets_carry_their_families_settings():
    get = ModelArgs.from_name
    assert get("llama2-70b").n_kv_heads == 8 and get("llama2-70b").hidden_dim == 28672
    assert get("llama2-7b").max_seq_len == 4096 and get("llama2-7b").norm_eps == 1e-5
    assert get("codellama-7b").rope_theta == 1e6 and get("codellama-7b").vocab_size == 32016
    l3, l31, l32 = get("llama3-8b"), get("llama3.1-405b"), get("llama3.2-1b")
    assert (l3.rope_theta, l3.vocab_size, l3.hidden_dim, l3.use_scaled_rope) == (500000.0, 128256, 14336, False)
    assert l31.use_scaled_rope and (l31.rope_scaling_factor, l31.rope_low_freq_factor, l31.rope_high_freq_factor,
                                    l31.rope_old_context_len) == LLAMA31_ROPE_SCALING
    assert l31.max_seq_len == 131072 and l31.hidden_dim == 53248
    assert l32.tie_word_embeddings and l32.rope_scaling_factor == 32.0 and l32.head_dim == 64
    # Tied: one tensor counted once, so 3.2 1B is 1.24B rather than 1.50B.
    assert count_parameters(ModelArgs.from_name("llama3.2-1b", tie_word_embeddings=False)) == (
        COUNTS["llama3.2-1b"] + 128256 * 2048)
    for name in COUNTS:  # the paper's four are untouched
        if name[0].isdigit():
            a = get(name)
            assert not a.use_scaled_rope and not a.tie_word_embeddings and a.rope_scaling_factor is None


# --- RoPE frequencies ---------------------------------------------------------------------------


def _llama31_by_definition(freqs, factor, low, high, old):
    # The scaling as the Llama 3 paper describes it, one frequency at a time in float64.
    out = []
    for f in freqs.double().tolist():
        wavelength = 2 * math.pi / f
        if wavelength < old / high:
            out.append(f)
        elif wavelength > old / low:
            out.append(f / factor)
        else:
            smooth = (old / wavelength - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("head_dim,theta,scaling", [
    (128, 500000.0, (8.0, 1.0, 4.0, 8192)),  # Llama 3.1
    (64, 500000.0, (32.0, 1.0, 4.0, 8192)),  # Llama 3.2
    (16, 500000.0, (8.0, 1.0, 4.0, 16)),  # the tiny tests' shape
    (64, 10000.0, (4.0, 2.0, 8.0, 512)),
])  # fmt: skip
def test_llama31_scaling_matches_its_definition(head_dim, theta, scaling):
    base = rope_inv_freq(head_dim, theta)
    got = llama31_scaled_inv_freq(base, *scaling)
    assert got.dtype == torch.float32 and got.shape == base.shape
    torch.testing.assert_close(got.double(), _llama31_by_definition(base, *scaling), atol=0, rtol=1e-6)


def test_llama31_scaling_bands():
    factor, low, high, old = LLAMA31_ROPE_SCALING
    base = rope_inv_freq(128, 500000.0)
    got = llama31_scaled_inv_freq(base, factor, low, high, old)
    wavelength = 2 * math.pi / base
    fast, slow = wavelength < old / high, wavelength > old / low
    assert fast.sum() > 10 and slow.sum() > 10 and (~fast & ~slow).sum() > 0  # three bands in 3.1's 64
    assert torch.equal(got[fast], base[fast])  # local position kept exactly
    assert torch.equal(got[slow], base[slow] / factor)  # stretched like linear scaling
    ratio = got / base  # from 1 down to 1/factor, never outside, monotone in wavelength
    assert (ratio <= 1).all() and (ratio >= 1 / factor - 1e-7).all() and (ratio[1:] <= ratio[:-1] + 1e-7).all()
    # Continuous at the band edges: frequencies just inside follow those outside.
    edge = torch.tensor([2 * math.pi / (old / high), 2 * math.pi / (old / low)])
    torch.testing.assert_close(llama31_scaled_inv_freq(edge, factor, low, high, old),
                               torch.stack([edge[0], edge[1] / factor]), atol=0, rtol=1e-6)


def test_linear_scaling_is_positions_over_factor():
    base = rope_inv_freq(16, 10000.0)
    assert torch.equal(linear_scaled_inv_freq(base, 4.0), base / 4.0)
    scaled = rope_table(linear_scaled_inv_freq(base, 4.0), 64)
    torch.testing.assert_close(scaled[::4], precompute_freqs_cis(16, 16), atol=1e-6, rtol=0)


def test_rope_theta_sets_the_frequencies():
    # Code Llama: theta 1e6, so its slowest pair turns 1e6^(-126/128) radians per position.
    f = rope_inv_freq(128, 1e6)
    assert f[0] == 1.0 and f[-1].item() == pytest.approx(1e6 ** (-126 / 128), rel=1e-6)
    assert torch.equal(precompute_freqs_cis(128, 5, 1e6), rope_table(f, 5))


def test_model_frequencies_follow_the_args():
    plain = ModelArgs(**{**TINY3, "use_scaled_rope": False, "rope_old_context_len": None})
    assert torch.equal(model_inv_freq(plain), rope_inv_freq(16, 500000.0))
    linear = ModelArgs(**{**TINY3, "use_scaled_rope": False, "rope_old_context_len": None,
                          "rope_scaling_factor": 2.0})
    assert torch.equal(model_inv_freq(linear), rope_inv_freq(16, 500000.0) / 2)
    scaled = ModelArgs(**TINY3)
    assert torch.equal(model_inv_freq(scaled), llama31_scaled_inv_freq(rope_inv_freq(16, 500000.0), 8.0, 1.0, 4.0, 16))
    model = build_model(scaled, seed=0)
    assert torch.equal(model.freqs_cis, rope_table(model_inv_freq(scaled), 128))
    model.to(torch.bfloat16).init_rope()  # a cast model gets the fp32 scaled table back
    assert model.freqs_cis.dtype == torch.float32
    assert torch.equal(model.freqs_cis, rope_table(model_inv_freq(scaled), 128))


# --- ModelArgs: the new keys --------------------------------------------------------------------


def test_use_scaled_rope_fills_metas_values():
    a = ModelArgs(dim=64, n_heads=4, use_scaled_rope=True)
    assert (a.rope_scaling_factor, a.rope_low_freq_factor, a.rope_high_freq_factor, a.rope_old_context_len) == (
        8.0, 1.0, 4.0, 8192)
    assert ModelArgs(dim=64, n_heads=4, use_scaled_rope=True, rope_scaling_factor=32).rope_scaling_factor == 32.0
    assert a == ModelArgs(dim=64, n_heads=4, use_scaled_rope=True, rope_scaling_factor=8.0, rope_old_context_len=8192)


@pytest.mark.parametrize("kwargs,match", [
    (dict(use_scaled_rope=1), "use_scaled_rope must be true or false, got 1"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings must be true or false"),
    (dict(rope_low_freq_factor=1.0), "rope_low_freq_factor applies only to Llama 3.1's scaling; set use_scaled_rope"),
    (dict(rope_old_context_len=8192), "rope_old_context_len applies only to Llama 3.1's scaling"),
    (dict(rope_scaling_factor=0.0), "rope_scaling_factor must be a positive finite number"),
    (dict(rope_scaling_factor=math.inf), "rope_scaling_factor must be a positive finite number"),
    (dict(use_scaled_rope=True, rope_old_context_len=8192.0), r"rope_old_context_len must be an integer.*write 8192"),
    (dict(use_scaled_rope=True, rope_old_context_len=0), "rope_old_context_len must be positive"),
    (dict(use_scaled_rope=True, rope_low_freq_factor=4.0), "rope_low_freq_factor=4.0 must be below"),
    (dict(use_scaled_rope=True, rope_high_freq_factor=math.nan), "rope_high_freq_factor must be a positive finite"),
])  # fmt: skip
def test_new_keys_are_checked_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelArgs(dim=64, n_heads=4, **kwargs)


def test_params_json_keys_round_trip():
    # Meta's Llama 3.1 8B params.json, verbatim.
    meta31 = {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
              "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256}
    a = ModelArgs.from_params(meta31)
    assert a == ModelArgs.from_name("llama3.1-8b", max_seq_len=2048)
    assert ModelArgs.from_params(a.to_params()) == a
    assert a.to_params()["rope_old_context_len"] == 8192
    tied = ModelArgs.from_name("llama3.2-1b")
    assert ModelArgs.from_params(json.loads(json.dumps(tied.to_params()))) == tied
    # LLaMA 1 and Llama 2 params.json keep their keys, none of the later ones.
    assert set(ModelArgs.from_name("7B").to_params()) == {
        "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier", "norm_eps",
        "max_seq_len", "rope_theta"}
    assert "use_scaled_rope" not in ModelArgs.from_name("llama3-8b").to_params()


# --- tied embeddings ----------------------------------------------------------------------------


def _tied(seed=0, **overrides):
    return _sharpen(build_model(ModelArgs(**{**TINY3, "tie_word_embeddings": True, **overrides}), seed=seed), seed)


def test_tied_output_is_the_embedding_tensor():
    model = _tied()
    assert model.output.weight is model.tok_embeddings.weight
    names = [n for n, _ in model.named_parameters()]
    assert "output.weight" not in names and "tok_embeddings.weight" in names
    assert "output.weight" not in model.state_dict()  # one tensor, one name
    assert sum(p.numel() for p in model.parameters()) == count_parameters(model.args)
    with torch.no_grad():
        model.tok_embeddings.weight[3].add_(1.0)
    assert torch.equal(model.output.weight[3], model.tok_embeddings.weight[3])
    # Training: the one tensor gets the gradient of both uses.
    tokens = torch.randint(0, 256, (1, 12), generator=_gen(1))
    model(tokens).logsumexp(-1).sum().backward()
    grad = model.tok_embeddings.weight.grad
    assert grad is not None and (grad[tokens[0]].abs().sum(-1) > 0).all() and (grad[200:].abs().sum() > 0)


def test_tied_model_survives_meta_materialisation_and_loading():
    args = ModelArgs(**{**TINY3, "tie_word_embeddings": True})
    with torch.device("meta"):
        empty = Transformer(args)
    empty.to_empty(device="cpu")
    assert empty.output.weight is empty.tok_embeddings.weight
    for convert in (lambda m: m.to("meta"), lambda m: m.to_empty(device="cpu"), lambda m: m.half()):
        convert(empty)  # conversions that make new tensors module by module
        assert empty.output.weight is empty.tok_embeddings.weight
    src = _tied()
    with torch.device("meta"):
        model = Transformer(args)
    assert not model.load_state_dict(src.state_dict(), strict=True, assign=True).missing_keys
    assert model.output.weight is model.tok_embeddings.weight
    assert model.tok_embeddings.weight.data_ptr() == src.tok_embeddings.weight.data_ptr()  # assigned, not copied
    # A full state dict (both names) is accepted when they agree, refused when they differ.
    full = {**src.state_dict(), "output.weight": src.tok_embeddings.weight.detach().clone()}
    other = build_model(args, seed=5)
    other.load_state_dict(full, strict=True)
    assert other.output.weight is other.tok_embeddings.weight
    assert torch.equal(other.output.weight, src.output.weight)
    full["output.weight"] = full["output.weight"] + 1
    with pytest.raises(ValueError, match="output.weight differs from tok_embeddings.weight.*tie_word_embeddings"):
        other.load_state_dict(full, strict=True)
    # An untied model still wants its output layer.
    untied = build_model(ModelArgs(**TINY3), seed=0)
    with pytest.raises(RuntimeError, match="output.weight"):
        untied.load_state_dict(src.state_dict(), strict=True)


def test_tied_model_directory_holds_one_copy(tmp_path):
    from safetensors import safe_open

    model = _tied()
    save_model(model, None, tmp_path / "m")
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "tok_embeddings.weight" in keys and "output.weight" not in keys
    params = json.loads((tmp_path / "m" / "params.json").read_text())
    assert params["tie_word_embeddings"] is True and params["use_scaled_rope"] is True
    loaded, _ = load_model(tmp_path / "m", tokenizer=False)
    assert loaded.output.weight is loaded.tok_embeddings.weight
    x = torch.randint(0, 256, (1, 40), generator=_gen(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


# --- scaled RoPE in the model -------------------------------------------------------------------


def test_scaling_changes_the_logits_past_the_original_context():
    scaled = _sharpen(build_model(ModelArgs(**TINY3), seed=0))
    plain = _sharpen(build_model(ModelArgs(**{**TINY3, "use_scaled_rope": False, "rope_old_context_len": None}),
                                 seed=0))
    x = torch.randint(0, 256, (1, 64), generator=_gen(3))
    with torch.no_grad():
        assert (scaled(x) - plain(x)).abs().max() > 1e-2


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True},
                                       {"use_scaled_rope": False, "rope_old_context_len": None,
                                        "rope_scaling_factor": 4.0}])
def test_kv_cache_decode_equals_full_forward_past_the_original_context(overrides):
    model = _sharpen(build_model(ModelArgs(**{**TINY3, **overrides}), seed=0))
    tokens = torch.randint(0, 256, (2, 64), generator=_gen(4))
    prompt = 10  # decode positions 10..63, mostly beyond rope_old_context_len=16
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(2, 64)
        steps = [model(tokens[:, :prompt], torch.arange(prompt))]
        for p in range(prompt, tokens.shape[1]):
            steps.append(model(tokens[:, p:p + 1], torch.tensor([p])))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
