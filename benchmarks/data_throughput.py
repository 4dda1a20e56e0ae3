"""Data pipeline throughput: ours against datatrove on the same generated web-like corpus.

    .venv/bin/python benchmarks/data_throughput.py --gb 0.1  # 100 MiB: minutes on a 2-core machine
    .venv/bin/python benchmarks/data_throughput.py --gb 1    # the issue's size (1 GiB dedup and mix)
    .venv/bin/python benchmarks/data_throughput.py --smoke   # 0.5 MB, no JSON (tests/test_benchmarks.py)

The corpus: JSONL pages built from the Shakespeare lines of ../shared/corpora (prose-like
paragraphs of lines joined into sentences) plus web boilerplate (navigation, cookie and
javascript notices, short link lines), some pages with "lorem ipsum" or code braces, exact
copies and near-copies (a few lines changed), so that the C4 rules, line dedup and MinHash
dedup all have real work. Timed, each in its own process:

    (a) c4:     ours `data run c4` (LineDedup + C4Filter: no datatrove counterpart, no ratio),
                ours C4Filter alone, datatrove JsonlReader -> C4QualityFilter -> JsonlWriter
                with its defaults, and the same with ours' rules (datatrove_c4filter_same_rules)
    (b) minhash: ours MinHashDedup on the local executor (one global stage), ours split into
                `--partitions` hash partitions (data/dedup_partitioned.py) on a Dask LocalCluster
                of 1, 2 and 4 worker processes (`--dask-workers`), and datatrove's 4 MinHash
                stages (signatures, buckets, clusters, filter) with its own local executor at
                the same worker counts, the same bands x rows and 5-grams: once computing ours'
                signatures in its stage 1 (datatrove_minhash_same, the ratio's denominator) and
                once its own (datatrove_minhash, at `--datatrove-default-workers`: shown beside)
    (c) mix:    `data mix` of seven sources (Table 1's names and shares of `--mix-mb`, the same
                kind of pages) with a 32k SentencePiece model trained on the Shakespeare text:
                this tree against the mixer of `--mix-baseline` (a git revision, run from its own
                `src/`), their output bytes compared, and the tokenizer alone on a sample
                (SentencePiece's batch encoder; the word-cache encoder of tokenizer/word_cache.py, cold
                and warm); with --workers above 1, also this tree's mix tokenising in one process

Equal work: a speed ratio is printed only for a pair whose kept documents agree (Jaccard of
the kept ids >= 0.99; below it the ratio is withheld and the disagreement shown). Both sides
follow c4_utils.clean_page line by line (citations cut, "lorem ipsum" and "{" judged on lines
that survive the punctuation and length rules); they differ by default in two choices:
datatrove counts sentences with its sentence splitter (spacy) where ours counts terminal-mark
runs (a regex), and it also ends lines with "'". The "same_rules" row runs datatrove's
C4QualityFilter with ours' choices on both (its sentence splitter swapped for ours' regex, its
end marks for c4_utils'): it is the ratio's denominator, and its time against the default
row's is what datatrove's own rules cost, printed beside it. The partitioned MinHash rows must
keep exactly the documents of the single-process one (printed).

MinHash, equal work: with 5 bands x 25 rows (ours' LSH shape for threshold 0.9) a pair at
Jaccard 0.9 shares a band with probability 0.31, so which near-copies are caught depends on the
hash family: two runs with different shingles and permutations disagree on ~2% of the kept
documents however exact each is (datatrove with its own signatures against datatrove with ours':
Jaccard 0.980-0.981 on this corpus). With ours' signatures in datatrove's stage 1 (same shingles,
hashes, permutations and band keys) the kept sets agree at >= 0.994; what remains is the
algorithm: datatrove drops every document of a connected group of band collisions except its
union-by-size root (no check of the full signature), ours drops a document whose signature agrees
on >= 90% of the permutations with an earlier kept one. The time datatrove's own signatures cost
(its word tokenizer mostly) is printed beside, as for C4.

The simulated 64-worker layout is computed from the partitioned run's own files: with P =
`--partitions` (64 by default) each of 64 workers reduces one partition, so the bytes it
receives are that partition's index payloads summed over the shards (measured sizes: the
largest, the mean, and max/mean as the skew), the bytes it sends are its shards' payloads
(input shards dealt round-robin), and the merge task reads every reduce output.

Printed and written to benchmarks/results/data_throughput.json: documents/s and MB/s of
input, peak RSS (the largest process of the run), kept documents and their Jaccard with the
counterpart, ours/datatrove, the mix rows and the machine (benchmarks/machine.py).

datatrove is not a dependency of llamaworks; install it into the project venv (it changes
none of torch, numpy, transformers, tokenizers, lm-eval; its quality filters need spacy):

    .venv/bin/pip install -c .venv/constraints.txt "datatrove[io]" spacy

If it is absent the datatrove rows are skipped with a note; without Dask (the cluster extra)
the partitioned rows are.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import add_label_argument, record_in_child  # benchmarks/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "corpora" / "shakespeare"

BOILERPLATE = ["Home | About us | Contact | Shop", "Skip to main content", "Menu", "Share this page",
               "Please enable JavaScript to view the comments.", "This site uses cookies to improve your experience.",
               "Read our privacy policy and terms of use.", "Copyright 2024 Example Media. All rights reserved.",
               "Subscribe to our newsletter", "Posted by admin on March 3, 2021", "Related posts:",
               "Tags: drama, verse"]


def _source_lines() -> list[str]:
    if not CORPORA.is_dir():
        raise SystemExit(f"{CORPORA} absent: the corpus is built from ../shared/corpora/shakespeare")
    lines = []
    for f in sorted(CORPORA.glob("*.txt")):
        for raw in f.read_text(encoding="utf-8", errors="replace").splitlines():
            raw = raw.strip()
            if len(raw.split()) >= 4 and not raw.isupper():
                lines.append(raw)
    return lines


def make_corpus(folder: Path, mb: float, shards: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    lines = _source_lines()
    folder.mkdir(parents=True, exist_ok=True)
    outs = [open(folder / f"web-{i:03d}.jsonl", "w", encoding="utf-8") for i in range(shards)]
    target, written, n = int(mb * 2**20), 0, 0
    pages: list[str] = []
    try:
        while written < target:
            r = rng.random()
            if pages and r < 0.08:
                text = rng.choice(pages)  # exact copy
            elif pages and r < 0.16:
                src = rng.choice(pages).split("\n")  # near copy: a few lines changed
                for _ in range(max(1, len(src) // 20)):
                    src[rng.randrange(len(src))] = rng.choice(lines) + "."
                text = "\n".join(src)
            else:
                body = []
                for _ in range(rng.randint(2, 12)):  # paragraphs: 2-6 lines joined into a sentence run
                    k = rng.randint(2, 6)
                    start = rng.randrange(len(lines) - k)
                    body.append(" ".join(lines[start:start + k]).rstrip(",;:") + rng.choice([".", ".", "!", "?"]))
                head = rng.sample(BOILERPLATE, rng.randint(1, 4))
                tail = rng.sample(BOILERPLATE, rng.randint(1, 3))
                if rng.random() < 0.02:
                    body.insert(1, "Lorem ipsum dolor sit amet, consectetur adipiscing elit.")
                if rng.random() < 0.02:
                    body.append("function show() { return menu.toggle(); }")
                text = "\n".join(head + body + tail)
                pages.append(text)
                if len(pages) > 2000:
                    pages.pop(rng.randrange(len(pages)))
            rec = json.dumps({"id": f"page-{n}", "text": text, "source": "web"}, ensure_ascii=False) + "\n"
            outs[n % shards].write(rec)
            written += len(rec.encode("utf-8"))
            n += 1
    finally:
        for f in outs:
            f.close()
    return {"documents": n, "bytes": written, "shards": shards}


# --- the timed runs (each in a child process: `--run NAME`) -------------------------------------------------

def run_ours(name: str, corpus: Path, out: Path, workers: int, partitions: int = 0) -> None:
    from llamaworks.data.c4 import C4Filter
    from llamaworks.data.command import pipeline
    from llamaworks.data.dedup import MinHashDedup
    from llamaworks.data.executor import JsonlReader, LocalExecutor

    if name == "ours_c4":
        reader, steps = pipeline("c4")
    elif name == "ours_c4filter":
        reader, steps = JsonlReader(), [C4Filter()]
    else:
        reader, steps = JsonlReader(), [MinHashDedup()]
    if name == "ours_minhash_dask":
        from llamaworks.data.cluster import DaskExecutor

        DaskExecutor(out, f"local:{workers}", dedup_partitions=partitions, progress=False).run(
            "web", reader, steps, [corpus])
        return
    LocalExecutor(out, workers=workers, progress=False).run("web", reader, steps, [corpus])


def layout_64(out: Path, workers: int = 64) -> dict:
    """The exchange of a partitioned MinHash run (executor.partition_exchange: measured payload sizes) laid
    out on `workers` workers: partition p reduced on worker p % workers, input shard i indexed on i % workers."""
    from llamaworks.data.executor import partition_exchange

    stages = partition_exchange(out)
    if not stages:
        return {}
    ex = stages[max(stages)]  # the MinHash stage (the only partitioned one)
    partitions = ex["partitions"]
    received = [0] * workers
    sent: dict[int, int] = {}
    for shard, sizes in enumerate(ex["index"]):
        for p, n in enumerate(sizes):
            received[p % workers] += n
        sent[shard % workers] = sent.get(shard % workers, 0) + sum(sizes)
    total = sum(received)
    mean = total / workers
    return {"workers": workers, "partitions": partitions, "input_shards": ex["shards"],
            "index_bytes_total": total, "received_per_worker_max": max(received),
            "received_per_worker_mean": round(mean),
            "received_skew_max_over_mean": round(max(received) / mean, 3) if mean else None,
            "sent_per_worker_max": max(sent.values()), "workers_sending": len(sent),
            "merge_reads_bytes": sum(sum(r) for r in ex["reduce"]),
            "note": "measured payload sizes of this run; with fewer input shards than workers, only "
                    "workers_sending workers index: cut the corpus into >= 64 files at that scale"}


# Equal work at the end of both pipelines: gzip at ours' level (data/document.py ShardWriter). datatrove's
# JsonlWriter writes gzip through fsspec, whose GzipFile defaults to level 9 (isal, fsspec's faster
# gzip, is not installed here): ~2x ours' CPU per byte written, so it is set to ours' level. Its
# workers (a forkserver) re-import this file, hence the environment variable read at import below.
OUTPUT_GZIP_LEVEL = 6
_DATATROVE_GZIP_ENV = "LLAMAWORKS_BENCH_DATATROVE_GZIP_LEVEL"


def datatrove_gzip_level(level: int) -> None:
    import gzip

    from fsspec.compression import register_compression

    os.environ[_DATATROVE_GZIP_ENV] = str(level)
    register_compression("gzip", lambda f, **kw: gzip.GzipFile(fileobj=f, compresslevel=level, **kw), "gz",
                         force=True)


if os.environ.get(_DATATROVE_GZIP_ENV):
    datatrove_gzip_level(int(os.environ[_DATATROVE_GZIP_ENV]))


def gzip_levels(folder: Path) -> list[str]:
    """The deflate level class of each .gz file (the header's XFL byte, as Python's gzip writes it)."""
    xfl = {2: "9 (best)", 4: "1 (fastest)", 0: "2-8"}
    return sorted({xfl.get(p.read_bytes()[8], "?") for p in folder.rglob("*.gz")})


def run_datatrove(name: str, corpus: Path, out: Path, workers: int) -> None:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    datatrove_gzip_level(OUTPUT_GZIP_LEVEL)
    tasks = len(list(corpus.glob("*.jsonl")))
    common = {"workers": workers, "skip_completed": False}

    def reader():
        return JsonlReader(str(corpus), glob_pattern="*.jsonl")

    if name in ("datatrove_c4filter", "datatrove_c4filter_same_rules"):
        from datatrove.pipeline.filters import C4QualityFilter

        c4 = C4QualityFilter() if name == "datatrove_c4filter" else same_rules_c4()
        LocalPipelineExecutor(pipeline=[reader(), c4, JsonlWriter(str(out / "documents"))],
                              tasks=tasks, logging_dir=str(out / "logs"), **common).run()
        return
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.utils.hashing import HashConfig

    from llamaworks.data.dedup import MinHashDedup

    ours = MinHashDedup()  # the same LSH shape and shingle size as ours
    # sha1: datatrove 0.10's xxhash path passes str, which xxhash >= 4 rejects. 32 bits: ours' values
    # (mod 2^32 - 5) in the "same signatures" variant.
    same = name == "datatrove_minhash_same"
    cfg = MinhashConfig(n_grams=ours.ngram, num_buckets=ours.bands, hashes_per_bucket=ours.rows,
                        hash_config=HashConfig(hash_fc="sha1", precision=32 if same else 64))
    signature = (same_signature_stage(ours) if same else MinhashDedupSignature)(output_folder=str(out / "sigs"),
                                                                                config=cfg)
    stages = [
        ([reader(), signature], tasks),
        ([MinhashDedupBuckets(input_folder=str(out / "sigs"), output_folder=str(out / "buckets"), config=cfg)],
         cfg.num_buckets),
        ([MinhashDedupCluster(input_folder=str(out / "buckets"), output_folder=str(out / "remove"), config=cfg)], 1),
        ([reader(), MinhashDedupFilter(input_folder=str(out / "remove")), JsonlWriter(str(out / "documents"))],
         tasks),
    ]
    for i, (pipe, n) in enumerate(stages):
        LocalPipelineExecutor(pipeline=pipe, tasks=n, logging_dir=str(out / f"logs{i}"), **common).run()


def same_signature_stage(ours):
    """datatrove's MinHash stage 1 computing ours' signatures (llamaworks/data/dedup.py): shingles of
    lowercased `\\w+` words hashed by blake2b-64 and n-grams of them mixed to 32 bits, permutations
    ((a h + b) mod 2^64) >> 32 with ours' a and b,
    where datatrove's own are words of simplify_text (numbers -> 0, punctuation and diacritics removed)
    split by its word tokenizer, sha1 hashes and (a h + b) mod 2^61 - 1. With LSH at 5 bands x 25 rows a
    pair at Jaccard 0.9 collides with probability 0.31: which borderline pairs each side finds is decided
    by its hash family, so only the same signatures make the kept sets comparable. Its stages 2-4 then
    see ours' band keys; what remains different is the algorithm (printed beside the ratio): datatrove
    drops every member of a connected group of band collisions but its union-by-size root, ours drops a
    document whose signature agrees on >= threshold of the permutations with an earlier *kept* one."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

    from llamaworks.data.dedup import shingles

    class SameSignature(MinhashDedupSignature):
        name = "MinHash stage 1 (ours' signatures)"

        def get_shingles(self, text):
            return shingles(text, ours.ngram).reshape(-1, 1)

        def get_signature(self, h):
            # minhash_signatures' arithmetic, one document at a time as datatrove's stage 1 goes:
            # ((a h + b) mod 2^64) >> 32, the minimum over the shingles (blocks bound the temporaries).
            sig = np.full(ours.a.size, np.iinfo(np.uint64).max, dtype=np.uint64)
            for c in range(0, h.shape[0], 8192):
                sig = np.minimum(sig, (np.multiply.outer(h[c:c + 8192, 0], ours.a) + ours.b).min(axis=0))
            sig >>= np.uint64(32)
            # The first bands x rows permutations are the band keys (ours' last num_perm % bands verify only).
            return [x.tolist() for x in np.split(sig[:ours.bands * ours.rows].astype(np.uint32), ours.bands)]

    return SameSignature


