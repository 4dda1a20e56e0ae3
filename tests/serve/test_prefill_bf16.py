"""`serve --prefill-bf16` (kernels.Bf16PrefillLinear, issue 18): an fp32 model's prompt products in
bf16 from a copy of the weights, decode products and the state dict unchanged."""

from __future__ import annotations

import pytest
import torch

from llamaworks.inference import native
from llamaworks.inference.fuse import fuse_projections
from llamaworks.inference.kernels import Bf16PrefillLinear, NativeLinear, use_bf16_prefill, use_native_kernels
from llamaworks.inference.paged import setup_paged_caches
from llamaworks.model import ModelArgs, build_model
from llamaworks.serve.engine import Engine, Request

from .test_paged import _run_all

pytestmark = pytest.mark.skipif(not native.available(), reason="the native kernels are not built")


def _model(bf16: bool):
    model = build_model(ModelArgs.from_name("tiny", n_layers=2), seed=0).eval()
    fuse_projections(model)
    use_native_kernels(model)
    if bf16:
        assert use_bf16_prefill(model) == 2 * 4 + 1  # wqkv, wo, w13, w2 per block, and the output layer
    return model


def test_prefill_products_in_bf16_decode_products_and_state_dict_unchanged():
    plain, bf16 = _model(False), _model(True)
    assert all(type(m) is Bf16PrefillLinear for m in bf16.modules() if isinstance(m, NativeLinear))
    sd, sd16 = plain.state_dict(), bf16.state_dict()
    assert sd.keys() == sd16.keys() and all(torch.equal(sd[k], sd16[k]) for k in sd)
    layer, layer16 = plain.layers[0].feed_forward.w2, bf16.layers[0].feed_forward.w2
    x = torch.randn(3, 40, layer.in_features)
    with torch.no_grad():
        rows = layer16(x)  # 120 rows: the bf16 product
        assert rows.dtype == torch.float32
        want = torch.nn.functional.linear(x.bfloat16(), layer.weight.bfloat16()).float()
        torch.testing.assert_close(rows, want, atol=1e-5, rtol=1e-5)
        assert not torch.equal(rows, layer(x))  # it is not the fp32 product
        torch.testing.assert_close(rows, layer(x), atol=0.05, rtol=0.05)
        one = x[:1, :4]  # 4 rows: decode, the fp32 native kernel bit for bit
        assert torch.equal(layer16(one), layer(one))


def test_a_prefill_in_bf16_gives_logits_close_to_fp32():
    prompt = torch.randint(0, 512, (1, 60), generator=torch.Generator().manual_seed(0))
    out = {}
    for bf16 in (False, True):
        model = _model(bf16)
        table = setup_paged_caches(model, 32, 16, 128)
        table.blocks = torch.arange(1, 5).unsqueeze(0)
        with torch.no_grad():
            out[bf16] = model(prompt, torch.arange(60))
    assert (out[True] - out[False]).abs().max() < 0.1 * out[False].abs().max()


def test_an_engine_serves_with_bf16_prefill(tiny_model_dir, tiny_tokenizer):
    from llamaworks.inference.load import load_model

    model, tok = load_model(tiny_model_dir)
    assert use_bf16_prefill(model) > 0
    eng = Engine(model.eval(), tok, max_batch=2, block_size=4).start()
    try:
        reqs = _run_all(eng, [Request(tok.encode("O fair lady of the night, speak to me of the moon"), 8, stop_ids=()),
                              Request(tok.encode("The king"), 8, stop_ids=())])
    finally:
        eng.stop(cancel=True, timeout=30)
    assert all(len(r.tokens) == 8 for r in reqs)


def test_serve_refuses_prefill_bf16_under_tensor_parallelism(tiny_model_dir):
    from llamaworks.serve.command import serve_command

    with pytest.raises(ValueError, match="--prefill-bf16 runs in one process"):
        serve_command(str(tiny_model_dir), prefill_bf16=True, tp=2)
