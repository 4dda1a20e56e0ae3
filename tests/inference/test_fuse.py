"""Load-time fusion (inference/fuse.py): q/k/v and w1/w3 as one product each give the unfused
logits and greedy tokens, for MHA and GQA, tied embeddings, int8/int4 weights, float kernels;
the state dict keeps Meta's keys and values, loads back, and saves the same files; LoRA-adapted
projections stay apart; unfuse restores Meta's modules."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from llamaworks.inference.fuse import FusedAttention, FusedFeedForward, fuse_projections, is_fused, unfuse
from llamaworks.inference.generate import generate_ids
from llamaworks.inference.kernels import use_gemv, use_native_kernels
from llamaworks.inference.load import load_model
from llamaworks.inference.quant import Int4Linear, Int8Linear, quantize_model
from llamaworks.model import Attention, FeedForward, ModelArgs, build_model
from llamaworks.modeldir import save_model
from llamaworks.weights import read_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SHAPES = {
    "mha": dict(dim=64, n_layers=2, n_heads=4, vocab_size=300, multiple_of=32, max_seq_len=128),
    "gqa": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=128),
    "tied": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=300, multiple_of=32, max_seq_len=128,
                 tie_word_embeddings=True),
}
TOKENS = torch.tensor([[1, 17, 250, 3, 99, 42, 7, 8], [1, 5, 6, 200, 201, 9, 10, 11]])


def peaked(args: dict) -> nn.Module:
    # Larger than init weights: well-separated logits, so greedy tokens compare the code.
    m = build_model(ModelArgs(**args), seed=0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return m


def greedy(model, n=12):
    return torch.cat([t for t, _ in generate_ids(model, [[1, 17, 250, 3], [1, 5]], n, temperature=0.0)], 1).tolist()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_logits_tokens_and_state_dict_equal_unfused(shape):
    model = peaked(SHAPES[shape])
    fused = copy.deepcopy(model)
    assert fuse_projections(fused) == 4 and is_fused(fused)
    assert all(type(b.attention) is FusedAttention and type(b.feed_forward) is FusedFeedForward for b in fused.layers)
    assert not hasattr(fused.layers[0].attention, "wq") and not hasattr(fused.layers[0].feed_forward, "w1")
    with torch.no_grad():
        torch.testing.assert_close(fused(TOKENS), model(TOKENS), atol=1e-5, rtol=1e-5)
    assert greedy(fused) == greedy(model)
    want, got = model.state_dict(), fused.state_dict()
    assert list(got) == list(want)  # Meta's keys, in Meta's order (tied: no output.weight)
    assert all(torch.equal(got[k], want[k]) for k in want)
    if SHAPES[shape].get("tie_word_embeddings"):
        assert fused.output.weight is fused.tok_embeddings.weight and "output.weight" not in got
    # One product per block where there were three and two: fewer parameters objects, same numbers.
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.parameters())


def test_state_dict_loads_back_into_a_fused_model():
    model = peaked(SHAPES["gqa"])
    fused = peaked(SHAPES["gqa"])
    with torch.no_grad():
        for p in fused.parameters():
            p.zero_()
    fuse_projections(fused)
    fused.load_state_dict(model.state_dict())  # Meta's names, concatenated by the load hook
    with torch.no_grad():
        torch.testing.assert_close(fused(TOKENS), model(TOKENS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantised_fused_equals_quantised_unfused(mode):
    model = quantize_model(peaked(SHAPES["gqa"]), mode, group_size=32)
    fused = copy.deepcopy(model)
    assert fuse_projections(fused) == 4
    kind = Int8Linear if mode == "int8" else Int4Linear
    assert type(fused.layers[0].attention.wqkv) is kind and fused.layers[0].attention.wqkv.out_features == 64 + 2 * 32
    with torch.no_grad():
        for rows in (TOKENS, TOKENS[:1, :1]):  # prefill (dequantised matmul) and one row (the kernels)
            torch.testing.assert_close(fused(rows), model(rows), atol=1e-4, rtol=1e-4)
    assert greedy(fused) == greedy(model)
    want, got = model.state_dict(), fused.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_fused_float_kernels_and_bf16():
    model = peaked(SHAPES["gqa"])
    for dtype, swap in ((torch.float32, use_native_kernels), (torch.bfloat16, use_gemv)):
        m = copy.deepcopy(model).to(dtype)
        m.init_rope()
        fused = copy.deepcopy(m)
        swap(m)
        fuse_projections(fused)
        swap(fused)
        # the fused product takes the same one-row kernel class as the others
        assert type(fused.layers[0].attention.wqkv) is type(fused.layers[0].attention.wo)
        with torch.no_grad():
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(fused(TOKENS[:, :1]), m(TOKENS[:, :1]), atol=tol, rtol=tol)
            torch.testing.assert_close(fused(TOKENS), m(TOKENS), atol=tol, rtol=tol)


def test_adapted_projections_stay_apart_and_unfuse_restores_meta_modules():
    from llamaworks.inference.lora import LoraConfig, apply_lora

    model = peaked(SHAPES["mha"])
    adapted = apply_lora(copy.deepcopy(model), LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("wq", "wv")))
    want = adapted.state_dict()
    assert fuse_projections(adapted) == 2  # the feed-forwards only
    assert all(type(b.attention) is Attention and type(b.feed_forward) is FusedFeedForward for b in adapted.layers)
    got = adapted.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)

    fused = copy.deepcopy(model)
    fuse_projections(fused)
    assert unfuse(fused) == 4 and not is_fused(fused)
    assert all(type(b.attention) is Attention and type(b.feed_forward) is FeedForward for b in fused.layers)
    assert [n for n, _ in fused.named_modules()] == [n for n, _ in model.named_modules()]
    with torch.no_grad():
        torch.testing.assert_close(fused(TOKENS), model(TOKENS), atol=1e-5, rtol=1e-5)


def test_load_model_fuses_by_default_and_saves_the_same_files(tmp_path, tiny_tokenizer):
    model = peaked({**SHAPES["gqa"], "vocab_size": tiny_tokenizer.vocab_size})
    src = save_model(model, tiny_tokenizer, tmp_path / "src")
    loaded, tok = load_model(src)
    plain, _ = load_model(src, fuse=False)
    assert is_fused(loaded) and not is_fused(plain)
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS), plain(TOKENS), atol=1e-5, rtol=1e-5)
    assert greedy(loaded) == greedy(plain)
    out = save_model(loaded, tok, tmp_path / "again")
    a, b = read_safetensors(src / "model.safetensors"), read_safetensors(out / "model.safetensors")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fused_quantised_directory_keeps_kernel_buffers_aligned(tmp_path, tiny_tokenizer, mode):
    from llamaworks.inference.kernels import is_aligned
    from llamaworks.inference.quant import QuantizedLinear, save_quantized

    model = quantize_model(peaked({**SHAPES["gqa"], "vocab_size": tiny_tokenizer.vocab_size}), mode, group_size=32)
    save_quantized(model, tiny_tokenizer, tmp_path / "q", mode, group_size=32)
    fused, _ = load_model(tmp_path / "q", fuse=True)
    layers = [m for m in fused.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 4 * fused.args.n_layers + 1
    fed = {f"{i}:{k}": t for i, m in enumerate(layers) for k, t in m.kernel_tensors().items()}
    assert len({k.split(":")[0] for k in fed}) == len(layers) and all(is_aligned(t) for t in fed.values())
    with torch.no_grad():
        torch.testing.assert_close(fused(TOKENS[:, :1]), model(TOKENS[:, :1]), atol=1e-4, rtol=1e-4)


def test_prompt_start_reads_contiguous_positions_only():
    from llamaworks.inference.paged import prompt_start

    assert prompt_start(torch.arange(5, 17).expand(3, 12)) == 5
    assert prompt_start(torch.arange(0, 9).view(1, 9)) == 0
    assert prompt_start(torch.tensor([[0, 1, 2], [1, 2, 3]])) is None  # rows at their own positions
    assert prompt_start(torch.tensor([[0, 1, 3]])) is None  # a gap
    assert prompt_start(torch.tensor([[2, 1, 0]])) is None
    assert prompt_start(torch.empty(1, 0, dtype=torch.long)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["mha", "gqa"])
def test_prompts_in_the_native_prefill_kernel_equal_sdpa_under_the_mask(monkeypatch, shape, dtype):
    # A prompt at positions start..start+seq-1 of every row (a prefill, or a chunk after a cached one)
    # takes paged.prefill_attention (the native kernel) over the cache's earlier keys and its own; rows
    # at their own positions (and decode steps) keep SDPA under the mask. Logits and cache agree.
    from llamaworks.inference import fuse, native

    if not native.load():
        pytest.skip("native kernels not built")
    model = peaked(SHAPES[shape]).to(dtype)
    model.init_rope(torch.device("cpu"))
    fuse_projections(model)
    use_native_kernels(model)
    calls = []
    real = fuse.prefill_attention
    monkeypatch.setattr(fuse, "prefill_attention", lambda q, k, v: calls.append(k.prefix.shape[2]) or real(q, k, v))
    tokens = torch.randint(3, 300, (2, 30), generator=torch.Generator().manual_seed(0))
    runs = {}
    for use_kernel in (True, False):
        if not use_kernel:
            monkeypatch.setattr(fuse, "prompt_start", lambda p: None)
        model.setup_caches(2, 64)
        with torch.no_grad():
            first = model(tokens[:, :18], torch.arange(18))  # a prompt
            second = model(tokens[:, 18:], torch.arange(18, 30))  # a chunk after it
            staggered = model(tokens[:, :10], torch.stack([torch.arange(10), torch.arange(5, 15)]))
        runs[use_kernel] = (first, second, staggered, model.layers[0].attention.kv_cache.k.clone())
    assert calls == [0, 0, 18, 18]  # two layers, two chunks; never the staggered rows
    tol = dict(atol=2e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    for got, want in zip(runs[True], runs[False]):
        torch.testing.assert_close(got.float(), want.float(), **tol)
