"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) with a small draft model.

Each round the draft proposes k tokens one at a time, then the target scores all of them
in one forward over k+1 positions of its KV cache. Greedy: the longest prefix on which the
draft agrees with the target's argmax is kept, plus the target's own next token, so the
output is exactly the target's greedy output. Sampling: draft token x is kept with
probability min(1, p(x)/q(x)), the first rejected one is replaced by a sample of
max(0, p - q) (renormalised), which leaves the target's distribution p unchanged.

Rolling back costs nothing with the position-indexed static cache: a rejected token's
keys sit beyond the sequence's position, where the causal mask hides them until the next
round overwrites them.

Batches of prompts of different lengths run together: every row sits at its own
positions in both caches (per-row input_pos), accepts its own number of drafts each
round, and leaves the batch (`rows=` of the remaining cache rows) once it is finished.
All rows draft k tokens each round so that the shapes stay fixed; a row near its token
limit simply considers fewer of them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Collection, Sequence

import torch

from llamaworks.inference.generate import Completion, CompletionBuilder, cache_len, check_prompt_lengths
from llamaworks.inference.load import load_model
from llamaworks.inference.sampling import is_greedy, probabilities
from llamaworks.tokenizer import stop_ids as tokenizer_stop_ids


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


def greedy_accepted(best: torch.Tensor, drafted: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
    """Drafts kept per row under greedy decoding: best (rows, k+1) target argmax at the
    drafted positions, drafted (rows, k), usable (rows,) how many drafts a row may keep.
    The count of leading positions where the draft equals the target's choice."""
    k = drafted.shape[1]
    agree = (best[:, :k] == drafted) & (torch.arange(k, device=best.device) < usable.unsqueeze(1))
    return agree.int().cumprod(1).sum(1)


def _check(target, draft, k: int, max_new_tokens: int, temperature: float, top_p: float) -> None:
    if k < 1:
        raise ValueError(f"the draft length k must be >= 1, got {k}; set --draft-k")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if draft.args.vocab_size != target.args.vocab_size:
        raise ValueError(f"the draft model's vocab_size {draft.args.vocab_size} differs from the target's "
                         f"{target.args.vocab_size}; the draft must use the target's tokenizer")
    if not is_greedy(temperature) and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@torch.no_grad()
def speculative_batch(target, draft, prompts: list[list[int]], max_new_tokens: int, *, k: int = 4,
                      temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
                      eos_id: int | None = None, stop_ids: Collection[int] | None = None, seed: int | None = None,
                      on_tokens: Callable[[int, list[int]], None] | None = None) -> tuple[list[list[int]], dict]:
    """New token ids for each prompt (ending at eos_id or any of stop_ids, included, or after
    max_new_tokens, or where the context window ends for that prompt alone) and statistics:
    overall rounds, drafted, accepted, acceptance_rate, tokens_per_target_forward, and the same per row
    under "rows". `on_tokens(i, new)` receives each row's tokens as they are accepted."""
    _check(target, draft, k, max_new_tokens, temperature, top_p)
    device = target.output.weight.device
    bsz = len(prompts)
    lens = [len(p) for p in prompts]
    max_seq_len = min(target.args.max_seq_len, draft.args.max_seq_len)
    for i, n in enumerate(lens):
        if not 0 < n < max_seq_len:
            raise ValueError(f"prompt {i} has {n} tokens but must have 1 to {max_seq_len - 1} (the context window "
                             f"is {max_seq_len}); shorten it")
    # Each row's limit is the one it would have alone (generate_ids caps by the context).
    limits = [min(max_new_tokens, max_seq_len - n) for n in lens]
    # Room for k drafted positions beyond the last useful one. Positions past the cache are
    # clamped to its last slot: the last token a row keeps sits at n + limit - 1 <= cache - 1
    # and is never fed, so every position a kept token is scored at is below that slot.
    cache = cache_len(max(n + m for n, m in zip(lens, limits)) + k, max_seq_len)
    target.setup_caches(bsz, cache)
    draft.setup_caches(bsz, cache)
    greedy = is_greedy(temperature)
    gen = None
    if not greedy:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed if seed is not None else torch.seed())

    def pick(logits):  # (rows, vocab) -> (rows,) tokens, and the probabilities they came from
        if greedy:
            return logits.argmax(-1), None
        p = probabilities(logits, temperature, top_k, top_p)
        return _draw(p, gen), p

    # Prefill both models on the right-padded prompts, as generate_ids does.
    longest = max(lens)
    padded = torch.zeros(bsz, longest, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = torch.tensor(p, device=device)
    pos = torch.arange(longest, device=device).expand(bsz, longest)
    first, _ = pick(target(padded, pos)[torch.arange(bsz, device=device), torch.tensor(lens, device=device) - 1])
    draft(padded, pos)
    out = [[t] for t in first.tolist()]
    rows_stats = [{"rounds": 0, "drafted": 0, "accepted": 0} for _ in range(bsz)]
    t0 = time.perf_counter()
    if on_tokens:
        for i in range(bsz):
            on_tokens(i, out[i][:])

    stops = frozenset({*(stop_ids or ()), *(() if eos_id is None else (eos_id,))})

    def running(i: int) -> bool:
        return len(out[i]) < limits[i] and out[i][-1] not in stops

    rounds = 0
    steps2 = torch.arange(2, device=device)
    steps = torch.arange(k + 1, device=device)
    active = [i for i in range(bsz) if running(i)]
    while active:
        rows = None if len(active) == bsz else torch.tensor(active, device=device)
        seq_len = torch.tensor([lens[i] + len(out[i]) for i in active], device=device)  # (a,)
        # The draft reads the last two tokens of every row: after a round that kept all k
        # drafts it has not seen the last draft, otherwise it rewrites a key it already holds.
        tail = torch.tensor([(prompts[i][-1:] + out[i])[-2:] for i in active], device=device)  # (a, 2)
        tok, dpos = tail, (seq_len - 2).unsqueeze(1) + steps2  # (a, 2)
        drafted, qs = [], []
        for _ in range(k):
            d, q = pick(draft(tok, dpos.clamp(max=cache - 1), rows=rows)[:, -1])
            drafted.append(d)
            qs.append(q)
            tok, dpos = d.unsqueeze(1), dpos[:, -1:] + 1
        drafted_t = torch.stack(drafted, 1)  # (a, k)
        block = torch.cat([tail[:, -1:], drafted_t], 1)  # (a, k+1): the last token, then the drafts
        tpos = ((seq_len - 1).unsqueeze(1) + steps).clamp(max=cache - 1)  # (a, k+1)
        logits = target(block, tpos, rows=rows)  # (a, k+1, vocab)
        # Drafts a row may keep: never past its own token limit.
        usable = [min(k, limits[i] - len(out[i]) - 1) for i in active]
        if greedy:
            best = logits.argmax(-1)  # (a, k+1)
            n_acc = greedy_accepted(best, drafted_t, torch.tensor(usable, device=device)).tolist()
            best_l, drafted_l = best.tolist(), drafted_t.tolist()
            news = [drafted_l[j][: n_acc[j]] + [best_l[j][n_acc[j]]] for j in range(len(active))]
        else:
            ps = probabilities(logits.flatten(0, 1), temperature, top_k, top_p).view(*logits.shape)
            qq = torch.stack(qs, 1)  # (a, k, vocab)
            drafted_l = drafted_t.tolist()
            news, n_acc = [], []
            for j, u in enumerate(usable):
                new, n = accept(ps[j, : u + 1], qq[j, :u], drafted_l[j][:u], gen)
                news.append(new)
                n_acc.append(n)
        rounds += 1
        for j, i in enumerate(active):
            new = news[j]
            end = next((at for at, t in enumerate(new) if t in stops), None)
            if end is not None:
                new = new[: end + 1]
            out[i] += new
            s = rows_stats[i]
            s["rounds"] += 1
            s["drafted"] += usable[j]
            s["accepted"] += n_acc[j]
            if on_tokens:
                on_tokens(i, new)
        active = [i for i in active if running(i)]
    decode_s = time.perf_counter() - t0
    for i, s in enumerate(rows_stats):
        s["new_tokens"] = len(out[i])
        s["target_forwards"] = s["rounds"] + 1
        s["acceptance_rate"] = s["accepted"] / max(s["drafted"], 1)
        s["tokens_per_target_forward"] = s["new_tokens"] / s["target_forwards"]
    total = {key: sum(s[key] for s in rows_stats)
             for key in ("drafted", "accepted", "new_tokens")}
    row_forwards = sum(s["target_forwards"] for s in rows_stats)
    stats = {"rounds": rounds, "target_forwards": rounds + 1, **total, "decode_s": decode_s,
             "acceptance_rate": total["accepted"] / max(total["drafted"], 1),
             "tokens_per_target_forward": total["new_tokens"] / row_forwards,
             "decode_tokens_per_s": (total["new_tokens"] - bsz) / max(decode_s, 1e-9),
             "rows": rows_stats}
    return out, stats


@torch.no_grad()
def generate_speculative(target, draft, tokenizer, prompts: str | list[str], max_new_tokens: int = 256, *,
                         k: int = 4, temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
                         stop: Sequence[str] = (), seed: int | None = None, bos: bool = True, truncate: bool = False,
                         on_text: Callable[[int, str], None] | None = None) -> Completion | list[Completion]:
    """Complete each prompt with `target`, drafting with `draft`, as generate() does (a string
    gives one Completion, a list a list); statistics in .stats: the batch's overall figures,
    and this row's under "row"."""
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    ids = check_prompt_lengths(tokenizer.encode_batch(texts, bos=bos, eos=False),
                               min(target.args.max_seq_len, draft.args.max_seq_len), truncate)
    rows = CompletionBuilder(tokenizer, ids, stop, on_text)
    _, stats = speculative_batch(target, draft, ids, max_new_tokens, k=k, temperature=temperature, top_k=top_k,
                                 top_p=top_p, stop_ids=tokenizer_stop_ids(tokenizer), seed=seed,
                                 on_tokens=rows.take)
    overall = {key: v for key, v in stats.items() if key != "rows"}
    results = [rows.completion(i, **overall, row=stats["rows"][i]) for i in range(len(ids))]
    return results[0] if single else results


def token_table(tokenizer) -> list:
    """What each id stands for, exactly: the token's bytes where the tokenizer has them
    (byte-level BPE, whose text form writes partial characters as U+FFFD), else its piece
    string; special tokens by name."""
    by_bytes = getattr(tokenizer, "token_bytes_table", None)
    table: list = list(by_bytes()) if by_bytes is not None else []
    for i in range(tokenizer.vocab_size):
        if i >= len(table):
            table.append(tokenizer.id_to_piece(i))
        elif not table[i]:
            table[i] = tokenizer.id_to_piece(i)  # special tokens have no bytes: compare their names
    return table


def check_same_vocabulary(target_tok, draft_tok, target_name, draft_name) -> None:
    """ValueError naming both models unless the draft's tokenizer is the target's: the same
    size, the same token for every id and the same bos/eos. A draft that reads ids as other
    tokens proposes nonsense the target rejects, and a different size could index past it."""
    why = None
    if draft_tok.vocab_size != target_tok.vocab_size:
        why = f"{draft_tok.vocab_size} tokens against the target's {target_tok.vocab_size}"
    elif (draft_tok.bos_id, draft_tok.eos_id) != (target_tok.bos_id, target_tok.eos_id):
        why = (f"bos/eos ids {draft_tok.bos_id}/{draft_tok.eos_id} against the target's "
               f"{target_tok.bos_id}/{target_tok.eos_id}")
    else:
        mine, theirs = token_table(target_tok), token_table(draft_tok)
        if mine != theirs:
            at = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
            why = f"id {at} is {theirs[at]!r} against the target's {mine[at]!r}"
    if why is not None:
        raise ValueError(f"the draft model {draft_name} does not share the tokenizer of the target {target_name} "
                         f"({why}); speculative decoding needs a draft trained with the target's tokenizer: pass "
                         "one with --draft")


def format_stats(s: dict) -> str:
    return (f"speculative: {s['accepted']}/{s['drafted']} drafted tokens accepted ({100 * s['acceptance_rate']:.1f}%), "
            f"{s['tokens_per_target_forward']:.2f} tokens per target forward over {s['rounds']} rounds")


def generate_with_draft(model, tokenizer, draft_dir: str, prompts: list[str], max_new_tokens: int, *, k: int,
                        device, dtype, target_name: str = "model", **kwargs) -> int:
    """`llamaworks generate --draft DIR`: one prompt is streamed, several run as one batch;
    acceptance statistics (per prompt, then overall) on stderr. `target_name` names the
    target in errors (its checkpoint path)."""
    draft, draft_tok = load_model(draft_dir, device=device, dtype=dtype)
    check_same_vocabulary(tokenizer, draft_tok, target_name, draft_dir)
    streaming = len(prompts) == 1

    def show(i, delta):
        sys.stdout.write(delta)
        sys.stdout.flush()

    if streaming:
        sys.stdout.write(prompts[0])
    results = generate_speculative(model, draft, tokenizer, prompts, max_new_tokens, k=k,
                                   on_text=show if streaming else None, **kwargs)
    if streaming:
        sys.stdout.write("\n")
    else:
        for p, r in zip(prompts, results):
            print(f"{p}{r.text}\n{'-' * 40}")
        for i, r in enumerate(results):
            print(f"prompt {i}: {format_stats(r.stats['row'])}", file=sys.stderr)
    s = results[0].stats
    print(f"{format_stats(s)}, {s['decode_tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    return 0
