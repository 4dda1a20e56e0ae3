from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llamaworks.model import Attention, FeedForward, ModelArgs, RMSNorm, Transformer, build_model, count_parameters
from llamaworks.presets import ffn_hidden_dim
from llamaworks.rope import apply_rotary_emb, precompute_freqs_cis

TINY = dict(dim=64, n_layers=2, n_heads=4, vocab_size=256, max_seq_len=64)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sharpen(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # init_weights' std 0.02 gives near-uniform attention, under which masking and position
    # bugs barely move the output; larger weights make them visible above 1e-5.
    g = _gen(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.15 * noise)
    return module


def _model(seed: int = 0, **overrides) -> Transformer:
    return _sharpen(build_model(ModelArgs(**{**TINY, **overrides}), seed=seed), seed).eval()


def _rope_complex(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    # Meta's reference: pairs (x[2i], x[2i+1]) as complex numbers times e^{i p theta^(-2i/d)}.
    # x: (bsz, seq, heads, head_dim), positions: (seq,). The angles are formed in fp32 as in
    # Meta's code (what released weights were trained with); the rotation itself in fp64.
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    angles = torch.outer(positions.float(), inv).double()
    cis = torch.polar(torch.ones_like(angles), angles)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * cis[None, :, None, :]).flatten(-2)


# --- attention ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_attention_matches_naive_masked_softmax(n_kv_heads):
    args = ModelArgs(**TINY, n_kv_heads=n_kv_heads)
    att = _sharpen(Attention(args))
    bsz, seq, h, hd = 2, 11, args.n_heads, args.head_dim
    x = torch.randn(bsz, seq, args.dim, generator=_gen(1))
    with torch.no_grad():
        got = att(x, precompute_freqs_cis(hd, seq))

        pos = torch.arange(seq)
        q = _rope_complex((x @ att.wq.weight.T).view(bsz, seq, h, hd), pos)
        k = _rope_complex((x @ att.wk.weight.T).view(bsz, seq, n_kv_heads, hd), pos)
        v = (x @ att.wv.weight.T).view(bsz, seq, n_kv_heads, hd).double()
        # Meta's repeat_kv: kv head j serves query heads j*g .. j*g+g-1.
        g = h // n_kv_heads
        k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)
        probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(bsz, seq, h * hd)
        ref = out @ att.wo.weight.double().T
    assert probs.max() > 0.5  # the weights are large enough for attention to be far from uniform
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


# --- RoPE --------------------------------------------------------------------------------------


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_complex_reference(theta):
    hd, end = 16, 2048
    x = torch.randn(2, end, 3, hd, generator=_gen(0))
    got = apply_rotary_emb(x, precompute_freqs_cis(hd, end, theta))
    torch.testing.assert_close(got.double(), _rope_complex(x, torch.arange(end), theta), atol=1e-5, rtol=1e-5)


def test_rope_table_shape_and_values():
    f = precompute_freqs_cis(8, 5)
    assert f.shape == (5, 4, 2) and f.dtype == torch.float32
    # Position 3, pair 1: angle 3 * 10000^(-2/8).
    a = 3 * 10000 ** (-2 / 8)
    assert f[3, 1].tolist() == pytest.approx([math.cos(a), math.sin(a)], abs=1e-7)


def test_rope_dot_product_depends_only_on_offset():
    hd, end = 32, 512
    freqs = precompute_freqs_cis(hd, end)
    q, k = torch.randn(hd, generator=_gen(0)), torch.randn(hd, generator=_gen(1))

    def score(m, n):
        qm = apply_rotary_emb(q.view(1, 1, 1, hd), freqs[m : m + 1])
        kn = apply_rotary_emb(k.view(1, 1, 1, hd), freqs[n : n + 1])
        return (qm * kn).sum().item()

    for m, n in [(5, 2), (2, 5), (10, 10), (40, 1)]:
        base = score(m, n)
        for shift in (1, 7, 100, 400):
            assert score(m + shift, n + shift) == pytest.approx(base, abs=1e-4)
    # ...and it does depend on the offset (otherwise the check above is empty).
    assert abs(score(5, 2) - score(5, 4)) > 1e-2


