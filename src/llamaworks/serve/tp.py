"""The engine's forward passes, in this process (LocalRunner) or over tensor-parallel ranks
under torchrun (TPRunner on rank 0, serve_worker on the others).

The engine (serve/engine.py) schedules, samples and keeps the block pool on rank 0 alone; a
forward pass is all it shares. It sets the block table, then calls the runner:
`forward(tokens, pos, rows)` (a prefill, the model's full logits) or `decode(step, tokens,
pos)` (the batch's decode step). Under tensor parallelism every rank holds 1/tp of the heads
and SwiGLU units (parallel/tp_load.py) and must run the same forward pass, whose all-reduces
join them; so rank 0 first broadcasts the pass's inputs (op, shapes, token ids, positions,
block table, rows) as one packed int64 tensor over a gloo group of its own, and every other
rank, looping in serve_worker(), unpacks them and runs the same pass on its own KV cache
(its heads of the same blocks). Only rank 0 samples: the others never need the tokens,
which reach them as the next pass's inputs. The stop op ends the workers' loop (after the
engine thread ends: a drain on SIGTERM finishes the requests in flight first).

A forward pass that fails on one rank and not the others leaves the others waiting in a
collective: under tensor parallelism such a failure ends the server (torchrun stops every
rank when one exits), where one process would fail only the requests of that pass.
"""

from __future__ import annotations

import datetime
import signal

import torch
import torch.distributed as dist

from llamaworks.inference.paged import BlockTable, setup_paged_caches

# The packed broadcast: HEADER int64s, then the payload they describe.
_STOP, _FORWARD, _DECODE = 0, 1, 2
_HEADER = 8  # op, bsz, seq, table rows, table width, has rows, has last, payload length
_SETUP = 6  # num_blocks, block_size, context, packed capacity, protocol version, KV dtype (_KV_DTYPES)
_VERSION = 3
_KV_DTYPES = (None, torch.float32, torch.bfloat16)  # None: the model's
# A worker idles in a broadcast until the next request arrives, for as long as the server
# runs: the control group's timeout must not end an idle server (gloo's default is 30 min).
_IDLE_TIMEOUT = datetime.timedelta(days=365)


def forward(model, tokens: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None = None,
            last: torch.Tensor | None = None) -> torch.Tensor:
    """model(tokens, pos, rows=rows): logits (bsz, seq, vocab); with `last` (bsz,), only those of
    position last[b] of each row, (bsz, 1, vocab): a prefill needs no more, and the output
    layer is a third of a small model's work per token; with `last` (bsz, k), those of k
    positions per row, (bsz, k, vocab) (a ragged pass: a decoding row's token, a prompt's last)."""
    if last is None:
        return model(tokens, pos, rows=rows)
    h = model(tokens, pos, rows=rows, return_hidden=True)  # (bsz, seq, dim), after the final norm
    h = h[torch.arange(h.shape[0], device=h.device).unsqueeze(-1), last.view(h.shape[0], -1)]  # (bsz, k, dim)
    return model.output(h).float()


class LocalRunner:
    """The forward passes in this process: the engine's default."""

    def __init__(self, model):
        self.model = model

    def setup(self, num_blocks: int, block_size: int, context: int, max_batch: int,
              kv_dtype: torch.dtype | None = None) -> BlockTable:
        """Give the model its paged KV cache (inference/paged.py) in kv_dtype (None: the model's);
        the table the engine fills."""
        return setup_paged_caches(self.model, num_blocks, block_size, context, dtype=kv_dtype)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None = None,
                last: torch.Tensor | None = None) -> torch.Tensor:
        return forward(self.model, tokens, pos, rows, last)  # (bsz, seq or 1, vocab)

    def decode(self, step, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return step(self.model, tokens, pos)  # (bsz, vocab)

    def close(self) -> None:
        pass


def control_group():
    """A gloo group of all ranks for the step broadcasts (CPU tensors, whatever the model's
    device; a timeout an idle server never reaches). Every rank calls it, in the same order."""
    return dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)


def _pack(op: int, tokens=None, pos=None, blocks=None, rows=None, last=None) -> torch.Tensor:
    if op == _STOP:
        return torch.tensor([_STOP] + [0] * (_HEADER - 1), dtype=torch.int64)
    bsz, seq = tokens.shape
    n_rows, width = blocks.shape
    parts = [tokens.reshape(-1), pos.expand(bsz, seq).reshape(-1), blocks.reshape(-1)]
    if rows is not None:
        parts.append(rows.reshape(-1))
    if last is not None:
        parts.append(last.reshape(-1))
    payload = torch.cat([p.to("cpu", torch.int64) for p in parts])
    header = torch.tensor([op, bsz, seq, n_rows, width, rows is not None, last is not None, payload.numel()],
                          dtype=torch.int64)
    return torch.cat([header, payload])


