"""Sampling policy as pure functions: greedy, temperature, top-k, nucleus (top-p).

Defaults are Meta's example.py for LLaMA 1 (temperature 0.8, top-p 0.95).
"""

from __future__ import annotations

import torch

# Meta's example.py defaults for LLaMA 1.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95


def probabilities(logits: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE, top_k: int | None = None,
                  top_p: float = DEFAULT_TOP_P) -> torch.Tensor:
    """The distribution sampling draws from: (bsz, vocab) logits -> probabilities after the
    temperature, top-k and nucleus filters (temperature must be > 0)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (bsz, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        # Nucleus (Holtzman et al. 2020) as in Meta's sample_top_p: keep the smallest prefix of
        # the sorted distribution whose mass reaches top_p (the top token is always kept).
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE, top_k: int | None = None,
           top_p: float = DEFAULT_TOP_P, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (bsz,) from logits (bsz, vocab). temperature <= 0 is greedy.

    `noise` is Exp(1) noise of the logits' shape: argmax(p / noise) is a sample from p
    (the exponential-race form of the Gumbel trick), which needs no multinomial sync and
    lets the caller own the random stream.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, temperature, top_k, top_p)
    if noise is None:
        noise = torch.empty_like(probs).exponential_(1)
    return (probs / noise).argmax(dim=-1)
