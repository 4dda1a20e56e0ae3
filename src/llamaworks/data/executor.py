"""Runs a reader and a list of steps over input files on one machine.

The executor, not the steps, owns: sharding (one input file = one shard, rank = its
index), worker processes, progress, counting, the excluded documents, per-shard stats
and completion markers. Layout of OUTPUT:

    documents/NNNNN.jsonl.gz      kept documents of the last stage (what `prepare` reads)
    excluded/SS-NNNNN.jsonl.gz    dropped documents with metadata.excluded = {step, reason}
    stats.json, DATACARD.md       written at the end from the per-shard stats
    .state/                       markers and per-shard stats; hidden so `prepare` skips it
    .stages/S/                    outputs of intermediate stages (a stage of MinHash signatures alone
                                  before a partitioned MinHash: NNNNN.signatures.bin, no documents)

Steps run in stages: consecutive ordinary steps form a parallel stage (each shard on
its own worker, streaming, so memory is bounded by one document per step per worker);
a step with `global_state` (cross-document dedup) gets a stage of its own that streams
every shard of the previous stage through one process, in shard order, its state in
memory up to `dedup_memory_mb` and on disk (.state/stageS/state/) beyond. Both kinds
resume shard by shard: a global step rebuilds its state from the documents it kept on
the finished shards (`Step.restore`), or, if it cannot, its stage is redone whole.
With `dedup_partitions` P > 0, a dedup stage runs split instead (data/dedup_partitioned.py):
index tasks per shard, reduce tasks per partition, a merge task (MinHash), filter tasks per
shard, all on the workers, with the same kept documents; each task's files and marker live
under .state/stageS/{index,reduce,merge}/, so a killed run resumes per shard and partition.
Every file lands under a temporary name and is renamed into place; a shard's marker is
written last, so a killed run never leaves a shard that looks finished.

`Executor` holds all of this; a subclass says only how a list of shard tasks runs: a
local process pool (`LocalExecutor`) or a Dask cluster (`cluster.DaskExecutor`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llamaworks.data import storage
from llamaworks.data.dedup import SIGNATURE_KEY, MinHashSignatures
from llamaworks.data.dedup_partitioned import MinHashPartitioned, PartitionedDedup, partitioned
from llamaworks.data.document import (
    Document,
    MalformedInput,
    MalformedRecord,
    ShardWriter,
    jsonl_records,
    read_jsonl,
    shard_suffix,
)
from llamaworks.data.step import Dropped, LinesRemoved, Step

log = logging.getLogger(__name__)

_MEASURES = ("documents", "lines", "chars", "bytes")

# The data card's examples of each removal reason: how many (the default), and how much text of each.
CARD_EXAMPLES = 3
EXAMPLE_CHARS = 200


def _measure(doc: Document) -> tuple[int, int, int, int]:
    text = doc.text
    return 1, text.count("\n") + (1 if text and not text.endswith("\n") else 0), len(text), \
        len(text.encode("utf-8", errors="replace"))


def _zero() -> dict[str, int]:
    return dict.fromkeys(_MEASURES, 0)


def _add(into: dict[str, int], m: Iterable[int]) -> None:
    for k, v in zip(_MEASURES, m):
        into[k] += v


@dataclass
class StepStats:
    name: str
    description: str
    into: dict[str, int] = field(default_factory=_zero)
    kept: dict[str, int] = field(default_factory=_zero)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    lines_removed: dict[str, dict[str, int]] = field(default_factory=dict)
    # Up to `limit` examples per removal reason ({"id", "text"}: the removed line, or the dropped
    # document's first EXAMPLE_CHARS characters), and dropped documents per document source.
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    dropped_by_source: dict[str, dict[str, int]] = field(default_factory=dict)
    limit: int = CARD_EXAMPLES
    last_input: tuple[str, str] | None = None

    def example(self, reason: str, doc_id: str, text: str, kind: str = "document") -> None:
        """`kind`: "document" (text is the document's start) or "line" (text is a removed line)."""
        got = self.examples.setdefault(reason, [])
        if len(got) < self.limit:
            got.append({"id": doc_id, "kind": kind, "text": text[:EXAMPLE_CHARS]})

    def to_json(self) -> dict:
        return {"name": self.name, "description": self.description, "in": self.into, "kept": self.kept,
                "dropped": self.dropped, "lines_removed": self.lines_removed, "examples": self.examples,
                "dropped_by_source": self.dropped_by_source}


class Reader:
    """Turns one input file into documents. `files` expands the user's inputs into the shards."""

    name = "reader"
    patterns: tuple[str, ...] = ("*",)

    # True: `read` opens its files through data/storage.py, so inputs may be URLs (s3://...).
    remote_inputs = False

    def files(self, inputs: Iterable[str | os.PathLike]) -> list[storage.StoragePath]:
        out: list[storage.StoragePath] = []
        for raw in inputs:
            if storage.is_remote(raw) and not self.remote_inputs:
                raise ValueError(f"input {raw}: the {self.name} reader reads local files only; copy the input "
                                 "to a local folder (outputs may still be URLs)")
            try:
                out.extend(storage.list_files(raw, self.patterns))
            except FileNotFoundError as e:
                raise FileNotFoundError(f"input {str(raw)!r} does not exist ({e}); "
                                        f"pass files or folders of {self.name} input") from None
        return out

    def read(self, path: storage.StoragePath) -> Iterator[Document]:
        """The file's documents; MalformedInput (or any error) when the file cannot be read on."""
        raise NotImplementedError

    def records(self, path: storage.StoragePath) -> Iterator[Document | MalformedRecord]:
        """What the executor reads: `read`, or, for a format whose records can be told apart, the
        documents with a MalformedRecord in place of each record that is not one, so that one bad
        record costs that record only (skipped and counted, or a stop, per --on-malformed)."""
        return self.read(path)

    def describe(self) -> str:
        return self.name


class JsonlReader(Reader):
    name = "jsonl"
    patterns = ("*.jsonl", "*.jsonl.gz", "*.jsonl.zst", "*.jsonl.bz2", "*.jsonl.xz")
    remote_inputs = True

    def read(self, path):
        yield from read_jsonl(path)

    def records(self, path):
        yield from jsonl_records(path)


@dataclass
class _Stage:
    index: int
    steps: list[Step]
    global_state: bool


def _stages(steps: list[Step]) -> list[_Stage]:
    stages: list[_Stage] = [_Stage(0, [], False)]
    for step in steps:
        if step.global_state:
            part = step.parallel_part()
            if part is not None:  # its per-document share runs on every worker, just before it
                if stages[-1].global_state:
                    stages.append(_Stage(len(stages), [], False))
                stages[-1].steps.append(part)
            stages.append(_Stage(len(stages), [step], True))
        elif stages[-1].global_state:
            stages.append(_Stage(len(stages), [step], False))
        else:
            stages[-1].steps.append(step)
    return stages


class RunPlan:
    """Everything one shard needs; pickled once into each worker."""

    def __init__(self, out: storage.StoragePath, reader: Reader, stages: list[_Stage], keep_excluded: bool,
                 on_malformed: str, compression: str, world: int, dedup_memory: int | None,
                 examples: int = CARD_EXAMPLES, partitions: int = 0):
        self.out, self.reader, self.stages, self.examples = out, reader, stages, examples
        self.partitions = partitions
        self.keep_excluded, self.on_malformed, self.compression = keep_excluded, on_malformed, compression
        self.suffix = shard_suffix(compression)
        self.world, self.dedup_memory = world, dedup_memory
        self.files: list[str] = []  # stage 0's input files (set by Executor.run)

    def shard_path(self, s: int, shard: int) -> storage.StoragePath:
        return storage.join(self.stage_dir(s), f"{shard:05d}{self.suffix}")

    def stage_dir(self, s: int) -> storage.StoragePath:
        return storage.join(self.out, "documents") if s == len(self.stages) - 1 else \
            storage.join(self.out, ".stages", str(s))

    def state_dir(self, s: int) -> storage.StoragePath:
        return storage.join(self.out, ".state", f"stage{s}")

    def input_path(self, s: int, shard: int) -> storage.StoragePath:
        """The file stage `s` reads for `shard`."""
        return storage.as_path(self.files[shard]) if s == 0 else self.shard_path(s - 1, shard)

    def signatures_only(self, s: int) -> bool:
        """Stage `s` is MinHash's signatures alone before a partitioned MinHash stage: it writes a
        signature file per shard (`signature_path`) instead of its documents, and the filter phase
        of stage s + 1 reads stage s's input again (dedup_partitioned.MinHashPartitioned)."""
        if s + 1 >= len(self.stages) or [type(x) for x in self.stages[s].steps] != [MinHashSignatures]:
            return False
        return isinstance(_plan(self, s + 1), MinHashPartitioned)

    def signature_path(self, s: int, shard: int) -> storage.StoragePath:
        return storage.join(self.stage_dir(s), f"{shard:05d}.signatures.bin")

    def marker(self, s: int, shard: int) -> storage.StoragePath:
        return storage.join(self.state_dir(s), f"{shard:05d}.done")

    def done(self, s: int) -> set[int]:
        """The shards of stage `s` whose marker is there (one listing of the stage's state folder)."""
        return {int(n.removesuffix(".done")) for n in storage.names(self.state_dir(s))
                if n.endswith(".done") and n.removesuffix(".done").isdigit()}

    def _read(self, s: int, path: storage.StoragePath, info: dict) -> Iterator[Document]:
        """The documents of `path` as stage `s` reads them (stage 0 through the reader)."""
        for item in self._read_file(s, path, info):
            if isinstance(item, MalformedRecord):
                if self.on_malformed == "stop":
                    raise MalformedInput(f"{item.message} (pass --on-malformed skip to skip such records)")
                info["malformed_records"] += 1
                if len(info["malformed_record_examples"]) < MALFORMED_EXAMPLES:
                    log.warning("skipping malformed record %s", item.message)
                    info["malformed_record_examples"].append(item.message)
                continue
            info["documents"] += 1
            info["bytes"] += len(item.text.encode("utf-8", errors="replace"))
            yield item

    def _read_file(self, s: int, path: storage.StoragePath, info: dict) -> Iterator[Document | MalformedRecord]:
        try:
            # Only the reader's own errors reach here: a step's exception is raised in the consumer.
            yield from (self.reader.records(path) if s == 0 else read_jsonl(path))
        except Exception as e:  # any failure to parse an input file is "malformed input"
            msg = str(e) if str(e).startswith(str(path)) else f"{path}: {type(e).__name__}: {e}"
            if self.on_malformed == "stop":
                raise MalformedInput(f"{msg} (pass --on-malformed skip to skip such files)") from e
            log.warning("skipping the rest of malformed input %s", msg)
            info["malformed"].append(msg)

    def run_shard(self, s: int, shard: int, path: storage.StoragePath, steps_state: list[Step] | None = None,
                  read_as: int | None = None) -> dict:
        """`read_as`: read `path` as that stage would (default `s`)."""
        stage = self.stages[s]
        steps = steps_state if steps_state is not None else stage.steps
        stats = [StepStats(st.name, st.describe(), limit=self.examples) for st in steps]
        info = {"file": str(path), "documents": 0, "bytes": 0, "malformed": [], "malformed_records": 0,
                "malformed_record_examples": []}
        name = f"{shard:05d}{self.suffix}"
        excluded = ShardWriter(storage.join(self.out, "excluded", f"{s:02d}-{name}"), self.compression) \
            if self.keep_excluded else None
        rank, world = (0, 1) if stage.global_state else (shard, self.world)
        try:
            sink = _SignatureSink(self, s, shard) if steps_state is None and self.signatures_only(s) else \
                ShardWriter(storage.join(self.stage_dir(s), name), self.compression, scratch=s < len(self.stages) - 1)
            with sink as writer:
                stream: Iterator = self._read(s if read_as is None else read_as, path, info)
                for step, st in zip(steps, stats):
                    stream = _accounted(step.run(_counted(stream, st), rank, world), st, step.name, excluded)
                for doc in stream:
                    writer.write(doc)
            if excluded is not None:
                excluded.close()
        except BaseException:
            if excluded is not None:
                excluded.abort()
            raise
        result = {"shard": shard, "read": info, "steps": [x.to_json() for x in stats]}
        storage.atomic_write_json(storage.join(self.state_dir(s), f"{shard:05d}.stats.json"), result)
        storage.atomic_write_text(self.marker(s, shard), "")  # last: the shard is complete
        return result


class _SignatureSink:
    """In place of a stage's ShardWriter when the stage is signatures only (RunPlan.signatures_only):
    keeps each document's id and signature and writes them as one file at close."""

    def __init__(self, run: RunPlan, s: int, shard: int):
        self.path, self.plan = run.signature_path(s, shard), _plan(run, s + 1)
        self.ids: list[str] = []
        self.encoded: list[str] = []

    def write(self, doc: Document) -> None:
        self.ids.append(doc.id)
        self.encoded.append(doc.metadata[SIGNATURE_KEY])

    def __enter__(self) -> _SignatureSink:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            _write_segments(self.path, self.plan.pack_signatures(self.ids, self.encoded))


def run_global_stage(run: RunPlan, s: int, after_shard: Callable[[int], None] | None = None) -> list[int]:
    """Stream every shard of stage `s - 1` through the stage's (global) steps in one process, in
    shard order; return the shards it ran. Finished shards are a prefix (shard order): their
    kept documents restore the steps' state, unless a step cannot restore (then all is redone)."""
    stage, n = run.stages[s], run.world
    assert s > 0, "a global stage always follows the reader's stage"
    done, finished = 0, run.done(s)
    while done < n and done in finished:
        done += 1
    if done == n:
        return []
    steps = copy.deepcopy(stage.steps)  # fresh state on every (re)run of the stage
    with contextlib.ExitStack() as stack:
        if storage.is_remote(run.out):
            # The steps' spilled state is SQLite: on this worker's local disk, not in the object store.
            import tempfile

            state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llamaworks-dedup-")))
        else:
            state = run.state_dir(s) / "state"
            shutil.rmtree(state, ignore_errors=True)  # disk state of a killed run: rebuilt from the outputs
        return _run_global_steps(run, s, steps, state, done, after_shard)


def _run_global_steps(run: RunPlan, s: int, steps: list[Step], state: Path, done: int,
                      after_shard: Callable[[int], None] | None) -> list[int]:
    n = run.world
    for j, st in enumerate(steps):
        st.configure_state(state / f"{j}-{st.name}", run.dedup_memory)
    # One global step per stage (_stages), so the stage's output is exactly that step's kept documents.
    assert len(steps) == 1, [st.name for st in steps]
    if done and not steps[0].restore(d for i in range(done) for d in read_jsonl(run.shard_path(s, i))):
        done = 0
    ran = []
    for i in range(done, n):
        run.run_shard(s, i, run.shard_path(s - 1, i), steps_state=steps)
        ran.append(i)
        if after_shard:
            after_shard(i)
    return ran


# --- a dedup stage split into tasks (data/dedup_partitioned.py); each returns a small dict ---

def _plan(run: RunPlan, s: int) -> PartitionedDedup | None:
    steps = run.stages[s].steps
    return partitioned(steps[0], run.partitions) if run.partitions and len(steps) == 1 else None


def _phase(run: RunPlan, s: int, phase: str, name: str = "") -> storage.StoragePath:
    folder = storage.join(run.state_dir(s), phase)
    return storage.join(folder, name) if name else folder


def _markers(run: RunPlan, s: int, phase: str) -> set[int]:
    return {int(n.removesuffix(".done")) for n in storage.names(_phase(run, s, phase))
            if n.endswith(".done") and n.removesuffix(".done").isdigit()}


def _write_segments(path: storage.StoragePath, segments: list[bytes]) -> None:
    """One file of many payloads: a header of len(segments) + 1 little-endian uint64 offsets
    (from the end of the header), then the payloads; each is read back alone (`_read_segment`).
    One file per task, not one per (task, partition): fewer writes and syncs, fewer objects."""
    offsets = np.cumsum([0] + [len(x) for x in segments], dtype="<u8")
    storage.atomic_write_bytes(path, offsets.tobytes() + b"".join(segments))


def _read_segment(path: storage.StoragePath, k: int, count: int) -> bytes:
    head = 8 * (count + 1)
    lo, hi = np.frombuffer(storage.read_range(path, 8 * k, 8 * (k + 2)), dtype="<u8")
    return storage.read_range(path, head + int(lo), head + int(hi)) if hi > lo else b""


def _segment_sizes(path: storage.StoragePath, count: int) -> list[int]:
    return np.diff(np.frombuffer(storage.read_range(path, 0, 8 * (count + 1)), dtype="<u8")).astype(int).tolist()


def partition_exchange(output: str | os.PathLike) -> dict[int, dict]:
    """The shuffle of a run's partitioned dedup stages, from their files' headers: per stage,
    `index[shard][p]`, the bytes shard's index task wrote for partition p (what the reduce task of
    p reads), and `reduce[p][shard]`, what p's reduce task wrote for the shard's filter (or the
    merge). For laying a measured run out on other cluster sizes (benchmarks/data_throughput.py)."""
    out = storage.as_path(output)
    partitions = json.loads(storage.read_text(storage.join(out, ".state", "pipeline.json"))).get("dedup_partitions", 0)
    found: dict[int, dict[str, list]] = {}
    for f in storage.list_files(storage.join(out, ".state"), ["*.bin"]):
        stage, phase = str(f).rsplit("/", 3)[-3:-1]
        found.setdefault(int(stage.removeprefix("stage")), {}).setdefault(phase, []).append(f)
    result = {}
    for s, phases in sorted(found.items()):
        index = sorted(phases.get("index", []), key=storage.name)
        reduce = sorted(phases.get("reduce", []), key=storage.name)
        result[s] = {"partitions": partitions, "shards": len(index),
                     "index": [_segment_sizes(f, partitions + 1)[:partitions] for f in index],
                     "reduce": [_segment_sizes(f, len(index)) for f in reduce]}
    return result


def index_task(run: RunPlan, s: int, shard: int) -> dict:
    plan = _plan(run, s)
    sig_file = run.signature_path(s - 1, shard)
    # A run begun before signature files (its stage s - 1 wrote documents) resumes from those.
    if run.signatures_only(s - 1) and not storage.exists(run.shard_path(s - 1, shard)):
        payloads, side = plan.index_signatures([_read_segment(sig_file, k, 3) for k in range(3)], shard)
    else:
        payloads, side = plan.index(read_jsonl(run.shard_path(s - 1, shard)), shard)
    # Segments: one per partition, then the side payload.
    _write_segments(_phase(run, s, "index", f"{shard:05d}.bin"), [*payloads, side or b""])
    storage.atomic_write_text(_phase(run, s, "index", f"{shard:05d}.done"), "")  # last: the shard is indexed
    return {"shard": shard}


def reduce_task(run: RunPlan, s: int, p: int) -> dict:
    plan = _plan(run, s)
    payloads = [_read_segment(_phase(run, s, "index", f"{i:05d}.bin"), p, plan.partitions + 1)
                for i in range(run.world)]
    outputs, stats = plan.reduce(p, payloads, run.world)
    _write_segments(_phase(run, s, "reduce", f"{p:05d}.bin"), outputs)  # one segment per shard
    # bytes_in: what this partition's task read from every shard's index (the shuffle a cluster pays).
    stats = {"partition": p, **stats, "bytes_in": sum(map(len, payloads)), "bytes_out": sum(map(len, outputs))}
    storage.atomic_write_json(_phase(run, s, "reduce", f"{p:05d}.done"), stats)  # last
    return stats


def _reduced(run: RunPlan, s: int, plan: PartitionedDedup, shard: int) -> list[bytes]:
    """Every partition's decisions about one shard."""
    return [_read_segment(_phase(run, s, "reduce", f"{p:05d}.bin"), shard, run.world) for p in range(plan.partitions)]


def merge_task(run: RunPlan, s: int) -> dict:
    plan = _plan(run, s)
    stats: dict = {}
    for i, data, so_far in plan.merge(
            lambda i: _reduced(run, s, plan, i),
            lambda i: _read_segment(_phase(run, s, "index", f"{i:05d}.bin"), plan.partitions, plan.partitions + 1),
            run.world):
        storage.atomic_write_bytes(_phase(run, s, "merge", f"{i:05d}.json"), data)
        stats = so_far
    storage.atomic_write_json(_phase(run, s, "merge", "merge.json"), stats)  # last: the merge is complete
    return stats


def filter_task(run: RunPlan, s: int, shard: int) -> dict:
    plan = _plan(run, s)
    if plan.has_merge:
        decisions = [storage.read_bytes(_phase(run, s, "merge", f"{shard:05d}.json"))]
    else:
        decisions = _reduced(run, s, plan, shard)
    steps = [plan.filter(decisions)]
    if run.signatures_only(s - 1):  # stage s - 1 kept no documents: its input is read again
        return run.run_shard(s, shard, run.input_path(s - 1, shard), steps_state=steps, read_as=s - 1)
    return run.run_shard(s, shard, run.shard_path(s - 1, shard), steps_state=steps)


def _counted(docs: Iterable[Document], st: StepStats) -> Iterator[Document]:
    for doc in docs:
        _add(st.into, _measure(doc))
        st.last_input = (doc.id, doc.text)  # the text before the step: a removed line for the examples
        yield doc


def _removed_line(st: StepStats, doc: Document) -> str | None:
    """The first line of `doc`'s text before the step that its text after lacks (None: not known)."""
    if st.last_input is None or st.last_input[0] != doc.id:
        return None
    kept = set(doc.text.split("\n"))
    return next((line for line in st.last_input[1].split("\n") if line not in kept), None)


def _accounted(events, st: StepStats, step: str, excluded: ShardWriter | None) -> Iterator[Document]:
    pending: list[LinesRemoved] = []  # a step yields a document's LinesRemoved before the document
    for ev in events:
        if isinstance(ev, (Document, Dropped)) and pending:
            doc = ev if isinstance(ev, Document) else ev.doc
            for lr in pending:
                line = lr.example or (_removed_line(st, doc) if isinstance(ev, Document) else None)
                st.example(lr.reason, doc.id, *((line, "line") if line else (doc.text, "document")))
            pending.clear()
        if isinstance(ev, Document):
            _add(st.kept, _measure(ev))
            yield ev
        elif isinstance(ev, Dropped):
            _add(st.dropped.setdefault(ev.reason, _zero()), _measure(ev.doc))
            st.example(ev.reason, ev.doc.id, ev.doc.text)
            by = st.dropped_by_source.setdefault(ev.doc.source or "-", {})
            by[ev.reason] = by.get(ev.reason, 0) + 1
            if excluded is not None:
                ev.doc.metadata = {**ev.doc.metadata, "excluded": {"step": step, "reason": ev.reason}}
                excluded.write(ev.doc)
        elif isinstance(ev, LinesRemoved):
            r = st.lines_removed.setdefault(ev.reason, {"lines": 0, "chars": 0})
            r["lines"] += ev.lines
            r["chars"] += ev.chars
            if len(st.examples.get(ev.reason, ())) < st.limit:
                pending.append(ev)
        else:
            raise TypeError(f"step {step!r} yielded {type(ev).__name__}; steps yield Document, Dropped or "
                            "LinesRemoved")


_WORKER: RunPlan | None = None


def _init_worker(run: RunPlan) -> None:
    global _WORKER
    _WORKER = run


def _worker_task(task: tuple[int, int, str]) -> dict:
    s, shard, path = task
    return _WORKER.run_shard(s, shard, storage.as_path(path))


def _worker_call(task: tuple[Callable, tuple]) -> dict:
    fn, args = task
    return fn(_WORKER, *args)


# Malformed records (MalformedRecord) logged and kept in the stats per shard, and in all: the
# count covers every one, a corpus may hold millions.
MALFORMED_EXAMPLES = 10

# The progress line's rates are over this many seconds of finished shards.
THROUGHPUT_WINDOW_S = 60.0

# Default memory for one dedup step's state before it spills to disk.
DEDUP_MEMORY_MB = 2048.0


class Executor:
    """Sharding, stages, resume, stats and the data card; `_map` and `_run_global` say where the
    shard tasks run."""

    def __init__(self, output: str | os.PathLike, keep_excluded: bool = False, on_malformed: str = "skip",
                 compression: str = "gzip", progress: bool = True, overwrite: bool = False,
                 dedup_memory_mb: float | None = DEDUP_MEMORY_MB, card_examples: int = CARD_EXAMPLES,
                 dedup_partitions: int = 0):
        if on_malformed not in ("skip", "stop"):
            raise ValueError(f"on_malformed must be 'skip' or 'stop', got {on_malformed!r}")
        if dedup_memory_mb is not None and dedup_memory_mb < 0:
            raise ValueError(f"dedup_memory_mb must be >= 0 (0: dedup state on disk from the start), "
                             f"got {dedup_memory_mb}")
        if card_examples < 0:
            raise ValueError(f"card_examples must be >= 0 (examples of each removal reason in the data card), "
                             f"got {card_examples}")
        self.out, self.keep_excluded = storage.as_path(output), keep_excluded
        self.card_examples = card_examples
        self.on_malformed, self.compression, self.progress, self.overwrite = \
            on_malformed, compression, progress, overwrite
        self.dedup_memory = None if dedup_memory_mb is None else int(dedup_memory_mb * 2**20)
        if dedup_partitions < 0:
            raise ValueError(f"dedup_partitions must be >= 0 (0: each dedup step in one process; P: split into P "
                             f"hash partitions across the workers, e.g. 4 x workers), got {dedup_partitions}")
        self.dedup_partitions = dedup_partitions

    def _fingerprint(self, source: str, reader: Reader, steps: list[Step], files: list[storage.StoragePath]) -> dict:
        fp = {"source": source, "reader": reader.describe(), "steps": [s.describe() for s in steps],
              "inputs": [str(f) for f in files], "compression": self.compression,
              "keep_excluded": self.keep_excluded}
        if self.dedup_partitions:  # the partition files of a run with another P cannot be resumed
            fp["dedup_partitions"] = self.dedup_partitions
        return fp

    def _check_resume(self, fp: dict) -> None:
        state = storage.join(self.out, ".state", "pipeline.json")
        if self.overwrite and storage.exists(self.out):
            for sub in ("documents", "excluded", ".stages", ".state", "stats.json", "DATACARD.md"):
                storage.rmtree(storage.join(self.out, sub))
        if storage.exists(state):
            if json.loads(storage.read_text(state)) != fp:
                raise ValueError(f"{self.out} holds a run of a different pipeline or inputs; pass --overwrite to "
                                 "replace it, or choose another --output")
        elif not storage.is_empty_dir(self.out):
            raise ValueError(f"{self.out} is not empty and holds no pipeline state; choose an empty --output "
                             "or pass --overwrite")
        storage.atomic_write_json(state, fp)

    def run(self, source: str, reader: Reader, steps: list[Step], inputs: Iterable[str | os.PathLike],
            on_shard: Callable[[int, int], None] | None = None) -> dict:
        """Run the pipeline; return the aggregated stats (also written to OUTPUT/stats.json)."""
        files = reader.files(inputs)
        if not files:
            raise ValueError(f"no {reader.name} input files found in {list(map(str, inputs))}")
        self._check_resume(self._fingerprint(source, reader, steps, files))
        # Temporary files of a killed run (hidden, never read as shards): remove, the shards are redone.
        for sub in ("documents", "excluded", ".stages"):
            storage.remove_temporaries(storage.join(self.out, sub))
        stages = _stages(steps)
        run = RunPlan(self.out, reader, stages, self.keep_excluded, self.on_malformed, self.compression,
                      len(files), self.dedup_memory, self.card_examples, self.dedup_partitions)
        run.files = [str(f) for f in files]
        for stage in stages:
            s = stage.index
            finished = run.done(s)
            done = len(finished)
            desc = f"stage {s}" + (f" ({', '.join(x.name for x in stage.steps)})" if stage.global_state else "")
            meter, counted = Throughput(THROUGHPUT_WINDOW_S), [done]
            with self._bar(len(files), done, desc) as bar:
                def after(i: int, result: dict | None = None, s: int = s, bar=bar, meter=meter, desc=desc,
                          counted=counted) -> None:
                    if result is None:  # a global stage's shard: its stats are in the output
                        result = json.loads(storage.read_text(storage.join(run.state_dir(s), f"{i:05d}.stats.json")))
                    now = time.monotonic()
                    meter.add(now, result["read"]["documents"], result["read"].get("bytes", 0))
                    bar.set_postfix_str(meter.line(now), refresh=False)
                    bar.update()
                    counted[0] += 1
                    log.info("%s: %d/%d shards, %s", desc, counted[0], len(files), meter.line(now))
                    if on_shard:
                        on_shard(s, i)

                if stage.global_state and _plan(run, s) is not None:
                    self._run_partitioned(run, s, after)
                    continue
                if stage.global_state:
                    self._run_global(run, s, after)
                    continue
                todo = [(s, i, str(files[i] if s == 0 else run.shard_path(s - 1, i))) for i in range(len(files))
                        if i not in finished]
                # closing: a failing callback stops the remaining tasks now, not when the generator is collected.
                with contextlib.closing(self._map(run, todo)) as results:
                    for r in results:
                        after(r["shard"], r)
        stats = self._collect(run, source, len(files))
        storage.atomic_write_json(storage.join(self.out, "stats.json"), stats)
        storage.atomic_write_text(storage.join(self.out, "DATACARD.md"), data_card(stats))
        return stats

    def _map(self, run: RunPlan, todo: list[tuple[int, int, str]]) -> Iterator[dict]:
        """Run `run.run_shard(s, shard, path)` for each task; yield each result as it finishes."""
        raise NotImplementedError

    def _run_global(self, run: RunPlan, s: int, after_shard: Callable[[int], None]) -> None:
        run_global_stage(run, s, after_shard)

    def _map_tasks(self, run: RunPlan, fn: Callable[..., dict], args: list[tuple]) -> Iterator[dict]:
        """Run `fn(run, *a)` for each `a` on the workers; yield each result as it finishes."""
        raise NotImplementedError

    def _run_partitioned(self, run: RunPlan, s: int, after_shard: Callable[[int, dict], None]) -> None:
        """A dedup stage as index / reduce / merge / filter tasks (module docstring); each phase
        skips the tasks whose marker is there."""
        plan, n, name = _plan(run, s), run.world, run.stages[s].steps[0].name
        for phase in ("index", "reduce", "merge"):
            storage.remove_temporaries(_phase(run, s, phase))
        if len(run.done(s)) < n:
            indexed = _markers(run, s, "index")
            for _ in self._map_tasks(run, index_task, [(s, i) for i in range(n) if i not in indexed]):
                pass
            log.info("stage %d (%s): %d shards indexed into %d partitions", s, name, n, plan.partitions)
            reduced = _markers(run, s, "reduce")
            for r in self._map_tasks(run, reduce_task, [(s, p) for p in range(plan.partitions) if p not in reduced]):
                reduced.add(r["partition"])
                log.info("stage %d (%s): partition %d done (%d/%d), %s", s, name, r["partition"], len(reduced),
                         plan.partitions, ", ".join(f"{k} {v}" for k, v in r.items() if k != "partition"))
            if plan.has_merge and not storage.exists(_phase(run, s, "merge", "merge.json")):
                for r in self._map_tasks(run, merge_task, [(s,)]):
                    log.info("stage %d (%s): merged: %s", s, name, ", ".join(f"{k} {v}" for k, v in r.items()))
            finished = run.done(s)
            for r in self._map_tasks(run, filter_task, [(s, i) for i in range(n) if i not in finished]):
                after_shard(r["shard"], r)
        summary: dict = {"partitions": plan.partitions, "partitions_done": 0}
        for p in range(plan.partitions):
            r = json.loads(storage.read_text(_phase(run, s, "reduce", f"{p:05d}.done")))
            summary["partitions_done"] += 1
            for k, v in r.items():
                if k != "partition":
                    summary[k] = summary.get(k, 0) + v
        if plan.has_merge:
            summary.update(json.loads(storage.read_text(_phase(run, s, "merge", "merge.json"))))
        log.info("stage %d (%s): %s", s, name, ", ".join(f"{k} {v}" for k, v in summary.items()))
        storage.atomic_write_json(storage.join(run.state_dir(s), "partitioned.json"), summary)

    def _bar(self, total: int, done: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, initial=done, desc=desc, unit="shard", disable=not self.progress)

    def _collect(self, run: RunPlan, source: str, n: int) -> dict:
        steps: list[dict] = []
        read = {"files": n, "documents": 0, "malformed": [], "malformed_records": 0,
                "malformed_record_examples": []}
        for stage in run.stages:
            merged: list[dict] | None = None
            for i in range(n):
                r = json.loads(storage.read_text(storage.join(run.state_dir(stage.index), f"{i:05d}.stats.json")))
                if stage.index == 0:
                    read["documents"] += r["read"]["documents"]
                    read["malformed"] += r["read"]["malformed"]
                    # .get: shard stats written before records were counted (a resumed run)
                    read["malformed_records"] += r["read"].get("malformed_records", 0)
                    examples = read["malformed_record_examples"] + r["read"].get("malformed_record_examples", [])
                    read["malformed_record_examples"] = examples[:MALFORMED_EXAMPLES]
                merged = r["steps"] if merged is None else \
                    [_merge(a, b, run.examples) for a, b in zip(merged, r["steps"])]
            summary = storage.join(run.state_dir(stage.index), "partitioned.json")
            if merged and stage.global_state and run.partitions and storage.exists(summary):
                merged[0]["partitioned"] = json.loads(storage.read_text(summary))
            steps += merged or []
        return {"source": source, "read": read, "steps": steps,
                "output": {"documents_dir": "documents", "excluded_dir": "excluded" if run.keep_excluded else None}}


class LocalExecutor(Executor):
    """All cores of this machine: one forked worker process per shard at a time."""

    def __init__(self, output: str | os.PathLike, workers: int | None = None, **kwargs):
        workers = (os.cpu_count() or 1) if workers is None else workers
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        super().__init__(output, **kwargs)
        self.workers = workers

    def _map(self, run, todo):
        if self.workers == 1 or len(todo) <= 1:
            for s, i, p in todo:
                yield run.run_shard(s, i, storage.as_path(p))
            return
        # maxtasksperchild: a worker's memory is returned after each shard (bounded memory).
        with multiprocessing.get_context("fork").Pool(min(self.workers, len(todo)), _init_worker, (run,),
                                                      maxtasksperchild=1) as pool:
            yield from pool.imap_unordered(_worker_task, todo)

    def _map_tasks(self, run, fn, args):
        if self.workers == 1 or len(args) <= 1:
            for a in args:
                yield fn(run, *a)
            return
        with multiprocessing.get_context("fork").Pool(min(self.workers, len(args)), _init_worker, (run,),
                                                      maxtasksperchild=1) as pool:
            yield from pool.imap_unordered(_worker_call, [(fn, a) for a in args])


def _merge(a: dict, b: dict, examples: int = CARD_EXAMPLES) -> dict:
    """Two shards' stats of one step, `a` the earlier shard (examples are kept in shard order)."""
    out = {"name": a["name"], "description": a["description"]}
    for k in ("in", "kept"):
        out[k] = {m: a[k][m] + b[k][m] for m in _MEASURES}
    # .get: shard stats written before examples and sources were recorded (a resumed run)
    for k in ("dropped", "lines_removed", "dropped_by_source"):
        out[k] = {r: dict(v) for r, v in a.get(k, {}).items()}
        for r, v in b.get(k, {}).items():
            cur = out[k].setdefault(r, dict.fromkeys(v, 0))
            for m, x in v.items():
                cur[m] = cur.get(m, 0) + x
    out["examples"] = {r: list(v) for r, v in a.get("examples", {}).items()}
    for r, v in b.get("examples", {}).items():
        got = out["examples"].setdefault(r, [])
        got += v[:max(0, examples - len(got))]
    return out


class Throughput:
    """Documents/s and bytes/s over the last `window` seconds (since the start while shorter),
    from finished shards' counts: the executor's rolling progress line."""

    def __init__(self, window: float = 30.0, start: float | None = None):
        assert window > 0, window
        self.window = window
        self.start = time.monotonic() if start is None else start
        self.events: deque[tuple[float, int, int]] = deque()

    def add(self, t: float, documents: int, nbytes: int) -> None:
        self.events.append((t, documents, nbytes))

    def rates(self, t: float) -> tuple[float, float]:
        while self.events and self.events[0][0] <= t - self.window:
            self.events.popleft()
        span = min(self.window, t - self.start)
        if span <= 0:
            return 0.0, 0.0
        return sum(e[1] for e in self.events) / span, sum(e[2] for e in self.events) / span

    def line(self, t: float) -> str:
        docs, nbytes = self.rates(t)
        rate = f"{nbytes / 1e6:,.2f} MB/s" if nbytes >= 1e5 else f"{nbytes / 1e3:,.2f} kB/s"
        return f"{docs:,.1f} docs/s, {rate} (last {min(self.window, t - self.start):.3g} s)"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _examples(examples: list[dict[str, str]]) -> list[str]:
    # JSON-quoted: newlines and markup in the text stay visible and cannot break the card's Markdown.
    what = {"line": "a removed line", "document": "the document starts"}
    return [f"  - `{e['id']}`, {what.get(e.get('kind', 'document'), 'text')}: "
            f"{json.dumps(e['text'], ensure_ascii=False)}" for e in examples]


def data_card(stats: dict) -> str:
    read = stats["read"]
    lines = [f"# Data card: {stats['source']}", "",
             f"Read {read['documents']} documents from {read['files']} input files "
             f"({len(read['malformed'])} malformed, skipped from the error on).", ""]
    for m in read["malformed"]:
        lines.append(f"- malformed: `{m}`")
    if read.get("malformed_records"):
        lines.append(f"- {read['malformed_records']} malformed records skipped (each alone), e.g.:")
        lines += [f"  - `{m}`" for m in read["malformed_record_examples"]]
    lines += ["", "| step | documents in | kept | dropped | characters removed | what it does |",
              "|---|---:|---:|---:|---:|---|"]
    for st in stats["steps"]:
        din, kept = st["in"], st["kept"]
        removed = din["chars"] - kept["chars"]
        gone = din["documents"] - kept["documents"]
        lines.append(f"| {st['name']} | {din['documents']} | {kept['documents']} | "
                     f"{gone} ({_pct(gone, din['documents'])}) | "
                     f"{removed} ({_pct(removed, din['chars'])}) | {st['description']} |")
    for st in stats["steps"]:
        if not st["dropped"] and not st["lines_removed"]:
            continue
        lines += ["", f"## {st['name']}", ""]
        examples = st.get("examples", {})
        if "partitioned" in st:  # the dedup ran split across the workers (data/dedup_partitioned.py)
            lines.append("- ran in hash partitions: " + ", ".join(f"{k.replace('_', ' ')} {v}"
                                                                  for k, v in st["partitioned"].items()))
        for why, v in sorted(st["dropped"].items(), key=lambda kv: -kv[1]["documents"]):
            lines.append(f"- dropped {v['documents']} documents ({v['chars']} characters): {why}")
            lines += _examples(examples.get(why, []))
        for why, v in sorted(st["lines_removed"].items(), key=lambda kv: -kv[1]["lines"]):
            lines.append(f"- removed {v['lines']} lines ({v['chars']} characters): {why}")
            lines += _examples(examples.get(why, []))
        by_source = st.get("dropped_by_source", {})
        if len(by_source) > 1:  # a mixed input (the jsonl source): who lost what
            lines += ["", "Dropped documents by document source:", ""]
            for src, reasons in sorted(by_source.items()):
                detail = "; ".join(f"{why}: {n}" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
                lines.append(f"- {src}: {sum(reasons.values())} ({detail})")
    if stats["steps"]:
        last = stats["steps"][-1]["kept"]
        lines += ["", f"Kept {last['documents']} documents, {last['chars']} characters, {last['bytes']} bytes "
                  "(`documents/`)."]
    return "\n".join(lines) + "\n"