def _unpack(packed: torch.Tensor, device) -> tuple:
    """(op, tokens (bsz, seq), pos (bsz, seq), blocks (table rows, width), rows (bsz,) or None,
    last (bsz,) or None)."""
    op, bsz, seq, n_rows, width, has_rows, has_last, _ = packed[:_HEADER].tolist()
    if op == _STOP:
        return op, None, None, None, None, None
    at = _HEADER
    tokens = packed[at:at + bsz * seq].view(bsz, seq)
    at += bsz * seq
    pos = packed[at:at + bsz * seq].view(bsz, seq)
    at += bsz * seq
    blocks = packed[at:at + n_rows * width].view(n_rows, width)
    at += n_rows * width
    rows = packed[at:at + bsz] if has_rows else None
    at += bsz if has_rows else 0
    last = packed[at:at + bsz] if has_last else None
    return tuple([op] + [None if t is None else t.to(device) for t in (tokens, pos, blocks, rows, last)])


class TPRunner:
    """Rank 0's runner under tensor parallelism: each forward pass's inputs go to every rank
    (one broadcast of `capacity` int64s, a second one for a pass too large for it: a long
    prompt's prefill), then rank 0 runs its own share of the pass."""

    def __init__(self, model, group=None):
        assert dist.is_initialized() and dist.get_rank() == 0, "TPRunner runs on rank 0; the others serve_worker()"
        self.model, self.group = model, group if group is not None else control_group()
        self.table: BlockTable | None = None
        self.capacity = 0
        self.closed = False

    def setup(self, num_blocks: int, block_size: int, context: int, max_batch: int,
              kv_dtype: torch.dtype | None = None) -> BlockTable:
        # Room for a decode step's inputs (and short prefills) in the one broadcast: the table
        # is (max_batch, blocks of the context) at most.
        width = -(-context // block_size)
        self.capacity = _HEADER + 4 * max(max_batch, 256) + max_batch * (width + 1)
        dist.broadcast(torch.tensor([num_blocks, block_size, context, self.capacity, _VERSION,
                                     _KV_DTYPES.index(kv_dtype)]), 0, group=self.group)
        self.table = setup_paged_caches(self.model, num_blocks, block_size, context, dtype=kv_dtype)
        return self.table

    def _send(self, op: int, tokens=None, pos=None, rows=None, last=None) -> None:
        packed = _pack(op, tokens, pos, None if op == _STOP else self.table.blocks, rows, last)
        buf = torch.zeros(self.capacity, dtype=torch.int64)
        n = min(packed.numel(), self.capacity)
        buf[:n] = packed[:n]
        dist.broadcast(buf, 0, group=self.group)
        if packed.numel() > self.capacity:  # the rest, whose length the header gave
            dist.broadcast(packed[self.capacity:].contiguous(), 0, group=self.group)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None = None,
                last: torch.Tensor | None = None) -> torch.Tensor:
        self._send(_FORWARD, tokens, pos, rows, last)
        return forward(self.model, tokens, pos, rows, last)

    def decode(self, step, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # The workers run model(tokens, pos)[:, -1], the uncompiled step (serve refuses
        # --compile with --tp), whose collectives are those of `step`.
        self._send(_DECODE, tokens, pos)
        return step(self.model, tokens, pos)

    def close(self) -> None:
        """End the workers' loop (once: at the engine thread's end, or the server's). Before
        setup (the engine failed to start: a bad option), an empty setup stops them there."""
        if self.closed:
            return
        self.closed = True
        if self.capacity:
            self._send(_STOP)
        else:
            dist.broadcast(torch.zeros(_SETUP, dtype=torch.int64), 0, group=self.group)


def _receive(group, capacity: int, device) -> tuple:
    buf = torch.empty(capacity, dtype=torch.int64)
    dist.broadcast(buf, 0, group=group)
    total = _HEADER + int(buf[_HEADER - 1])
    if total > capacity:
        rest = torch.empty(total - capacity, dtype=torch.int64)
        dist.broadcast(rest, 0, group=group)
        buf = torch.cat([buf, rest])
    return _unpack(buf[:total], device)


def serve_worker(model, group=None) -> int:
    """A rank other than 0 of `serve` under torchrun: set up the KV cache rank 0's engine asks
    for, then run every forward pass it broadcasts, until it broadcasts stop. SIGTERM and
    SIGINT are ignored here (torchrun and a terminal send them to every rank): rank 0 drains
    its requests and then stops the workers. Returns the number of passes run."""
    assert dist.is_initialized() and dist.get_rank() != 0, "serve_worker runs on the ranks other than 0"
    group = group if group is not None else control_group()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    setup = torch.empty(_SETUP, dtype=torch.int64)
    dist.broadcast(setup, 0, group=group)
    num_blocks, block_size, context, capacity, version, kv = setup.tolist()
    if num_blocks == 0:  # rank 0 stopped before its engine started
        return 0
    assert version == _VERSION, (version, _VERSION)
    device = model.output.weight.device
    table = setup_paged_caches(model, num_blocks, block_size, context, dtype=_KV_DTYPES[kv])
    passes = 0
    with torch.no_grad():
        while True:
            op, tokens, pos, blocks, rows, last = _receive(group, capacity, device)
            if op == _STOP:
                return passes
            table.blocks = blocks
            if op == _FORWARD:
                forward(model, tokens, pos, rows, last)
            else:
                assert op == _DECODE, op
                model(tokens, pos)
            passes += 1
