"""Where `data mix` spends its CPU seconds, stage by stage (issue 20), with the compiled text kernels
(tokenizer/native.py) and orjson, and with the reference paths they replace (numpy passes, json).

    .venv/bin/python benchmarks/mix_stages.py --mix-mb 200 --label quiet \
        --json benchmarks/results/mix_stages_quiet.json
    .venv/bin/python benchmarks/mix_stages.py --smoke      # 2 MiB, a 2000-piece tokenizer, no JSON

The corpus is data_throughput.py's mix corpus (seven sources named and sized as Table 1, a 32k
SentencePiece model). For each path:

- one process (workers = 1, so every stage runs here): the mix with the pipeline's functions wrapped
  in CPU timers (time.process_time, exclusive of the timed functions they call), so other load on the
  machine moves the figures far less than wall time: reading the JSONL's lines (decompress, split),
  parsing them (in the workers when there are workers), the word cache's stages (joining the UTF-8,
  cutting chunks, packing and probing keys, SentencePiece on
  new chunks, the cache's bookkeeping of them, gathering the ids), the val-split hashes, the cache
  shards' writes, the documents' start offsets, and the mix proper (drawing and interleaving, gathering
  the documents' tokens, writing the output shards);
- `--workers` processes: wall time, and CPU seconds of the mixing process and of its workers.

Each run starts with a cold word cache, as a fresh `data mix` does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from data_throughput import make_mix_corpus  # benchmarks/ is on sys.path
from machine import add_label_argument, record_in_child, write_result

from llamaworks.data import document, shards
from llamaworks.data import mix as mix_module
from llamaworks.tokenizer import native, word_cache


class Profile:
    """CPU seconds per stage, each exclusive of the timed stages it calls. The timers' own cost (two
    clock reads per call: about a microsecond, and some stages run per document) is estimated by
    timing a wrapped no-op, taken out of the caller's time and shown as its own row."""

    def __init__(self):
        self.cpu: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []  # [stage, start, seconds of timed callees]
        self.phase = ""
        self.overhead = 0.0  # seconds per timed call, outside the callee's own time
        self.overhead = self._calibrate()

    def _calibrate(self, calls: int = 20000) -> float:
        def noop():
            return None

        t0 = time.process_time()
        for _ in range(calls):
            noop()
        bare = time.process_time() - t0
        t0 = time.process_time()
        for _ in range(calls):
            self.enter("calibration")
            noop()
            self.leave()
        timed = time.process_time() - t0
        self.cpu.clear()
        return max(0.0, (timed - bare) / calls)

    def enter(self, stage: str) -> None:
        self.stack.append([stage, time.process_time(), 0.0])

    def leave(self) -> None:
        stage, start, inner = self.stack.pop()
        spent = time.process_time() - start
        self.cpu[f"{self.phase}{stage}"] += spent - inner
        if self.stack:
            self.stack[-1][2] += spent + self.overhead  # the caller paid the timers around this call too
            self.cpu["profiler timers (estimated)"] += self.overhead

    def wrap(self, owner, name: str, stage: str, phase: str | None = None) -> None:
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            before = self.phase
            if phase is not None:
                self.phase = phase
            self.enter(stage)
            try:
                return fn(*args, **kwargs)
            finally:
                self.leave()
                self.phase = before

        setattr(owner, name, timed)

    def wrap_generator(self, owner, name: str, stage: str) -> None:
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            items = fn(*args, **kwargs)
            while True:
                self.enter(stage)
                try:
                    item = next(items)
                except StopIteration:
                    return
                finally:
                    self.leave()
                yield item

        setattr(owner, name, timed)


def mix_config(corpus: Path, out: Path, workers: int) -> mix_module.MixConfig:
    sources = {p.name: {"inputs": [str(p)]} for p in sorted((corpus / "sources").iterdir())}
    return mix_module.MixConfig(tokenizer=str(corpus / "tokenizer.model"), output=str(out), workers=workers,
                                seed=0, sources=sources)


def profiled_mix(corpus: Path, out: Path) -> dict:
    """The mix in this process (workers = 1) with every stage's CPU seconds."""
    prof = Profile()
    saved = []
    targets = [(shards, "_records", "read JSONL lines (decompress, split)", None, True),
               (shards, "_span_records", "read JSONL lines (decompress, split)", None, True),  # in the workers
               (shards, "_span_bytes", "read JSONL lines (decompress, split)", None, False),
               (native, "jsonl_docs", "JSONL records to documents (compiled)", None, False),
               (shards, "_split_tokens", "train/val split of the ids", None, False),
               (shards, "_document_of", "parse JSON", None, False),
               (shards, "_val_mask", "val-split hashes", None, False),
               (shards.ShardWriter, "write", "shard writes", None, False),
               (shards, "_pwrite_all", "shard writes", None, False),  # the mix's windows (write_window)
               (shards, "_encode", "encode: the rest (on the numpy path the id gather too)", None, False),
               (word_cache, "_utf8", "encode: texts to UTF-8", None, False),
               (word_cache, "split_chunks", "encode: cut chunks (numpy)", None, False),
               (word_cache, "_joined", "encode: UTF-8 join", None, False),
               (word_cache, "_packed", "encode: pack keys (numpy)", None, False),
               (word_cache.FlatEncoder, "_lookup", "encode: probe (numpy)", None, False),
               (native, "chunks", "encode: cut + pack + probe (compiled)", None, False),
               (native, "assemble", "encode: gather ids (compiled)", None, False),
               (word_cache.FlatEncoder, "_fill", "encode: new chunks' bookkeeping", None, False),
               (word_cache.FlatEncoder, "_add", "encode: SentencePiece on new chunks", None, False),
               (mix_module, "_document_starts", "documents' start offsets", None, False),
               (shards.TokenFiles, "copy_runs", "gather documents' tokens", None, False),
               (mix_module, "_source_cache", "other", "tokenise: ", False),
               (mix_module, "_write_split", "draw + interleave", "mix: ", False)]
    for owner, name, stage, phase, generator in targets:
        saved.append((owner, name, getattr(owner, name)))
        (prof.wrap_generator if generator else prof.wrap)(owner, name, stage, *([] if generator else [phase]))
    word_cache._LAST = None  # a cold cache, as in a fresh `data mix`
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        mix_module.mix(mix_config(corpus, out, 1), progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
    stages = {k: round(v, 3) for k, v in sorted(prof.cpu.items(), key=lambda kv: -kv[1])}
    stages["other (config, planning, manifests)"] = round(cpu - sum(prof.cpu.values()), 3)
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "stages_cpu_s": stages}