def test_rope_preserves_norms_and_per_row_positions():
    hd = 16
    x = torch.randn(3, 6, 2, hd, generator=_gen(0))
    freqs = precompute_freqs_cis(hd, 64)
    out = apply_rotary_emb(x, freqs[:6])
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    # (bsz, seq) positions: each row uses its own slice of the table.
    pos = torch.tensor([[0, 1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15], [3, 3, 9, 1, 0, 60]])
    per_row = apply_rotary_emb(x, freqs[pos])
    for b in range(3):
        torch.testing.assert_close(per_row[b : b + 1], apply_rotary_emb(x[b : b + 1], freqs[pos[b]]))
    assert torch.equal(per_row[:1], out[:1])
    assert not torch.allclose(per_row[1:2], out[1:2])


# --- RMSNorm -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 1e-4])  # at 1e-4, mean(x^2) ~ 1e-8 << eps: eps must sit in the sqrt
def test_rmsnorm_formula(scale):
    norm = RMSNorm(48)
    assert norm.eps == 1e-6
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=_gen(1)))
    x = scale * torch.randn(4, 7, 48, generator=_gen(0))
    xd = x.double()
    ref = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    torch.testing.assert_close(norm(x).double(), ref, atol=1e-6, rtol=1e-5)


def test_norm_eps_reaches_every_norm():
    model = Transformer(ModelArgs(**TINY, norm_eps=1e-5))
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * TINY["n_layers"] + 1 and all(m.eps == 1e-5 for m in norms)


# --- SwiGLU ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim,hidden", [(4096, 11008), (5120, 13824), (6656, 17920), (8192, 22016)])
def test_swiglu_hidden_sizes(dim, hidden):
    assert ffn_hidden_dim(dim, 256) == hidden
    assert ModelArgs(dim=dim, n_heads=dim // 128).hidden_dim == hidden


def test_ffn_dim_multiplier():
    # Llama 2 70B: dim 8192, multiplier 1.3, multiple_of 4096 -> 28672.
    assert ffn_hidden_dim(8192, 4096, 1.3) == 28672


def test_feedforward_by_hand():
    ff = _sharpen(FeedForward(32, 96))
    x = torch.randn(3, 5, 32, generator=_gen(0))
    w1, w2, w3 = ff.w1.weight, ff.w2.weight, ff.w3.weight
    a = x @ w1.T
    ref = ((a * torch.sigmoid(a)) * (x @ w3.T)) @ w2.T
    torch.testing.assert_close(ff(x), ref, atol=1e-5, rtol=1e-5)
    # w1 is the gated branch, w3 the linear one: swapping them changes the result.
    swapped = ((x @ w3.T) * torch.sigmoid(x @ w3.T) * a) @ w2.T
    assert not torch.allclose(ff(x), swapped, atol=1e-3)


# --- sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,count",
    [("7B", 6_738_415_616), ("13B", 13_015_864_320), ("33B", 32_528_943_616), ("65B", 65_285_660_672)],
)
def test_preset_parameter_counts_on_meta(name, count):
    args = ModelArgs.from_name(name)
    assert count_parameters(args) == count
    with torch.device("meta"):
        model = Transformer(args)
    assert all(t.is_meta for t in model.parameters()) and all(t.is_meta for t in model.buffers())
    assert sum(p.numel() for p in model.parameters()) == count


def test_presets_follow_table_2():
    for name, (dim, heads, layers) in {
        "7B": (4096, 32, 32),
        "13B": (5120, 40, 40),
        "33B": (6656, 52, 60),
        "65B": (8192, 64, 80),
    }.items():
        a = ModelArgs.from_name(name)
        assert (a.dim, a.n_heads, a.n_layers, a.max_seq_len, a.vocab_size) == (
            dim,
            heads,
            layers,
            2048,
            32000,
        )
        assert a.head_dim == 128 and a.norm_eps == 1e-6 and a.rope_theta == 10000.0
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelArgs.from_name("7b-typo")


# --- state dict --------------------------------------------------------------------------------


