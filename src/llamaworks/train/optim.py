"""AdamW with the paper's hyper-parameters (section 2.3) and its weight-decay groups."""

from __future__ import annotations

import torch
from torch import nn

from llamaworks.train.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the matrices (linear weights and embeddings); exempt the RMSNorm gains.

    A norm gain is a per-channel scale, not capacity: decaying it towards 0 shrinks the
    signal fed to every sub-layer instead of regularising. Same split as GPT-3/nanoGPT
    (tensors with fewer than two dimensions are not decayed).
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    kwargs = {}
    if next(model.parameters()).device.type in ("cuda", "cpu"):
        # One pass over each parameter's weight, gradient and moments. On CPU the foreach
        # variant falls back to a loop of per-tensor kernels: for 60M parameters on 2 cores,
        # 0.4 s against 0.1 s a step (single thread), 1.4 s against 0.26 s with other jobs
        # competing for the cores. The fused CPU kernel exists since torch 2.4.
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, **kwargs)
