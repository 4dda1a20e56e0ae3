"""AdamW construction: the paper's hyper-parameters, decay groups, the fused kernel."""

from __future__ import annotations

import torch

from llamaworks.model import ModelArgs, build_model
from llamaworks.train.config import OptimConfig
from llamaworks.train.optim import build_optimizer


def test_adamw_groups_hyperparameters_and_fused_kernel_on_cpu():
    model = build_model(ModelArgs.from_name("tiny", n_layers=2), seed=0)
    opt = build_optimizer(model, OptimConfig())
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["fused"] is True


def test_fused_step_matches_the_reference_implementation():
    torch.manual_seed(0)
    a = build_model(ModelArgs.from_name("tiny", n_layers=1), seed=0)
    b = build_model(ModelArgs.from_name("tiny", n_layers=1), seed=0)
    opt_a = build_optimizer(a, OptimConfig(lr=1e-2))
    cfg = OptimConfig(lr=1e-2)
    opt_b = torch.optim.AdamW([{"params": [p for p in b.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                               {"params": [p for p in b.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                              lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)
    for _ in range(3):
        for m in (a, b):
            for p in m.parameters():
                p.grad = torch.ones_like(p) * 0.01 + p.detach() * 0.1
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)