def test_state_dict_keys_are_metas():
    args = ModelArgs(**TINY)
    model = build_model(args, seed=0)
    layer = [
        "attention.wq.weight",
        "attention.wk.weight",
        "attention.wv.weight",
        "attention.wo.weight",
        "feed_forward.w1.weight",
        "feed_forward.w2.weight",
        "feed_forward.w3.weight",
        "attention_norm.weight",
        "ffn_norm.weight",
    ]
    expected = ["tok_embeddings.weight"] + [f"layers.{i}.{k}" for i in range(2) for k in layer]
    expected += ["norm.weight", "output.weight"]
    assert list(model.state_dict()) == expected
    # Caches are runtime state, never checkpoint content.
    model.setup_caches(2, 16)
    assert list(model.state_dict()) == expected
    sd = model.state_dict()
    d, hid = args.dim, args.hidden_dim
    assert sd["tok_embeddings.weight"].shape == (256, d) and sd["output.weight"].shape == (256, d)
    assert sd["layers.0.attention.wq.weight"].shape == (d, d)
    assert sd["layers.0.feed_forward.w1.weight"].shape == (hid, d)
    assert sd["layers.0.feed_forward.w2.weight"].shape == (d, hid)
    assert sd["layers.0.feed_forward.w3.weight"].shape == (hid, d)
    gqa = build_model(ModelArgs(**TINY, n_kv_heads=2), seed=0).state_dict()
    assert gqa["layers.1.attention.wk.weight"].shape == (32, d) and gqa[
        "layers.1.attention.wv.weight"
    ].shape == (32, d)


def test_no_biases_and_untied_output():
    model = build_model(ModelArgs(**TINY), seed=0)
    assert not [n for n, _ in model.named_parameters() if "bias" in n]
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model.output.weight.data_ptr() != model.tok_embeddings.weight.data_ptr()
    before = model.output.weight.clone()
    with torch.no_grad():
        model.tok_embeddings.weight.add_(1.0)
    assert torch.equal(model.output.weight, before)


# --- KV cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_kv_cache_decode_equals_full_forward(n_kv_heads):
    model = _model(n_kv_heads=n_kv_heads)
    tokens = torch.randint(0, 256, (2, 14), generator=_gen(3))
    prompt = 5
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(2, 32)
        steps = [model(tokens[:, :prompt], torch.arange(prompt))]
        for p in range(prompt, tokens.shape[1]):
            steps.append(model(tokens[:, p : p + 1], torch.tensor([p])))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_ragged_batch_per_row_positions():
    model = _model(n_kv_heads=2)
    lengths = [7, 4, 2]
    rows = [torch.randint(0, 256, (n + 4,), generator=_gen(10 + i)) for i, n in enumerate(lengths)]
    width = max(lengths)
    batch = torch.zeros(3, width, dtype=torch.long)  # right-padded with token 0
    for i, n in enumerate(lengths):
        batch[i, :n] = rows[i][:n]
    with torch.no_grad():
        alone = [model(r.unsqueeze(0))[0] for r in rows]
        model.setup_caches(3, 32)
        pre = model(batch, torch.arange(width).expand(3, width))
        for i, n in enumerate(lengths):
            torch.testing.assert_close(pre[i, :n], alone[i][:n], atol=1e-5, rtol=0)
        # Decode 4 tokens, each row at its own position; the padding written past a row's
        # length is overwritten or masked, never attended to.
        for step in range(4):
            pos = torch.tensor([[n + step] for n in lengths])
            tok = torch.stack([rows[i][n + step] for i, n in enumerate(lengths)]).unsqueeze(1)
            out = model(tok, pos)
            for i, n in enumerate(lengths):
                torch.testing.assert_close(out[i, 0], alone[i][n + step], atol=1e-5, rtol=0)


def test_kv_cache_rows_target_any_cache_row():
    # Continuous batching: each sequence is prefilled alone into its own cache row, then the
    # rows decode together (or any subset does) without disturbing the others.
    model = _model(n_kv_heads=2)
    lengths = {3: 6, 1: 4}  # cache row -> prompt length
    seqs = {r: torch.randint(0, 256, (n + 3,), generator=_gen(20 + r)) for r, n in lengths.items()}
    with torch.no_grad():
        alone = {r: model(s.unsqueeze(0))[0] for r, s in seqs.items()}
        model.setup_caches(4, 32)
        for r, n in lengths.items():
            out = model(seqs[r][:n].unsqueeze(0), torch.arange(n).unsqueeze(0), rows=torch.tensor([r]))
            torch.testing.assert_close(out[0], alone[r][:n], atol=1e-5, rtol=0)
        k_row0 = model.layers[0].attention.kv_cache.k[0].clone()
        for step in range(3):
            rows = torch.tensor([3, 1] if step < 2 else [1])
            pos = torch.tensor([[lengths[int(r)] + step] for r in rows])
            tok = torch.stack([seqs[int(r)][lengths[int(r)] + step] for r in rows]).unsqueeze(1)
            out = model(tok, pos, rows=rows)
            for i, r in enumerate(rows.tolist()):
                torch.testing.assert_close(out[i, 0], alone[r][lengths[r] + step], atol=1e-5, rtol=0)
    assert torch.equal(model.layers[0].attention.kv_cache.k[0], k_row0)  # untouched row


