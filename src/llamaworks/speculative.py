"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) with a small draft model.

Each round the draft proposes k tokens one at a time, then the target scores all of them
in one forward over k+1 positions of its KV cache. Greedy: the longest prefix on which the
draft agrees with the target's argmax is kept, plus the target's own next token, so the
output is exactly the target's greedy output. Sampling: draft token x is kept with
probability min(1, p(x)/q(x)), the first rejected one is replaced by a sample of
max(0, p - q) (renormalised), which leaves the target's distribution p unchanged.

Rolling back costs nothing with the position-indexed static cache: a rejected token's
keys sit beyond the sequence's position, where the causal mask hides them until the next
round overwrites them. Batch size 1 (a server would run one draft per slot).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

import torch

from llamaworks.generate import Completion, _cache_len, _StopStream, check_prompt_lengths, probabilities


def _draw(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def accept(p: torch.Tensor, q: torch.Tensor, drafted: list[int], gen: torch.Generator) -> tuple[list[int], int]:
    """The rejection rule: p (k+1, vocab) target and q (k, vocab) draft probabilities at the
    k drafted positions (plus one more for p). Returns the new tokens (accepted drafts, then
    one token drawn from the residual or, when all were accepted, from p's last row) and the
    number of drafts accepted. Every emitted token is distributed as p."""
    new = []
    for i, d in enumerate(drafted):
        if torch.rand((), generator=gen, device=p.device) < p[i, d] / q[i, d]:
            new.append(d)
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        total = residual.sum()
        new.append(int(_draw(residual / total if total > 0 else p[i], gen)))
        return new, i
    new.append(int(_draw(p[len(drafted)], gen)))
    return new, len(drafted)


@torch.no_grad()
def speculative_ids(target, draft, prompt: list[int], max_new_tokens: int, *, k: int = 4, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float = 1.0, eos_id: int | None = None, seed: int | None = None,
                    on_tokens: Callable[[list[int]], None] | None = None) -> tuple[list[int], dict]:
    """New token ids for one prompt (ending at eos, included, or after max_new_tokens) and
    statistics: rounds, drafted, accepted, acceptance_rate, tokens_per_target_forward."""
    if k < 1:
        raise ValueError(f"the draft length k must be >= 1, got {k}; set --draft-k")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if draft.args.vocab_size != target.args.vocab_size:
        raise ValueError(f"the draft model's vocab_size {draft.args.vocab_size} differs from the target's "
                         f"{target.args.vocab_size}; the draft must use the target's tokenizer")
    if temperature > 0 and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    device = target.output.weight.device
    n = len(prompt)
    max_seq_len = min(target.args.max_seq_len, draft.args.max_seq_len)
    if n >= max_seq_len:
        raise ValueError(f"the prompt has {n} tokens but the context window is {max_seq_len}; shorten it")
    max_new_tokens = min(max_new_tokens, max_seq_len - n)
    cache = _cache_len(n + max_new_tokens, max_seq_len)
    target.setup_caches(1, cache)
    draft.setup_caches(1, cache)
    greedy = temperature <= 0
    gen = None
    if not greedy:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed if seed is not None else torch.seed())

    def pick(logits):  # (rows, vocab) -> (rows,) tokens, and the probabilities they came from
        if greedy:
            return logits.argmax(-1), None
        p = probabilities(logits, temperature, top_k, top_p)
        return _draw(p, gen), p

    ids = torch.tensor([prompt], device=device)
    pos = torch.arange(n, device=device)
    first, _ = pick(target(ids, pos)[:, -1])
    draft(ids, pos)
    out = [int(first)]
    # Tokens the draft has not yet seen, the last of them not yet in the target's cache either.
    pending = first.view(1, 1)
    stats = {"rounds": 0, "drafted": 0, "accepted": 0, "target_forwards": 1}
    t0 = time.perf_counter()
    if on_tokens:
        on_tokens(out[:])
    while len(out) < max_new_tokens and out[-1] != eos_id:
        p = n + len(out) - 1  # position of the last token, the first one the target scores
        kk = min(k, max_new_tokens - len(out) - 1)  # never run past max_new_tokens (or the cache)
        drafted, qs = [], []
        tok = pending
        dpos = torch.arange(p - pending.shape[1] + 1, p + 1, device=device)
        for _ in range(kk):
            logits = draft(tok, dpos)[:, -1]
            d, q = pick(logits)
            drafted.append(d)
            qs.append(q)
            tok, dpos = d.view(1, 1), dpos[-1:] + 1
        block = torch.cat([pending[:, -1:]] + [d.view(1, 1) for d in drafted], dim=1)  # (1, kk+1)
        logits = target(block, torch.arange(p, p + kk + 1, device=device))[0]  # (kk+1, vocab)
        stats["target_forwards"] += 1
        stats["rounds"] += 1
        stats["drafted"] += kk
        if greedy:
            best = logits.argmax(-1)
            if kk:
                agree = (best[:kk] == torch.cat(drafted)).int().cumprod(0)
                n_acc = int(agree.sum())
            else:
                n_acc = 0
            new = block[0, 1: n_acc + 1].tolist() + [int(best[n_acc])]
        else:
            ps = probabilities(logits, temperature, top_k, top_p)  # (kk+1, vocab)
            qq = torch.cat(qs) if kk else ps[:0]
            new, n_acc = accept(ps, qq, [int(d) for d in drafted], gen)
        stats["accepted"] += n_acc
        if eos_id is not None and eos_id in new:
            new = new[: new.index(eos_id) + 1]
        out += new
        if on_tokens:
            on_tokens(new)
        # The draft saw pending + drafted[:kk-1]; when all kk were kept it has not seen the last
        # drafted token, which it must read before the correction/bonus token.
        last = torch.tensor([[new[-1]]], device=device)
        if kk == 0:
            pending = torch.cat([pending, last], 1)
        else:
            pending = torch.cat([drafted[-1].view(1, 1), last], 1) if n_acc == kk else last
    stats["decode_s"] = time.perf_counter() - t0
    out = out[:max_new_tokens]
    stats["new_tokens"] = len(out)
    stats["acceptance_rate"] = stats["accepted"] / max(stats["drafted"], 1)
    stats["tokens_per_target_forward"] = len(out) / stats["target_forwards"]
    stats["decode_tokens_per_s"] = (len(out) - 1) / max(stats["decode_s"], 1e-9)
    return out, stats


