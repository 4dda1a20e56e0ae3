"""Continuous batching in one model instance, over a paged KV cache.

The decode batch has `max_batch` rows; each row is a slot holding one request. The KV cache
is a pool of fixed-size blocks (inference/paged.py) budgeted by serve/kvpool.py: a request
is admitted when a row is free and the pool can promise every block it may need (prompt +
max_tokens, less the prompt prefix it finds cached), so a running request never waits for
memory. Full prompt blocks are shared between requests through their chain hash (prefix
caching): a request whose prompt starts with a cached prefix prefills only the rest (the
last prompt token at least, whose logits start its answer).

Each engine iteration prefills at most `prefill_chunk` prompt tokens (of one prompt or of
several short ones in turn; without it, every admissible prompt whole) and decodes one token
of every running row: a long prompt arriving never stalls the running requests for more than
a chunk. On a CPU with the paged cache (the default, _ragged_step) both are ONE forward pass:
the decoding rows' tokens and the step's prompt runs side by side in one row of tokens, each
product reading the weights once for all of them, as llama.cpp's server batches; elsewhere
(a draft model, a compiled decode step, tensor parallelism) the prompts' passes come first,
then the decode step's own. The order of the passes' parts is recorded in `step_log`.

The decode step always runs the full batch (free rows, and rows whose prompt is still being
prefilled, decode a dummy token at position 0 into the null block, which no sequence reads).
The keys a row reads span the batch's block-table width (the longest sequence's blocks rounded
up to a multiple of WIDTH_STEP, the whole context when compiled: table_width), and those past
its position are masked to exact zeros, so a greedy request gets the tokens it gets when
served alone, under any load (tests/serve/test_paged.py).

The engine runs in its own thread; results go back through each request's `on_event`
callback, called from that thread. A request whose own work raises (its prefill, its
sampling, its text) fails alone, with an "error" event; only a failure of the batched
decode forward, which every running request shares, fails them all.

With a draft model (`serve --draft`), the decode step is speculative (_speculate): the draft,
whose paged cache mirrors the model's block for block, proposes K tokens per row, and the
model verifies them all in one batched forward; greedy requests get exactly the tokens they
get without a draft, sampled ones tokens distributed as the model's. Requests with penalties,
logit_bias or a grammar decode one token per step beside them (_drafts_for).
"""

from __future__ import annotations

import collections
import math
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from llamaworks.inference.generate import compile_step
from llamaworks.inference.paged import (
    NULL_BLOCK,
    BlockTable,
    Ragged,
    block_bytes,
    kernel_dtypes,
    ragged_groups,
    setup_paged_caches,
)
from llamaworks.inference.sampling import (
    SamplingState,
    apply_states,
    filtered_probabilities,
    is_greedy,
    logit_bias_vector,
    sample_rows,
)
from llamaworks.inference.speculative import accept as accept_drafts
from llamaworks.inference.speculative import greedy_accepted
from llamaworks.inference.stops import StopMatcher
from llamaworks.model import Transformer
from llamaworks.serve.kvpool import BlockPool, blocks_for, chain_hash, prompt_hashes
from llamaworks.serve.prometheus import Metrics
from llamaworks.serve.structured import Constraint, Matcher, apply_masks
from llamaworks.serve.tp import LocalRunner
from llamaworks.tokenizer import stop_ids as tokenizer_stop_ids

# Eager passes gather every row's keys up to the table's width, each layer, each step: that
# copy, not the weights, is most of a decode step's memory traffic for a small model over a long
# context. A power-of-two width gathered up to twice the keys needed (128 blocks for a 1.1k-token
# prompt); whole multiples of 4 blocks (64 tokens) waste at most 3. Measured with multiples of 8
# (8 rows at ~1.1k tokens, 14M parameters, 2 threads, contended, 2 turns): a full-batch decode
# step of 885 -> 100 ms and 304 -> 144 ms, greedy tokens identical.
WIDTH_STEP = 4


