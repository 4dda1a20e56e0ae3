"""Text generation: prefill, then decode with the static KV cache.

The decode step (one forward, sampling, the stop check and the next position) has fixed
shapes and no host synchronisation, so it compiles into one graph (and, on CUDA, one CUDA
graph); with compile=True it is compiled and run once for the exact decode shapes before the
prefill, so no compilation lands in the decode that callers time. The loop looks at the host
only every `sync_every` steps, or per token when streaming.

A sequence ends at any of the tokenizer's stop ids (`tokenizer.stop_ids`: eos, and for
Llama 3 also <|eot_id|> and <|eom_id|>), which is not part of its output.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from llamaworks.inference.sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, is_greedy, sample
from llamaworks.inference.stops import StopMatcher
from llamaworks.model import Transformer
from llamaworks.tokenizer import stop_ids as tokenizer_stop_ids


def stop_rows(tok: torch.Tensor, prev: torch.Tensor, done: torch.Tensor, stop_ids: torch.Tensor):
    """The stop check on the device: (bsz,) new ids, the previous ids, the rows already stopped
    -> (ids, done). A stopped row repeats the id it stopped at; a row stops at any of stop_ids."""
    tok = torch.where(done, prev, tok)
    return tok, done | torch.isin(tok, stop_ids)


def decode_step(model, tokens: torch.Tensor, input_pos: torch.Tensor, noise: torch.Tensor | None,
                temperature: float, top_k: int | None, top_p: float, done: torch.Tensor | None = None,
                stop_ids: torch.Tensor | None = None, logprobs: bool = True):
    """One token for every sequence: tokens, input_pos (bsz, 1) -> next ids (bsz,), their
    log-probs (bsz,; None without `logprobs`), the rows stopped so far (done (bsz,) bool, updated
    with stop_ids; None without them) and the next positions (bsz, 1). All of it on the device,
    in one graph."""
    logits = model(tokens, input_pos)[:, -1]  # (bsz, vocab)
    nxt = sample(logits, temperature, top_k, top_p, noise)
    logprob = torch.log_softmax(logits, dim=-1).gather(-1, nxt.unsqueeze(-1)).squeeze(-1) if logprobs else None
    if done is not None:
        nxt, done = stop_rows(nxt, tokens[:, 0], done, stop_ids)
    return nxt, logprob, done, input_pos + 1


def compile_step(fn, device: torch.device, fullgraph: bool = False):
    """torch.compile a fixed-shape decode step. On CUDA also with CUDA graphs ("reduce-overhead"):
    one graph replay per step instead of a kernel launch per op, which is what bounds a small
    model's decode on a GPU; elsewhere plain inductor. fullgraph: a graph break is an error
    rather than a step split into several graphs with eager code between them."""
    if device.type != "cuda":
        return torch.compile(fn, dynamic=False, fullgraph=fullgraph)
    graphed = torch.compile(fn, dynamic=False, fullgraph=fullgraph, mode="reduce-overhead")

    def step(*args):
        torch.compiler.cudagraph_mark_step_begin()
        out = graphed(*args)
        # A replay overwrites the previous replay's outputs, and callers keep them across steps.
        if isinstance(out, tuple):
            return tuple(None if t is None else t.clone() for t in out)
        return out.clone()

    return step


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    logprobs: list[float] | None = None
    prompt_tokens: int = 0
    stats: dict = field(default_factory=dict)


def cache_len(needed: int, max_seq_len: int) -> int:
    # Round up so that repeated calls with similar lengths reuse one compiled decode graph.
    return min(max_seq_len, -(-needed // 256) * 256)


def check_prompt_lengths(prompts: list[list[int]], max_seq_len: int, truncate: bool) -> list[list[int]]:
    out = []
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty after tokenisation; give at least one token (or keep bos=True)")
        if len(p) >= max_seq_len:
            if not truncate:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens but the model's context window is {max_seq_len} "
                    "(and at least one new token must fit): shorten the prompt, or pass truncate=True "
                    "(--truncate) to keep only its last tokens")
            p = p[len(p) - max_seq_len + 1:]
        out.append(p)
    return out


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = DEFAULT_TEMPERATURE,
                 top_k: int | None = None, top_p: float = DEFAULT_TOP_P, eos_id: int | None = None,
                 stop_ids: Collection[int] | None = None, seed: int | None = None, compile: bool = False,
                 compile_prefill: bool = False, sync_every: int = 8, logprobs: bool = True,
                 stats: dict | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (tokens, logprobs), each (bsz, n) on the model's device, every `sync_every` steps;
    logprobs None with `logprobs=False` (a log-softmax over the vocabulary a token spared: 10-30 us
    at 4k-32k entries on 2 Zen 4 cores, what llama.cpp's and transformers' plain generation skip too).

    Sequences of different lengths run together: each sits at its own positions in the
    cache (right-padded prefill, per-row input_pos), so every sequence gets exactly the
    tokens it would get alone. A sequence ends at eos_id or any of stop_ids, and then keeps
    emitting the id it stopped at; generation ends when every sequence has stopped (looked
    at on the host only when a chunk is yielded).
    compile: torch.compile the decode step (compile_step, one graph), compiled and run for the
    exact decode shapes before the prefill; `stats["compile_s"]` gets the time that took.
    compile_prefill: also the prefill forward, with dynamic shapes (batch and prompt length
    vary from call to call).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not is_greedy(temperature) and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None), got {top_k}")
    device = model.output.weight.device
    max_seq_len = model.args.max_seq_len
    lens = torch.tensor([len(p) for p in prompts], device=device)
    bsz, longest = len(prompts), max(len(p) for p in prompts)
    assert longest < max_seq_len, (longest, max_seq_len)
    max_new_tokens = min(max_new_tokens, max_seq_len - longest)
    model.setup_caches(bsz, cache_len(longest + max_new_tokens, max_seq_len))
    stops = sorted({*(stop_ids or ()), *(() if eos_id is None else (eos_id,))})
    # The stop check runs on the device (stop_rows, inside the step): no host sync per token.
    stop_t = torch.tensor(stops, dtype=torch.long, device=device) if stops else None
    gen = None
    if not is_greedy(temperature):
        gen = torch.Generator(device=device)
        gen.manual_seed(seed if seed is not None else torch.seed())
    step_fn = compile_step(decode_step, device, fullgraph=True) if compile else decode_step
    prefill = torch.compile(model, dynamic=True) if compile_prefill else model
    if compile and max_new_tokens > 1:
        t0 = time.perf_counter()
        _warm_up(step_fn, model, lens, temperature, top_k, top_p, stop_t, logprobs)
        if stats is not None:
            stats["compile_s"] = time.perf_counter() - t0
        step_fn = warmed_step(step_fn)

    # Prefill: one causal pass over the right-padded prompts; pad positions write keys that
    # no real query can see (they lie beyond its position) and are overwritten later.
    padded = torch.zeros(bsz, longest, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = torch.tensor(p, device=device)
    pos = torch.arange(longest, device=device).expand(bsz, longest)
    logits = _last_logits(model, prefill, padded, pos, lens - 1)  # (bsz, vocab)
    tok = sample(logits, temperature, top_k, top_p, _noise(logits, gen))
    logprob = torch.log_softmax(logits, dim=-1).gather(-1, tok.unsqueeze(-1)).squeeze(-1) if logprobs else None
    done = None
    if stop_t is not None:
        done = torch.isin(tok, stop_t)
    # Step 0 is yielded alone so callers can time prefill apart from decoding.
    yield tok.unsqueeze(1), None if logprob is None else logprob.unsqueeze(1)
    if max_new_tokens == 1 or (done is not None and bool(done.all())):
        return
    input_pos = lens.unsqueeze(1)  # (bsz, 1): each sequence's own next position
    out_tok, out_lp = [], []
    for step in range(1, max_new_tokens):
        tok, logprob, done, input_pos = step_fn(model, tok.unsqueeze(1), input_pos, _noise(logits, gen),
                                                temperature, top_k, top_p, done, stop_t, logprobs)
        out_tok.append(tok)
        out_lp.append(logprob)
        last = step == max_new_tokens - 1
        if len(out_tok) >= sync_every or last:
            yield torch.stack(out_tok, 1), torch.stack(out_lp, 1) if logprobs else None
            out_tok, out_lp = [], []
            if done is not None and bool(done.all()):  # the only host look at the stop flags
                return


def _last_logits(model, forward, tokens: torch.Tensor, pos: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The logits at position last[b] of each row b (bsz, vocab), from `forward` (the model or its compiled
    form) over the whole prompt. Only those positions are sampled from, so a Transformer's output
    projection runs on them alone: at config A it was 40% of a 128-token prompt's products (128 rows of
    32000 x 512). Other models (wrappers, test stand-ins) are asked for every position's logits."""
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    if not isinstance(model, Transformer):
        return forward(tokens, pos)[rows, last]
    hidden = forward(tokens, pos, return_hidden=True)[rows, last]  # (bsz, dim), after the final norm
    return model.output(hidden.unsqueeze(1))[:, 0].float()  # one row a sequence, as a decode step


