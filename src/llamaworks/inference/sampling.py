"""Sampling policy as pure functions: greedy, temperature, top-k, nucleus (top-p).

Defaults are Meta's example.py for LLaMA 1 (temperature 0.8, top-p 0.95).
"""

from __future__ import annotations

import torch

# Meta's example.py defaults for LLaMA 1.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95

# Temperatures below float32's smallest normal number (2**-126, ~1.18e-38) sample greedily.
# Logits are divided by the temperature in float32: a temperature below this is subnormal
# there (it has lost precision, and below ~7e-46 it is 0, giving 0/0 = NaN), and the
# distribution it describes is already the greedy one to float32's resolution (a gap of
# one ulp between two logits of size 1 becomes ~1e31 nats). Above it the division cannot
# overflow to +inf either, because the logits are shifted so that the largest is 0 first.
GREEDY_BELOW = torch.finfo(torch.float32).tiny


def is_greedy(temperature: float) -> bool:
    """Whether sampling at this temperature is the argmax (0, negative or below GREEDY_BELOW)."""
    return temperature < GREEDY_BELOW


def probabilities(logits: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE, top_k: int | None = None,
                  top_p: float = DEFAULT_TOP_P) -> torch.Tensor:
    """The distribution sampling draws from: (bsz, vocab) logits -> probabilities after the
    temperature, top-k and nucleus filters; a greedy temperature (is_greedy) gives the
    argmax all the mass, the limit of the distribution as the temperature goes to 0."""
    logits = logits.float()
    if is_greedy(temperature):
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    # Shifted so the largest is 0: dividing by a tiny temperature then gives 0 and -inf at
    # worst (probability 1 and 0), never +inf, whose inf - inf inside softmax is NaN.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
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
    """Next token ids (bsz,) from logits (bsz, vocab). A temperature below GREEDY_BELOW
    (0 included) is greedy.

    `noise` is Exp(1) noise of the logits' shape: argmax(p / noise) is a sample from p
    (the exponential-race form of the Gumbel trick), which needs no multinomial sync and
    lets the caller own the random stream.
    """
    if is_greedy(temperature):
        return logits.argmax(dim=-1)
    probs = probabilities(logits, temperature, top_k, top_p)
    if noise is None:
        noise = torch.empty_like(probs).exponential_(1)
    return (probs / noise).argmax(dim=-1)