def pooled_mix(corpus: Path, out: Path, workers: int) -> dict:
    """The mix with `workers` tokenising processes: wall time, CPU of this process and of the workers."""
    word_cache._LAST = None
    before_self = resource.getrusage(resource.RUSAGE_SELF)
    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    mix_module.mix(mix_config(corpus, out, workers), progress=False)
    wall = time.perf_counter() - t0
    shards._drop_pool()  # the workers exit: their CPU time joins RUSAGE_CHILDREN
    after_self = resource.getrusage(resource.RUSAGE_SELF)
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)

    def cpu(a, b):
        return round(b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime, 3)

    return {"workers": workers, "wall_s": round(wall, 3), "mixing_process_cpu_s": cpu(before_self, after_self),
            "workers_cpu_s": cpu(before_children, after_children)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mix-mb", type=float, default=200.0, help="size of the mix corpus in MiB (default 200)")
    ap.add_argument("--mix-vocab", type=int, default=None, help="SentencePiece pieces (default 32000; --smoke 2000)")
    ap.add_argument("--workers", type=int, default=2, help="tokenising processes of the pooled run (default 2)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each row, round robin; the fastest is kept")
    ap.add_argument("--workdir", default=None,
                    help="where the corpus (kept for the next run of the same size) and outputs go (default: a "
                         "temporary folder)")
    ap.add_argument("--json", default=None, help="where to write the result (default: none)")
    ap.add_argument("--smoke", action="store_true", help="a 2 MiB corpus and a 2000-piece tokenizer")
    add_label_argument(ap)
    args = ap.parse_args()
    if args.smoke:
        args.mix_mb, args.mix_vocab = 2.0, args.mix_vocab or 2000
    args.mix_vocab = args.mix_vocab or 32000
    machine = record_in_child(args.label, threads=1)
    paths = ["compiled", "numpy"]
    if native.library() is None:
        print("the text kernels are not built (python -m llamaworks.tokenizer.native build): numpy only")
        paths = ["numpy"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        t0 = time.perf_counter()
        made = work / "corpus" / f"corpus_{args.mix_mb:g}mb_{args.mix_vocab}.json"  # a --workdir keeps its corpus
        if made.is_file():
            info = json.loads(made.read_text())
        else:
            shutil.rmtree(work / "corpus", ignore_errors=True)
            info = make_mix_corpus(work / "corpus", args.mix_mb, args.mix_vocab)
            made.write_text(json.dumps(info))
        mb = info["bytes"] / 2**20
        print(f"mix corpus: {info['documents']} documents, {mb:.1f} MiB ({time.perf_counter() - t0:.1f} s)")
        result = {"corpus": info, "paths": {p: {} for p in paths}}
        for _ in range(args.repeats):  # round robin: each row's fastest run
            for path in paths:
                native.set_enabled(path == "compiled")
                document.set_fast_json(path == "compiled")  # the reference path parses with json alone
                os.environ["LLAMAWORKS_NATIVE"] = "1" if path == "compiled" else "0"  # the spawned workers too
                os.environ["LLAMAWORKS_FAST_JSON"] = os.environ["LLAMAWORKS_NATIVE"]
                rows = result["paths"][path]
                for key, run in (("one_process", lambda out: profiled_mix(work / "corpus", out)),
                                 (f"{args.workers}_workers", lambda out: pooled_mix(work / "corpus", out,
                                                                                     args.workers))):
                    out = work / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    r = run(out)
                    r["mb_per_s"] = round(mb / r["wall_s"], 2)
                    if key not in rows or r["wall_s"] < rows[key]["wall_s"]:
                        rows[key] = r
        native.set_enabled(True)
        document.set_fast_json(True)
    for path, rows in result["paths"].items():
        one = rows["one_process"]
        print(f"\n{path}: one process {one['wall_s']:.2f} s wall, {one['cpu_s']:.2f} s CPU "
              f"({mb / one['cpu_s']:.1f} MB per CPU second)")
        for stage, s in one["stages_cpu_s"].items():
            print(f"  {stage:48s} {s:7.3f} s  {s / one['cpu_s']:6.1%}")
        pool = rows[f"{args.workers}_workers"]
        print(f"  {args.workers} workers: {pool['wall_s']:.2f} s wall ({pool['mb_per_s']:.1f} MB/s), mixing process "
              f"{pool['mixing_process_cpu_s']:.2f} s CPU, workers {pool['workers_cpu_s']:.2f} s CPU")
    result["machine"] = machine
    if args.json:
        write_result(args.json, result)


if __name__ == "__main__":  # the tokenising workers are spawned: they re-import this file
    sys.exit(main())