def same_rules_c4():
    """datatrove's C4QualityFilter with ours' (llamaworks/data/c4.py) choices where the two differ:
    sentences counted by ours' terminal-mark regex instead of datatrove's sentence splitter, and
    c4_utils' end marks (no "'")."""
    import re

    from datatrove.pipeline.filters import c4_filters

    from llamaworks.data.c4 import END_MARKS

    sentence = re.compile(r"[^.!?]+[.!?]+")  # ours' rule (llamaworks/data/c4.py _SENTENCE)

    def split_into_sentences(text, language):
        return sentence.findall(text)

    class SameRulesC4(c4_filters.C4QualityFilter):
        name = "C4 Quality (ours' rules)"

        def filter(self, doc):
            # Set here, not at construction: datatrove's workers get the pipeline pickled, not the patch.
            c4_filters.END_PUNCTUATION, c4_filters.split_into_sentences = END_MARKS, split_into_sentences
            return super().filter(doc)

    return SameRulesC4()


def timed(name: str, corpus: Path, out: Path, workers: int, partitions: int = 0, pythonpath: str | None = None) -> dict:
    """Run one variant in a child process; wall time and the peak RSS of its largest process."""
    cmd = [sys.executable, __file__, "--run", name, "--corpus", str(corpus), "--out", str(out),
           "--workers", str(workers), "--partitions", str(partitions)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    if pythonpath:  # another revision's llamaworks (the mix baseline) ahead of this tree's
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, *filter(None, [env.get("PYTHONPATH")])])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)  # rusage of the child and the descendants it waited for
    seconds = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed:\n{err[-3000:]}")
    return {"seconds": round(seconds, 3), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


# --- (c) data mix -------------------------------------------------------------------------------------------

TABLE1 = {"commoncrawl": 67.0, "c4": 15.0, "github": 4.5, "wikipedia": 4.5, "books": 4.5, "arxiv": 2.5,
          "stackexchange": 2.0}
MIX_BASELINE = "7e4f4e2"  # the last commit of the per-document mixer (before tokenizer/word_cache.py)


def make_mix_corpus(folder: Path, mb: float, vocab_size: int) -> dict:
    """Seven sources named as Table 1, sized by its shares, and a SentencePiece model (the paper's recipe)."""
    from llamaworks.tokenizer import Tokenizer

    info = {"sources": {}}
    for k, (name, share) in enumerate(TABLE1.items()):
        info["sources"][name] = make_corpus(folder / "sources" / name, mb * share / 100, 4, seed=100 + k)
    files = sorted(CORPORA.glob("*.txt"))
    if vocab_size < 8000:  # a small model (--smoke) needs little text: a quick training
        files = files[:6]
    docs = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    Tokenizer.train(folder / "tokenizer.model", documents=docs, vocab_size=vocab_size, seed=0)
    info["bytes"] = sum(v["bytes"] for v in info["sources"].values())
    info["documents"] = sum(v["documents"] for v in info["sources"].values())
    info["vocab_size"] = vocab_size
    return info


def run_mix(corpus: Path, out: Path, workers: int) -> None:
    """A child: `data mix` of the sources under corpus/sources with whichever llamaworks is first on the path."""
    from llamaworks.data.mix import MixConfig, mix

    sources = {p.name: {"inputs": [str(p)]} for p in sorted((corpus / "sources").iterdir())}
    cfg = MixConfig(tokenizer=str(corpus / "tokenizer.model"), output=str(out), workers=workers, seed=0,
                    sources=sources)
    t0 = time.perf_counter()
    mix(cfg, progress=False)
    seconds = time.perf_counter() - t0
    tokenising = sum(json.loads(m.read_text())["seconds"] for m in out.glob(".mix/sources/*/manifest.json"))
    (out.parent / f"{out.name}.timing.json").write_text(json.dumps({"seconds": seconds, "tokenising_s": tokenising}))


def output_digest(out: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(out.glob("*/*.bin")):
        h.update(f.relative_to(out).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def baseline_src(rev: str, into: Path) -> Path | None:
    """`src/` of git revision `rev` of this repository, extracted under `into`; None (with a note) if impossible."""
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.decode(errors="replace").strip() if isinstance(e, subprocess.CalledProcessError) else e
        print(f"mix baseline {rev!r} unavailable ({detail}): its row is skipped")
        return None
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src"


def tokenizer_alone(corpus: Path, mb: float, threads: int) -> dict:
    """MB/s of SentencePiece's batch encoder (one call) and of the word-cache encoder (1 MiB calls, cold
    then warm) on a sample of the mix's text."""
    from llamaworks.tokenizer import Tokenizer
    from llamaworks.tokenizer.word_cache import FlatEncoder

    texts, size = [], 0
    for f in sorted((corpus / "sources" / "commoncrawl").glob("*.jsonl")):
        for line in f.open(encoding="utf-8"):
            texts.append(json.loads(line)["text"])
            size += len(texts[-1].encode("utf-8"))
            if size >= mb * 2**20:
                break
        if size >= mb * 2**20:
            break
    tok = Tokenizer(corpus / "tokenizer.model")
    t0 = time.perf_counter()
    plain = tok.processor.encode(texts, add_bos=True, add_eos=True, num_threads=threads)
    sp_s = time.perf_counter() - t0
    enc = FlatEncoder(tok, threads=threads)
    batches, chars = [[]], 0  # ~1 MiB of text per call, as `prepare` sends them (its batch_chars)
    for text in texts:
        batches[-1].append(text)
        chars += len(text)
        if chars >= 2**20:
            batches.append([])
            chars = 0
    t0 = time.perf_counter()
    ids = np.concatenate([enc.encode(b, bos=True, eos=True)[0] for b in batches if b])
    cached_s = time.perf_counter() - t0
    t0 = time.perf_counter()  # again, every chunk cached: what a worker runs at once its cache is warm
    again = np.concatenate([enc.encode(b, bos=True, eos=True)[0] for b in batches if b])
    warm_s = time.perf_counter() - t0
    same = bool(np.array_equal(ids, np.fromiter((i for x in plain for i in x), np.int64)))
    mb = size / 2**20
    return {"sample_mb": round(mb, 2), "threads": threads, "sentencepiece_mb_per_s": round(mb / sp_s, 2),
            "word_cache_one_process_mb_per_s": round(mb / cached_s, 2),
            "word_cache_warm_one_process_mb_per_s": round(mb / warm_s, 2),
            "same_ids": same and bool(np.array_equal(ids, again)),
            "word_cache_refusal": enc.refusal}


def kept_ids(out: Path) -> set[str]:
    from llamaworks.data.document import json_lines

    files = [p for p in (out / "documents").rglob("*") if p.is_file() and ".jsonl" in p.name]
    return {str(rec["id"]) for f in files for _, rec in json_lines(f)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


MIN_JACCARD = 0.99  # below it two runs did not do the same work: no speed ratio
# (ours, datatrove) pairs that do the same work; ours_c4 adds line dedup and has no counterpart.
PAIRS = (("ours_c4filter", "datatrove_c4filter_same_rules"), ("ours_minhash", "datatrove_minhash"))


def rate(info: dict, r: dict) -> dict:
    return {"docs_per_s": round(info["documents"] / r["seconds"], 1),
            "mb_per_s": round(info["bytes"] / 2**20 / r["seconds"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=100.0, help="corpus size in MiB (default 100)")
    ap.add_argument("--gb", type=float, default=None, help="corpus size in GiB (sets --mb; 1 is the issue's size)")
    ap.add_argument("--shards", type=int, default=8, help="JSONL files the corpus is split into")
    ap.add_argument("--workers", type=int, default=2, help="workers of the c4 rows, the local MinHash row and the mix")
    ap.add_argument("--dask-workers", type=int, nargs="+", default=None,
                    help="Dask worker processes of the partitioned MinHash rows, and datatrove's at the same counts "
                         "(default 1 2 4; --smoke: 2)")
    ap.add_argument("--datatrove-default-workers", type=int, nargs="*", default=None,
                    help="worker counts at which datatrove's MinHash also runs with its own signatures (shown beside, "
                         "no ratio; default: every --dask-workers count)")
    ap.add_argument("--partitions", type=int, default=64, help="hash partitions of the partitioned dedup (default 64)")
    ap.add_argument("--mix-mb", type=float, default=None, help="size of the mix corpus in MiB (default: --mb)")
    ap.add_argument("--mix-vocab", type=int, default=None, help="SentencePiece pieces (default 32000; --smoke 2000)")
    ap.add_argument("--mix-baseline", default=None,
                    help=f"git revision whose mixer is the 'before' row (default {MIX_BASELINE}; --smoke: none)")
    ap.add_argument("--mix-repeats", type=int, default=1,
                    help="runs of each mix row, round robin; the fastest is reported (default 1)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["c4", "minhash", "mix"], help="groups not to run")
    ap.add_argument("--workdir", default=None, help="where the corpus and outputs go (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="default benchmarks/results/data_throughput.json; --smoke: none")
    ap.add_argument("--smoke", action="store_true", help="a 0.5 MB corpus in 2 files, no JSON unless --json")
    add_label_argument(ap)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:  # a child: one timed variant
        if args.run == "mix":
            run_mix(Path(args.corpus), Path(args.out), args.workers)
        elif args.run.startswith("datatrove"):
            run_datatrove(args.run, Path(args.corpus), Path(args.out), args.workers)
        else:
            run_ours(args.run, Path(args.corpus), Path(args.out), args.workers, args.partitions)
        return

    if args.gb is not None:
        args.mb = args.gb * 1024
    if args.smoke:
        args.mb, args.shards = 0.5, 2
        args.dask_workers = args.dask_workers or [2]
        args.mix_vocab = args.mix_vocab or 2000
        args.mix_baseline = args.mix_baseline or "none"
        args.partitions = min(args.partitions, 8)
    elif args.json is None:
        args.json = str(ROOT / "benchmarks" / "results" / "data_throughput.json")
    args.dask_workers = args.dask_workers or [1, 2, 4]
    if args.datatrove_default_workers is None:
        args.datatrove_default_workers = args.dask_workers
    args.mix_mb = args.mix_mb or args.mb
    args.mix_vocab = args.mix_vocab or 32000
    args.mix_baseline = args.mix_baseline or MIX_BASELINE
    # In a child: the bandwidth probe's 1 GiB would become every timed child's peak RSS (ru_maxrss).
    machine = record_in_child(args.label, threads=args.workers, libraries=("datatrove", "spacy", "distributed"))
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    try:
        import datatrove  # noqa: F401
        have_datatrove = True
    except ImportError:
        have_datatrove = False
        print("datatrove not installed: its rows are skipped (see this script's docstring)")
    try:
        import distributed  # noqa: F401
        have_dask = True
    except ImportError:
        have_dask = False
        print("dask.distributed not installed: the partitioned MinHash rows are skipped (the cluster extra)")
    rows, ids, layout, mix_result, info = {}, {}, {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="llamaworks-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        if {"c4", "minhash"} - set(args.skip):
            t0 = time.perf_counter()
            info = make_corpus(work / "corpus", args.mb, args.shards)
            print(f"corpus: {info['documents']} documents, {info['bytes'] / 2**20:.1f} MiB in {info['shards']} files "
                  f"({time.perf_counter() - t0:.1f} s to generate)")
        variants = []  # (group, row name, variant, workers)
        if "c4" not in args.skip:
            variants += [("c4", n, n, args.workers) for n in ("ours_c4", "ours_c4filter", "datatrove_c4filter",
                                                              "datatrove_c4filter_same_rules")]
        if "minhash" not in args.skip:
            variants.append(("minhash", "ours_minhash", "ours_minhash", args.workers))
            for w in args.dask_workers:
                variants.append(("minhash", f"ours_minhash_dask@{w}", "ours_minhash_dask", w))
                variants.append(("minhash", f"datatrove_minhash_same@{w}", "datatrove_minhash_same", w))
                if w in args.datatrove_default_workers:
                    variants.append(("minhash", f"datatrove_minhash@{w}", "datatrove_minhash", w))
        for group, row, variant, workers in variants:
            if variant.startswith("datatrove") and not have_datatrove or variant.endswith("dask") and not have_dask:
                continue
            out = work / row.replace("@", "_")
            r = timed(variant, work / "corpus", out, workers, args.partitions if variant.endswith("dask") else 0)
            ids[row] = kept_ids(out)
            r.update(group=group, workers=workers, kept=len(ids[row]), **rate(info, r))
            r["output_gzip_level"] = gzip_levels(out / "documents")  # equal work at the end: the same level
            if variant.endswith("dask"):
                r["partitions"] = args.partitions
                layout = layout_64(out)  # the same exchange at every worker count: the last is kept
            rows[row] = r
            print(f"{row:32s} {r['seconds']:8.2f} s {r['docs_per_s']:10.1f} docs/s {r['mb_per_s']:7.2f} MB/s "
                  f"peak RSS {r['peak_rss_mb']:7.1f} MB  kept {r['kept']}")
        if "mix" not in args.skip:
            mix_result = bench_mix(work / "mix", args)

    pairs = [("ours_c4filter", "datatrove_c4filter_same_rules"),
             ("ours_minhash", f"datatrove_minhash_same@{args.workers}")]
    pairs += [(f"ours_minhash_dask@{w}", f"datatrove_minhash_same@{w}") for w in args.dask_workers]
    # Shown, never a ratio: datatrove's own rules / signatures against ours'.
    shown = [("ours_c4filter", "datatrove_c4filter")]
    shown += [(f"ours_minhash_dask@{w}", f"datatrove_minhash@{w}") for w in args.dask_workers]
    shown += [(f"datatrove_minhash_same@{w}", f"datatrove_minhash@{w}") for w in args.dask_workers]
    ratios, agreement = {}, {}
    for ours, theirs in pairs + shown:
        if ours not in rows or theirs not in rows:
            continue
        a, b = ids[ours], ids[theirs]
        j = jaccard(a, b)
        agreement[f"{ours}~{theirs}"] = {"jaccard": round(j, 5), "only_ours": len(a - b), "only_theirs": len(b - a)}
        print(f"kept documents {ours} ~ {theirs}: Jaccard {j:.4f} ({len(a - b)} kept only by ours, "
              f"{len(b - a)} only by datatrove)")
        if (ours, theirs) not in pairs:
            continue  # datatrove's default C4 rules: the agreement is shown, the speed is not a like-for-like
        if j < MIN_JACCARD:
            print(f"  no speed ratio: below {MIN_JACCARD} the two did not do the same work")
            continue
        ratios[f"{ours}/{theirs}"] = round(rows[ours]["docs_per_s"] / rows[theirs]["docs_per_s"], 3)
        print(f"  throughput {ours} / {theirs}: {ratios[f'{ours}/{theirs}']:.2f}x")
    same_as_single = {r: ids[r] == ids["ours_minhash"] for r in rows if r.startswith("ours_minhash_dask")
                      if "ours_minhash" in rows}
    for r, same in same_as_single.items():
        print(f"{r} keeps {'exactly' if same else 'NOT'} the documents of ours_minhash (single process)")
    fewest = rows.get(f"ours_minhash_dask@{args.dask_workers[0]}")
    scaling = {r: round(fewest["seconds"] / rows[r]["seconds"], 3) for r in rows
               if fewest and r.startswith("ours_minhash_dask@")}
    if scaling:
        print("partitioned MinHash speed-up over " + f"{args.dask_workers[0]} worker(s): " +
              ", ".join(f"{r.split('@')[1]} workers {v:.2f}x" for r, v in scaling.items()) +
              f" ({os.cpu_count()} CPUs here)")
    if layout:
        print(f"simulated {layout['workers']}-worker layout ({layout['partitions']} partitions): each worker receives "
              f"max {layout['received_per_worker_max'] / 2**20:.2f} MiB, "
              f"mean {layout['received_per_worker_mean'] / 2**20:.2f} MiB "
              f"(skew {layout['received_skew_max_over_mean']}) of {layout['index_bytes_total'] / 2**20:.1f} MiB "
              f"shuffled; the merge reads {layout['merge_reads_bytes'] / 2**20:.2f} MiB")
    own_signature_cost = {w: round(rows[f"datatrove_minhash@{w}"]["seconds"] /
                                   rows[f"datatrove_minhash_same@{w}"]["seconds"], 3)
                          for w in args.dask_workers
                          if f"datatrove_minhash@{w}" in rows and f"datatrove_minhash_same@{w}" in rows}
    for w, v in own_signature_cost.items():
        print(f"datatrove's own MinHash signatures (its word tokenizer, sha1, mod 2^61 - 1) take {v:.2f}x the time of "
              f"its 4 stages with ours' signatures at {w} workers")
    rules_cost = None
    if "datatrove_c4filter" in rows and "datatrove_c4filter_same_rules" in rows:
        rules_cost = round(rows["datatrove_c4filter"]["seconds"] / rows["datatrove_c4filter_same_rules"]["seconds"], 3)
        print(f"datatrove's own C4 rules (its sentence splitter, mainly) take {rules_cost:.2f}x the time of the same "
              "filter with ours' rules")
    result = {"corpus": info | {"mb": args.mb}, "workers": args.workers, "dask_workers": args.dask_workers,
              "partitions": args.partitions, "cpus": os.cpu_count(), "runs": rows, "kept_agreement": agreement,
              "min_jaccard_for_a_ratio": MIN_JACCARD, "ratio_docs_per_s": ratios,
              "partitioned_keeps_the_single_process_documents": same_as_single,
              "partitioned_speedup_over_fewest_workers": scaling, "simulated_64_worker_layout": layout,
              "datatrove_default_over_same_rules_time": rules_cost,
              "datatrove_own_over_same_signatures_time": own_signature_cost, "mix": mix_result,
              "output_compression": f"both write their kept documents as gzip level {OUTPUT_GZIP_LEVEL}: ours' "
                                    "ShardWriter default; datatrove's JsonlWriter (gzip through fsspec's GzipFile, "
                                    "level 9 by default) set to the same level here (rows' output_gzip_level: the "
                                    "files' header class)",
              "machine": machine}
    if args.json is None:
        return
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


def bench_mix(work: Path, args) -> dict:
    """`data mix` before (--mix-baseline) and after (this tree) on the same seven sources; the tokenizer alone."""
    t0 = time.perf_counter()
    info = make_mix_corpus(work / "corpus", args.mix_mb, args.mix_vocab)
    print(f"mix corpus: {info['documents']} documents, {info['bytes'] / 2**20:.1f} MiB in 7 sources, "
          f"{args.mix_vocab}-piece tokenizer ({time.perf_counter() - t0:.1f} s to generate)")
    rows, digests = {}, {}
    sides = [("mix_after", None, args.workers)]
    if args.workers != 1:  # the worker pool against tokenising in the mixing process itself
        sides.append(("mix_after_1_worker", None, 1))
    if args.mix_baseline != "none":
        src = baseline_src(args.mix_baseline, work / "baseline")
        if src is not None:
            sides.insert(0, ("mix_before", str(src), args.workers))
    every: dict[str, list[float]] = {row: [] for row, *_ in sides}
    for _ in range(args.mix_repeats):  # round robin: each row's best of the repeats (other load varies)
        for row, pythonpath, workers in sides:
            out = work / row
            shutil.rmtree(out, ignore_errors=True)  # else the rerun finds its finished mix and does nothing
            r = timed("mix", work / "corpus", out, workers, pythonpath=pythonpath)
            timing = json.loads((work / f"{row}.timing.json").read_text())
            r.update(workers=workers, **rate(info, r), mix_seconds=round(timing["seconds"], 3),
                     tokenising_seconds=round(timing["tokenising_s"], 3),
                     tokenising_share=round(timing["tokenising_s"] / timing["seconds"], 3))
            if pythonpath:
                r["revision"] = args.mix_baseline
            digests[row] = output_digest(out)
            every[row].append(r["seconds"])
            if row not in rows or r["seconds"] < rows[row]["seconds"]:
                rows[row] = r
            rows[row]["every_seconds"] = every[row]
            print(f"{row:32s} {r['seconds']:8.2f} s {r['docs_per_s']:10.1f} docs/s {r['mb_per_s']:7.2f} MB/s "
                  f"peak RSS {r['peak_rss_mb']:7.1f} MB  tokenising {r['tokenising_share']:.0%} of the mix")
    result = {"corpus": info, "runs": rows}
    if "mix_before" in rows:
        result["same_bytes"] = len(set(digests.values())) == 1
        result["after_over_before_mb_per_s"] = round(rows["mix_after"]["mb_per_s"] / rows["mix_before"]["mb_per_s"], 3)
        print(f"mix after / before: {result['after_over_before_mb_per_s']:.2f}x MB/s; output bytes "
              f"{'identical' if result['same_bytes'] else 'DIFFERENT'}")
    sample = min(args.mix_mb * TABLE1["commoncrawl"] / 100, 20.0)
    result["tokenizer_alone"] = tok = tokenizer_alone(work / "corpus", sample, args.workers)
    print(f"tokenizer alone on {tok['sample_mb']} MiB: SentencePiece batch encode ({tok['threads']} threads) "
          f"{tok['sentencepiece_mb_per_s']} MB/s, word cache (one process) {tok['word_cache_one_process_mb_per_s']} "
          f"MB/s cold, {tok['word_cache_warm_one_process_mb_per_s']} MB/s warm, same ids: {tok['same_ids']}")
    return result


if __name__ == "__main__":  # datatrove's local executor forks workers that re-import this file
    main()
