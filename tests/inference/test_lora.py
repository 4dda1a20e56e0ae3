"""LoRA (inference/lora.py): the layer's math, training only the adapters, merging, QLoRA over
int8/int4 bases, PEFT's adapter files both ways, one AdamW step equal to PEFT's, and the
`merge` and `generate --adapter` commands."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from llamaworks.cli import main as cli_main
from llamaworks.convert.hf import hf_config_dict, permute_for_hf, to_hf_state_dict
from llamaworks.inference.command import merge_command, quantize_command
from llamaworks.inference.kernels import bf16_matmul
from llamaworks.inference.load import load_model
from llamaworks.inference.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DEFAULT_TARGETS,
    PEFT_PREFIX,
    LoraConfig,
    LoRALinear,
    apply_lora,
    dense_linear,
    dropout_keep_mask,
    hf_module_names,
    load_adapter,
    load_lora_state_dict,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    merge_adapter,
    save_adapter,
)
from llamaworks.inference.quant import QuantizedLinear, quantize_model
from llamaworks.model import ModelArgs, build_model
from llamaworks.modeldir import QUANT_FILE
from llamaworks.weights import read_safetensors, save_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = dict(dim=64, n_layers=2, n_heads=4, vocab_size=256, max_seq_len=64)
VARIANTS = {"mha": ModelArgs(**TINY), "gqa": ModelArgs(**TINY, n_kv_heads=2)}
HF_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]


def _sharpen(model, seed: int = 0):
    # Larger than init's std 0.02, so attention is far from uniform and a wrong q/k row order
    # (the rotary permutation of lora_B) moves the logits far above the tolerances.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.15 * noise)
    return model


def _randomise(model, seed: int = 1, std: float = 0.1):
    # Adapters as after some training: B != 0, so every factor moves the logits.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _base(variant: str = "gqa", seed: int = 0):
    return _sharpen(build_model(VARIANTS[variant], seed=seed), seed).eval()


def _tokens(args, shape=(2, 12), seed=3):
    return torch.randint(0, args.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return float((a - b).norm() / b.norm())


# --- the layer and the model -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_at_initialisation_leaves_logits_unchanged(dtype):
    base = _base().to(dtype)
    x = _tokens(base.args)
    with torch.no_grad():
        ref = base(x)
        lm = apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=16))
        assert all(torch.count_nonzero(m.lora_B) == 0 and torch.count_nonzero(m.lora_A) > 0 for _, m in lora_layers(lm))
        assert torch.equal(lm(x), ref)  # B = 0: exactly the base model
    # adapters are fp32 whatever the base holds; a layer's output keeps the base's dtype
    assert {p.dtype for p in lora_parameters(lm)} == {torch.float32}
    assert lm.layers[0].attention.wq(torch.ones(3, 64, dtype=dtype)).dtype == dtype


def test_apply_lora_wraps_the_attention_and_mlp_projections():
    lm = apply_lora(_base(), LoraConfig())
    names = [name for name, _ in lora_layers(lm)]
    assert names == [f"layers.{i}.{part}.{p}" for i in range(2) for part, ps in
                     (("attention", ("wq", "wk", "wv", "wo")), ("feed_forward", ("w1", "w2", "w3"))) for p in ps]
    assert type(lm.output) is torch.nn.Linear and LoraConfig().target_modules == DEFAULT_TARGETS
    m = lm.layers[0].attention.wk
    assert (m.r, m.alpha, m.scaling) == (8, 8, 1.0)  # PEFT's defaults: r=8, lora_alpha=8
    assert m.lora_A.shape == (8, 64) and m.lora_B.shape == (32, 8)
    # Kaiming-uniform with a = sqrt(5), as nn.Linear and PEFT: bound 1/sqrt(in_features)
    assert float(m.lora_A.detach().abs().max()) <= 1 / 64**0.5
    # HF names are accepted and kept as Meta's; only the named ones are wrapped
    only = apply_lora(_base(), LoraConfig(target_modules=["q_proj", "wv"]))
    assert [n.rpartition(".")[2] for n, _ in lora_layers(only)] == ["wq", "wv"] * 2
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(lm)


@pytest.mark.parametrize("bad,match", [
    (dict(r=0), "r \\(rank\\) must be a positive integer"),
    (dict(r=2.0), "positive integer"),
    (dict(alpha=float("nan")), "alpha must be a finite"),
    (dict(dropout=1.0), "dropout must be a probability"),
    (dict(target_modules=["output"]), "'output' is not a projection LoRA applies to"),
    (dict(target_modules="wq"), "must be a list"),
    (dict(target_modules=["wq", "q_proj"]), "twice"),
    (dict(target_modules=[]), "empty"),
])
def test_config_errors_name_the_option(bad, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**bad)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("use_rslora", [False, True])
def test_merged_weights_give_the_unmerged_logits(variant, use_rslora):
    lm = _randomise(apply_lora(_base(variant), LoraConfig(r=4, alpha=16, use_rslora=use_rslora)))
    x = _tokens(lm.args)
    with torch.no_grad():
        y = lm(x)
        merged = merge_adapter(copy.deepcopy(lm))
        assert not lora_layers(merged) and type(merged.layers[0].attention.wq) is torch.nn.Linear
        assert rel(y, _base(variant)(x)) > 0.05  # the adapters do change the model
        # 1e-5 relative to the logits' scale (|y| up to ~4.5 here): W + s B A is rounded to fp32 before the
        # product, x W + s (x A) B is not, and that roundoff reached 1.25e-5 absolute on Intel AVX-512.
        torch.testing.assert_close(merged(x), y, atol=1e-5 * float(y.abs().max()), rtol=1e-5)
    # the merged weight is W + (alpha / r) B A, per projection
    m = lm.layers[1].feed_forward.w2
    scale = 16 / 2 if use_rslora else 16 / 4
    want = m.base_layer.weight + scale * m.lora_B @ m.lora_A
    torch.testing.assert_close(merged.layers[1].feed_forward.w2.weight, want, atol=1e-6, rtol=0)


def test_only_the_adapters_receive_gradients():
    lm = _randomise(apply_lora(_base().train(), LoraConfig(r=4, dropout=0.1)))
    x = _tokens(lm.args)
    logits = lm(x)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{part}" for n, _ in lora_layers(lm) for part in ("lora_A", "lora_B")}
    for n, p in lm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_dropout_applies_to_the_adapter_input_in_training_only():
    lm = _randomise(apply_lora(_base(), LoraConfig(r=4, dropout=0.5)))
    plain = copy.deepcopy(lm)
    for _, m in lora_layers(plain):
        m.lora_dropout = torch.nn.Identity()
    x = _tokens(lm.args)
    with torch.no_grad():
        assert torch.equal(lm.eval()(x), plain(x))
        torch.manual_seed(0)
        assert rel(lm.train()(x), plain(x)) > 1e-3


def _module_path(m, x, mask=None):
    # y = base(x) + s B A dropout(x) in plain autograd ops: what the training node must compute.
    h = x.to(m.lora_A.dtype)
    if mask is not None:
        h = h * mask / (1 - m.lora_dropout.p)
    out = m.base_layer(x)
    return (out + F.linear(F.linear(h, m.lora_A), m.lora_B) * m.scaling).to(out.dtype)


def _grads(m, x, fn):
    x = x.detach().requires_grad_()
    m.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=x.dtype == torch.bfloat16):
        y = fn(m, x.float() if x.dtype == torch.bfloat16 else x)
    (y.float() ** 2).sum().backward()  # a gradient that differs per output
    return [y.detach().float(), x.grad, m.lora_A.grad, m.lora_B.grad]


@pytest.mark.parametrize("base", ["fp32", "bf16-autocast", "int8", "int4"])
def test_training_node_gives_the_module_paths_output_and_gradients(base):
    # LoRALinear trains through one autograd node (_LoRAFunction); it must compute what the
    # plain autograd ops compute, in the same dtypes. bf16 here means the input is marked for
    # autocast (_grads): both sides then differ by bf16 rounding of different sums.
    lin = torch.nn.Linear(96, 80, bias=False)
    if base in ("int8", "int4"):
        lin = quantize_model(torch.nn.Sequential(lin), base, group_size=32)[0]
    m = LoRALinear(lin, r=4, alpha=8).train()
    with torch.no_grad():
        m.lora_B.normal_(0, 0.1)
    x = torch.randn(2, 70, 96, dtype=torch.bfloat16 if base == "bf16-autocast" else torch.float32)
    got = _grads(m, x, lambda m, x: m(x))
    want = _grads(m, x, _module_path)
    bound = 1e-2 if base == "bf16-autocast" else 1e-5
    for name, a, b in zip(("output", "x", "A", "B"), got, want):
        assert rel(a, b) < bound, (name, rel(a, b))


def test_training_node_with_dropout_has_the_gradients_of_its_function():
    # The mask is drawn once per call from the global generator (same seed, same mask): gradcheck
    # in float64 checks the input's gradient against finite differences, and the plain autograd
    # ops over that same mask give the adapters' gradients, 1/(1-p) included.
    m = LoRALinear(torch.nn.Linear(12, 10, bias=False).double(), r=3, alpha=6, dropout=0.3,
                   dtype=torch.float64).train()
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(2, 5, 12, dtype=torch.float64)

    def node(m, x):
        torch.manual_seed(0)
        return m(x)

    assert torch.autograd.gradcheck(lambda x: node(m, x), (x.clone().requires_grad_(),))
    torch.manual_seed(0)
    mask = dropout_keep_mask((10, 12), 0.3, x.device).view(2, 5, 12)
    assert 0 < mask.sum() < mask.numel()
    got, want = _grads(m, x, node), _grads(m, x, lambda m, x: _module_path(m, x, mask))
    for name, a, b in zip(("output", "x", "A", "B"), got, want):
        assert rel(a, b) < 1e-12, (name, rel(a, b))


def test_dropout_keep_mask_keeps_with_probability_1_minus_p():
    torch.manual_seed(0)
    for p in (0.05, 0.5):
        mask = dropout_keep_mask((400, 500), p, torch.device("cpu"))
        assert mask.dtype == torch.bool and mask.shape == (400, 500)
        # 200,000 draws: the standard error of the kept share is below 0.0012
        assert abs(mask.float().mean().item() - (1 - p)) < 0.005
        assert abs(mask[:, ::2].float().mean().item() - mask[:, 1::2].float().mean().item()) < 0.01  # both halves
    torch.manual_seed(1)
    a = dropout_keep_mask((7, 9), 0.3, torch.device("cpu"))
    torch.manual_seed(1)
    assert torch.equal(a, dropout_keep_mask((7, 9), 0.3, torch.device("cpu")))  # the global generator's


def test_lora_state_dict_round_trip():
    lm = _randomise(apply_lora(_base(), LoraConfig(r=4)))
    state = {k: v.clone() for k, v in lora_state_dict(lm).items()}
    assert len(state) == 2 * 7 * 2 and "layers.0.attention.wq.lora_A" in state
    other = apply_lora(_base(), LoraConfig(r=4))
    load_lora_state_dict(other, state)
    x = _tokens(lm.args)
    with torch.no_grad():
        assert torch.equal(other(x), lm(x))
    with pytest.raises(ValueError, match="missing keys"):
        load_lora_state_dict(other, {k: v for k, v in state.items() if "wq" not in k})
    with pytest.raises(ValueError, match="shape"):
        load_lora_state_dict(apply_lora(_base(), LoraConfig(r=2)), state)


# --- QLoRA: adapters over int8 / int4 bases ----------------------------------------------------


def _amx() -> bool:
    # int8's many-row products run in bf16 (quant.bf16_matmul: AMX or AVX512_BF16)
    return bf16_matmul()


def _dequantised(model):
    """The same adapters over float copies of the quantised weights (the math QLoRA computes)."""
    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if isinstance(m, QuantizedLinear):
            ref.set_submodule(name, dense_linear(m))
    return ref


def _loss_backward(model, x):
    model.zero_grad()
    logits = model.train()(x)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora_trains_only_adapters_and_merges_to_a_float_model(mode):
    # Every projection quantised, the output layer too, as `llamaworks quantize` writes them.
    q = quantize_model(_base(), mode, group_size=32)
    lm = _randomise(apply_lora(q, LoraConfig(r=4, alpha=8)), std=0.05)
    assert isinstance(lm.layers[0].attention.wq.base_layer, QuantizedLinear)
    ref = _dequantised(lm)  # the same adapters over float copies of the dequantised weights
    trainable = {f"{n}.{part}" for n, _ in lora_layers(lm) for part in ("lora_A", "lora_B")}
    # 2 x 40 = 80 rows: the quantised layers dequantise and multiply in fp32 (int8 on CPUs with
    # AMX: in bf16), so the adapters' gradients are those through the float weights up to fp32
    # rounding (measured 2.5e-6 for int8, 0 for int4). 2 x 10 = 20 rows: on CPU the fused
    # kernels run the forward with bf16 activations (2^-9 relative rounding per layer, through
    # every layer of the backward too): measured 2.3% of the gradient's norm, bounded at 6%.
    for rows, bound in ((40, 5e-2 if mode == "int8" and _amx() else 1e-4), (10, 6e-2)):
        x = _tokens(lm.args, (2, rows))
        _loss_backward(lm, x)
        _loss_backward(ref, x)
        assert {n for n, p in lm.named_parameters() if p.requires_grad} == trainable
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(lm))
        assert all(b.grad is None for b in lm.buffers())
        for (name, a), (_, b) in zip(lora_layers(lm), lora_layers(ref)):
            assert rel(a.lora_A.grad, b.lora_A.grad) < bound and rel(a.lora_B.grad, b.lora_B.grad) < bound, name
    # Merging dequantises, adds B A and leaves no quantised layer (the output layer included).
    lm.eval()
    merged = merge_adapter(copy.deepcopy(lm))
    assert not any(isinstance(m, QuantizedLinear) for m in merged.modules()) and not lora_layers(merged)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    # 80 rows again: merged and unmerged differ by fp32 reassociation only, (x W^T) s vs
    # x (W s)^T and x W^T + s x A^T B^T vs x (W + s B A)^T (int8 with AMX: bf16 products).
    x = _tokens(lm.args, (2, 40))
    with torch.no_grad():
        want, got = lm(x), merged(x)
    assert rel(got, want) < (2e-2 if mode == "int8" and _amx() else 1e-5)


# --- PEFT's adapter files ----------------------------------------------------------------------

def _peft():
    pytest.importorskip("transformers")
    return pytest.importorskip("peft")  # a test dependency only: llamaworks never imports it


def _hf_model(base):
    from transformers import LlamaConfig, LlamaForCausalLM

    args = base.args
    cfg = LlamaConfig(**hf_config_dict(args))
    cfg._attn_implementation = "eager"
    hf = LlamaForCausalLM(cfg).eval()
    hf.load_state_dict(to_hf_state_dict(base.state_dict(), args), strict=True)
    return hf


def _peft_factors(peft_model, hf_name):
    m = peft_model.base_model.model.get_submodule(hf_name)
    return m.lora_A["default"].weight, m.lora_B["default"].weight


def test_saved_adapter_layout(tmp_path):
    lm = _randomise(apply_lora(_base(), LoraConfig(r=4, alpha=16, dropout=0.05)))
    save_adapter(lm, LoraConfig(r=4, alpha=16, dropout=0.05), tmp_path / "ad", base_model="tiny-base")
    cfg = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 16, 0.05)
    assert sorted(cfg["target_modules"]) == sorted(HF_NAMES) and cfg["base_model_name_or_path"] == "tiny-base"
    state = read_safetensors(tmp_path / "ad" / ADAPTER_WEIGHTS)
    assert len(state) == 28
    wk = lm.layers[1].attention.wk
    a = state[f"{PEFT_PREFIX}model.layers.1.self_attn.k_proj.lora_A.weight"]
    b = state[f"{PEFT_PREFIX}model.layers.1.self_attn.k_proj.lora_B.weight"]
    assert torch.equal(a, wk.lora_A) and not torch.equal(b, wk.lora_B)  # B's rows in transformers' order
    assert torch.equal(b, permute_for_hf(wk.lora_B.detach(), 2))
    # with adapters in some blocks only, target_modules names the modules themselves
    some = apply_lora(_base(), LoraConfig(target_modules=["wv"]))
    some.layers[1].attention.wv = some.layers[1].attention.wv.merge()
    save_adapter(some, None, tmp_path / "some")
    assert json.loads((tmp_path / "some" / ADAPTER_CONFIG).read_text())["target_modules"] == [
        "model.layers.0.self_attn.v_proj"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_loads_our_adapter_with_our_logits(variant, tmp_path):
    peft = _peft()
    base = _base(variant)
    lm = _randomise(apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=16)))
    save_adapter(lm, LoraConfig(r=4, alpha=16), tmp_path / "ad")
    theirs = peft.PeftModel.from_pretrained(_hf_model(base), str(tmp_path / "ad")).eval()
    x = _tokens(base.args, (2, 16))
    with torch.no_grad():
        ours = lm(x)
        assert ours.abs().max() > 1.0 and rel(ours, base(x)) > 0.05
        torch.testing.assert_close(theirs(input_ids=x).logits, ours, atol=1e-5, rtol=1e-5)
        # PEFT's own merge agrees with ours too
        torch.testing.assert_close(theirs.merge_and_unload()(input_ids=x).logits, merge_adapter(lm)(x),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant,extra", [
    ("mha", {}),
    ("gqa", dict(use_rslora=True)),
    ("gqa", dict(rank_pattern={"k_proj": 2, "model.layers.1.mlp.down_proj": 6}, alpha_pattern={"q_proj": 3})),
    ("mha", dict(layers_to_transform=[1], target_modules=["q_proj", "k_proj", "down_proj"])),
])
def test_we_load_a_peft_adapter_with_its_logits(variant, extra, tmp_path):
    peft = _peft()
    base = _base(variant)
    cfg = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": HF_NAMES, "task_type": "CAUSAL_LM", **extra})
    theirs = peft.get_peft_model(_hf_model(base), cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = copy.deepcopy(base)
    got = load_adapter(ours, tmp_path / "peft")
    assert (got.r, got.alpha, got.use_rslora) == (4, 8, extra.get("use_rslora", False))
    x = _tokens(base.args, (2, 16))
    with torch.no_grad():
        want = theirs.eval()(input_ids=x).logits
        assert rel(want, base(x)) > 0.05
        torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=1e-5)
    if "rank_pattern" in extra:
        assert ours.layers[0].attention.wk.r == 2 and ours.layers[1].feed_forward.w2.r == 6
        assert ours.layers[0].attention.wq.scaling == 3 / 4
    if "layers_to_transform" in extra:
        assert [n for n, _ in lora_layers(ours)] == ["layers.1.attention.wq", "layers.1.attention.wk",
                                                     "layers.1.feed_forward.w2"]
    # and back: what we save from it PEFT loads with the same logits (patterns included)
    save_adapter(ours, got, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(_hf_model(base), str(tmp_path / "again")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, want, atol=1e-5, rtol=1e-5)


def test_one_adamw_step_equals_peft(tmp_path):
    peft = _peft()
    base = _base("gqa")
    ours = _randomise(apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=16)), std=0.05)
    save_adapter(ours, None, tmp_path / "init")  # the same initial adapters on both sides
    theirs = peft.PeftModel.from_pretrained(_hf_model(base), str(tmp_path / "init"), is_trainable=True)
    theirs_params = [p for p in theirs.parameters() if p.requires_grad]
    assert len(theirs_params) == len(lora_parameters(ours)) == 28
    settings = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt_ours = torch.optim.AdamW(lora_parameters(ours), **settings)
    opt_theirs = torch.optim.AdamW(theirs_params, **settings)
    x = _tokens(base.args, (2, 16), seed=7)

    def loss_of(logits):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())

    loss_ours, loss_theirs = loss_of(ours.train()(x)), loss_of(theirs.train()(input_ids=x).logits)
    torch.testing.assert_close(loss_ours, loss_theirs, atol=1e-5, rtol=0)
    loss_ours.backward()
    loss_theirs.backward()
    names = hf_module_names(base.args)
    heads = {"wq": base.args.n_heads, "wk": base.args.n_kv_heads}

    def in_hf_order(name, b):
        h = heads.get(name.rpartition(".")[2])
        return permute_for_hf(b, h) if h else b

    for name, m in lora_layers(ours):
        a, b = _peft_factors(theirs, names[name])
        torch.testing.assert_close(m.lora_A.grad, a.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(in_hf_order(name, m.lora_B.grad), b.grad, atol=1e-6, rtol=1e-4)
    opt_ours.step()
    opt_theirs.step()
    for name, m in lora_layers(ours):
        a, b = _peft_factors(theirs, names[name])
        torch.testing.assert_close(m.lora_A.detach(), a.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(in_hf_order(name, m.lora_B.detach()), b.detach(), atol=1e-5, rtol=0)
    # the step did move the adapters (Adam's first step: about lr per element)
    init = read_safetensors(tmp_path / "init" / ADAPTER_WEIGHTS)
    a0 = init[f"{PEFT_PREFIX}model.layers.0.self_attn.v_proj.lora_A.weight"]
    assert (lora_state_dict(ours)["layers.0.attention.wv.lora_A"] - a0).abs().max() > 5e-3


def _write_adapter(tmp_path, name="ad", **changes):
    lm = _randomise(apply_lora(_base(), LoraConfig(r=4)))
    path = save_adapter(lm, None, tmp_path / name)
    cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    cfg.update(changes)
    (path / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("changes,match", [
    (dict(use_dora=True), "use_dora is True"),
    (dict(bias="lora_only"), "bias is 'lora_only'"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save is \\['lm_head'\\]"),
    (dict(peft_type="IA3"), "peft_type is 'IA3'"),
    (dict(task_type="SEQ_CLS"), "task_type is 'SEQ_CLS'"),
    (dict(init_lora_weights="pissa"), "init_lora_weights is 'pissa'"),
    (dict(lora_bias=True), "lora_bias is True"),
    (dict(trainable_token_indices=[3]), "trainable_token_indices"),
    (dict(r=8), "has rank 4 but adapter_config.json says r = 8"),
    (dict(rank_pattern={"q_proj": 2}), "rank_pattern\\['q_proj'\\] = 2"),
    (dict(lora_dropout=2), "lora_dropout must be a probability"),
])
def test_unsupported_adapter_configs_are_refused_by_name(tmp_path, changes, match):
    path = _write_adapter(tmp_path, **changes)
    model = _base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match) as e:
        load_adapter(model, path)
    assert "adapter_config.json" in str(e.value)
    assert not lora_layers(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_adapter_tensors_that_do_not_fit_are_refused(tmp_path):
    path = _write_adapter(tmp_path)
    file = path / ADAPTER_WEIGHTS
    state = {k: v.clone() for k, v in read_safetensors(file).items()}
    with pytest.raises(ValueError, match="another base model"):  # 2 layers' adapters on a 1-layer model
        other = build_model(ModelArgs(**{**TINY, "n_layers": 1}, n_kv_heads=2))
        load_adapter(other, path)
    with pytest.raises(ValueError, match="but this model's projection is 128 x"):  # another width
        load_adapter(build_model(ModelArgs(**{**TINY, "dim": 128}, n_kv_heads=2)), path)
    key = f"{PEFT_PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"
    save_safetensors({k: v for k, v in state.items() if k != key}, file)
    with pytest.raises(ValueError, match="q_proj.lora_B.weight is missing"):
        load_adapter(_base(), path)
    save_safetensors({**state, f"{PEFT_PREFIX}model.embed_tokens.lora_embedding_A": torch.zeros(4, 256)}, file)
    with pytest.raises(ValueError, match="LoRA on embeddings is not supported"):
        load_adapter(_base(), path)
    with pytest.raises(FileNotFoundError, match="adapter"):
        load_adapter(_base(), tmp_path / "nowhere")


# --- commands ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    model, _ = load_model(tiny_model_dir)
    lm = _randomise(apply_lora(model, LoraConfig(r=4, alpha=8)), std=0.2)
    return save_adapter(lm, None, tmp_path_factory.mktemp("adapters") / "tiny-lora", base_model=str(tiny_model_dir))


def test_merge_command_writes_a_loadable_model_directory(tiny_model_dir, adapter_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert cli_main(["merge", "--checkpoint", str(tiny_model_dir), "--adapter", str(adapter_dir),
                     "--out", str(out)]) == 0
    assert "14 projections merged" in capsys.readouterr().err
    merged, tok = load_model(out)
    unmerged, _ = load_model(tiny_model_dir, adapter=adapter_dir)
    assert tok is not None and not lora_layers(merged) and len(lora_layers(unmerged)) == 14
    x = torch.randint(3, merged.args.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = load_model(tiny_model_dir)[0](x)
        want = unmerged(x)
        assert rel(want, base) > 1e-2
        # fp32 reassociation (x W^T + s (x A^T) B^T vs x (W + s B A)^T) through two blocks
        torch.testing.assert_close(merged(x), want, atol=5e-5, rtol=1e-5)
    # generate --adapter (unmerged) gives the merged model's greedy text
    texts = []
    for argv in (["--checkpoint", str(tiny_model_dir), "--adapter", str(adapter_dir)], ["--checkpoint", str(out)]):
        assert cli_main(["generate", *argv, "--prompt", "the king", "--max-new-tokens", "8", "--temperature", "0",
                         "--device", "cpu"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]
    with pytest.raises(ValueError, match="--out must differ from --checkpoint"):
        merge_command(str(tiny_model_dir), str(adapter_dir), str(tiny_model_dir))
    assert cli_main(["merge", "--checkpoint", str(tiny_model_dir), "--adapter", str(tmp_path / "none"),
                     "--out", str(tmp_path / "x")]) == 2
    assert "adapter" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_merge_over_a_quantised_base_writes_a_plain_directory(tiny_model_dir, adapter_dir, tmp_path):
    q = tmp_path / "q8"
    assert quantize_command(str(tiny_model_dir), str(q), "int8") == 0
    out = tmp_path / "merged"
    assert merge_command(str(q), str(adapter_dir), str(out)) == 0
    assert not (out / QUANT_FILE).exists()
    merged, _ = load_model(out)
    assert not any(isinstance(m, QuantizedLinear) for m in merged.modules())
    unmerged, _ = load_model(q, adapter=adapter_dir)
    assert isinstance(unmerged.layers[0].attention.wq, LoRALinear)
    assert isinstance(unmerged.layers[0].attention.wq.base_layer, QuantizedLinear)
    x = torch.randint(3, merged.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel(merged(x), unmerged(x)) < (2e-2 if _amx() else 1e-5)


# --- fused models (inference/fuse.py) ----------------------------------------------------------


def test_apply_lora_on_a_fused_model_unfuses_it_first(tmp_path):
    from llamaworks.inference.fuse import fuse_projections, is_fused

    plain, fused = _base(), _base()
    assert fuse_projections(fused) == 4 and is_fused(fused)
    cfg = LoraConfig(r=4, alpha=16)
    a, b = _randomise(apply_lora(plain, cfg)), _randomise(apply_lora(fused, cfg))
    assert not is_fused(b) and [n for n, _ in lora_layers(b)] == [n for n, _ in lora_layers(a)]
    x = _tokens(a.args)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), atol=1e-6, rtol=1e-6)
    # the adapter files keep PEFT's module names, as from the unfused model
    save_adapter(a, cfg, tmp_path / "a")
    save_adapter(b, cfg, tmp_path / "b")
    sa, sb = read_safetensors(tmp_path / "a" / ADAPTER_WEIGHTS), read_safetensors(tmp_path / "b" / ADAPTER_WEIGHTS)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("targets", [DEFAULT_TARGETS, ("wq", "wv", "w2")])
def test_an_adapter_over_a_fused_model_gives_the_unfused_logits(tiny_model_dir, tmp_path, targets):
    from llamaworks.inference.fuse import FusedFeedForward, is_fused
    from llamaworks.inference.generate import generate

    model, _ = load_model(tiny_model_dir, fuse=False)
    lm = _randomise(apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=targets)), std=0.2)
    adapter = save_adapter(lm, None, tmp_path / "ad")
    fused, tok = load_model(tiny_model_dir, adapter=adapter)  # fuse=True is the default
    plain, _ = load_model(tiny_model_dir, adapter=adapter, fuse=False)
    assert not is_fused(plain) and len(lora_layers(fused)) == len(lora_layers(plain)) > 0
    # unadapted projections still fuse: w1/w3 when only wq, wv and w2 carry adapters
    assert is_fused(fused) == (targets != DEFAULT_TARGETS)
    assert isinstance(fused.layers[0].feed_forward, FusedFeedForward) == (targets != DEFAULT_TARGETS)
    # also onto a model fused before the adapter is loaded
    late, _ = load_model(tiny_model_dir)
    assert is_fused(late)
    load_adapter(late, adapter)
    x = torch.randint(3, plain.args.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = plain(x)
        assert rel(want, load_model(tiny_model_dir)[0](x)) > 1e-2  # the adapter changes the logits
        torch.testing.assert_close(fused(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(late(x), want, atol=1e-5, rtol=1e-5)
    outs = [generate(m, tok, ["the king"], max_new_tokens=8, temperature=0)[0].text for m in (fused, plain)]
    assert outs[0] == outs[1]


def test_a_frozen_base_cast_to_bf16_computes_what_autocast_does():
    """cast_frozen_base stores the frozen projections under the adapters in bf16 once:
    under bf16 autocast the loss and the adapters' gradients are those of the fp32 base, exactly."""
    from llamaworks.inference.lora import cast_frozen_base
    from llamaworks.train.loss import lm_loss

    lm = _randomise(apply_lora(_base().train(), LoraConfig(r=4, alpha=16)))
    cast = copy.deepcopy(lm)
    assert cast_frozen_base(cast, torch.bfloat16) == 14
    assert cast.layers[0].attention.wq.base_layer.weight.dtype == torch.bfloat16
    assert cast.output.weight.dtype == torch.float32 and cast.tok_embeddings.weight.dtype == torch.float32
    assert {p.dtype for p in lora_parameters(cast)} == {torch.float32}
    x = _tokens(lm.args, (2, 16))
    results = []
    for m in (lm, cast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss(m, x, torch.roll(x, -1, 1))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in lora_parameters(m)]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    with torch.no_grad():  # inference without autocast: the bf16 base takes its input in bf16
        assert cast.eval()(x).isfinite().all()
