"""`llamaworks data mix`: the sources of Table 1 -> one token stream sampled by token proportion.

Section 2.1 samples its sources by proportion, so over 1.4T tokens a small, high-quality
source (Wikipedia, Books) is seen more than once and the large ones about once. The mix:

1. tokenises each source once, with `prepare` (the same `<s> text </s>` packing and
   hash-based train/val split), into a cache under OUTPUT/.mix/sources/NAME/, and records
   where each document starts. The cache depends only on the source's input files, the
   tokenizer and val_fraction, so changing weights, seed or size re-samples without
   re-tokenising;
2. plans each source's token budget from the weights (`plan_mix`, pure);
3. draws each source's documents (whole epochs of a seeded permutation, then a random
   subset for the fraction) until its budget is met, interleaves the sources and writes
   the trainer's packed shards (train/, val/, manifest.json) plus mix.json (the report).

Where the time goes: tokenising, about 90% of the CPU time (docs/data.md has the stages). It runs
in `workers` processes (one pool for every source, so their caches stay warm), each reading its
batch of JSONL lines (a byte span of a local .jsonl; compressed files come as lines), parsing and
encoding it through a word cache in front of SentencePiece (tokenizer/word_cache.py: the same ids,
the model asked about once per distinct chunk between the workers, the chunks cut and looked up by
compiled kernels, about 150-200 MB/s per core warm; numpy where they are not built) and splitting
it into train and val ids of the shards' dtype, written into a shared result slot (shards._Slots).
This process cuts the spans and writes the shards from the slots.
Drawing and interleaving work on arrays of document lengths here; each interleaving window goes to
the same workers, which gather its tokens from the caches with one memcpy per document
(shards.TokenFiles) and write them at their offset of the output shards, several windows at once, into
page cache recycled as it goes (shards.write_window).

Output (a directory `TokenLoader` / `open_token_dataset` read as is):

    manifest.json                 written last: a mix with a manifest is complete
    mix.json                      per split and source: available, planned, drawn, epochs
    train/00000.bin ...           full shards are complete files (renamed into place)
    val/00000.bin ...
    .mix/state.json               what the output was made from; a different config is refused
    .mix/sources/NAME/            the source's tokenised cache (a prepared directory)

A killed mix resumes: caches with their marker are reused, full output shards are kept and
the stream (a pure function of caches, plan and seed) is regenerated without reading their
tokens, so writing continues at the first missing shard. Same config and seed -> the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from llamaworks import __version__
from llamaworks.args import Arg
from llamaworks.atomic import atomic_write_bytes, atomic_write_json
from llamaworks.configfile import from_dict, load_config, resolve_config_path
from llamaworks.data import storage
from llamaworks.data.shards import FORMAT as SHARDS_FORMAT
from llamaworks.data.shards import (
    Window,
    default_workers,
    input_files,
    load_tokenizer,
    pool_executor,
    prepare,
    sha256_file,
    window_order,
    write_window,
)

log = logging.getLogger(__name__)

FORMAT = "llamaworks.mix/1"
# Table 1, sampling proportion (percent) of each source in the pretraining mixture.
TABLE1_WEIGHTS = {"commoncrawl": 67.0, "c4": 15.0, "github": 4.5, "wikipedia": 4.5, "books": 4.5, "arxiv": 2.5,
                  "stackexchange": 2.0}
_CACHE_SHARD_TOKENS = 2**27
# The train/val split hashes document ids with this seed, not the mix seed: re-seeding a mix
# must not move documents between splits (nor re-tokenise every source).
_SPLIT_SEED = 0
# Documents drawn per vectorised step of a source's sampler, and tokens per interleaving window:
# both bound memory (never O(corpus) beyond the per-document start offsets, which are mmapped).
_DRAW_CHUNK = 1 << 16
_WINDOW_TOKENS = 1 << 22
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def canonical_source(name: str) -> str:
    """'CommonCrawl', 'stack_exchange', 'Stack-Exchange' -> the Table 1 key ('commoncrawl', ...)."""
    return re.sub(r"[\s_-]", "", name.lower())


# ---------------------------------------------------------------------------- config


@dataclass
class SourceConfig:
    inputs: list[str] = field(default_factory=list)  # `data run` output folders, their documents/, or JSONL/text
    weight: float | None = None  # sampling proportion, any scale (normalised); unset: Table 1 for its name
    available_tokens: int | None = None  # --dry-run only: a size estimate in place of tokenising the inputs


@dataclass
class MixConfig:
    tokenizer: str = ""  # SentencePiece .model
    output: str = ""  # directory for train/, val/, manifest.json, mix.json
    seed: int = 0
    total_tokens: int = 0  # tokens in the train split; 0: the sum of the sources' available tokens
    val_fraction: float = 0.005  # documents held out (by id hash), mixed by the same weights into val/
    shard_tokens: int = 2**27
    workers: int | None = None  # tokenising processes (default: min(4, CPU count))
    # name -> SourceConfig, in config order (the order breaks interleaving ties). Typed Any because
    # config.py has no "table of tables" type: __post_init__ checks each [sources.NAME] table.
    sources: Any = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.sources, dict):
            raise ValueError(f"sources must be tables [sources.NAME], got {self.sources!r}")
        built = {}
        for name, table in self.sources.items():
            if not _NAME.match(name):
                raise ValueError(f"source name {name!r} is not a plain name (letters, digits, '_', '-', '.'); "
                                 "rename the [sources.NAME] table, it names a cache folder")
            if isinstance(table, SourceConfig):
                built[name] = table
                continue
            src = from_dict(SourceConfig, table, f"sources.{name}.")
            if src.weight is None:
                if canonical_source(name) not in TABLE1_WEIGHTS:
                    raise ValueError(f"sources.{name}.weight is not set and {name!r} is not a source of Table 1 "
                                     f"({', '.join(TABLE1_WEIGHTS)}); give its sampling proportion, e.g. "
                                     "weight = 2.0")
                src.weight = TABLE1_WEIGHTS[canonical_source(name)]
            if not (math.isfinite(src.weight) and src.weight >= 0):
                raise ValueError(f"sources.{name}.weight must be a finite number >= 0, got {src.weight}; weights "
                                 "are proportions (normalised to sum to 1), e.g. 67.0 for 67%")
            if src.available_tokens is not None and src.available_tokens < 0:
                raise ValueError(f"sources.{name}.available_tokens must be >= 0, got {src.available_tokens}")
            built[name] = src
        self.sources = built

    def validate(self, dry_run: bool) -> None:
        if not self.sources:
            raise ValueError("the config has no sources; add one table per source, e.g. [sources.c4] with "
                             'inputs = ["runs/c4"] (a `llamaworks data run` output) and weight = 15.0')
        if sum(s.weight for s in self.sources.values()) <= 0:
            raise ValueError("every sources.NAME.weight is 0; give at least one source a positive weight")
        if self.total_tokens < 0:
            raise ValueError(f"total_tokens must be >= 0, got {self.total_tokens}; 0 mixes as many tokens as "
                             "the sources hold together, e.g. 1.4e12 is the paper's 1.4T")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}; e.g. 0.005 holds out 0.5%")
        if self.shard_tokens < 1 or (self.workers is not None and self.workers < 1):
            raise ValueError(f"shard_tokens and workers must be positive, got {self.shard_tokens} and {self.workers}")
        estimated = [n for n, s in self.sources.items() if s.available_tokens is not None]
        if estimated and not dry_run:
            raise ValueError(f"sources.{estimated[0]}.available_tokens is a size estimate for --dry-run; remove "
                             "it to mix real data (the mix counts the tokens of the inputs itself)")
        tokenised = [n for n, s in self.sources.items() if s.available_tokens is None]
        for name in tokenised:
            if not self.sources[name].inputs:
                raise ValueError(f"sources.{name}.inputs is empty; list the source's documents, e.g. "
                                 f'inputs = ["runs/{name}"] (a `llamaworks data run` output folder)')
        if tokenised and not self.tokenizer:
            raise ValueError('tokenizer is not set; give the SentencePiece .model path, e.g. tokenizer = '
                             '"tokenizer.model" (train one with `llamaworks tokenizer train`)')
        if tokenised and not self.output:
            raise ValueError('output is not set; give the directory for the token shards, e.g. output = "data/mix"')


def load_mix_config(path: str | os.PathLike | None, overrides: list[str] | dict | None = None) -> MixConfig:
    """A mix config file (or the name of a shipped one, e.g. `mix_paper`) plus --key / --sources.NAME.key overrides."""
    if path is not None and not Path(path).exists():
        path = resolve_config_path(str(path))
    return load_config(MixConfig, path, overrides)


# ---------------------------------------------------------------------------- planning (pure)


def plan_mix(available: dict[str, int], weights: dict[str, float], total_tokens: int | None = None) -> dict[str, dict]:
    """Token budget and implied epochs per source: budget_i = total * w_i / sum(w), epochs = budget / available.

    `total_tokens` None: the sum of the available tokens (the corpus re-weighted). Budgets are
    rounded by largest remainder (ties: first source first) so they sum to the total exactly.
    """
    assert list(available) == list(weights), (list(available), list(weights))
    assert all(w >= 0 for w in weights.values()) and sum(weights.values()) > 0, weights
    total = sum(available.values()) if total_tokens is None else int(total_tokens)
    assert total >= 0, total
    wsum = sum(Fraction(w) for w in weights.values())
    exact = {n: total * Fraction(w) / wsum for n, w in weights.items()}  # exact rationals: no float drift
    budget = {n: math.floor(x) for n, x in exact.items()}
    by_remainder = sorted(exact, key=lambda n: -(exact[n] - budget[n]))  # stable: ties keep config order
    for n in by_remainder[: total - sum(budget.values())]:
        budget[n] += 1
    plan = {}
    for n, w in weights.items():
        if budget[n] > 0 and available[n] <= 0:
            raise ValueError(f"sources.{n}: weight {w} asks for {budget[n]:,} tokens but its inputs hold none; "
                             "add documents to its inputs or set its weight = 0")
        plan[n] = {"weight": float(Fraction(w) / wsum), "available_tokens": int(available[n]),
                   "planned_tokens": budget[n], "epochs": budget[n] / available[n] if available[n] else 0.0}
    return plan


# ---------------------------------------------------------------------------- per-source token caches


@dataclass
class _Cache:
    """One source tokenised: a prepared directory and, per split, document start offsets (+ the end)."""

    root: Path
    manifest: dict
    starts: dict[str, np.ndarray]  # split -> int64 (documents + 1,), memory-mapped

    def lengths(self, split: str) -> np.ndarray:
        return np.diff(self.starts[split])  # (documents,) tokens of each document, <s> and </s> included


def _resolve_inputs(name: str, inputs: list[str], mirrors: Path | None = None) -> list[str]:
    """A `data run` output folder stands for its documents/ (never its stats, data card or excluded/).
    A URL (s3://...) is mirrored under `mirrors` first (data/storage.py; unchanged files are kept)."""
    out = []
    for k, raw in enumerate(inputs):
        if storage.is_remote(raw):
            if storage.exists(storage.join(raw, "documents")):
                if not storage.exists(storage.join(raw, "stats.json")):
                    raise ValueError(f"sources.{name}: the `llamaworks data run` in {raw} has not finished (no "
                                     "stats.json); rerun that command to complete it, then mix")
                raw = storage.join(raw, "documents")
            try:
                raw = str(storage.mirror(raw, mirrors / name / str(k)))
            except FileNotFoundError as e:
                raise ValueError(f"sources.{name}: input {raw} does not exist ({e})") from None
        path = Path(raw)
        if path.is_dir() and (path / "documents").is_dir():
            if not (path / "stats.json").is_file():
                raise ValueError(f"sources.{name}: the `llamaworks data run` in {path} has not finished (no "
                                 "stats.json); rerun that command to complete it, then mix")
            path = path / "documents"
        out.append(str(path))
    return out


def _input_listing(inputs: list[str]) -> list[list]:
    out = []
    for file, _, _ in input_files(inputs):
        st = file.stat()
        out.append([str(file.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _document_starts(lengths: np.ndarray, manifest: dict, split: str) -> np.ndarray:
    """(documents + 1,) each document's first token in the split's stream, then the stream's end: from
    the lengths `prepare` reports (a scan of the written shards for <s> cost 0.57 s of a 1 GiB mix,
    serial, between sources)."""
    starts = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths, dtype=np.int64)])
    info = manifest["splits"][split]
    assert len(starts) == info["documents"] + 1 and starts[-1] == info["tokens"], (split, len(starts), info)
    return starts


def _load_cache(root: Path) -> _Cache:
    manifest = json.loads((root / "manifest.json").read_text())
    starts = {split: np.load(root / f"{split}.starts.npy", mmap_mode="r") for split in ("train", "val")}
    return _Cache(root, manifest, starts)


def _source_cache(cfg: MixConfig, name: str, inputs: list[str], listing: list, tok_sha: str) -> _Cache:
    """The source's tokenised cache, built unless its marker says it matches inputs and tokenizer."""
    root = Path(cfg.output) / ".mix" / "sources" / name
    key = {"inputs": listing, "tokenizer_sha256": tok_sha, "val_fraction": cfg.val_fraction}
    marker = root / "cache.json"
    if marker.is_file() and json.loads(marker.read_text()) == key:
        return _load_cache(root)
    marker.unlink(missing_ok=True)  # first: a rebuild interrupted half-way must not read as valid
    log.info("tokenising source %s (%d files)", name, len(listing))
    lengths: dict[str, np.ndarray] = {}
    try:
        manifest = prepare(inputs, cfg.tokenizer, root, val_fraction=cfg.val_fraction, seed=_SPLIT_SEED,
                           shard_tokens=_CACHE_SHARD_TOKENS, workers=cfg.workers, overwrite=True,
                           document_lengths=lengths)
    except ValueError as e:
        raise ValueError(f"sources.{name}: {e}") from None
    for split in ("train", "val"):
        buf = io.BytesIO()
        np.save(buf, _document_starts(lengths[split], manifest, split))
        atomic_write_bytes(root / f"{split}.starts.npy", buf.getvalue())
    atomic_write_json(marker, key)  # last: the cache is complete
    return _load_cache(root)


# ---------------------------------------------------------------------------- drawing and interleaving


def _source_seed(seed: int, split: str, name: str) -> int:
    # Keyed by name, not position, so adding or reordering sources leaves each one's draw unchanged.
    digest = hashlib.blake2b(f"{seed}\0{split}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class _Draw:
    """One source's documents in drawn order until its token budget is met.

    Epoch e visits every document once in the keyed permutation `window_order(., n, seed, e)`
    (a different order each epoch); the last, partial epoch is a prefix of its permutation,
    i.e. a seeded random subset. A source larger than its budget is just that: a random subset.
    A document is drawn while the source's tokens before it are under budget, so a source
    overshoots its budget by less than one document. Each document gets the key
    (tokens of the source before it) / budget in [0, 1): the fraction of the source's budget
    already drawn when it starts.
    """

    def __init__(self, lengths: np.ndarray, budget: int, seed: int):
        self.lengths, self.budget, self.seed = lengths, budget, seed
        self.epoch = self.pos = 0
        self.tokens = self.documents = 0  # drawn so far
        self._buf = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))  # documents, lengths, keys

    def _more(self) -> bool:
        n = len(self.lengths)
        if self.tokens >= self.budget or n == 0:
            return False
        positions = np.arange(self.pos, min(self.pos + _DRAW_CHUNK, n), dtype=np.uint64)
        docs = window_order(positions, n, self.seed, self.epoch)
        lens = np.asarray(self.lengths[docs], dtype=np.int64)
        starts = self.tokens + np.cumsum(lens) - lens  # (chunk,) source tokens drawn before each document
        keep = int(np.searchsorted(starts, self.budget, side="left"))  # documents starting under budget
        docs, lens, starts = docs[:keep], lens[:keep], starts[:keep]
        self.tokens += int(lens.sum())
        self.documents += keep
        self.pos += len(positions)
        if self.pos == n:
            self.epoch, self.pos = self.epoch + 1, 0
        self._buf = (docs, lens, starts / self.budget)
        return keep > 0

    def take(self, limit: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(documents, lengths, keys) of the next documents whose key is < limit."""
        parts = []
        while True:
            if not len(self._buf[0]) and not self._more():
                break
            cut = int(np.searchsorted(self._buf[2], limit, side="left"))
            parts.append(tuple(a[:cut] for a in self._buf))
            self._buf = tuple(a[cut:] for a in self._buf)
            if len(self._buf[0]):
                break  # the rest start at or after limit
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
        return tuple(np.concatenate(p) for p in zip(*parts))


def _interleave(draws: list[_Draw]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(source index, document, length) arrays, window after window, in stream order.

    Why this order: the stream is ordered by each document's key (the fraction of its source's
    budget drawn before it), ties by source order. That is weighted round-robin by token
    deficit: the next document always comes from the source furthest behind its share, so any
    prefix of the stream (and so every shard, and a stream cut short) holds each source in its
    planned proportion to within about one document per source, and the copies of a repeated
    document land an epoch apart rather than side by side. The trainer's loader also shuffles
    windows, but shards read in order, an unshuffled loader or a truncated run keep the mix too.
    The merge runs over windows of keys [k/W, (k+1)/W) so memory stays bounded; it equals one
    global sort by (key, source).
    """
    windows = max(1, math.ceil(sum(d.budget for d in draws) / _WINDOW_TOKENS))
    for k in range(windows):
        limit = (k + 1) / windows  # the last limit is exactly 1.0 > every key
        parts = [d.take(limit) for d in draws]
        source = np.concatenate([np.full(len(p[0]), i, dtype=np.int64) for i, p in enumerate(parts)])
        docs, lens, keys = (np.concatenate([p[j] for p in parts]) for j in range(3))
        order = np.lexsort((source, keys))  # by key, then source order
        yield source[order], docs[order], lens[order]


# ---------------------------------------------------------------------------- writing


def _finished_shards(out: Path, split: str, shard_tokens: int, itemsize: int) -> list[dict]:
    """Full shards 0..k-1 left by an earlier run; everything else of the split is removed (redone)."""
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    done: list[dict] = []
    while (p := folder / f"{len(done):05d}.bin").is_file() and p.stat().st_size == shard_tokens * itemsize:
        done.append({"file": f"{split}/{p.name}", "tokens": shard_tokens})
    keep = {Path(d["file"]).name for d in done}
    for stale in folder.iterdir():
        if stale.name not in keep and stale.name.endswith((".bin", ".bin.tmp")):
            stale.unlink()  # a partial last shard or an interrupted one: rewritten, byte for byte
    return done


def _stream_files(cache: _Cache, split: str) -> list[tuple[str, int]]:
    """A source cache's split as (shard file, tokens) in stream order (shards.TokenFiles reads them)."""
    return [(str(cache.root / sh["file"]), sh["tokens"]) for sh in cache.manifest["splits"][split]["shards"]]


def _seal(out: Path, split: str, shard: int, tokens: int, itemsize: int) -> dict:
    """Shard `shard` written whole by its windows: synced, renamed into place; its manifest entry."""
    path = out / split / f"{shard:05d}.bin"
    tmp = path.with_suffix(".bin.tmp")
    fd = os.open(tmp, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        size = os.fstat(fd).st_size
        assert size == tokens * itemsize, (tmp, size, tokens * itemsize)
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):  # never read back here: its pages (clean now) go to the next shards
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return {"file": f"{split}/{path.name}", "tokens": tokens}


def _write_split(cfg: MixConfig, split: str, caches: list[_Cache], draws: list[_Draw], dtype: np.dtype,
                 progress: bool) -> list[dict]:
    """Write the split's stream into shards, resuming after the full shards already on disk.

    This process draws and interleaves the windows; prepare's workers (shards.pool_executor) gather
    each one's documents from the caches and write them at their offset of the shard files, several
    windows at once, while the next ones are drawn: the mix phase scales with the workers as the
    tokenising does (one process gathering and writing was 0.75 s of a 4.8 s 1 GiB mix on 2 cores,
    with the workers idle; docs/data.md). A shard is renamed into place, in order, once every window
    in it is written, so a killed mix leaves whole shards and .tmp files (redone on resume)."""
    from tqdm import tqdm

    out = Path(cfg.output)
    S = cfg.shard_tokens
    shards = _finished_shards(out, split, S, dtype.itemsize)
    skip = len(shards) * S  # stream tokens already on disk
    streams = [_stream_files(c, split) for c in caches]
    starts = [c.starts[split] for c in caches]
    key = os.urandom(8).hex()  # this write's streams: the workers map them anew
    pos = 0  # stream offset of the current window's first document
    total = sum(d.budget for d in draws)
    pending: deque = deque()  # (future, stream offset after its window), in stream order
    workers = default_workers() if cfg.workers is None else cfg.workers

    def finish_one() -> None:
        future, end = pending.popleft()
        bar.update(future.result())  # a window that failed raises here: no shard after it is sealed
        while (len(shards) + 1) * S <= end:
            shards.append(_seal(out, split, len(shards), S, dtype.itemsize))

    with tqdm(total=total, initial=min(skip, total), desc=f"mix {split}", unit="tok", unit_scale=True,
              disable=not progress) as bar, pool_executor(cfg.workers, cfg.tokenizer) as executor:
        for source, docs, lens in _interleave(draws):
            ends = pos + np.cumsum(lens)  # (documents,) stream offset after each document
            first = int(np.searchsorted(ends, skip, side="right"))  # first document not fully on disk
            if first < len(lens):
                source, docs, lens, ends = source[first:], docs[first:], lens[first:], ends[first:]
                # tokens of a document straddling the resume point that are already written
                head = np.maximum(0, skip - (ends - lens))
                begin = np.empty(len(docs), np.int64)  # (documents,) each one's first token to write, in its cache
                for s in np.unique(source).tolist():
                    mine = source == s
                    begin[mine] = np.asarray(starts[s][docs[mine]], dtype=np.int64) + head[mine]
                window = Window(source, begin, lens - head, int(ends[0] - lens[0] + head[0]))
                pending.append((executor.submit(write_window, key, streams, dtype.str, window, str(out / split), S,
                                                True), int(ends[-1])))
                if len(pending) > 2 * workers:  # a few windows out: the draws run ahead of the writes
                    finish_one()
            if len(lens):
                pos = int(ends[-1])
        while pending:
            finish_one()
    if pos > len(shards) * S:  # the last shard, short
        shards.append(_seal(out, split, len(shards), pos - len(shards) * S, dtype.itemsize))
    assert pos == sum(d.tokens for d in draws), (split, pos, [d.tokens for d in draws])
    return shards


# ---------------------------------------------------------------------------- the command


def _fingerprint(cfg: MixConfig, listings: dict[str, list], tok_sha: str) -> dict:
    return {"format": FORMAT, "tokenizer_sha256": tok_sha, "seed": cfg.seed, "total_tokens": cfg.total_tokens,
            "val_fraction": cfg.val_fraction, "shard_tokens": cfg.shard_tokens,
            "sources": {n: {"weight": s.weight, "inputs": listings[n]} for n, s in cfg.sources.items()}}


def _check_resume(out: Path, fp: dict, overwrite: bool) -> bool:
    """True when `out` already holds this exact, finished mix; clears a different one on overwrite."""
    state = out / ".mix" / "state.json"
    if state.is_file() and json.loads(state.read_text()) == fp:
        return (out / "manifest.json").is_file()
    if state.is_file() or (out.exists() and any(p.name != ".mix" for p in out.iterdir())):
        if not overwrite:
            what = "a mix of another config, inputs or tokenizer" if state.is_file() else "files that are no mix"
            raise ValueError(f"{out} holds {what}; pass --overwrite to replace it (sources whose inputs and "
                             "tokenizer are unchanged are not re-tokenised), or choose another output")
        (out / "manifest.json").unlink(missing_ok=True)  # first: while rewriting, the folder reads as incomplete
        for sub in ("train", "val"):
            shutil.rmtree(out / sub, ignore_errors=True)
        (out / "mix.json").unlink(missing_ok=True)
    atomic_write_json(state, fp)
    return False


def _split_plan(caches: dict[str, _Cache], weights: dict[str, float], split: str, total: int | None) -> dict:
    available = {n: c.manifest["splits"][split]["tokens"] for n, c in caches.items()}
    if split == "val":
        # Few documents may give a source no held-out ones; val then mixes the others by their weights.
        missing = [n for n, a in available.items() if a == 0 and weights[n] > 0]
        weights = {n: (0.0 if n in missing else w) for n, w in weights.items()}
        if sum(weights.values()) == 0:  # val_fraction 0 or tiny sources: no val split (the trainer says so)
            return {n: {"weight": 0.0, "available_tokens": 0, "planned_tokens": 0, "epochs": 0.0,
                        "available_documents": 0} for n in weights}
        if missing:
            log.warning("no validation documents in source(s) %s; val/ mixes the other sources", ", ".join(missing))
    plan = plan_mix(available, weights, total)
    for n, p in plan.items():
        p["available_documents"] = caches[n].manifest["splits"][split]["documents"]
    return plan


def mix(cfg: MixConfig, *, dry_run: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Tokenise, plan and (unless dry_run) write the mix of `cfg`; return the report (also OUTPUT/mix.json)."""
    cfg.validate(dry_run)
    start = time.perf_counter()
    weights = {n: s.weight for n, s in cfg.sources.items()}
    total = cfg.total_tokens or None
    if dry_run and all(s.available_tokens is not None for s in cfg.sources.values()):
        available = {n: s.available_tokens for n, s in cfg.sources.items()}
        return _report(cfg, {"train": plan_mix(available, weights, total)}, dry_run=True)

    load_tokenizer(cfg.tokenizer)  # a missing or broken tokenizer fails here, before anything is written
    tok_sha = sha256_file(Path(cfg.tokenizer))
    if storage.is_remote(cfg.output):
        return _mix_to_store(cfg, dry_run=dry_run, overwrite=overwrite, progress=progress)
    out = Path(cfg.output)
    tokenised = {n: s for n, s in cfg.sources.items() if s.available_tokens is None}
    inputs = {n: _resolve_inputs(n, s.inputs, out / ".mix" / "remote") for n, s in tokenised.items()}
    listings = {n: _input_listing(inputs[n]) for n in tokenised}
    if not dry_run and _check_resume(out, _fingerprint(cfg, listings, tok_sha), overwrite):
        report = json.loads((out / "mix.json").read_text())
        log.info("%s already holds this mix; nothing to do", out)
        return report
    caches = {n: _source_cache(cfg, n, inputs[n], listings[n], tok_sha) for n in tokenised}
    if dry_run:
        available = {n: s.available_tokens if s.available_tokens is not None else
                     caches[n].manifest["splits"]["train"]["tokens"] for n, s in cfg.sources.items()}
        return _report(cfg, {"train": plan_mix(available, weights, total)}, dry_run=True)

    names = list(cfg.sources)
    first = caches[names[0]].manifest
    dtype = np.dtype(first["dtype"])
    plans, shards = {}, {}
    for split in ("train", "val"):
        # The val split is sized by the held-out documents (total None), mixed by the same weights.
        plans[split] = _split_plan(caches, weights, split, total if split == "train" else None)
        draws = [_Draw(caches[n].lengths(split), plans[split][n]["planned_tokens"], _source_seed(cfg.seed, split, n))
                 for n in names]
        shards[split] = _write_split(cfg, split, [caches[n] for n in names], draws, dtype, progress)
        for n, d in zip(names, draws):
            plans[split][n].update(tokens=d.tokens, documents=d.documents,
                                   epochs=d.tokens / max(1, plans[split][n]["available_tokens"]))
    report = _report(cfg, plans, dry_run=False)
    atomic_write_json(out / "mix.json", report)

    splits = {s: {"documents": sum(p["documents"] for p in plans[s].values()),
                  "tokens": sum(p["tokens"] for p in plans[s].values()), "shards": shards[s]} for s in plans}
    manifest = {
        "format": SHARDS_FORMAT,
        "documents": sum(s["documents"] for s in splits.values()),
        "tokens": sum(s["tokens"] for s in splits.values()),
        "splits": splits,
        "sources": {n: {k: sum(plans[s][n][k] for s in plans) for k in ("documents", "tokens")} for n in names},
        # The caches share one tokenizer, so any of them describes the token ids.
        **{k: first[k] for k in ("dtype", "vocab_size", "bos_id", "eos_id", "tokenizer")},
        "val_fraction": cfg.val_fraction, "seed": cfg.seed, "shard_tokens": cfg.shard_tokens,
        "skipped_files": sum(c.manifest["skipped_files"] for c in caches.values()),
        "empty_documents": sum(c.manifest["empty_documents"] for c in caches.values()),
        "mix": "mix.json",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "llamaworks_version": __version__,
        "seconds": round(time.perf_counter() - start, 3),
    }
    atomic_write_json(out / "manifest.json", manifest)  # last: its presence marks the mix complete
    return report


def _staging(url: str) -> Path:
    """The local folder a mix to object storage is written in first (caches, shards; kept for resume)."""
    root = os.environ.get("LLAMAWORKS_MIX_STAGING") or Path.home() / ".cache" / "llamaworks" / "mix"
    return Path(root) / hashlib.sha256(url.encode()).hexdigest()[:16]


def _mix_to_store(cfg: MixConfig, *, dry_run: bool, overwrite: bool, progress: bool) -> dict:
    """A mix whose output is a URL: made in a local staging folder (the token caches are memory-mapped),
    then uploaded: .mix/state.json, the shards, mix.json, and manifest.json last (complete when there)."""
    url = cfg.output
    staging = _staging(url)
    remote_state, local_state = storage.join(url, ".mix", "state.json"), staging / ".mix" / "state.json"
    if not dry_run and overwrite:
        storage.rmtree(url)
    elif not dry_run and not storage.is_empty_dir(url) and not (
            storage.exists(remote_state) and local_state.is_file()
            and storage.read_text(remote_state) == local_state.read_text()):
        raise ValueError(f"{url} is not empty and holds no mix staged here (in {staging}); pass --overwrite to "
                         "replace it, or choose another output")
    report = mix(dataclasses.replace(cfg, output=str(staging)), dry_run=dry_run, overwrite=overwrite,
                 progress=progress)
    report["config"]["output"] = url
    if dry_run:
        return report
    manifest = json.loads((staging / "manifest.json").read_text())
    shards = [sh["file"] for split in manifest["splits"].values() for sh in split["shards"]]
    storage.upload(staging, url, [".mix/state.json", *shards, "mix.json", "manifest.json"])
    log.info("uploaded the mix to %s (staged in %s)", url, staging)
    return report


def _report(cfg: MixConfig, plans: dict[str, dict], dry_run: bool) -> dict:
    splits = {}
    for split, plan in plans.items():
        drawn = sum(p.get("tokens", p["planned_tokens"]) for p in plan.values())
        sources = {}
        for n, p in plan.items():
            tokens = p.get("tokens", p["planned_tokens"])
            sources[n] = {**p, "tokens": tokens, "documents": p.get("documents"),
                          "share": tokens / drawn if drawn else 0.0}
        splits[split] = {"tokens": drawn, "sources": sources}
    return {"format": FORMAT, "dry_run": dry_run, "seed": cfg.seed, "total_tokens": cfg.total_tokens or None,
            "config": dataclasses.asdict(cfg), "splits": splits}


def format_report(report: dict) -> str:
    lines = []
    for split, s in report["splits"].items():
        what = "planned" if report["dry_run"] else "drawn"
        lines.append(f"{split}: {s['tokens']:,} tokens {what}" + (" (dry run: nothing written)" * report["dry_run"]))
        lines.append(f"  {'source':<16}{'weight':>8}{'available tokens':>20}{what + ' tokens':>20}{'share':>8}"
                     f"{'epochs':>8}{'documents':>14}")
        for n, p in s["sources"].items():
            docs = "-" if p["documents"] is None else f"{p['documents']:,}"
            lines.append(f"  {n:<16}{p['weight']:>8.1%}{p['available_tokens']:>20,}{p['tokens']:>20,}"
                         f"{p['share']:>8.1%}{p['epochs']:>8.2f}{docs:>14}")
    return "\n".join(lines)


def mix_command(
    config: Annotated[str, Arg("TOML mix config, or a shipped one (mix_paper)", metavar="FILE")],
    dry_run: Annotated[bool, Arg("print tokens available, drawn and epochs per source; write no shards")] = False,
    overwrite: Annotated[bool, Arg("replace a mix of another config in the output folder")] = False,
    overrides: list[str] | None = None,
) -> int:
    """Tokenise each source and sample them by token proportion (Table 1 by default) into the packed
    shards `llamaworks pretrain` reads (data.dir = the output). Keys: tokenizer, output, seed,
    total_tokens (0: all available), val_fraction, shard_tokens, workers, and one [sources.NAME] table
    per source with inputs, weight (unset: Table 1 for commoncrawl, c4, github, wikipedia, books,
    arxiv, stackexchange). Override any key as --seed 1 or --sources.c4.weight 20. A killed mix
    resumes where it stopped; rerunning a finished one does nothing."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = load_mix_config(config, overrides or [])
    report = mix(cfg, dry_run=dry_run, overwrite=overwrite, progress=sys.stderr.isatty())
    print(format_report(report))
    if not dry_run:
        print(f"-> {cfg.output} (report: {Path(cfg.output) / 'mix.json'})")
    return 0
