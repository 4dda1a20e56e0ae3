"""The loader fine-tuning reads: (x, y) batches of tokenised instruction examples (data/sft.py),
shuffled per epoch, split across data-parallel ranks, resumable.

Unpacked (the default), a row holds one example, right-padded; the padding's targets are
IGNORE_INDEX. Under the causal mask a token attends to the tokens before it only, so the padding
after an example changes none of its logits, and no two examples share a row to attend to each
other. Rows are padded to the longest example of the micro-batch, not to train.seq_len:
instruction examples are mostly far shorter than the context.

Packed (pack=True), the same micro-batch's examples go whole into as few rows as the fewest
tokens allow (pack_rows), and a batch is (x, y, doc_ids): doc_ids numbers the examples of each row,
and Transformer.forward(x, doc_ids=...) lets a token attend only to the earlier tokens of its own
example, at positions counted from that example's start, so a packed example is computed exactly
as it is alone (document masking; Krell et al. 2021, "Efficient sequence packing without
cross-contamination"). Packing changes which rows examples share, never which examples a step
reads: the steps, the order, the loader's state and the loss (the mean over the step's unmasked
targets) are those of the unpacked loader, and only the padding computed differs. A larger
train.micro_batch_size fills the rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from llamaworks.data.sft import IGNORE_INDEX, TokenizedExample
from llamaworks.data.shards import window_order
from llamaworks.train.loader import EpochCursor


def pack_rows(lengths: Sequence[int], seq_len: int, pad_multiple: int = 8) -> tuple[int, list[list[int]]]:
    """(width, rows): examples of these lengths packed whole into rows of `width` <= seq_len
    tokens, each row the indices of its examples in increasing order.

    First-fit decreasing for each candidate width: the longest example rounded up to pad_multiple
    (what an unpacked batch pads to), and for r = 1, 2, ... rows the total length / r rounded up.
    The plan with the fewest tokens (rows x width) wins, the narrower on a tie (masked attention
    costs the square of the width): never more tokens than one example per row.
    """
    assert lengths and max(lengths) <= seq_len, (max(lengths, default=None), seq_len)

    def rounded(n: int) -> int:
        return min(seq_len, -(-n // pad_multiple) * pad_multiple)

    total, longest = sum(lengths), rounded(max(lengths))
    widths = sorted({longest} | {w for r in range(1, len(lengths) + 1) if (w := rounded(-(-total // r))) > longest})
    best = None
    for capacity in widths:
        rows: list[list[int]] = []
        fill: list[int] = []
        for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
            row = next((r for r, used in enumerate(fill) if used + lengths[i] <= capacity), None)
            if row is None:
                rows.append([])
                fill.append(0)
                row = len(rows) - 1
            rows[row].append(i)
            fill[row] += lengths[i]
        width = rounded(max(fill))
        if best is None or (len(rows) * width, width) < (len(best[1]) * best[0], best[0]):
            best = width, [sorted(r) for r in rows]
    return best


def fingerprint(examples: Sequence[TokenizedExample]) -> str:
    """A digest of the examples' ids and labels: a resumed run must read the very same examples."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(len(ex.ids).to_bytes(4, "little"))
        h.update(ex.ids.tobytes())
        h.update(ex.labels.tobytes())
    return h.hexdigest()[:16]


