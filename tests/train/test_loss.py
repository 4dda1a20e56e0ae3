"""The fused output-projection + cross-entropy loss against the plain logits -> F.cross_entropy path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamaworks.model import ModelArgs, build_model
from llamaworks.train.loss import fused_linear_cross_entropy, lm_loss


def _reference(h, w, y, ignore_index=-100):
    return F.cross_entropy((h @ w.T).flatten(0, -2).float(), y.flatten(), ignore_index=ignore_index)


@pytest.mark.parametrize("chunk_rows", [1, 7, 16, 1024])
def test_loss_and_gradients_match_cross_entropy(chunk_rows):
    torch.manual_seed(0)
    h = torch.randn(3, 11, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    y = torch.randint(0, 50, (3, 11))
    y[0, 2], y[2, :4] = -100, -100  # ignored targets: no loss, no gradient, not in the mean
    ref = _reference(h, w, y)
    ref_grads = torch.autograd.grad(ref * 2.5, (h, w))  # a non-unit incoming gradient
    got = fused_linear_cross_entropy(h, w, y, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(got * 2.5, (h, w))
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


def test_rows_without_a_target_get_no_logits():
    """A fine-tuning prompt's rows are never multiplied by the output layer; the result and the
    gradients are those of the full logits (zero for those rows)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LogitRows(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket is torch.ops.aten.mm and out.shape[-1] == 50:  # (rows, vocab): logits
                LogitRows.rows += out.shape[0]
            return out

    torch.manual_seed(3)
    h = torch.randn(4, 9, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    y = torch.randint(0, 50, (4, 9))
    y[:, :5] = -100  # the prompts: 20 of 36 rows
    with LogitRows():
        got = fused_linear_cross_entropy(h, w, y, chunk_rows=7)
    assert LogitRows.rows == 16
    ref = _reference(h, w, y)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    for g, r in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(ref, (h, w))):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    assert torch.equal(torch.autograd.grad(fused_linear_cross_entropy(h, w, y), h)[0][:, :5], torch.zeros(4, 5, 16))
    y[:] = -100  # no target at all: NaN, as F.cross_entropy gives
    assert fused_linear_cross_entropy(h, w, y).isnan() and _reference(h, w, y).isnan()


def test_gradients_accumulate_and_only_requested_ones_are_computed():
    torch.manual_seed(1)
    h = torch.randn(20, 8, requires_grad=True)
    w = torch.randn(30, 8)  # frozen output layer
    y = torch.randint(0, 30, (20,))
    for _ in range(2):
        fused_linear_cross_entropy(h, w, y, chunk_rows=6).backward()
    ref = h.detach().clone().requires_grad_()
    for _ in range(2):
        _reference(ref, w, y).backward()
    torch.testing.assert_close(h.grad, ref.grad, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_cross_entropy(h, w, y), _reference(h, w, y))


def test_autocast_bf16_runs_matmuls_in_bf16_and_returns_fp32_gradients():
    torch.manual_seed(2)
    h = torch.randn(24, 32, requires_grad=True)
    w = torch.randn(40, 32, requires_grad=True)
    y = torch.randint(0, 40, (24,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_linear_cross_entropy(h, w, y, chunk_rows=10)
        ref = F.cross_entropy(h @ w.T, y)  # autocast: bf16 matmul, fp32 cross-entropy
    assert got.dtype == torch.float32
    gh, gw = torch.autograd.grad(got, (h, w))
    rh, rw = torch.autograd.grad(ref, (h, w))
    assert gh.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(gh, rh, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gw, rw, atol=2e-2, rtol=2e-2)


def test_lm_loss_fused_equals_unfused_on_a_model():
    args = ModelArgs.from_name("tiny", n_layers=2)
    model = build_model(args, seed=0)
    tokens = torch.randint(0, args.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    losses, grads = [], []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        loss = lm_loss(model, x, y, fused=fused)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_return_hidden_is_what_the_output_layer_reads():
    args = ModelArgs.from_name("tiny", n_layers=2)
    model = build_model(args, seed=0)
    tokens = torch.randint(0, args.vocab_size, (2, 9))
    with torch.no_grad():
        h = model(tokens, return_hidden=True)
        assert h.shape == (2, 9, args.dim)
        assert torch.equal(model.output(h).float(), model(tokens))