def warmed_step(step_fn):
    """The compiled step after _warm_up, called with only the guards that tell its compiled
    graphs apart (torch.compiler.set_stance's skip_guard_eval_unsafe): checking all of them,
    one per module attribute and tensor the step reads, took 0.2-0.4 ms a step on Zen 4 (small
    fp32: 2.0 -> 1.8 ms a step; base int8 4.5 -> 4.3). Safe here because the loop calls it
    with the inputs _warm_up compiled it for: the same model, cache, shapes and options, so no
    guard can fail between steps. Scoped to each call: the caller's own compiled code between
    steps keeps its guards."""

    def step(*args):
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return step_fn(*args)

    return step


def _warm_up(step_fn, model, lens: torch.Tensor, temperature: float, top_k: int | None, top_p: float,
             stop_t: torch.Tensor | None, logprobs: bool = True) -> None:
    """Compile (and on CUDA record) the decode step before the prefill, with inputs built as the
    loop builds them (same shapes, dtypes and strides: the guards hold, nothing recompiles later).
    It writes keys at each row's first decode position, which decoding overwrites before any
    query reads it; the random stream is not touched (ones stand in for the noise)."""
    bsz, device = lens.shape[0], lens.device
    tok = torch.zeros(bsz, dtype=torch.long, device=device)
    noise = None if is_greedy(temperature) else torch.ones(bsz, model.args.vocab_size, device=device)
    done = None if stop_t is None else torch.zeros(bsz, dtype=torch.bool, device=device)
    for _ in range(2):  # the second run: CUDA graphs record then (reduce-overhead), and the guards are checked
        step_fn(model, tok.unsqueeze(1), lens.unsqueeze(1), noise, temperature, top_k, top_p, done, stop_t, logprobs)