def table_width(blocks: int, max_blocks: int, compiled: bool, step: int = WIDTH_STEP) -> int:
    """Block-table width of a pass whose longest sequence holds `blocks` blocks: `blocks`
    rounded up to a multiple of `step`, at most `max_blocks`; `max_blocks` when the step is
    compiled (one shape, so it compiles once)."""
    if compiled:
        return max_blocks
    return min(max_blocks, -(-max(1, blocks) // step) * step)


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
    # Token ids that end the request, not included in its tokens (a chat template's
    # end-of-turn tokens); None: the tokenizer's stop ids (eos; Llama 3's <|eot_id|>, <|eom_id|>).
    stop_ids: Collection[int] | None = None
    # Log-probabilities (OpenAI's logprobs): None for none, else how many alternatives per
    # token (0: only the chosen token's); prompt_logprobs also scores the prompt (echo).
    logprobs: int | None = None
    prompt_logprobs: bool = False
    # Sampling options beyond the temperature and filters (inference/sampling.py): min-p (0:
    # off), OpenAI's presence and frequency penalties over the output, the repetition penalty
    # over prompt and output (1: off), and a bias per token id added to its logit.
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] | None = None
    # Structured output (serve/structured.py): a compiled grammar the reply must follow; the
    # reply ends ("stop") when the grammar is complete.
    constraint: Constraint | None = None
    # Written by the engine.
    tokens: list[int] = field(default_factory=list)
    # Per generated token (then per prompt token after the first, with prompt_logprobs):
    # (log p(token), [(alternative id, log p), ...] most likely first).
    token_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    prompt_token_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    submitted: float = 0.0
    first_token: float | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        # Safe from any thread; the engine frees the slot before its next decode step.
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


def _per_row(reqs: list[Request], name: str, off: float, logits: torch.Tensor) -> torch.Tensor:
    """Each request's option `name` as a float32 per row of `logits` (rows, vocab), `off` where unset."""
    values = [off if (v := getattr(r, name)) is None else v for r in reqs]
    return torch.tensor(values, dtype=torch.float32, device=logits.device)


def _top_k_per_row(reqs: list[Request], logits: torch.Tensor) -> torch.Tensor:
    """Each request's top_k as an int64 per row of `logits` (rows, vocab), 0 (off) where unset. One past the
    vocabulary keeps every token: taken as the vocabulary's size, so that 10**400 (valid JSON, a valid
    integer) fits (as a float it overflowed: a 500 from the fuzz test)."""
    return torch.tensor([min(r.top_k or 0, logits.shape[-1]) for r in reqs], dtype=torch.long, device=logits.device)


@dataclass
class _Slot:
    req: Request
    pos: int  # where the next fed token is written
    stream: StopMatcher
    gen: torch.Generator | None
    stop_ids: frozenset[int]
    # Penalties and logit_bias (when the request has any) and the grammar's state (structured
    # output), made at the request's first sampling step.
    sampling: SamplingState | None = None
    matcher: Matcher | None = None
    options_made: bool = False
    number: int = 0  # admission order (step_log names requests by it)
    blocks: list[int] = field(default_factory=list)  # physical block of each logical block
    reserved: int = 0  # blocks promised by the pool and not allocated yet
    # Chain hashes of the prompt's full blocks, then (_publish) of those generated tokens filled.
    hashes: list[bytes] = field(default_factory=list)
    registered: int = 0  # of which published in the prefix cache
    prefilled: int = 0  # prompt tokens whose keys and values are in the cache
    prompt_logits: list[torch.Tensor] = field(default_factory=list)  # per chunk, for prompt_logprobs
    # Positions whose keys and values the draft's cache holds (past the prompt, which every
    # prefill gives it): behind after steps decoded without the draft (_speculate catches up).
    drafted_to: int = 0

    @property
    def ready(self) -> bool:
        return self.prefilled == len(self.req.prompt_ids)


@dataclass
class _Embedding:
    """An embeddings job (Engine.embed): token id lists in, pooled vectors out."""

    inputs: list[list[int]]
    done: threading.Event = field(default_factory=threading.Event)
    vectors: torch.Tensor | None = None  # (len(inputs), dim) float32
    error: Exception | None = None


def _check_draft(model, draft, draft_tokens: int, paged: bool) -> None:
    if not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise ValueError(f"--draft-tokens must be an integer >= 1 (tokens the draft proposes per step), "
                         f"got {draft_tokens!r}")
    if draft is model:
        raise ValueError("--draft: the draft must be a model instance of its own (load it again), since each "
                         "model keeps its own KV cache")
    if not paged or not hasattr(draft, "layers"):
        raise ValueError("--draft needs transformer models with attention layers (a paged KV cache)")
    if draft.args.vocab_size != model.args.vocab_size:
        raise ValueError(f"--draft: the draft model's vocab_size {draft.args.vocab_size} differs from the served "
                         f"model's {model.args.vocab_size}; pass a draft that uses the served model's tokenizer")


# Prompt remainders this short (after a prefix-cache hit, say) are prefilled together, one
# batched forward for all of them: a forward of a few dozen tokens is bound by reading the
# weights (on a CPU, and a GPU alike), so k of them cost about what one does.
SHORT_PREFILL = 64
# Longer rests, up to this, are batched with rests at the same positions (fresh prompts, or rests
# after the same cached system prompt) at least half as long: such a pass attends without a mask
# or a gather (inference/paged.py's prefill_attention), its padding costs at most as much as its
# tokens, and its products run on more rows: 7 prompts of 129 tokens of the `small` preset took
# 1-8% less in one pass than in seven (benchmarks/prefill.py, 1 thread, contended, two runs; the
# products at 67-75 against 53-54 GFLOP/s).
BATCH_PREFILL = 256


# A ragged step without --prefill-chunk (whole prompts) adds prompts to its pass while it holds
# fewer tokens than this (llama.cpp's default n_batch): the pass's activations stay bounded,
# and a prompt longer than it is still prefilled whole, in a pass of its own.
PASS_TOKENS = 4096


def prefill_groups(rests: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Which of a step's prompt rests, (start, tokens) each, are prefilled in one batched pass:
    lists of their indices, longest rest first. Rests of at most SHORT_PREFILL tokens go together
    whatever their positions; a longer one (up to BATCH_PREFILL) joins only rests at its start
    at least half as long as the longest, and stays alone otherwise."""
    groups: list[list[int]] = []
    for i in sorted(range(len(rests)), key=lambda i: -rests[i][1]):
        start, n = rests[i]
        for g in groups:
            start0, longest = rests[g[0]]
            if longest <= SHORT_PREFILL or (start == start0 and 2 * n >= longest):
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


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
                 compile: bool = False, kv_cache_gb: float | None = None, block_size: int = 16,
                 prefix_cache: bool = True, prefill_chunk: int | None = None,
                 runner=None, draft=None, draft_tokens: int = 4, draft_max_batch: int | None = None,
                 ragged: bool = True, kv_dtype: torch.dtype | None = None):
        """kv_cache_gb: the KV cache's memory (default: room for max_batch sequences of the whole
        context, as a static cache); prefill_chunk: prompt tokens prefilled per engine step
        (default: whole prompts); prefix_cache: share cached prompt blocks between requests;
        draft: a smaller model of the same tokenizer (its own instance) that proposes
        `draft_tokens` tokens per running request and step for the model to verify (speculative
        decoding, see _speculate), while at most `draft_max_batch` requests decode (None: any
        number; larger batches decode one token per step, which costs less there); ragged: each
        step one forward pass for the decoding rows and the prompt tokens (_ragged_step), where
        it applies (one process, a paged CPU cache, no draft, an eager decode step); False: a
        pass per prompt (or batch of rests), then the decode step's own pass; kv_dtype: the KV
        cache's dtype (None: the model's; bf16 under an fp32 model halves the cache's memory and
        the bytes a decode step reads from it, as llama.cpp's default f16 cache does, at the cost
        of rounding the keys and values to bf16: replies may differ from fp32's at near-ties)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}; it is the number of concurrent sequences")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}; it bounds requests waiting for a slot")
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be an integer >= 1 (prompt tokens per step) or None (whole "
                             f"prompts), got {prefill_chunk!r}")
        if kv_cache_gb is not None and not 0 < kv_cache_gb < math.inf:
            raise ValueError(f"kv_cache_gb must be a positive number of GiB, got {kv_cache_gb!r}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        model_dtype = model.tok_embeddings.weight.dtype if hasattr(model, "tok_embeddings") else None
        # The cache in the model's dtype, or one the kernels read under it (paged.kernel_dtypes: bf16 under fp32).
        if kv_dtype is not None and kv_dtype != model_dtype and not kernel_dtypes(model_dtype, kv_dtype):
            raise ValueError(f"--kv-dtype {str(kv_dtype).removeprefix('torch.')} under a "
                             f"{str(model_dtype).removeprefix('torch.')} model: the cache is the model's dtype, or "
                             f"bfloat16 under a float32 model; leave --kv-dtype out or pick one of those")
        self.kv_dtype = kv_dtype or model_dtype
        paged = hasattr(model, "layers")  # test stand-ins without attention keep no cache
        if draft is not None:
            _check_draft(model, draft, draft_tokens, paged)
        self.model, self.tokenizer = model, tokenizer
        if draft_max_batch is not None and (not isinstance(draft_max_batch, int) or draft_max_batch < 1):
            raise ValueError(f"--draft-max-batch must be an integer >= 1 (decoding requests up to which the draft "
                             f"runs), got {draft_max_batch!r}")
        self.draft, self.draft_tokens, self.draft_max_batch = draft, draft_tokens, draft_max_batch
        self.stop_ids = tokenizer_stop_ids(tokenizer)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = min(max_seq_len or model.args.max_seq_len, model.args.max_seq_len,
                           *(() if draft is None else (draft.args.max_seq_len,)))
        self.device = model.output.weight.device
        self.block_size, self.prefill_chunk = block_size, prefill_chunk
        self.max_blocks = blocks_for(self.context, block_size)  # a table row spans the context
        num_blocks = max_batch * self.max_blocks + 1  # + the null block
        if kv_cache_gb is not None and paged:
            # The draft's cache mirrors the model's block for block (the same block ids), so a
            # block costs both models' bytes.
            per_block = (block_bytes(model, block_size, kv_dtype)
                         + (0 if draft is None else block_bytes(draft, block_size, kv_dtype)))
            num_blocks = int(kv_cache_gb * 2**30) // per_block
            if num_blocks < 2:
                raise ValueError(f"--kv-cache-gb {kv_cache_gb} holds {num_blocks} blocks of {block_size} tokens "
                                 f"({per_block} bytes each); raise it")
        self.pool = BlockPool(num_blocks, block_size, prefix_cache)
        # Every forward pass of the model goes through the runner: in this process, or on every
        # tensor-parallel rank under torchrun (serve/tp.py), which also sets up their caches.
        self.runner = runner if runner is not None else LocalRunner(model)
        # Prefills compute only the logits they use: on the model's hidden states (test stand-ins
        # that wrap or replace the model take the whole forward).
        self._last_only = isinstance(model, Transformer)
        self._table = (self.runner.setup(num_blocks, block_size, self.context, max_batch, kv_dtype) if paged
                       else BlockTable(block_size, self.device))
        # The draft's table holds the model's block ids: a block of a sequence (or of the prefix
        # cache) has both models' keys and values at the same index of their own pools.
        self._draft_table = None if draft is None else setup_paged_caches(draft, num_blocks, block_size,
                                                                          self.context, dtype=kv_dtype)
        self.spec = {"rounds": 0, "drafted": 0, "accepted": 0, "fallback_steps": 0}
        self._ragged = bool(ragged and paged and self._last_only and isinstance(self.runner, LocalRunner)
                            and draft is None and not compile and model.layers
                            and model.layers[0].attention.kv_cache.splits_prefill)
        self._decode_blocks = torch.full((max_batch, self.max_blocks), NULL_BLOCK, dtype=torch.long,
                                         device=self.device)
        self._row0 = torch.zeros(1, dtype=torch.long, device=self.device)
        self._admitted = 0
        self._steps = 0  # engine iterations so far (the step numbers of step_log)
        # The forward passes in order: ("prefill", request number, start, end, engine step) and
        # ("decode", request numbers of the rows decoded); bounded, for tests and debugging.
        self.step_log: collections.deque[tuple] = collections.deque(maxlen=10_000)
        self.metrics = Metrics(slots=max_batch)
        self._slots: list[_Slot | None] = [None] * max_batch
        self._tokens = torch.zeros(max_batch, 1, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(max_batch, 1, dtype=torch.long, device=self.device)
        # Rows are set one token at a time (_set_row): on CPU through numpy views of the same
        # memory, ~0.2 us where a tensor element write with a Python index is ~15 us (two per
        # accepted token: 0.25 ms of a batch-8 decode step).
        self._rows_np = (self._tokens.numpy(), self._pos.numpy()) if self.device.type == "cpu" else None
        self._pending: collections.deque[Request] = collections.deque()
        self._embeddings: collections.deque[_Embedding] = collections.deque()
        self._cv = threading.Condition()
        self._accepting = True
        self._cancel_all = False
        self._thread = threading.Thread(target=self._run, name="llamaworks-engine", daemon=True)
        # The decode step has one fixed shape, so it compiles once (prefill stays eager: its
        # length varies per request), when the engine thread starts; requests wait meanwhile.
        self._compiled = compile
        self._step = compile_step(_decode_logits, self.device) if compile else _decode_logits

    # --- public, any thread ---------------------------------------------------------------

    def check(self, req: Request) -> None:
        """Refuse (ValueError) a request the engine thread could not run: everything it
        reads is checked here, in the caller's thread, so that bad input never fails there."""
        vocab = self.tokenizer.vocab_size
        if not req.prompt_ids or not all(isinstance(t, int) and 0 <= t < vocab for t in req.prompt_ids):
            raise ValueError(f"prompt_ids must be a non-empty list of token ids in [0, {vocab})")
        if not isinstance(req.max_tokens, int) or req.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {req.max_tokens!r}")
        if len(req.prompt_ids) + req.max_tokens > self.context:
            raise ValueError(f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.max_tokens}) exceeds "
                             f"the context window of {self.context} tokens: shorten the prompt or lower max_tokens")
        need = blocks_for(len(req.prompt_ids) + req.max_tokens - 1, self.block_size)  # the last token is not fed
        if need > self.pool.capacity:
            raise ValueError(f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.max_tokens}) needs {need} KV "
                             f"cache blocks of {self.block_size} tokens, more than the whole cache holds "
                             f"({self.pool.capacity}): raise --kv-cache-gb, shorten the prompt or lower max_tokens")
        if not isinstance(req.temperature, (int, float)) or not 0 <= req.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {req.temperature!r}")
        if not 0 < req.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {req.top_p!r}")
        if req.top_k is not None and (not isinstance(req.top_k, int) or req.top_k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {req.top_k!r}")
        if req.seed is not None and (not isinstance(req.seed, int) or not -(2**63) <= req.seed < 2**64):
            raise ValueError(f"seed must be None or an integer in [-2**63, 2**64), got {req.seed!r}")
        if req.logprobs is not None and (not isinstance(req.logprobs, int) or not 0 <= req.logprobs <= vocab):
            raise ValueError(f"logprobs must be None or an integer in [0, {vocab}], got {req.logprobs!r}")
        if not isinstance(req.min_p, (int, float)) or not 0 <= req.min_p <= 1:
            raise ValueError(f"min_p must be a number in [0, 1], got {req.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            x = getattr(req, name)
            if not isinstance(x, (int, float)) or not -2 <= x <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2], got {x!r}")
        if not isinstance(req.repetition_penalty, (int, float)) or not 0 < req.repetition_penalty <= 10:
            raise ValueError(f"repetition_penalty must be a number in (0, 10] (1: off), got {req.repetition_penalty!r}")
        if req.logit_bias is not None:
            logit_bias_vector(dict(req.logit_bias), vocab)  # ValueError naming the bad id or bias
        if req.constraint is not None and not isinstance(req.constraint, Constraint):
            raise ValueError(f"constraint must be a structured.Constraint, got {type(req.constraint).__name__}")
        if not all(isinstance(s, str) for s in req.stop):
            raise ValueError(f"stop must be a sequence of strings, got {req.stop!r}")
        if req.stop_ids is not None and (isinstance(req.stop_ids, (str, bytes)) or not all(
                isinstance(t, int) and 0 <= t < vocab for t in req.stop_ids)):
            raise ValueError(f"stop_ids must be None or a collection of token ids in [0, {vocab}), "
                             f"got {req.stop_ids!r}")

    def start(self) -> Engine:
        self._thread.start()
        return self

    def submit(self, req: Request) -> Request:
        self.check(req)
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

    def embed(self, inputs: Sequence[Sequence[int]], timeout: float | None = None) -> torch.Tensor:
        """Embeddings of token id lists, (len(inputs), dim) float32: each input's final hidden
        states (after the final norm, what the output layer reads) averaged over its tokens.
        They are computed in the engine thread between its steps (the model is busy otherwise),
        in batches of max_batch inputs; TimeoutError if not done within `timeout` seconds."""
        vocab = self.tokenizer.vocab_size
        if not inputs:
            raise ValueError("inputs must be a non-empty list of token id lists")
        for ids in inputs:
            if not ids or not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
                raise ValueError(f"each input must be a non-empty list of token ids in [0, {vocab})")
            if len(ids) > self.context:
                raise ValueError(f"an input has {len(ids)} tokens, more than the context window of {self.context}")
        if not hasattr(self.model, "layers") or not isinstance(self.runner, LocalRunner):
            # Under tensor parallelism every rank would have to run the same pass (serve/tp.py).
            raise ValueError("embeddings need a model served in one process (not under --tp)")
        job = _Embedding([list(ids) for ids in inputs])
        with self._cv:
            if not self._accepting:
                raise EngineStopped("the server is shutting down")
            self._embeddings.append(job)
            self._cv.notify()
        if not job.done.wait(timeout):
            raise TimeoutError(f"the embeddings were not computed within {timeout} s")
        if job.error is not None:
            raise job.error
        return job.vectors

    @property
    def queue_length(self) -> int:
        return sum(not r.cancelled for r in self._pending)

    @property
    def active(self) -> int:
        return sum(s is not None for s in self._slots)

    def stats(self) -> dict[str, float]:
        """Numbers for /metrics: KV cache blocks (used, free, cached and evictable, shared) and
        the prefix cache's hits and queries, in prompt tokens."""
        out = {**self.pool.stats(), "kv_block_size": self.block_size}
        if self.draft is not None:  # speculative decoding: drafts proposed and kept so far
            spec = dict(self.spec)
            out.update({f"spec_{k}": v for k, v in spec.items()}, spec_draft_tokens=self.draft_tokens,
                       spec_acceptance_rate=spec["accepted"] / spec["drafted"] if spec["drafted"] else 0.0)
        return out

    # --- engine thread ----------------------------------------------------------------------

    def _free_slots(self) -> int:
        return sum(s is None for s in self._slots)

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            self.runner.close()  # under tensor parallelism, the other ranks stop with this thread

    def _serve(self) -> None:
        torch.set_grad_enabled(False)
        if self._compiled:
            self._table.blocks = self._decode_blocks  # every row in the null block
            # Every row is free: a full decode of dummy tokens at position 0, which no request
            # reads before its prefill rewrites it (as in any step with free rows).
            try:
                self.runner.decode(self._step, self._tokens, self._pos)
            except Exception:  # noqa: BLE001 - serve uncompiled rather than not at all
                traceback.print_exc()
                print("llamaworks serve: torch.compile failed (above); decoding uncompiled", file=sys.stderr)
                self._step = _decode_logits
        while True:
            with self._cv:
                while self._accepting and not self._pending and not self.active and not self._embeddings:
                    self._cv.wait()
                if self._cancel_all:
                    while self._embeddings:
                        job = self._embeddings.popleft()
                        job.error = EngineStopped("the server is shutting down")
                        job.done.set()
                    while self._pending:
                        self._finish_pending(self._pending.popleft())
                    for i, s in enumerate(self._slots):
                        if s is not None:
                            self._finish(i, "cancelled")
                if not self._accepting and not self._pending and not self.active and not self._embeddings:
                    break
            try:
                for i, s in enumerate(self._slots):
                    if s is not None and s.req.cancelled:
                        self._finish(i, "cancelled")
                self._embed_step()
                if self._ragged:
                    self._ragged_step()
                    continue
                self._prefill_step()
                ready = [s for s in self._slots if s is not None and s.ready]
                if any(self._drafts_for(s) for s in ready) and len(ready) <= (self.draft_max_batch or len(ready)):
                    self._speculate()
                elif any(s is not None and s.ready for s in self._slots):
                    self._decode()
            except Exception as e:  # noqa: BLE001 - a bug in no one request's work: end the running ones
                for s in list(self._slots):
                    if s is not None:
                        self._fail(s.req, e)

    def _fail(self, req: Request, e: Exception) -> None:
        """End `req` with an error event and free its slot, if it holds one."""
        traceback.print_exception(e)
        for i, s in enumerate(self._slots):
            if s is not None and s.req is req:
                self._free(i)
        if req.finish_reason is not None:  # it had finished before the failure
            return
        req.finish_reason = "error"
        self.metrics.finished["error"] += 1
        self._emit(req, Event("error", f"generation failed: {type(e).__name__}: {e}"))

    def _free(self, i: int) -> None:
        s = self._slots[i]
        if s is not None:
            self.pool.release(s.blocks, s.reserved)
        self._slots[i] = None
        self._set_row(i, 0, 0)

    def _finish_pending(self, req: Request) -> None:
        req.finish_reason = "cancelled"
        self.metrics.finished["cancelled"] += 1
        self._emit(req, Event("done", finish_reason="cancelled"))

    def _embed_step(self) -> None:
        """Run the waiting embeddings jobs (Engine.embed): inputs of similar lengths batched
        together, right-padded; attention is causal, so the padding after an input changes
        none of its hidden states, and the mean is over the input's own positions."""
        with self._cv:
            jobs, self._embeddings = list(self._embeddings), collections.deque()
        for job in jobs:
            try:
                order = sorted(range(len(job.inputs)), key=lambda j: len(job.inputs[j]))
                out: list[torch.Tensor | None] = [None] * len(order)
                for b in range(0, len(order), self.max_batch):
                    part = order[b : b + self.max_batch]
                    lengths = torch.tensor([len(job.inputs[j]) for j in part], device=self.device)
                    tokens = torch.zeros(len(part), int(lengths.max()), dtype=torch.long, device=self.device)
                    for row, j in enumerate(part):
                        tokens[row, : len(job.inputs[j])] = torch.tensor(job.inputs[j])
                    hidden = self.model(tokens, return_hidden=True).float()  # (rows, longest, dim), no cache
                    keep = torch.arange(tokens.shape[1], device=self.device) < lengths.unsqueeze(1)  # (rows, longest)
                    pooled = (hidden * keep.unsqueeze(-1)).sum(1) / lengths.unsqueeze(1)  # (rows, dim)
                    for row, j in enumerate(part):
                        out[j] = pooled[row].cpu()
                job.vectors = torch.stack(out)
            except Exception as e:  # noqa: BLE001 - the job's caller gets it
                job.error = e
            finally:
                job.done.set()

    def _prefill_step(self) -> None:
        """One step's prefill: `prefill_chunk` prompt tokens at most, of the prompt being
        prefilled and then of the next admissible ones (each prompt's part its own forward
        pass), or without chunking every admissible prompt whole. Prompts whose whole rest is
        short (BATCH_PREFILL) wait for the step's end and are prefilled in batched passes
        (prefill_groups)."""
        budget = self.prefill_chunk
        self._steps += 1
        short: list[int] = []  # rows whose rest is prefilled together at the end of the step
        pending_blocks: set[bytes] = set()  # the prompt blocks they will compute (prefix caching)
        while budget is None or budget > 0:
            i = next((i for i, s in enumerate(self._slots) if s is not None and not s.ready and i not in short),
                     None)
            if i is None and short and self._head_shares(pending_blocks):
                # The next request's prompt shares blocks that deferred ones are yet to compute:
                # prefill those first, so that it is admitted onto their cached blocks.
                self._prefill_short(short)
                short, pending_blocks = [], set()
            if i is None and (i := self._admit()) is None:
                break
            s = self._slots[i]
            rest = len(s.req.prompt_ids) - s.prefilled
            chunk = None if budget is None else min(budget, rest)
            if (chunk is None or chunk == rest) and rest <= BATCH_PREFILL and not s.req.prompt_logprobs:
                short.append(i)
                # Its prompt blocks' hashes (none without prefix caching) past those already cached.
                pending_blocks.update(s.hashes[s.prefilled // self.block_size:])
            else:
                try:
                    self._prefill(i, chunk)
                except Exception as e:  # noqa: BLE001 - a failed request must not take others down
                    self._fail(s.req, e)
            if budget is not None:
                budget -= chunk
        self._prefill_short(short)

    def _plan_prefill(self) -> list[tuple[int, int, int]]:
        """The prompt runs of a ragged step, (row, start, end) each: `prefill_chunk` tokens at
        most, of the prompt being prefilled and then of the next admissible ones, or without
        chunking whole prompts while the pass holds fewer than PASS_TOKENS. Admission stops
        at a waiting request whose prompt shares blocks these runs are yet to compute: it is
        admitted at the next step, onto their cached blocks (requests arriving together with
        one system prompt compute it once)."""
        budget = self.prefill_chunk
        plan: list[tuple[int, int, int]] = []
        pending: set[bytes] = set()  # chain hashes of the prompt blocks the runs will compute
        size, tokens = self.block_size, 0
        while (budget > 0) if budget is not None else tokens < PASS_TOKENS:
            i = next((i for i, s in enumerate(self._slots)
                      if s is not None and not s.ready and all(i != r[0] for r in plan)), None)
            if i is None and (self._head_shares(pending) or (i := self._admit()) is None):
                break
            s = self._slots[i]
            start, n = s.prefilled, len(s.req.prompt_ids)
            end = n if budget is None else min(n, start + budget)
            plan.append((i, start, end))
            pending.update(s.hashes[start // size:end // size])
            tokens += end - start
            if budget is not None:
                budget -= end - start
        return plan

    def _ragged_step(self) -> None:
        """One engine step as one forward pass: a token of every decoding row and the prompt runs
        of _plan_prefill, side by side in one row of tokens (paged.Ragged), so that every product
        reads the weights once for all of them (llama.cpp's server batches so too): a long prompt
        chunked by --prefill-chunk costs the running requests a chunk's pass per token, and a
        decode step riding in a prompt's pass costs a few more rows. Attention runs per group of
        runs (paged.ragged_attention). A row whose prompt completes here samples its first token;
        it decodes from the next step on. The pass's logits are those of the decoding rows and
        of each run that ends a prompt (every position's with prompt_logprobs)."""
        self._steps += 1
        plan = self._plan_prefill()
        decoding = [i for i, s in enumerate(self._slots) if s is not None and s.ready]
        if not plan and not decoding:
            return
        size = self.block_size
        # Runs: (row, first position, tokens); decoding rows feed the token _accept left at pos - 1.
        runs = [(i, self._slots[i].pos - 1, 1) for i in decoding] + [(i, a, b - a) for i, a, b in plan]
        for i, a, n in runs:
            self._grow(self._slots[i], a + n)
        order, groups = ragged_groups([(a, n) for _, a, n in runs])
        runs = [runs[j] for j in order]
        width = self._width(max(len(self._slots[i].blocks) for i, _, _ in runs))
        # Built as Python lists, then one tensor each: a decode step's pass holds a few tokens.
        table: list[list[int]] = []
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []  # each token's place in the pool: block * size + offset
        picks: list[int] = []  # tokens of the pass whose logits are computed
        where: dict[int, tuple[int, int]] = {}  # row -> its picks' span
        for i, a, n in runs:
            s = self._slots[i]
            table.append(s.blocks + [NULL_BLOCK] * (width - len(s.blocks)))
            at = len(ids)
            if s.ready:  # a decoding row: its last accepted token
                ids.append(s.req.tokens[-1])
                want = [at]
            else:
                ids += s.req.prompt_ids[a:a + n]
                want = list(range(at, at + n)) if s.req.prompt_logprobs else [at + n - 1] if a + n == len(
                    s.req.prompt_ids) else []
                self.step_log.append(("prefill", s.number, a, a + n, self._steps))
            pos += range(a, a + n)
            slots += [s.blocks[p // size] * size + p % size for p in range(a, a + n)]
            where[i] = (len(picks), len(picks) + len(want))
            picks += want
        if decoding:
            self.step_log.append(("decode", tuple(self._slots[i].number for i in decoding)))
        self._table.blocks = torch.tensor(table, dtype=torch.long, device=self.device)  # (runs, width)
        self._table.ragged = Ragged(torch.tensor(slots, dtype=torch.long, device=self.device), tuple(groups))
        involved, where_decoding = [i for i, _, _ in runs], set(decoding)
        try:
            logits = self.runner.forward(torch.tensor([ids], device=self.device),
                                         torch.tensor([pos], dtype=torch.long, device=self.device), None,
                                         torch.tensor([picks], dtype=torch.long, device=self.device))[0]
            # (picks, vocab): the decoding rows' next tokens, sampled together
            toks = self._sample_slots([self._slots[i] for i in decoding], logits[[where[i][0] for i in decoding]])
        except Exception as e:  # noqa: BLE001 - the pass is every one of these requests'
            for i in involved:
                if self._slots[i] is not None:
                    self._fail(self._slots[i].req, e)
            return
        finally:
            self._table.ragged = None
        for i, a, n in runs:
            s = self._slots[i]
            if i in where_decoding:
                continue
            try:
                self._prefilled(i, a + n, logits[where[i][0]:where[i][1]])
            except Exception as e:  # noqa: BLE001 - this request's work failed: only it ends
                self._fail(s.req, e)
        for i, tok in zip(decoding, toks):
            s = self._slots[i]
            if s is None:
                continue
            try:
                if isinstance(tok, Exception):
                    raise tok
                self._accept(i, tok, logits[where[i][0]:where[i][1]])
            except Exception as e:  # noqa: BLE001 - this row's work failed: only its request ends
                self._fail(s.req, e)
        if decoding:
            self.metrics.steps += 1

    def _head_shares(self, blocks: set[bytes]) -> bool:
        """Whether the oldest waiting request's prompt holds one of `blocks` (chain hashes)."""
        if not blocks:
            return False
        with self._cv:
            head = self._pending[0] if self._pending else None
        return head is not None and not blocks.isdisjoint(prompt_hashes(head.prompt_ids, self.block_size))

    def _prefill_short(self, short: list[int]) -> None:
        """Prefill the deferred short rests of `short`'s rows in batched passes (prefill_groups)."""
        rests = [(self._slots[i].prefilled, len(self._slots[i].req.prompt_ids) - self._slots[i].prefilled)
                 for i in short]
        for group in prefill_groups(rests):
            rows = [short[j] for j in group]
            if len(rows) > 1:
                self._prefill_batch(rows)
                continue
            try:
                self._prefill(rows[0], None)
            except Exception as e:  # noqa: BLE001 - a failed request must not take others down
                self._fail(self._slots[rows[0]].req, e)

    def _admit(self) -> int | None:
        """Give the oldest waiting request a row and its blocks if both are there now (in order:
        a large request is not overtaken for ever by small ones); its row, or None."""
        with self._cv:
            while self._pending and self._pending[0].cancelled:
                self._finish_pending(self._pending.popleft())
            if not self._pending or not self._free_slots():
                return None
            req = self._pending[0]
            n, size = len(req.prompt_ids), self.block_size
            hashes = prompt_hashes(req.prompt_ids, size) if self.pool.prefix_caching else []
            # The block of the last prompt token is always computed (its logits start the answer,
            # and a block being written is never shared); prompt_logprobs needs every position.
            shareable = 0 if req.prompt_logprobs else (n - 1) // size
            total = blocks_for(n + req.max_tokens - 1, size)
            hits = self.pool.admit(hashes[:shareable], total, n)
            if hits is None:
                return None
            self._pending.popleft()
        i = self._slots.index(None)
        gen = None
        if not is_greedy(req.temperature):
            gen = torch.Generator(device=self.device)
            gen.manual_seed(req.seed if req.seed is not None else int(torch.randint(2**62, ()).item()))
        stops = self.stop_ids if req.stop_ids is None else frozenset(req.stop_ids)
        self._admitted += 1
        self._slots[i] = _Slot(req, n, StopMatcher(self.tokenizer, req.prompt_ids, req.stop), gen, stops,
                               number=self._admitted, blocks=list(hits), reserved=total - len(hits), hashes=hashes,
                               registered=len(hits), prefilled=len(hits) * size)
        return i

    def _width(self, blocks: int) -> int:
        return table_width(blocks, self.max_blocks, self._compiled)

    def _grow(self, s: _Slot, positions: int) -> None:
        """Allocate `s` the blocks that `positions` tokens take, out of its reservation."""
        while len(s.blocks) < blocks_for(positions, self.block_size):
            s.blocks.append(self.pool.allocate())
            s.reserved -= 1

    def _prefill(self, i: int, chunk: int | None) -> None:
        s = self._slots[i]
        req = s.req
        n, start = len(req.prompt_ids), s.prefilled
        end = n if chunk is None else min(n, start + chunk)
        self._grow(s, end)
        width = self._width(len(s.blocks))
        self._table.blocks = torch.tensor([s.blocks + [NULL_BLOCK] * (width - len(s.blocks))], dtype=torch.long,
                                          device=self.device)  # (1, width)
        ids = torch.tensor([req.prompt_ids[start:end]], dtype=torch.long, device=self.device)
        pos = torch.arange(start, end, device=self.device).unsqueeze(0)
        self.step_log.append(("prefill", s.number, start, end, self._steps))
        # The last position's logits only (the answer's first token), every position's for
        # prompt_logprobs (and for stand-in models without hidden states).
        last = (None if req.prompt_logprobs or not self._last_only
                else torch.tensor([end - start - 1], device=self.device))
        full = self.runner.forward(ids, pos, self._row0, last)  # (1, end - start or 1, vocab)
        if self.draft is not None:  # the draft's cache follows the model's, chunk for chunk
            self._draft_table.blocks = self._table.blocks
            self.draft(ids, pos, rows=self._row0, return_hidden=True)  # its keys and values only
        self._prefilled(i, end, full[0])

    def _prefilled(self, i: int, end: int, full: torch.Tensor) -> None:
        """Row i's prompt is in the cache up to `end`; `full` (tokens of the pass, vocab) its logits."""
        s = self._slots[i]
        req = s.req
        n = len(req.prompt_ids)
        s.prefilled = end
        for j in range(s.registered, min(end // self.block_size, len(s.hashes))):
            self.pool.register(s.blocks[j], s.hashes[j])  # complete now: later prompts may share it
        s.registered = max(s.registered, min(end // self.block_size, len(s.hashes)))
        if req.prompt_logprobs:
            s.prompt_logits.append(full)
        if end < n:
            return
        if req.prompt_logprobs:  # row i predicts prompt token i + 1
            req.prompt_token_logprobs = _logprobs(torch.cat(s.prompt_logits)[:-1], req.prompt_ids[1:],
                                                  req.logprobs or 0)
            s.prompt_logits.clear()
        logits = full[-1:]  # (1, vocab)
        self.metrics.prompt_tokens += n
        req.first_token = time.perf_counter()
        self.metrics.ttft.observe(req.first_token - req.submitted)
        self._accept(i, self._sample(s, logits), logits)

    def _prefill_batch(self, rows: list[int]) -> None:
        """Prefill the rest of several prompts in one forward pass, (len(rows), longest rest).
        A shorter rest is padded at its end: the padding's positions follow the prompt's (the
        context's last at most), where its keys land in the row's own unshared blocks, past
        anything it reads, and are overwritten before it gets there, or in the null block."""
        size, top = self.block_size, self.context - 1
        spans = []
        for i in rows:
            s = self._slots[i]
            start, end = s.prefilled, len(s.req.prompt_ids)
            self._grow(s, end)
            spans.append((start, end))
            self.step_log.append(("prefill", s.number, start, end, self._steps))
        longest = max(end - start for start, end in spans)
        pos = torch.tensor([[min(start + j, top) for j in range(longest)] for start, _ in spans], dtype=torch.long)
        ids = torch.zeros(len(rows), longest, dtype=torch.long)  # (rows, longest): token 0 pads
        for r, (i, (start, end)) in enumerate(zip(rows, spans)):
            ids[r, : end - start] = torch.tensor(self._slots[i].req.prompt_ids[start:end])
        width = self._width(max(blocks_for(int(p[-1]) + 1, size) for p in pos))
        table = torch.full((len(rows), width), NULL_BLOCK, dtype=torch.long)
        for r, i in enumerate(rows):
            blocks = self._slots[i].blocks
            table[r, : len(blocks)] = torch.tensor(blocks)
        self._table.blocks = table.to(self.device)  # (rows, width)
        ids, pos = ids.to(self.device), pos.to(self.device)
        try:
            # (rows, 1, vocab): each row's last position's logits (every position's for a stand-in)
            last = (torch.tensor([end - start - 1 for start, end in spans], device=self.device) if self._last_only
                    else None)
            full = self.runner.forward(ids, pos, None, last)
            if self.draft is not None:  # the draft's cache follows the model's
                self._draft_table.blocks = self._table.blocks
                self.draft(ids, pos, return_hidden=True)
        except Exception as e:  # noqa: BLE001 - the pass is every one of these requests'
            for i in rows:
                if self._slots[i] is not None:
                    self._fail(self._slots[i].req, e)
            return
        for r, (i, (start, end)) in enumerate(zip(rows, spans)):
            try:
                self._prefilled(i, end, full[r] if last is not None else full[r, : end - start])
            except Exception as e:  # noqa: BLE001 - this request's work failed: only it ends
                self._fail(self._slots[i].req, e)

    def _decode(self) -> None:
        rows = [i for i, s in enumerate(self._slots) if s is not None and s.ready]
        for i in rows:
            self._grow(self._slots[i], self._slots[i].pos)  # _accept fed its token at position pos - 1
        width = self._width(max(len(self._slots[i].blocks) for i in rows))
        table = [[NULL_BLOCK] * width for _ in range(self.max_batch)]
        for i in rows:
            table[i][: len(self._slots[i].blocks)] = self._slots[i].blocks
        if self._compiled:  # the compiled step reads one tensor, rewritten in place
            self._decode_blocks.copy_(torch.tensor(table, dtype=torch.long))
            self._table.blocks = self._decode_blocks
        else:
            self._table.blocks = torch.tensor(table, dtype=torch.long, device=self.device)  # (max_batch, width)
        self.step_log.append(("decode", tuple(self._slots[i].number for i in rows)))
        try:
            logits = self.runner.decode(self._step, self._tokens, self._pos)  # (max_batch, vocab): fixed shape
            # Every decoded row's next token (or the exception its own sampling raised), in one call.
            greedy = self._sample_batch(logits)
        except Exception as e:  # noqa: BLE001 - the forward is every running request's: none can go on
            for s in list(self._slots):
                if s is not None:
                    self._fail(s.req, e)
            return
        for i in rows:
            s = self._slots[i]
            if s is not None:
                try:
                    tok = greedy[i]
                    if isinstance(tok, Exception):
                        raise tok
                    self._accept(i, tok, logits[i : i + 1])
                except Exception as e:  # noqa: BLE001 - this row's work failed: only its request ends
                    self._fail(s.req, e)
        self.metrics.steps += 1

    def _drafts_for(self, s: _Slot) -> bool:
        """Whether row `s` decodes speculatively: there is a draft, and the request has no
        penalties, logit_bias or grammar. Those make each position's distribution depend on the
        tokens before it inside the drafted run (counts, the grammar's state), so verifying all
        positions from one forward would need the state advanced along the drafts; such a
        request falls back to one token per step (its row still rides in the verify pass)."""
        return self.draft is not None and s.options_made and s.sampling is None and s.matcher is None

    def _speculate(self) -> None:
        """One speculative step of every ready row (Leviathan et al. 2023; Chen et al. 2023):
        the draft proposes K tokens per row (K small forwards of the whole batch, the first
        re-reading the row's last two tokens: after a step that kept every draft, the draft has
        not seen the last one), then the model scores the row's last token and its K drafts in
        ONE forward (max_batch, K+1) over the paged cache. A greedy row keeps the drafts up to
        the first that differs from the model's argmax, then the model's own token: exactly the
        tokens of plain greedy decoding. A sampled row keeps draft x with probability
        min(1, p(x)/q(x)) of its filtered distributions, and the first rejected one is redrawn
        from max(0, p - q): its tokens are distributed as the model's. The kept tokens go
        through _accept one at a time, so stop ids, stop strings and max_tokens end the row
        mid-run. Rolling back costs nothing: a rejected draft's keys lie past the row's
        position, masked until overwritten, and blocks holding only such positions go back to
        the row's reservation. Rows that cannot speculate (_drafts_for) take position 0's
        logits, as a plain decode step.

        A row writes K+1 positions whatever it may keep (fixed shapes); positions past its last
        useful one are clamped to the context's last, which no sequence reads unmasked."""
        k, size = self.draft_tokens, self.block_size
        rows = [i for i, s in enumerate(self._slots) if s is not None and s.ready]
        spec = {i: self._drafts_for(self._slots[i]) for i in rows}
        # Drafts a row may keep: never past max_tokens (its own last token follows them).
        usable = {i: min(k, self._slots[i].req.max_tokens - len(self._slots[i].req.tokens) - 1) if spec[i] else 0
                  for i in rows}
        last = {i: self._slots[i].pos - 1 for i in rows}  # position of the row's last token (fed now)
        for i in rows:
            self._grow(self._slots[i], last[i] + usable[i] + 1)
        width = min(self.max_blocks, 1 << (blocks_for(max(last.values()) + k + 1, size) - 1).bit_length())
        table = torch.full((self.max_batch, width), NULL_BLOCK, dtype=torch.long)
        tail = torch.zeros(self.max_batch, 2, dtype=torch.long)  # (max_batch, 2): tokens at last - 1, last
        start = torch.zeros(self.max_batch, 1, dtype=torch.long)  # free and prefilling rows: position 0
        for i in rows:
            s = self._slots[i]
            table[i, : len(s.blocks)] = torch.tensor(s.blocks)
            tail[i] = torch.tensor((s.req.prompt_ids + s.req.tokens)[-2:])
            start[i, 0] = last[i]
        table, tail, start = table.to(self.device), tail.to(self.device), start.to(self.device)
        self._table.blocks = self._draft_table.blocks = table  # (max_batch, width)
        self.step_log.append(("speculate", tuple(self._slots[i].number for i in rows), k))
        top = self.context - 1
        try:
            for i in rows:  # tokens decoded without the draft (above draft_max_batch): into its cache first
                s = self._slots[i]
                behind = max(s.drafted_to, len(s.req.prompt_ids))
                if spec[i] and behind < last[i] - 1:
                    ids = (s.req.prompt_ids + s.req.tokens)[behind : last[i] - 1]
                    self.draft(torch.tensor([ids], device=self.device),
                               torch.arange(behind, last[i] - 1, device=self.device).unsqueeze(0),
                               rows=torch.tensor([i], device=self.device), return_hidden=True)
            # Draft: K tokens per row, each from the request's own options and generator.
            tok, pos = tail, (start - 1 + torch.arange(2, device=self.device)).clamp(0, top)  # (max_batch, 2)
            drafted, qs = [], []
            for _ in range(k):
                d, q = self._propose(rows, spec, self.draft(tok, pos)[:, -1])
                drafted.append(d)
                qs.append(q)
                tok, pos = d.unsqueeze(1), (pos[:, -1:] + 1).clamp(max=top)
            drafts = torch.stack(drafted, 1)  # (max_batch, k)
            block = torch.cat([tail[:, -1:], drafts], 1)  # (max_batch, k+1): the last token, then the drafts
            logits = self.runner.forward(block, (start + torch.arange(k + 1, device=self.device)).clamp(max=top))
            # (max_batch, k+1, vocab)
            plain = [i for i in rows if not spec[i]]
            fallback = dict(zip(plain, self._sample_slots([self._slots[i] for i in plain], logits[plain, 0])))
        except Exception as e:  # noqa: BLE001 - the forwards are every running request's
            for s in list(self._slots):
                if s is not None:
                    self._fail(s.req, e)
            return
        drafts_l = drafts.tolist()
        for i in rows:
            s = self._slots[i]
            try:
                if not spec[i]:
                    tok = fallback[i]
                    if isinstance(tok, Exception):
                        raise tok
                    new, kept = [tok], 0
                    self.spec["fallback_steps"] += 1
                else:
                    new, kept = self._verify(s, logits[i], drafts_l[i][: usable[i]], [q.get(i) for q in qs])
                    # The draft fed the tail and its first k - 1 drafts: valid up to the kept ones.
                    s.drafted_to = last[i] + 1 + min(kept, k - 1)
                    self.spec["rounds"] += 1
                    self.spec["drafted"] += usable[i]
                    self.spec["accepted"] += kept
                for j, t in enumerate(new):
                    if not self._accept(i, t, logits[i, j : j + 1]):
                        break
                if self._slots[i] is s:  # still running: blocks past its position back to its reservation
                    while len(s.blocks) > blocks_for(s.pos, size):
                        self.pool.unallocate(s.blocks.pop())
                        s.reserved += 1
            except Exception as e:  # noqa: BLE001 - this row's work failed: only its request ends
                self._fail(s.req, e)
        self.metrics.steps += 1

    def _propose(self, rows: list[int], spec: dict[int, bool],
                 logits: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The draft's next token for every row of its logits (max_batch, vocab): the argmax for
        greedy rows (and rows that do not speculate: their drafts are ignored), a sample of the
        filtered distribution q for sampled rows, whose q (vocab,) it returns by row."""
        tokens = logits.argmax(-1)
        sampled = [i for i in rows if spec[i] and self._slots[i].gen is not None]
        qs: dict[int, torch.Tensor] = {}
        if sampled:
            q = self._probabilities(sampled, logits[sampled])
            for j, i in enumerate(sampled):
                noise = torch.empty_like(q[j]).exponential_(1, generator=self._slots[i].gen)
                tokens[i] = (q[j] / noise).argmax()
                qs[i] = q[j]
        return tokens, qs

    def _probabilities(self, rows: list[int], logits: torch.Tensor) -> torch.Tensor:
        """filtered_probabilities with rows' request options, one row of `logits` (len(rows), vocab) each."""
        reqs = [self._slots[i].req for i in rows]

        return filtered_probabilities(logits, _per_row(reqs, "temperature", 1.0, logits),
                                      _top_k_per_row(reqs, logits), _per_row(reqs, "top_p", 1.0, logits),
                                      _per_row(reqs, "min_p", 0.0, logits))

    def _verify(self, s: _Slot, logits: torch.Tensor, drafted: list[int],
                qs: list[torch.Tensor | None]) -> tuple[list[int], int]:
        """The tokens row `s` keeps from the model's logits (k+1, vocab) at its last token and
        drafts: the accepted drafts then one of the model's; and how many drafts were accepted."""
        u = len(drafted)
        if s.gen is None:  # greedy: exactly the model's argmax tokens
            best = logits[: u + 1].argmax(-1)  # (u+1,)
            n = int(greedy_accepted(best.unsqueeze(0), torch.tensor([drafted], dtype=torch.long, device=best.device),
                                    torch.tensor([u], device=best.device))[0]) if u else 0
            return drafted[:n] + [int(best[n])], n
        i = self._slots.index(s)
        p = self._probabilities([i] * (u + 1), logits[: u + 1])  # (u+1, vocab)
        q = torch.stack(qs[:u]) if u else p[:0]
        return accept_drafts(p, q, drafted, s.gen)

    def _sample(self, s: _Slot, logits: torch.Tensor) -> int:
        tok = self._sample_slots([s], logits)[0]  # logits (1, vocab)
        if isinstance(tok, Exception):
            raise tok
        return tok

    def _sample_batch(self, logits: torch.Tensor) -> list[int | Exception | None]:
        """Per row of the decode step's logits (max_batch, vocab): its slot's next token, the
        exception its own sampling raised, or None for a row not decoding."""
        rows = [i for i, s in enumerate(self._slots) if s is not None and s.ready]
        out: list[int | Exception | None] = [None] * len(self._slots)
        if rows:
            for i, tok in zip(rows, self._sample_slots([self._slots[i] for i in rows], logits[rows])):
                out[i] = tok
        return out

    def _sample_slots(self, slots: list[_Slot], logits: torch.Tensor) -> list[int | Exception]:
        """The next token of each slot from its row of `logits` (len(slots), vocab), all rows at
        once with per-row options (inference/sampling.py): penalties and logit_bias, the
        grammar's mask (structured.py), then greedy or seeded sampling. Each request draws its
        noise from its own generator, so its tokens do not depend on the batch. A row whose own
        preparation (its grammar) fails gets the exception instead."""
        failed: dict[int, Exception] = {}
        masks: list[torch.Tensor | None] = []
        for j, s in enumerate(slots):
            try:
                if not s.options_made:
                    self._make_options(s, logits.shape[-1])
                masks.append(None if s.matcher is None else s.matcher.allowed())
            except Exception as e:  # noqa: BLE001 - this row's options failed: only its request ends
                failed[j] = e
                masks.append(None)
        if not failed and all(s.gen is None and s.sampling is None and s.matcher is None for s in slots):
            return logits.argmax(dim=-1).tolist()  # plain greedy rows: the model's argmax
        logits = apply_masks(apply_states(logits, [s.sampling for s in slots]), masks)
        noise = torch.ones(logits.shape, dtype=torch.float32, device=logits.device)
        for j, s in enumerate(slots):
            if s.gen is not None:
                noise[j : j + 1].exponential_(1, generator=s.gen)

        reqs = [s.req for s in slots]
        toks = sample_rows(logits, _per_row(reqs, "temperature", 0.0, logits),
                           _top_k_per_row(reqs, logits), _per_row(reqs, "top_p", 1.0, logits),
                           _per_row(reqs, "min_p", 0.0, logits), noise).tolist()
        return [failed.get(j, t) for j, t in enumerate(toks)]

    def _make_options(self, s: _Slot, vocab: int) -> None:
        req = s.req
        s.options_made = True
        if req.presence_penalty or req.frequency_penalty or req.repetition_penalty != 1 or req.logit_bias:
            s.sampling = SamplingState(vocab, req.prompt_ids, req.presence_penalty, req.frequency_penalty,
                                       req.repetition_penalty, dict(req.logit_bias or {}), device=self.device)
        if req.constraint is not None:
            s.matcher = Matcher(req.constraint, self.tokenizer, vocab, s.stop_ids)

    def _accept(self, i: int, tok: int, logits: torch.Tensor) -> bool:
        """Take `tok` as row i's next token; whether the request goes on."""
        s = self._slots[i]
        req = s.req
        self._publish(s)
        if tok in s.stop_ids:
            self._finish(i, "stop")
            return False
        req.tokens.append(tok)
        if s.sampling is not None:
            s.sampling.update(tok)
        if s.matcher is not None:
            s.matcher.accept(tok)
        if req.logprobs is not None:  # of the model's distribution, before temperature and filters
            req.token_logprobs += _logprobs(logits, [tok], req.logprobs)
        self.metrics.generation_tokens += 1
        delta, hit = s.stream.push(tok)
        if delta:
            self._emit(req, Event("text", delta))
        if hit or (s.matcher is not None and s.matcher.done):  # a stop string, or the grammar is complete
            self._finish(i, "stop")
            return False
        if len(req.tokens) >= req.max_tokens:
            self._finish(i, "length")
            return False
        self._set_row(i, tok, s.pos)
        s.pos += 1
        return True

    def _set_row(self, i: int, tok: int, pos: int) -> None:
        """Row i of the decode step's inputs: token `tok` at position `pos`."""
        if self._rows_np is not None:
            self._rows_np[0][i, 0], self._rows_np[1][i, 0] = tok, pos
        else:
            self._tokens[i, 0], self._pos[i, 0] = tok, pos

    def _publish(self, s: _Slot) -> None:
        """Put the blocks of `s` that generated tokens filled into the prefix cache (a next chat
        turn holds this turn's prompt and answer). Called as a token is accepted, when the
        sequence's first s.pos positions hold the keys and values of prompt + tokens so far (the
        last accepted token's are written by the next forward pass)."""
        full = s.pos // self.block_size
        if not self.pool.prefix_caching or full <= len(s.hashes):
            return
        seq = s.req.prompt_ids + s.req.tokens  # (s.pos,) tokens whose keys and values are cached
        assert len(seq) == s.pos, (len(seq), s.pos)
        size, parent = self.block_size, s.hashes[-1] if s.hashes else b""
        for j in range(len(s.hashes), full):
            parent = chain_hash(parent, seq[j * size:(j + 1) * size])
            s.hashes.append(parent)
        for j in range(s.registered, full):
            self.pool.register(s.blocks[j], s.hashes[j])
        s.registered = full

    def _finish(self, i: int, reason: str) -> None:
        s = self._slots[i]
        self._free(i)
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
