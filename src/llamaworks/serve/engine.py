"""Continuous batching in one model instance.

The static KV cache has `max_batch` rows; each row is a slot holding one request. A new
request is prefilled alone into a free row (`model(..., rows=[slot])`) and joins the
running batch at the next decode step; every step decodes all rows at once, each at
its own position, and a finished (or cancelled) request frees its row at once.

The decode step always runs the full, fixed-shape batch (free rows decode a dummy token
at position 0 of their own row, which no later request reads before rewriting it). A
row's arithmetic then does not depend on which other requests happen to be running, so
a greedy request gets bit-for-bit the tokens it gets when served alone, under any load.

The engine runs in its own thread; results go back through each request's `on_event`
callback, called from that thread.
"""

from __future__ import annotations

import collections
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from llamaworks.inference.generate import compile_step
from llamaworks.inference.sampling import sample
from llamaworks.inference.stops import StopMatcher
from llamaworks.serve.prometheus import Metrics


class QueueFull(RuntimeError):
    pass


class EngineStopped(RuntimeError):
    pass


@dataclass
class Event:
    kind: str  # "text" (a delta of final text), "done" (finish_reason set) or "error" (text is the message)
    text: str = ""
    finish_reason: str | None = None  # "stop", "length" or "cancelled"


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: Sequence[str] = ()
    seed: int | None = None
    on_event: Callable[[Event], None] | None = None
    # Log-probabilities (OpenAI's logprobs): None for none, else how many alternatives per
    # token (0: only the chosen token's); prompt_logprobs also scores the prompt (echo).
    logprobs: int | None = None
    prompt_logprobs: bool = False
    # Written by the engine.
    tokens: list[int] = field(default_factory=list)
    # Per generated token (then per prompt token after the first, with prompt_logprobs):
    # (log p(token), [(alternative id, log p), ...] most likely first).
    token_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    prompt_token_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    submitted: float = 0.0
    first_token: float | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        # Safe from any thread; the engine frees the slot before its next decode step.
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass
class _Slot:
    req: Request
    pos: int  # where the next fed token is written
    stream: StopMatcher
    gen: torch.Generator | None