@torch.no_grad()
def generate_speculative(target, draft, tokenizer, prompt: str, max_new_tokens: int = 256, *, k: int = 4,
                         temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
                         stop: Sequence[str] = (), seed: int | None = None, bos: bool = True, truncate: bool = False,
                         on_text: Callable[[str], None] | None = None) -> Completion:
    """Complete one prompt with `target`, drafting with `draft`; stats in .stats (acceptance rate)."""
    ids = check_prompt_lengths([tokenizer.encode(prompt, bos=bos, eos=False)],
                               min(target.args.max_seq_len, draft.args.max_seq_len), truncate)[0]
    stream = _StopStream(tokenizer, ids, stop)
    toks: list[int] = []
    reason = ["length"]

    def take(new):
        for t in new:
            if reason[0] == "stop":
                return
            if t == tokenizer.eos_id:
                reason[0] = "stop"
                return
            toks.append(t)
            delta, hit = stream.push(t)
            if on_text and delta:
                on_text(delta)
            if hit:
                reason[0] = "stop"

    _, stats = speculative_ids(target, draft, ids, max_new_tokens, k=k, temperature=temperature, top_k=top_k,
                               top_p=top_p, eos_id=tokenizer.eos_id, seed=seed, on_tokens=take)
    tail = stream.finish()
    if on_text and tail:
        on_text(tail)
    return Completion(text=stream.text, tokens=toks, finish_reason=reason[0], prompt_tokens=len(ids), stats=stats)


def format_stats(s: dict) -> str:
    return (f"speculative: {s['accepted']}/{s['drafted']} drafted tokens accepted ({100 * s['acceptance_rate']:.1f}%), "
            f"{s['tokens_per_target_forward']:.2f} tokens per target forward over {s['rounds']} rounds, "
            f"{s['decode_tokens_per_s']:.1f} tokens/s")


def generate_with_draft(model, tokenizer, draft_dir: str, prompts: list[str], max_new_tokens: int, *, k: int,
                        device, dtype, **kwargs) -> int:
    """`llamaworks generate --draft DIR`: one prompt, streamed, statistics on stderr."""
    from llamaworks.modeldir import load_model

    if len(prompts) != 1:
        raise ValueError(f"--draft takes one prompt, got {len(prompts)}; run the prompts one at a time")
    draft, draft_tok = load_model(draft_dir, device=device, dtype=dtype)
    if draft_tok.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"the draft model in {draft_dir} has a {draft_tok.vocab_size}-piece tokenizer but the "
                         f"target's has {tokenizer.vocab_size}; the draft must share the target's tokenizer")

    def show(delta):
        sys.stdout.write(delta)
        sys.stdout.flush()

    sys.stdout.write(prompts[0])
    result = generate_speculative(model, draft, tokenizer, prompts[0], max_new_tokens, k=k, on_text=show, **kwargs)
    sys.stdout.write("\n")
    print(format_stats(result.stats), file=sys.stderr)
    return 0