def test_chunked_prefill_equals_single_prefill():
    model = _model()
    tokens = torch.randint(0, 256, (2, 13), generator=_gen(4))
    with torch.no_grad():
        model.setup_caches(2, 32)
        single = model(tokens, torch.arange(13))
        model.setup_caches(2, 32)
        # Second chunk: several queries against a longer cache, the case where a top-left
        # aligned causal mask would go wrong.
        chunks = [model(tokens[:, :6], torch.arange(6)), model(tokens[:, 6:], torch.arange(6, 13))]
        nxt = torch.randint(0, 256, (2, 1), generator=_gen(5))
        after = model(nxt, torch.tensor([13]))
        ref = model.forward(torch.cat([tokens, nxt], dim=1))
    torch.testing.assert_close(torch.cat(chunks, dim=1), single, atol=1e-5, rtol=0)
    torch.testing.assert_close(after[:, 0], ref[:, -1], atol=1e-5, rtol=0)


def test_cache_longer_than_context_is_rejected():
    model = build_model(ModelArgs(**TINY), seed=0)
    with pytest.raises(ValueError):
        model.setup_caches(1, TINY["max_seq_len"] + 1)


# --- initialisation ----------------------------------------------------------------------------


def test_init_weights_statistics():
    args = ModelArgs(dim=256, n_layers=4, n_heads=4, vocab_size=1024, max_seq_len=32)
    model = build_model(args, seed=0)
    resid = 0.02 / math.sqrt(2 * args.n_layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            assert p.std().item() == pytest.approx(resid, rel=0.05), name
            assert abs(p.mean().item()) < resid / 10, name
        else:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
            assert abs(p.mean().item()) < 0.002, name


def test_init_is_deterministic_under_seed_and_materialises_from_meta():
    args = ModelArgs(**TINY)
    a, b, c = build_model(args, seed=7), build_model(args, seed=7), build_model(args, seed=8)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name
    assert not any(t.is_meta for t in list(a.parameters()) + list(a.buffers()))
    # The RoPE table is recomputed after to_empty(), not left as uninitialised memory.
    torch.testing.assert_close(
        a.freqs_cis, precompute_freqs_cis(args.head_dim, args.max_seq_len), atol=0, rtol=0
    )


def test_bf16_model_keeps_rope_table_in_fp32():
    args = ModelArgs(**TINY)
    model = build_model(args, dtype=torch.bfloat16, seed=0)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.freqs_cis.dtype == torch.float32
    torch.testing.assert_close(
        model.freqs_cis, precompute_freqs_cis(args.head_dim, args.max_seq_len), atol=0, rtol=0
    )
    with torch.no_grad():
        logits = model(torch.randint(0, 256, (1, 8), generator=_gen(0)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


# --- ModelArgs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dim=100, n_heads=3), "not divisible by n_heads"),
        (dict(dim=12, n_heads=4), "must be even"),
        (dict(dim=64, n_heads=4, n_kv_heads=3), "not divisible by n_kv_heads"),
        (dict(dim=64, n_heads=4, n_layers=0), "n_layers must be positive"),
        # values a params.json, config.json or GGUF file can hold; before, these failed inside
        # torch (a traceback) or, for norm_eps and rope_theta, computed NaN or wrong logits
        (dict(dim=64.0, n_heads=4), r"dim must be an integer, got 64.0 \(write 64\)"),
        (dict(n_layers=True), "n_layers must be an integer, got True"),
        (dict(vocab_size=0), "vocab_size must be positive"),
        (dict(norm_eps="1e-6"), "norm_eps must be a positive finite number, got '1e-6'"),
        (dict(norm_eps=-1e-6), "norm_eps must be a positive finite number"),
        (dict(norm_eps=math.nan), "norm_eps must be a positive finite number, got nan"),
        (dict(rope_theta=0.0), "rope_theta must be a positive finite number"),
        (dict(rope_theta=-1e4), "rope_theta must be a positive finite number"),
        (dict(ffn_dim_multiplier=math.inf), "ffn_dim_multiplier must be a positive finite number"),
        (dict(max_seq_len=300_000_000), "exceeds 16777216: float32 positions are exact only up to 2"),
    ],
)
def test_model_args_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelArgs(**kwargs)


def test_params_round_trip_and_unknown_keys():
    args = ModelArgs(
        dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=1234, multiple_of=32,
        ffn_dim_multiplier=1.3, norm_eps=1e-5, max_seq_len=128, rope_theta=500000.0,
    )  # fmt: skip
    params = args.to_params()
    assert params["vocab_size"] == 1234 and params["n_kv_heads"] == 2
    assert ModelArgs.from_params(params) == args
    # Meta's LLaMA 1 params.json, verbatim: vocab_size -1 is kept for the loader to resolve.
    meta = {
        "dim": 4096,
        "multiple_of": 256,
        "n_heads": 32,
        "n_layers": 32,
        "norm_eps": 1e-06,
        "vocab_size": -1,
    }
    loaded = ModelArgs.from_params(meta)
    assert loaded.vocab_size == -1 and loaded.n_kv_heads == 32 and loaded.hidden_dim == 11008
    with pytest.raises(ValueError, match="bogus"):
        ModelArgs.from_params({**meta, "bogus": 1})


# --- training ----------------------------------------------------------------------------------


def test_gradients_reach_every_parameter():
    model = build_model(ModelArgs(**TINY, n_kv_heads=2), seed=0)
    tokens = torch.randint(0, 256, (2, 16), generator=_gen(0))
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(math.log(256), rel=0.05)  # small init: near-uniform predictions
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_model_args_keep_int_and_float_kinds():
    a = ModelArgs(**{**TINY, "rope_theta": 500000, "norm_eps": 1, "vocab_size": -1})  # Meta's -1 stays
    assert isinstance(a.rope_theta, float) and isinstance(a.norm_eps, float) and a.vocab_size == -1


# --- the RoPE table: built for what is used ----------------------------------------------------


def test_rope_table_grows_to_the_positions_used():
    # A declared context of 2^24 positions costs 4096 rows until longer inputs or caches come.
    args = ModelArgs(**{**TINY, "max_seq_len": 1 << 24})
    model = build_model(args, seed=0).eval()
    assert model.freqs_cis.shape[0] == 4096
    full = precompute_freqs_cis(args.head_dim, 16384)
    with torch.no_grad():
        model(torch.zeros(1, 5000, dtype=torch.long))  # a forward pass longer than the table
    assert model.freqs_cis.shape[0] == 8192
    torch.testing.assert_close(model.freqs_cis, full[:8192], atol=0, rtol=0)  # rows do not depend on length
    model.setup_caches(1, 9000)  # the cache's length, rounded up to a power of two
    assert model.freqs_cis.shape[0] == 16384
    torch.testing.assert_close(model.freqs_cis, full, atol=0, rtol=0)
    table = model.freqs_cis
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), torch.arange(3))
        model(torch.tensor([[4]]), torch.tensor([3]))
    assert model.freqs_cis is table  # decoding never touches the table
    # never beyond max_seq_len, and bf16 casts are undone by init_rope at the same length
    small = build_model(ModelArgs(**{**TINY, "max_seq_len": 100}), dtype=torch.bfloat16, seed=0)
    assert small.freqs_cis.shape[0] == 100 and small.freqs_cis.dtype == torch.float32


