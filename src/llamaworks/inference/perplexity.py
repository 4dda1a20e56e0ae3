"""Perplexity of a model on a token sequence: the quality column beside quantised speed."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, ids: list[int], seq_len: int | None = None, batch_size: int = 8) -> float:
    """exp(mean next-token loss) over `ids` cut into non-overlapping windows of seq_len
    (default: the model's context); each window is scored from its own start."""
    seq_len = min(seq_len or model.args.max_seq_len, model.args.max_seq_len)
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"perplexity needs more than {seq_len} tokens, got {len(ids)}; give a longer text "
                         "or a shorter seq_len")
    device = model.tok_embeddings.weight.device
    data = torch.tensor(ids[: n * seq_len + 1], device=device)
    x = data[:-1].view(n, seq_len)
    y = data[1:].view(n, seq_len)
    total = 0.0
    for i in range(0, n, batch_size):
        logits = model(x[i: i + batch_size])
        total += F.cross_entropy(logits.flatten(0, 1).float(), y[i: i + batch_size].flatten(), reduction="sum").item()
    return math.exp(total / (n * seq_len))