def _noise(logits: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor | None:
    if gen is None:
        return None
    return torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_(1, generator=gen)


@torch.no_grad()
def generate(model, tokenizer, prompts: str | list[str], max_new_tokens: int = 256, *,
             temperature: float = DEFAULT_TEMPERATURE, top_k: int | None = None, top_p: float = DEFAULT_TOP_P,
             stop: Sequence[str] = (), seed: int | None = None, logprobs: bool = False, bos: bool = True,
             truncate: bool = False, compile: bool = False, compile_prefill: bool = False, sync_every: int = 8,
             on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
    """Complete each prompt; stops at the tokenizer's stop ids (eos; Llama 3's end-of-turn
    tokens), at any of `stop` (neither included), or after max_new_tokens.

    `on_text(i, delta)` streams the final text of sequence i as it is produced (incremental,
    UTF-8 safe, stop strings withheld until resolved); streaming syncs with the host per token.
    """
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    ids = check_prompt_lengths(tokenizer.encode_batch(texts, bos=bos, eos=False), model.args.max_seq_len, truncate)
    bsz = len(ids)
    rows = CompletionBuilder(tokenizer, ids, stop, on_text)
    t0 = time.perf_counter()
    t_first = None
    timings: dict = {}
    for chunk_tok, chunk_lp in generate_ids(model, ids, max_new_tokens, temperature=temperature, top_k=top_k,
                                            top_p=top_p, stop_ids=tokenizer_stop_ids(tokenizer), seed=seed,
                                            compile=compile, compile_prefill=compile_prefill,
                                            sync_every=1 if on_text else sync_every, logprobs=logprobs,
                                            stats=timings):
        t_first = t_first or time.perf_counter()
        lps = chunk_lp.tolist() if chunk_lp is not None else [None] * len(ids)
        for i, (row_t, row_lp) in enumerate(zip(chunk_tok.tolist(), lps)):
            rows.take(i, row_t, row_lp)
        if all(rows.finished):
            break
    t_end = time.perf_counter()
    results = [rows.completion(i, logprobs) for i in range(bsz)]
    n_gen = sum(len(r.tokens) for r in results)
    # The decode step's compilation (compile=True) ran before the prefill: timed on its own.
    compile_s = timings.get("compile_s", 0.0)
    prefill_s = (t_first or t_end) - t0 - compile_s
    stats = {"prefill_tokens": sum(map(len, ids)), "prefill_s": prefill_s, "decode_tokens": n_gen,
             "decode_s": t_end - (t_first or t_end), "compile_s": compile_s}
    stats["prefill_tokens_per_s"] = stats["prefill_tokens"] / max(prefill_s, 1e-9)
    stats["decode_tokens_per_s"] = max(n_gen - bsz, 0) / max(stats["decode_s"], 1e-9)
    for r in results:
        r.stats = stats
    return results


class CompletionBuilder:
    """Per-sequence bookkeeping of generate() and generate_speculative(): tokens (and their
    log-probs) up to a stop id (`stop_ids`, default the tokenizer's) or a stop string, the
    streamed text, and why each sequence ended."""

    def __init__(self, tokenizer, ids: list[list[int]], stop: Sequence[str],
                 on_text: Callable[[int, str], None] | None, stop_ids: Collection[int] | None = None):
        self.stop_ids = frozenset(tokenizer_stop_ids(tokenizer) if stop_ids is None else stop_ids)
        self.on_text, self.prompt_lens = on_text, [len(p) for p in ids]
        self.streams = [StopMatcher(tokenizer, p, stop) for p in ids]
        self.toks: list[list[int]] = [[] for _ in ids]
        self.lps: list[list[float]] = [[] for _ in ids]
        self.finished = [False] * len(ids)
        self.reasons = ["length"] * len(ids)

    def take(self, i: int, tokens: list[int], logprobs: list[float] | None = None) -> None:
        for j, t in enumerate(tokens):
            if self.finished[i]:
                return
            if t in self.stop_ids:
                self.finished[i], self.reasons[i] = True, "stop"
                return
            self.toks[i].append(t)
            if logprobs is not None:
                self.lps[i].append(logprobs[j])
            delta, hit = self.streams[i].push(t)
            if self.on_text and delta:
                self.on_text(i, delta)
            if hit:
                self.finished[i], self.reasons[i] = True, "stop"

    def completion(self, i: int, logprobs: bool = False, **stats) -> Completion:
        tail = self.streams[i].finish()
        if self.on_text and tail:
            self.on_text(i, tail)
        return Completion(text=self.streams[i].text, tokens=self.toks[i], finish_reason=self.reasons[i],
                          logprobs=self.lps[i] if logprobs else None, prompt_tokens=self.prompt_lens[i],
                          stats=stats)
