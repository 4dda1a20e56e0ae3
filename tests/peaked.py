"""Random weights larger than init_weights' (std 0.02): peaked logits, so greedy tokens are stable
across backends and layout mistakes (a wrong q/k permutation, RoPE settings) change them.
Imported by test modules (tests/ is on sys.path)."""

from __future__ import annotations

import torch


def sharpen(model, seed: int = 0, std: float = 0.1, norm_std: float = 0.1):
    """Fill every weight with N(0, std) noise and the norm gains with 1 + N(0, norm_std); eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + norm_std * noise if name.endswith("norm.weight") else std * noise)
    return model.eval()