def test_grown_table_gives_the_same_logits():
    args = ModelArgs(**{**TINY, "max_seq_len": 8192})
    model = _model(**{"max_seq_len": 8192})
    x = torch.randint(0, 256, (1, 4200), generator=_gen(3))
    with torch.no_grad():
        grown = model(x)
        model.freqs_cis = precompute_freqs_cis(args.head_dim, 8192)  # the old eager table
        eager = model(x)
    torch.testing.assert_close(grown, eager, atol=0, rtol=0)


# --- packed examples (doc_ids) ----------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, dict(n_kv_heads=2), dict(use_scaled_rope=True, rope_old_context_len=8,
                                                                    rope_theta=500000.0)])
def test_packed_examples_give_their_logits_alone(overrides):
    model = _model(**overrides)
    g = _gen(3)
    lengths = [5, 9, 1, 7]
    examples = [torch.randint(0, TINY["vocab_size"], (n,), generator=g) for n in lengths]
    pad = torch.zeros(4, dtype=torch.long)  # the rest of the row: its own document
    row = torch.cat([*examples, pad]).unsqueeze(0)  # (1, 26)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate([*lengths, 4])]).unsqueeze(0)
    # A second row packed in another order, with an id reused by a later document of the row.
    row2 = torch.cat([examples[3], examples[0], examples[1], pad[:1], examples[2], pad[:3]]).unsqueeze(0)
    doc2 = torch.cat([torch.full((n,), i % 2) for i, n in enumerate([7, 5, 9, 1, 1, 3])]).unsqueeze(0)
    with torch.no_grad():
        packed = model(torch.cat([row, row2]), doc_ids=torch.cat([doc_ids, doc2]))  # (2, 26, vocab)
        hidden = model(row, doc_ids=doc_ids, return_hidden=True)
        alone = [model(ex.unsqueeze(0))[0] for ex in examples]
        unmasked = model(row)[0]
    starts = [0, 5, 14, 15]
    for ex, start, n in zip(alone, starts, lengths):
        torch.testing.assert_close(packed[0, start:start + n], ex, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.output(hidden[0, start:start + n]), ex, atol=1e-5, rtol=0)
    for ex, start, n in zip([alone[3], alone[0], alone[1], alone[2]], [0, 7, 12, 22], [7, 5, 9, 1]):
        torch.testing.assert_close(packed[1, start:start + n], ex, atol=1e-5, rtol=0)
    # Control: without doc_ids the later examples see the earlier ones and other positions.
    assert (unmasked[5:14] - alone[1]).abs().max() > 1e-2


