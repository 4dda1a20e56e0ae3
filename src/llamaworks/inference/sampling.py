"""Sampling policy as pure functions: greedy, temperature, top-k, nucleus (top-p); for serving,
the same with per-row options in one batch, min-p, and the penalties and logit_bias (below).

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


# --- per-request options in one batch --------------------------------------------------------
#
# A serving batch holds requests with different options. Each option below is a tensor with
# one entry per row, so one call processes the whole batch; a row whose option is off (a
# penalty of 0, a repetition penalty of 1, min_p 0, top_k 0, top_p 1) is unchanged by it.
# The order is vLLM's and Hugging Face's: penalties and logit_bias on the model's logits,
# then the temperature, top-k, top-p and min-p on the distribution.


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019) as Hugging Face applies it: the logit of
    every token in the prompt or the output so far (`seen`, (bsz, vocab) bool) is divided by
    the row's penalty (bsz,) when positive and multiplied by it when negative."""
    p = penalty.to(logits.dtype).unsqueeze(-1)  # (bsz, 1)
    return torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                             frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties: logits -= presence * (count > 0) + frequency * count, where `counts`
    (bsz, vocab) counts each token in the output so far (the prompt is not counted)."""
    counts = counts.to(logits.dtype)
    return logits - presence.to(logits.dtype).unsqueeze(-1) * (counts > 0) \
        - frequency.to(logits.dtype).unsqueeze(-1) * counts


def logit_bias_vector(bias: dict[int, float], vocab_size: int) -> torch.Tensor:
    """A logit_bias mapping (token id -> bias in [-100, 100]) as a dense (vocab,) tensor to add
    to a row's logits; ValueError naming the id or value that is out of range."""
    out = torch.zeros(vocab_size, dtype=torch.float32)
    for token, value in bias.items():
        if not isinstance(token, int) or not 0 <= token < vocab_size:
            raise ValueError(f"logit_bias: token id {token!r} is not in [0, {vocab_size})")
        if not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise ValueError(f"logit_bias: the bias of token {token} must be a number in [-100, 100], got {value!r}")
        out[token] = float(value)
    return out