def _decode_logits(model, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return model(tokens, pos)[:, -1]  # (max_batch, vocab)


def _logprobs(logits: torch.Tensor, chosen: list[int], top: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row of logits (n, vocab): log p of chosen[row] and the `top` most likely (id, log p)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    picked = lp.gather(-1, torch.tensor(chosen, dtype=torch.long, device=lp.device).unsqueeze(-1)).squeeze(-1).tolist()
    if top == 0:
        return [(p, []) for p in picked]
    values, ids = lp.topk(top, dim=-1)
    return [(p, list(zip(i, v))) for p, i, v in zip(picked, ids.tolist(), values.tolist())]


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64, max_seq_len: int | None = None,
                 compile: bool = False):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}; it is the number of concurrent sequences")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}; it bounds requests waiting for a slot")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = min(max_seq_len or model.args.max_seq_len, model.args.max_seq_len)
        self.device = model.output.weight.device
        model.setup_caches(max_batch, self.context)
        self.metrics = Metrics(slots=max_batch)
        self._slots: list[_Slot | None] = [None] * max_batch
        self._tokens = torch.zeros(max_batch, 1, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(max_batch, 1, dtype=torch.long, device=self.device)
        self._pending: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._accepting = True
        self._cancel_all = False
        self._thread = threading.Thread(target=self._run, name="llamaworks-engine", daemon=True)
        # The decode step has one fixed shape, so it compiles once (prefill stays eager: its
        # length varies per request), when the engine thread starts; requests wait meanwhile.
        self._compiled = compile
        self._step = compile_step(_decode_logits, self.device) if compile else _decode_logits

    # --- public, any thread ---------------------------------------------------------------

    def start(self) -> Engine:
        self._thread.start()
        return self

    def submit(self, req: Request) -> Request:
        if len(req.prompt_ids) + req.max_tokens > self.context:
            raise ValueError(f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.max_tokens}) exceeds "
                             f"the context window of {self.context} tokens: shorten the prompt or lower max_tokens")
        with self._cv:
            if not self._accepting:
                raise EngineStopped("the server is shutting down")
            waiting = sum(not r.cancelled for r in self._pending)
            # Requests that a free slot will take at the next step do not wait in the queue.
            if waiting - self._free_slots() >= self.max_queue:
                self.metrics.rejected += 1
                raise QueueFull(f"{waiting} requests are already queued (max_queue={self.max_queue}); retry later")
            req.submitted = time.perf_counter()
            self._pending.append(req)
            self._cv.notify()
        return req

    def stop(self, cancel: bool = False, timeout: float | None = None) -> None:
        """Stop accepting requests; finish the running and queued ones (cancel=False) or
        cancel them, then end the engine thread."""
        with self._cv:
            self._accepting = False
            self._cancel_all = self._cancel_all or cancel
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def complete(self, req: Request, timeout: float | None = None) -> Request:
        """Submit and wait: a blocking call for scripts and tests."""
        done: queue.Queue[Event] = queue.Queue()
        user = req.on_event

        def on_event(ev: Event):
            if user:
                user(ev)
            if ev.kind in ("done", "error"):
                done.put(ev)

        req.on_event = on_event
        self.submit(req)
        ev = done.get(timeout=timeout)
        if ev.kind == "error":
            raise RuntimeError(ev.text)
        return req

    @property
    def queue_length(self) -> int:
        return sum(not r.cancelled for r in self._pending)

    @property
    def active(self) -> int:
        return sum(s is not None for s in self._slots)

    # --- engine thread ----------------------------------------------------------------------

    def _free_slots(self) -> int:
        return sum(s is None for s in self._slots)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        if self._compiled:
            # Every row is free: a full decode of dummy tokens at position 0, which no request
            # reads before its prefill rewrites it (as in any step with free rows).
            try:
                self._step(self.model, self._tokens, self._pos)
            except Exception:  # noqa: BLE001 - serve uncompiled rather than not at all
                traceback.print_exc()
                print("llamaworks serve: torch.compile failed (above); decoding uncompiled", file=sys.stderr)
                self._step = _decode_logits
        while True:
            with self._cv:
                while self._accepting and not self._pending and not self.active:
                    self._cv.wait()
                if self._cancel_all:
                    while self._pending:
                        self._finish_pending(self._pending.popleft())
                    for i, s in enumerate(self._slots):
                        if s is not None:
                            self._finish(i, "cancelled")
                if not self._accepting and not self._pending and not self.active:
                    break
                admit = []
                while self._pending and len(admit) < self._free_slots():
                    req = self._pending.popleft()
                    if req.cancelled:
                        self._finish_pending(req)
                    else:
                        admit.append(req)
            try:
                for req in admit:
                    self._prefill(req)
                for i, s in enumerate(self._slots):
                    if s is not None and s.req.cancelled:
                        self._finish(i, "cancelled")
                if self.active:
                    self._decode()
            except Exception as e:  # noqa: BLE001 - a failed step must not kill the server
                msg = f"generation failed: {type(e).__name__}: {e}"
                traceback.print_exc()
                for req in admit:
                    if req.finish_reason is None and all(s is None or s.req is not req for s in self._slots):
                        self._emit(req, Event("error", msg))
                for i, s in enumerate(self._slots):
                    if s is not None:
                        self._emit(s.req, Event("error", msg))
                        self._slots[i] = None
                self.metrics.finished["error"] += 1

    def _finish_pending(self, req: Request) -> None:
        req.finish_reason = "cancelled"
        self.metrics.finished["cancelled"] += 1
        self._emit(req, Event("done", finish_reason="cancelled"))

    def _prefill(self, req: Request) -> None:
        slot = self._slots.index(None)
        n = len(req.prompt_ids)
        ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.device)
        pos = torch.arange(n, device=self.device).unsqueeze(0)
        # Full logits then the last row, exactly as generate() computes them, so that a greedy
        # request served here gets the tokens generate() gives.
        full = self.model(ids, pos, rows=torch.tensor([slot], device=self.device))  # (1, n, vocab)
        if req.prompt_logprobs:  # row i predicts prompt token i + 1
            req.prompt_token_logprobs = _logprobs(full[0, :-1], req.prompt_ids[1:], req.logprobs or 0)
        logits = full[:, -1]
        gen = None
        if req.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(req.seed if req.seed is not None else int(torch.randint(2**62, ()).item()))
        self._slots[slot] = _Slot(req, n, StopMatcher(self.tokenizer, req.prompt_ids, req.stop), gen)
        self.metrics.prompt_tokens += n
        req.first_token = time.perf_counter()
        self.metrics.ttft.observe(req.first_token - req.submitted)
        self._accept(slot, self._sample(self._slots[slot], logits), logits)

    def _decode(self) -> None:
        logits = self._step(self.model, self._tokens, self._pos)  # (max_batch, vocab): the fixed-shape step
        greedy = logits.argmax(dim=-1).tolist()
        for i, s in enumerate(self._slots):
            if s is not None:
                tok = greedy[i] if s.gen is None else self._sample(s, logits[i : i + 1])
                self._accept(i, tok, logits[i : i + 1])
        self.metrics.steps += 1

    def _sample(self, s: _Slot, logits: torch.Tensor) -> int:
        r = s.req
        if s.gen is None:
            return int(logits.argmax(dim=-1).item())
        noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_(1, generator=s.gen)
        return int(sample(logits, r.temperature, r.top_k, r.top_p, noise).item())

    def _accept(self, i: int, tok: int, logits: torch.Tensor) -> None:
        s = self._slots[i]
        req = s.req
        if tok == self.tokenizer.eos_id:
            return self._finish(i, "stop")
        req.tokens.append(tok)
        if req.logprobs is not None:  # of the model's distribution, before temperature and filters
            req.token_logprobs += _logprobs(logits, [tok], req.logprobs)
        self.metrics.generation_tokens += 1
        delta, hit = s.stream.push(tok)
        if delta:
            self._emit(req, Event("text", delta))
        if hit:
            return self._finish(i, "stop")
        if len(req.tokens) >= req.max_tokens:
            return self._finish(i, "length")
        self._tokens[i, 0] = tok
        self._pos[i, 0] = s.pos
        s.pos += 1

    def _finish(self, i: int, reason: str) -> None:
        s = self._slots[i]
        self._slots[i] = None
        self._tokens[i, 0] = 0
        self._pos[i, 0] = 0
        req = s.req
        tail = s.stream.finish() if reason != "cancelled" else ""
        if tail:
            self._emit(req, Event("text", tail))
        req.finish_reason = reason
        self.metrics.finished[reason] += 1
        self.metrics.latency.observe(time.perf_counter() - req.submitted)
        self._emit(req, Event("done", finish_reason=reason))

    def _emit(self, req: Request, ev: Event) -> None:
        if ev.kind == "text":
            req.text += ev.text
        if req.on_event is not None:
            try:
                req.on_event(ev)
            except Exception:  # noqa: BLE001 - a vanished client must not stop the others
                req.cancel()
