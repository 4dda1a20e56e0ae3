"""The loader that training reads: (x, y) batches of windows of a prepared token dataset
(data/shards.py writes it), shuffled per epoch, split across data-parallel ranks, resumable."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from llamaworks.data.shards import SPLITS, TokenStream, open_token_dataset, window_order

log = logging.getLogger(__name__)


class EpochCursor:
    """The position of a loader in its epoch's global order, shared by the loaders: global batch
    i of an epoch is positions [i*G, (i+1)*G) (G = batch_size * world_size) and rank r takes
    [r*batch_size, (r+1)*batch_size) of it. The subclass sets position, epoch, rank,
    batch_size, global_batch, batches_per_epoch and infinite."""

    def batch_start(self, name: str) -> int:
        """This rank's first position of the next batch; rolls over to the next epoch (an
        infinite loader) or ends the pass (a finite one: StopIteration, position back at 0)."""
        if self.position >= self.batches_per_epoch * self.global_batch:
            self.position = 0
            if not self.infinite:
                raise StopIteration  # position is back at 0: the next `for` loop is a fresh pass
            self.epoch += 1
            log.info("%s loader: epoch %d begins (%d batches per epoch)", name, self.epoch, self.batches_per_epoch)
        return self.position + self.rank * self.batch_size

    def check_global_batch(self, state: dict, unit: str, fix: str = "") -> None:
        """A saved stream continues exactly only with the same global batch (the world size may
        change if batch_size * world_size does not)."""
        saved_global = state["batch_size"] * state["world_size"]
        if saved_global != self.global_batch:
            raise ValueError(f"the loader state was saved with a global batch of {saved_global} {unit} "
                             f"(batch_size {state['batch_size']} x world_size {state['world_size']}), this "
                             f"loader has {self.global_batch}; the stream cannot continue exactly. Choose "
                             f"batch_size = {saved_global} // world_size{fix}")


class TokenLoader(EpochCursor):
    """(x, y) int64 batches of shape (batch_size, seq_len) from a prepared split; y is x shifted by one.

    Window k holds tokens [k*seq_len, k*seq_len + seq_len + 1) of the split's stream, so windows
    share one boundary token and every token is a target once; there are (tokens - 1) // seq_len.
    Each epoch visits them in the order `window_order(..., seed, epoch)` (identity when not
    shuffled). With G = batch_size * world_size, global batch i of an epoch is positions
    [i*G, (i+1)*G) of that order, and rank r takes the contiguous slice [r*batch_size,
    (r+1)*batch_size), so the ranks' batches stacked in rank order equal one process's batch of
    size G. An epoch has num_windows // G batches (the few remaining positions are skipped). An
    infinite loader then goes on to the next epoch's order; a finite one (the default for val)
    stops, and a new `for` loop starts a fresh pass. Shards are memory-mapped and read per window.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", *, batch_size: int, seq_len: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool | None = None,
                 infinite: bool | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if batch_size < 1 or seq_len < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1, seq_len >= 1 and 0 <= rank < world_size; got "
                             f"{batch_size}, {seq_len}, rank {rank} of {world_size}")
        self.manifest = open_token_dataset(data_dir)
        self.root, self.split = Path(data_dir), split
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.seed, self.epoch, self.position = seed, 0, 0  # position: windows of this epoch consumed
        self.shuffle = split == "train" if shuffle is None else shuffle
        self.infinite = split == "train" if infinite is None else infinite
        self._stream = TokenStream(data_dir, self.manifest, split)
        self.num_windows = max(0, self._stream.tokens - 1) // seq_len
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = self.num_windows // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"the {split} split of {data_dir} has {self.num_windows} windows of seq_len+1 = "
                             f"{seq_len + 1} tokens, fewer than one global batch of {self.global_batch}; "
                             "lower batch_size or seq_len, or prepare more data")

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self):
        first = self.batch_start(self.split)
        positions = np.arange(first, first + self.batch_size, dtype=np.uint64)
        if self.shuffle:
            positions = window_order(positions, self.num_windows, self.seed, self.epoch)
        rows = np.stack([self._stream.read(int(w) * self.seq_len, self.seq_len + 1) for w in positions])
        self.position += self.global_batch
        import torch  # here, not at the top: encoding workers import this module and need no torch

        rows = torch.from_numpy(rows)  # (batch_size, seq_len + 1)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def rewind(self) -> None:
        """Back to the first batch of the first epoch: the next batches are those of a new loader."""
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "shuffle": int(self.shuffle), "batch_size": self.batch_size, "seq_len": self.seq_len,
                "world_size": self.world_size, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the saved global stream; the world size may change if batch_size * world_size does not."""
        self.check_global_batch(state, "windows", ", or start a fresh loader")
        for key, mine in (("seq_len", self.seq_len), ("num_windows", self.num_windows),
                          ("shuffle", int(self.shuffle))):
            if state[key] != mine:
                raise ValueError(f"the loader state has {key}={state[key]} but this loader has {mine} (a "
                                 "different seq_len, shuffle setting or prepared dataset); it cannot resume")
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]