def filtered_probabilities(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                           top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """`probabilities` with per-row options: logits (bsz, vocab) and, each (bsz,), the
    temperature (rows below GREEDY_BELOW are given 1 here: callers take their argmax), top_k
    (0: off), top_p (1: off) and min_p (0: off; Nguyen et al. 2024: tokens less likely than
    min_p times the most likely one are dropped). A row with top_k, top_p and min_p off gets
    the same float32 arithmetic as `probabilities`, so a seeded sample is the same token."""
    logits = logits.float()
    bsz, vocab = logits.shape
    t = torch.where(temperature < GREEDY_BELOW, torch.ones_like(temperature), temperature).float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / t.unsqueeze(-1)
    k = top_k.to(torch.long)
    k = torch.where((k <= 0) | (k > vocab), torch.full_like(k, vocab), k)
    if bool((k < vocab).any()):
        ordered = torch.sort(logits, dim=-1, descending=True).values
        kth = ordered.gather(-1, (k - 1).unsqueeze(-1))  # (bsz, 1)
        logits = logits.masked_fill((logits < kth) & (k < vocab).unsqueeze(-1), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    nucleus = top_p < 1.0
    if bool(nucleus.any()):
        # As `probabilities`: keep the smallest prefix of the sorted distribution whose mass
        # reaches top_p; rows with top_p 1 keep their probabilities untouched.
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        drop = ((sorted_probs.cumsum(dim=-1) - sorted_probs) > top_p.float().unsqueeze(-1)) & nucleus.unsqueeze(-1)
        kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
        probs = torch.where(nucleus.unsqueeze(-1), kept / kept.sum(-1, keepdim=True), probs)
    floor = min_p > 0
    if bool(floor.any()):
        threshold = min_p.float().unsqueeze(-1) * probs.amax(dim=-1, keepdim=True)  # (bsz, 1)
        kept = probs.masked_fill(probs < threshold, 0.0)
        probs = torch.where(floor.unsqueeze(-1), kept / kept.sum(-1, keepdim=True), probs)
    return probs


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                min_p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Next ids (bsz,) from logits (bsz, vocab) with per-row options (filtered_probabilities);
    greedy rows (temperature below GREEDY_BELOW) take the argmax, the others argmax(p / noise)
    with `noise` Exp(1) of the logits' shape, as `sample`."""
    greedy = temperature < GREEDY_BELOW
    if bool(greedy.all()):
        return logits.argmax(dim=-1)
    probs = filtered_probabilities(logits, temperature, top_k, top_p, min_p)
    return torch.where(greedy, logits.argmax(dim=-1), (probs / noise).argmax(dim=-1))


class SamplingState:
    """What one running request's penalties and logit_bias read: counts of each token in its
    output (vocab,), the tokens of its prompt and output (vocab,) bool, its bias (vocab,) or
    None. The engine keeps one per request that uses any of them and updates it with each
    accepted token."""

    def __init__(self, vocab_size: int, prompt_ids: list[int], presence: float = 0.0, frequency: float = 0.0,
                 repetition: float = 1.0, bias: dict[int, float] | None = None, device=None):
        assert repetition > 0, repetition
        self.presence, self.frequency, self.repetition = float(presence), float(frequency), float(repetition)
        self.counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        if prompt_ids:
            self.seen[torch.tensor(prompt_ids, dtype=torch.long, device=device)] = True
        self.bias = logit_bias_vector(bias, vocab_size).to(device) if bias else None
        # On CPU the update goes through numpy views of the same memory: indexing a tensor with
        # a Python int is a few aten operators (~30 us per token and request, 6% of a `small`
        # decode step at batch 8), a numpy element update ~0.2 us.
        self._np = (self.counts.numpy(), self.seen.numpy()) if self.counts.device.type == "cpu" else None

    def update(self, token: int) -> None:
        if self._np is not None:
            self._np[0][token] += 1
            self._np[1][token] = True
        else:
            self.counts[token] += 1
            self.seen[token] = True

    @property
    def penalised(self) -> bool:
        """Whether any penalty is on (a logit_bias alone needs neither counts nor seen)."""
        return self.repetition != 1.0 or self.presence != 0.0 or self.frequency != 0.0


def apply_states(logits: torch.Tensor, states: list[SamplingState | None]) -> torch.Tensor:
    """The penalties and biases of each row's state (None: the row is unchanged) on logits
    (bsz, vocab), batched: one stacked tensor per quantity."""
    if all(s is None for s in states):
        return logits
    logits = logits.float()
    vocab = logits.shape[-1]
    live = [s for s in states if s is not None]
    size = live[0].counts.shape[0]
    assert size <= vocab, (size, vocab)  # a padded output layer may have more rows than the tokenizer

    def per_row(name: str, off: float) -> torch.Tensor:
        return torch.tensor([off if s is None else getattr(s, name) for s in states], device=logits.device)

    # With every penalty off (a logit_bias alone) the penalties change nothing: skipped.
    if any(s.penalised for s in live):
        zeros_i = torch.zeros(size, dtype=torch.int32, device=logits.device)
        zeros_b = torch.zeros(size, dtype=torch.bool, device=logits.device)
        counts = torch.stack([zeros_i if s is None else s.counts for s in states])  # (bsz, size)
        seen = torch.stack([zeros_b if s is None else s.seen for s in states])
        if size < vocab:
            counts = torch.nn.functional.pad(counts, (0, vocab - size))
            seen = torch.nn.functional.pad(seen, (0, vocab - size))
        logits = apply_repetition_penalty(logits, seen, per_row("repetition", 1.0))
        logits = apply_presence_frequency(logits, counts, per_row("presence", 0.0), per_row("frequency", 0.0))
    if any(s is not None and s.bias is not None for s in states):
        zeros_f = torch.zeros(size, dtype=torch.float32, device=logits.device)
        bias = torch.stack([zeros_f if s is None or s.bias is None else s.bias for s in states])
        logits = logits + torch.nn.functional.pad(bias, (0, vocab - size))
    return logits