class SFTLoader(EpochCursor):
    """(x, y) int64 batches of shape (batch_size, width): x = ids[:-1], y = labels[1:] of each example;
    with pack=True, (x, y, doc_ids) of shape (rows, width), the batch's examples packed (pack_rows).

    width is the longest example of the batch less one, rounded up to pad_multiple (kernels like
    aligned shapes; sequence parallelism needs a multiple of the tensor-parallel degree) and capped
    at seq_len. Training loaders (train=True) visit the examples in the order
    `window_order(..., seed, epoch)` each epoch, global batch i being positions [i*G, (i+1)*G) with
    G = batch_size * world_size and rank r taking [r*batch_size, (r+1)*batch_size) of it (as
    TokenLoader does), skip the remainder of an epoch and go on forever. Validation loaders
    (train=False) read every example once in file order, the last batch possibly smaller; a new
    `for` loop (or `rewind`) starts a fresh pass.
    """

    def __init__(self, examples: Sequence[TokenizedExample], *, batch_size: int, seq_len: int, pad_id: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, train: bool = True, pad_multiple: int = 8,
                 name: str = "train", pack: bool = False):
        if batch_size < 1 or seq_len < 1 or pad_multiple < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size, seq_len, pad_multiple >= 1 and 0 <= rank < world_size; got "
                             f"{batch_size}, {seq_len}, {pad_multiple}, rank {rank} of {world_size}")
        if not train and world_size != 1:
            raise ValueError("a validation loader is read whole by every rank: world_size must be 1")
        too_long = [ex.line for ex in examples if len(ex.ids) > seq_len]
        if too_long:
            raise ValueError(f"examples (line {too_long[0]} and {len(too_long) - 1} more) are longer than seq_len "
                             f"{seq_len}; drop them first (data.sft.tokenize_examples)")
        self.examples, self.name, self.pack = list(examples), name, pack
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
        self.rank, self.world_size, self.seed, self.pad_multiple = rank, world_size, seed, pad_multiple
        self.shuffle = self.infinite = train
        self.epoch, self.position = 0, 0  # position: examples of this epoch consumed, all ranks together
        self.global_batch = batch_size * world_size
        n = len(self.examples)
        self.batches_per_epoch = n // self.global_batch if train else -(-n // batch_size)
        if train and self.batches_per_epoch == 0:
            raise ValueError(f"{n} {name} examples are fewer than one global batch of {self.global_batch} "
                             f"({batch_size} per rank x {world_size} rank(s)); lower the batch size or add examples")
        self.fingerprint = fingerprint(self.examples)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> SFTLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        first = self.batch_start(self.name)
        if self.shuffle:
            positions = np.arange(first, first + self.batch_size, dtype=np.uint64)
            order = window_order(positions, len(self.examples), self.seed, self.epoch)
        else:
            order = np.arange(first, min(first + self.batch_size, len(self.examples)))
        self.position += self.global_batch
        return self.collate([self.examples[int(i)] for i in order])

    def collate(self, batch: Sequence[TokenizedExample]) -> tuple[torch.Tensor, ...]:
        if self.pack:
            return self.collate_packed(batch)
        longest = max(len(ex.ids) for ex in batch) - 1
        width = min(self.seq_len, -(-longest // self.pad_multiple) * self.pad_multiple)
        x = torch.full((len(batch), width), self.pad_id, dtype=torch.int64)
        y = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.int64)
        for row, ex in enumerate(batch):
            n = len(ex.ids) - 1
            x[row, :n] = torch.from_numpy(ex.ids[:-1].astype(np.int64))
            y[row, :n] = torch.from_numpy(ex.labels[1:].astype(np.int64))
        return x, y

    def collate_packed(self, batch: Sequence[TokenizedExample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lengths = [len(ex.ids) - 1 for ex in batch]
        width, rows = pack_rows(lengths, self.seq_len, self.pad_multiple)
        x = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)
        y = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)
        doc_ids = torch.empty((len(rows), width), dtype=torch.int64)
        for row, members in enumerate(rows):
            start = 0
            for doc, i in enumerate(members):
                n, ex = lengths[i], batch[i]
                x[row, start:start + n] = torch.from_numpy(ex.ids[:-1].astype(np.int64))
                y[row, start:start + n] = torch.from_numpy(ex.labels[1:].astype(np.int64))
                doc_ids[row, start:start + n] = doc
                start += n
            doc_ids[row, start:] = len(members)  # the padding, a document of its own: no example sees it
        return x, y, doc_ids

    def rewind(self) -> None:
        """Back to the first batch of the first epoch: the next batches are those of a new loader."""
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": int(self.shuffle),
                "batch_size": self.batch_size, "world_size": self.world_size,
                "num_examples": len(self.examples), "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved global stream; the world size may change if batch_size * world_size does not."""
        self.check_global_batch(state, "examples")
        for key, mine in (("num_examples", len(self.examples)), ("fingerprint", self.fingerprint),
                          ("shuffle", int(self.shuffle))):
            if state.get(key) != mine:
                raise ValueError(f"the loader state has {key}={state.get(key)} but this loader has {mine}: the "
                                 "instruction data, its held-out fraction, the chat template or seq_len changed "
                                 "since the checkpoint, so the run cannot resume exactly; restore them or start a "
                                 "new run")
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]