def test_one_document_per_row_is_the_causal_pass():
    model = _model(n_kv_heads=2)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 13), generator=_gen(4))
    with torch.no_grad():
        causal = model(tokens)
        masked = model(tokens, doc_ids=torch.full((2, 13), 7))
    torch.testing.assert_close(masked, causal, atol=1e-5, rtol=0)


def test_without_doc_ids_attention_is_sdpas_causal_kernel(monkeypatch):
    # The fast path (is_causal, no mask tensor) stays the one training takes without packing.
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("is_causal", False), kwargs.get("attn_mask") is not None))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = _model()
    tokens = torch.randint(0, TINY["vocab_size"], (1, 6), generator=_gen(5))
    with torch.no_grad():
        model(tokens)
        assert calls == [(True, False)] * TINY["n_layers"]
        calls.clear()
        model(tokens, doc_ids=torch.tensor([[0, 0, 1, 1, 1, 2]]))
        assert calls == [(False, True)] * TINY["n_layers"]


def test_packed_gradients_equal_those_of_the_examples_alone():
    model = _model()
    g = _gen(6)
    examples = [torch.randint(0, TINY["vocab_size"], (n,), generator=g) for n in (6, 4)]
    model.zero_grad()
    model(torch.cat(examples).unsqueeze(0), doc_ids=torch.tensor([[0] * 6 + [1] * 4])).sum().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for ex in examples:
        model(ex.unsqueeze(0)).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed[n], p.grad, atol=1e-4, rtol=1e-4, msg=n)


def test_doc_ids_belong_to_the_training_path():
    model = _model()
    model.setup_caches(1, 16)
    with pytest.raises(AssertionError, match="doc_ids"):
        model(torch.zeros(1, 3, dtype=torch.long), torch.arange(3), doc_ids=torch.zeros(1, 3, dtype=torch.long))


def test_moved_names_are_still_importable_from_model():
    # rope.py, presets.py and kvcache.py took them out of model.py; callers import either home.
    from llamaworks import kvcache, model, presets, rope

    def public(module):
        return [name for name, value in vars(module).items() if not name.startswith("_") and (
            name.isupper() or getattr(value, "__module__", None) == module.__name__)]

    moved = [name for module in (rope, presets, kvcache) for name in public(module)]
    assert {"PRESETS", "apply_rotary_emb", "ffn_params", "KVCache", "document_positions"} <= set(moved)
    for module in (rope, presets, kvcache):
        for name in public(module):
            assert getattr(model, name, None) is getattr(module, name), name
    assert model.ModelArgs.from_name("llama3.2-1b").tie_word_embeddings


def test_tied_output_stays_tied_through_a_linear_subclass():
    # Inference swaps the output layer's class for a kernel layer (inference/kernels.py) with the
    # same parameters; a dtype change must keep one tensor, not copy the embedding into the output.
    class KernelLinear(torch.nn.Linear):
        pass

    m = build_model(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=96, max_seq_len=16, tie_word_embeddings=True))
    m.output.__class__ = KernelLinear
    m = m.to(torch.bfloat16)
    assert m.output.weight is m.tok_embeddings.weight
    assert "output.weight" not in m.state_dict()
