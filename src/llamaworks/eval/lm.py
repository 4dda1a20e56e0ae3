"""The evaluation model: log-likelihoods and generations from any llamaworks model.

The three requests of lm-evaluation-harness' `LM` interface (the paper's section 3 needs
only these): `loglikelihood` for multiple choice, `loglikelihood_rolling` for perplexity,
`generate_until` for free-form answers (closed-book QA, GSM8k, code).

Tokenisation follows lm-evaluation-harness so that numbers are comparable:
- a request (context, continuation) moves the context's trailing whitespace to the front
  of the continuation, encodes `whole = context + continuation` and `context` separately,
  and takes the continuation tokens as `whole[len(context_tokens):]` (SentencePiece merges
  across the boundary, so encoding the two halves apart would give other tokens);
- an input longer than the window keeps its last `max_length + 1` tokens (truncated from
  the left; the continuation is always kept whole);
- rolling log-likelihoods score disjoint windows of `max_length` tokens, each window
  conditioned on the tokens before it in the same window (`get_rolling_token_windows` with
  context_len=1), the first one on the prefix token.

BOS: LLaMA saw `<s>` at the start of every training document (Meta's reference code always
prepends it), so by default (`add_bos=True`) every context starts with BOS and an empty
context is just BOS. `add_bos=False` is lm-evaluation-harness' transformers default for
LLaMA: no BOS, except as the prefix of an empty context or of a rolling text.

Results do not depend on the batch size or on padding: sequences are right-padded, the
model is causal and positions start at 0 in every row, so a row's logits never see its
padding (equal up to float rounding, about 1e-6 in fp32); a continuation scored against a
shared, cached context sees that context and itself only, at the positions a plain forward
gives it (`loglikelihood_tokens`); sampled generations draw from a random stream per request
(see `generate_until`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from llamaworks.device import resolve_device
from llamaworks.inference.load import load_model
from llamaworks.inference.sampling import is_greedy, sample
from llamaworks.model import Transformer
from llamaworks.tokenizer import stop_ids

__all__ = ["EvalModel", "rolling_windows", "disjoint_window", "split_trailing_space", "GenOptions"]


def split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    # lm-evaluation-harness `_encode_pair`: "Answer: " + "Paris" scores " Paris" after "Answer:".
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_seq_len: int,
                    context_len: int = 1) -> Iterator[tuple[list[int], list[int]]]:
    """(input tokens, predicted tokens) windows covering every token once (lm-eval's
    `get_rolling_token_windows`); score the last len(predicted) positions of each input."""
    if not 1 <= context_len <= max_seq_len:
        raise ValueError(f"context_len must be in [1, max_seq_len={max_seq_len}], got {context_len}")
    tokens = list(tokens)
    if not tokens:
        return
    pred_len = max_seq_len - context_len + 1
    first = min(max_seq_len, len(tokens))
    yield [prefix_token] + tokens[: first - 1], tokens[:first]
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, pred_len)
        end = predicted + n
        yield tokens[max(end - max_seq_len - 1, 0): end - 1], tokens[end - n: end]
        predicted += n


def disjoint_window(window: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    # lm-eval's `make_disjoint_window`: the input minus the predicted part is the context.
    inp, pred = window
    return inp[: len(inp) - (len(pred) - 1)], pred


@dataclass(frozen=True)
class GenOptions:
    until: tuple[str, ...] = ()
    max_gen_toks: int = 256
    temperature: float = 0.0  # 0: greedy (the paper's closed-book QA, section 3.2)
    top_p: float = 1.0
    seed: int | None = None

    @classmethod
    def parse(cls, options: dict | None, default_until: Sequence[str] = ()) -> GenOptions:
        options = dict(options or {})
        known = {"until", "max_gen_toks", "temperature", "do_sample", "top_p", "seed"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown generation option(s) {unknown}; known: {sorted(known)}")
        until = options.get("until", list(default_until))
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
            raise ValueError(f"generation option 'until' must be a string or a list of strings, got {until!r}")
        max_gen_toks = int(options.get("max_gen_toks", cls.max_gen_toks))
        if max_gen_toks < 1:
            raise ValueError(f"generation option 'max_gen_toks' must be >= 1, got {max_gen_toks}")
        temperature = float(options.get("temperature", 0.0))
        do_sample = options.get("do_sample", not is_greedy(temperature))
        if not do_sample:
            temperature = 0.0  # as transformers: do_sample=False is greedy whatever the temperature
        elif is_greedy(temperature):
            temperature = 1.0  # do_sample=True without a temperature: transformers' default
        return cls(tuple(s for s in until if s), max_gen_toks, temperature, float(options.get("top_p", 1.0)),
                   options.get("seed"))


DEFAULT_SEED = 1234  # lm-evaluation-harness' default seed


def _row_seed(seed: int, index: int) -> int:
    # A distinct, reproducible stream per (seed, request index).
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(hits)] if hits else text


class EvalModel:
    """lm-evaluation-harness' three requests over a llamaworks `Transformer` and `Tokenizer`."""

    def __init__(self, model, tokenizer, *, batch_size: int = 8, add_bos: bool = True,
                 max_length: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.add_bos = add_bos
        self.max_length = max_length or model.args.max_seq_len
        if self.max_length > model.args.max_seq_len:
            raise ValueError(f"max_length={self.max_length} exceeds the model's max_seq_len="
                             f"{model.args.max_seq_len}; leave max_length unset or lower it")
        self.device = model.output.weight.device

    @classmethod
    def from_dir(cls, path, device: str = "auto", dtype: str | None = None, adapter: str | None = None,
                 **kwargs) -> EvalModel:
        dev, dt = resolve_device(device, dtype)
        model, tokenizer = load_model(path, device=dev, dtype=dt, adapter=adapter)
        return cls(model, tokenizer, **kwargs)

    @property
    def prefix_token_id(self) -> int:
        # The token an empty context conditions on (lm-eval: BOS when the tokenizer has one).
        return self.tokenizer.bos_id if self.tokenizer.bos_id >= 0 else self.tokenizer.eos_id

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=False, eos=False)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not continuation:
            raise ValueError("a loglikelihood request needs a non-empty continuation")
        if context == "":
            # lm-eval: an empty context conditions on the prefix token alone.
            return [self.prefix_token_id], self.tok_encode(continuation)
        context, continuation = split_trailing_space(context, continuation)
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        cont = whole[len(ctx):]
        if not cont:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens after context {context!r}")
        if self.add_bos:
            ctx = [self.tokenizer.bos_id] + ctx
        elif not ctx:
            ctx = [self.prefix_token_id]  # only whitespace in the context
        return ctx, cont

    # -- requests ---------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """log P(continuation | context) and whether greedy decoding would produce it."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests])

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """log P(text) over the whole text, in disjoint windows of max_length tokens."""
        items, owner = [], []
        for i, text in enumerate(texts):
            for w in rolling_windows(self.tok_encode(text), self.prefix_token_id, self.max_length):
                items.append(disjoint_window(w))
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (lp, _) in zip(owner, self.loglikelihood_tokens(items)):
            totals[i] += lp
        return totals

    def generate_until(self, requests: Sequence[tuple[str, dict]]) -> list[str]:
        """Continuation of each context, cut at the first of options['until'] (not included).

        Options: until (str or list), max_gen_toks (256), temperature (0: greedy), do_sample,
        top_p (1.0), seed (default 1234). Neither greedy nor sampled results depend on the
        batch size: request i samples with its own generator seeded by (seed, i), so k copies
        of one prompt give k different samples (maj1@k, pass@k) and rerunning gives the same.
        """
        opts = [GenOptions.parse(o) for _, o in requests]
        out: list[str | None] = [None] * len(requests)
        groups: dict[GenOptions, list[int]] = {}
        for i, o in enumerate(opts):
            groups.setdefault(o, []).append(i)
        for o, idx in groups.items():
            encoded = {i: self._gen_prompt(requests[i][0], o.max_gen_toks) for i in idx}
            idx = sorted(idx, key=lambda i: (-len(encoded[i]), i))
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start: start + self.batch_size]
                for i, text in zip(chunk, self._generate([encoded[i] for i in chunk], o, chunk)):
                    out[i] = text
        return out  # type: ignore[return-value]

    # -- internals --------------------------------------------------------------------------

    def _gen_prompt(self, context: str, max_gen_toks: int) -> list[int]:
        ids = ([self.tokenizer.bos_id] if self.add_bos else []) + self.tok_encode(context)
        if not ids:
            ids = [self.prefix_token_id]
        # lm-eval: keep the last max_length - max_gen_toks context tokens (at least one).
        keep = max(self.max_length - max_gen_toks, 1)
        return ids[-keep:]

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], o: GenOptions, rows: list[int]) -> list[str]:
        # Right-padded prefill, then one token per step at each row's own position (as
        # generate_ids). Sampling draws each row's noise from its own generator, seeded by
        # (seed, request index), so a sample does not depend on the batch it runs in.
        # A generation ends at the tokenizer's stop ids: eos, and Llama 3's end-of-turn tokens.
        model, stops, dev = self.model, stop_ids(self.tokenizer), self.device
        bsz, longest = len(prompts), max(map(len, prompts))
        max_new = min(o.max_gen_toks, self.max_length - longest)
        decoders = [self.tokenizer.stream_decoder(p) for p in prompts]
        texts, done = [""] * bsz, [False] * bsz
        if max_new < 1:
            return texts
        model.setup_caches(bsz, min(longest + max_new, model.args.max_seq_len))
        try:
            lens = torch.tensor([len(p) for p in prompts], device=dev)
            padded = torch.zeros(bsz, longest, dtype=torch.long, device=dev)
            for r, p in enumerate(prompts):
                padded[r, : len(p)] = torch.tensor(p, device=dev)
            pos = torch.arange(longest, device=dev).expand(bsz, longest)
            logits = model(padded, pos)[torch.arange(bsz, device=dev), lens - 1]
            gens = None
            if not is_greedy(o.temperature):
                base = DEFAULT_SEED if o.seed is None else o.seed
                gens = [torch.Generator(device=dev).manual_seed(_row_seed(base, i)) for i in rows]
            for step in range(max_new):
                noise = None if gens is None else torch.stack(
                    [torch.empty(logits.shape[-1], device=dev).exponential_(1, generator=g) for g in gens])
                tok = sample(logits, o.temperature, None, o.top_p, noise)
                for r, t in enumerate(tok.tolist()):
                    if done[r]:
                        continue
                    if t in stops:
                        done[r] = True
                        continue
                    texts[r] += decoders[r].push(t)
                    if o.until and cut_at_stop(texts[r], o.until) != texts[r]:
                        done[r] = True
                if all(done) or step == max_new - 1:
                    break
                logits = model(tok.unsqueeze(1), (lens + step).unsqueeze(1))[:, -1]
        finally:
            model.clear_caches()
        return [cut_at_stop(t + ("" if d else dec.flush()), o.until) for t, d, dec in zip(texts, done, decoders)]

    @torch.no_grad()
    def loglikelihood_tokens(self, items: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Score (context tokens, continuation tokens) pairs; the context must be non-empty.

        The scores are those of a plain forward over each request's input (the last
        max_length + 1 tokens of context + continuation, minus the final one), reading the
        log-softmax at the continuation positions, computed with less work:
        - requests whose inputs share the part before the continuation (the choices of a
          multiple-choice question) run it once: it is prefilled into the KV cache and the
          continuations decode against it (never against each other);
        - the continuations of a pool of prefixes run sorted by length, so that a batch carries
          little padding; a pool keeps at most batch_size * max_length prefix positions in its
          cache, the size of one batch's full cache;
        - the output projection and the log-softmax run only at the scored positions.
        batch_size bounds the sequences of every forward pass: prefixes in a prefill,
        continuations in a decode pass. A model other than a llamaworks `Transformer` (any
        module mapping tokens to logits) gets the plain forward per request instead.
        """
        prefixes, conts = [], []
        for ctx, cont in items:
            if not ctx or not cont:
                raise ValueError("loglikelihood needs a non-empty context and continuation (in tokens)")
            if len(cont) > self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit in max_length="
                                 f"{self.max_length}; shorten it")
            # lm-eval: the input is the last max_length + 1 tokens minus the final one. Its
            # prefix up to the position predicting cont[0] is what requests can share.
            inp = (list(ctx) + list(cont))[-(self.max_length + 1):][:-1]
            prefixes.append(tuple(inp[: len(inp) - len(cont) + 1]))
            conts.append(list(cont))
        if not isinstance(self.model, Transformer):
            return self._score_plain(prefixes, conts)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(prefixes):
            groups.setdefault(p, []).append(i)
        # Longest prefixes first: the prefixes of one prefill have similar lengths.
        unique = sorted(groups, key=lambda p: (-len(p), groups[p][0]))
        results: list[tuple[float, bool] | None] = [None] * len(items)
        start = 0
        while start < len(unique):
            end = start + 1  # the pool's cache holds (end - start) rows of the longest, first, prefix
            while end < len(unique) and (end + 1 - start) * len(unique[start]) <= self.batch_size * self.max_length:
                end += 1
            members = [(i, k) for k, p in enumerate(unique[start:end]) for i in groups[p]]  # (request, prefix row)
            for i, res in self._score_shared(unique[start:end], members, conts):
                results[i] = res
            start = end
        return results  # type: ignore[return-value]

    def _score_plain(self, prefixes: list[tuple[int, ...]], conts: list[list[int]]) -> list[tuple[float, bool]]:
        # One right-padded forward over prefix + continuation[:-1] per request, longest first.
        inputs = [list(p) + c[:-1] for p, c in zip(prefixes, conts)]
        order = sorted(range(len(inputs)), key=lambda i: (-len(inputs[i]), i))
        results: list[tuple[float, bool] | None] = [None] * len(inputs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start: start + self.batch_size]
            longest = len(inputs[chunk[0]])
            batch = torch.tensor([inputs[i] + [0] * (longest - len(inputs[i])) for i in chunk], device=self.device)
            logits = self.model(batch)  # (b, longest, vocab)
            for b, i in enumerate(chunk):
                n, end = len(conts[i]), len(inputs[i])
                lp = torch.log_softmax(logits[b, end - n: end].double(), dim=-1)
                target = torch.tensor(conts[i], device=lp.device)
                results[i] = (float(lp.gather(-1, target.unsqueeze(-1)).sum()), bool((lp.argmax(-1) == target).all()))
        return results  # type: ignore[return-value]

    def _score_shared(self, prefixes: list[tuple[int, ...]], members: list[tuple[int, int]],
                      conts: list[list[int]]) -> list[tuple[int, tuple[float, bool]]]:
        """(request, (log-prob, is_greedy)) for each (request i, prefix row k) of `members`:
        conts[i] after prefixes[k], whose last token predicts conts[i][0]."""
        model, dev = self.model, self.device
        # Right-padded prefills at positions 0.., batch_size prefixes at a time, each batch in
        # a cache of its own: a row's padding comes after its tokens, where its queries never
        # look. The last hidden state of a prefix predicts the first token of its continuations.
        first, prefix_kv = [], []  # prefix_kv[k]: per layer, (keys, values) of prefixes[k]
        for s in range(0, len(prefixes), self.batch_size):
            batch = prefixes[s: s + self.batch_size]
            width = max(map(len, batch))
            model.setup_caches(len(batch), width)
            try:
                tokens = torch.tensor([list(p) + [0] * (width - len(p)) for p in batch], device=dev)
                h = model(tokens, torch.arange(width, device=dev), return_hidden=True)  # (batch, width, dim)
                ends = torch.tensor([len(p) - 1 for p in batch], device=dev)
                first.append(h[torch.arange(len(batch), device=dev), ends])
                caches = [layer.attention.kv_cache for layer in model.layers]
                prefix_kv += [[(c.k[r], c.v[r]) for c in caches] for r in range(len(batch))]
            finally:
                model.clear_caches()
        first = torch.cat(first)  # (prefixes, dim)
        members = sorted(members, key=lambda m: (len(conts[m[0]]), m[0]))
        batches = list(self._decode_batches(members, prefixes, conts))
        # One decode cache for all the batches, allocated once: a fresh one per batch costs
        # more in zero-filling than the attention over its few unused positions.
        spans = [max(len(prefixes[k]) for _, k in b) + max(len(conts[i]) for i, _ in b) - 1 for b in batches]
        if max(len(conts[i]) for i, _ in members) > 1:
            model.setup_caches(max(map(len, batches)), max(spans))
        try:
            out = []
            for batch in batches:
                out += zip((i for i, _ in batch), self._score_batch(batch, prefixes, conts, first, prefix_kv))
        finally:
            model.clear_caches()
        return out

    def _decode_batches(self, members, prefixes, conts) -> Iterator[list[tuple[int, int]]]:
        # At most batch_size continuations, in a cache of longest prefix + longest continuation
        # - 1 positions that the model's RoPE table covers (each request alone fits: its input
        # has at most max_length tokens; two requests together may not).
        batch: list[tuple[int, int]] = []
        longest_prefix = longest_cont = 0
        for i, k in members:
            lp, lc = max(longest_prefix, len(prefixes[k])), max(longest_cont, len(conts[i]))
            if batch and (len(batch) == self.batch_size or lp + lc - 1 > self.model.args.max_seq_len):
                yield batch
                batch, lp, lc = [], len(prefixes[k]), len(conts[i])
            batch.append((i, k))
            longest_prefix, longest_cont = lp, lc
        if batch:
            yield batch

    def _score_batch(self, batch, prefixes, conts, first, prefix_kv) -> list[tuple[float, bool]]:
        model, dev = self.model, self.device
        hidden = [first[torch.tensor([k for _, k in batch], device=dev)]]  # (batch, dim): each first token
        multi = [(i, k) for i, k in batch if len(conts[i]) > 1]  # requests with tokens after the first
        lens = [len(conts[i]) - 1 for i, _ in multi]
        if multi:
            # Cache row r starts as a copy of its request's prefix; the continuation (minus
            # its last token) runs at the positions after that prefix and sees it and itself
            # (what the row held before, past its own positions, no real query looks at).
            tail = max(lens)
            for r, (_, j) in enumerate(multi):  # row by row: no gathered temporary to allocate
                n = len(prefixes[j])
                for layer, (keys, values) in zip(model.layers, prefix_kv[j]):
                    layer.attention.kv_cache.k[r, :, :n].copy_(keys[:, :n])  # (heads, positions, head_dim)
                    layer.attention.kv_cache.v[r, :, :n].copy_(values[:, :n])
            tokens = torch.tensor([conts[i][:-1] + [0] * (tail - n) for (i, _), n in zip(multi, lens)], device=dev)
            start = torch.tensor([len(prefixes[k]) for _, k in multi], device=dev)
            h = model(tokens, start.unsqueeze(1) + torch.arange(tail, device=dev), return_hidden=True)
            real = torch.arange(tail, device=dev) < torch.tensor(lens, device=dev).unsqueeze(1)  # (multi, tail)
            hidden.append(h[real])  # (sum of lens, dim), row by row
        # Per request, the hidden states predicting its tokens: its row of the first block,
        # then its run in the second.
        run, offset = {}, len(batch)
        for (i, _), n in zip(multi, lens):
            run[i], offset = offset, offset + n
        index, owner = [], []
        for b, (i, _) in enumerate(batch):
            n = len(conts[i])
            index += [b] + list(range(run.get(i, 0), run.get(i, 0) + n - 1))
            owner += [b] * n
        logits = model.output(torch.cat(hidden)[torch.tensor(index, device=dev)]).float()  # (tokens, vocab)
        target = torch.tensor([t for i, _ in batch for t in conts[i]], device=dev)
        # log_softmax at the target as logit - logsumexp, without a float64 copy of the logits:
        # max and exponentials in fp32, the log in fp64; within ~4e-7 of a float64 log_softmax
        # per token (errors of both signs, ~5e-8 on average).
        top, argmax = logits.max(-1)
        lse = top.double() + (logits - top.unsqueeze(-1)).exp_().sum(-1).double().log()
        lp = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1).double() - lse
        owner_t = torch.tensor(owner, device=dev)
        score = torch.zeros(len(batch), dtype=torch.float64, device=dev).index_add_(0, owner_t, lp)
        hits = torch.zeros(len(batch), dtype=torch.long, device=dev).index_add_(0, owner_t, (argmax == target).long())
        greedy = hits == torch.tensor([len(conts[i]) for i, _ in batch], device=dev)
        return list(zip(score.tolist(), greedy.tolist()))
