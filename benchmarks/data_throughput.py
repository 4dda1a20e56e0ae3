"""Data pipeline throughput: ours against datatrove on the same generated web-like corpus.

    .venv/bin/python benchmarks/data_throughput.py            # 100 MB corpus (the issue's size)
    .venv/bin/python benchmarks/data_throughput.py --mb 5     # a quick check that everything runs
    .venv/bin/python benchmarks/data_throughput.py --smoke    # 0.5 MB, no JSON (tests/test_benchmarks.py)

The corpus: JSONL pages built from the Shakespeare lines of ../shared/corpora (prose-like
paragraphs of lines joined into sentences) plus web boilerplate (navigation, cookie and
javascript notices, short link lines), some pages with "lorem ipsum" or code braces, exact
copies and near-copies (a few lines changed), so that the C4 rules, line dedup and MinHash
dedup all have real work. Timed, each in its own process with `--workers` workers:

    (a) c4:     ours `data run c4` (LineDedup + C4Filter: no datatrove counterpart, no ratio),
                ours C4Filter alone, datatrove JsonlReader -> C4QualityFilter -> JsonlWriter
                with its defaults, and the same with ours' rules (datatrove_c4filter_same_rules)
    (b) minhash: ours MinHashDedup (one global stage), datatrove's 4 MinHash stages
                (signatures, buckets, clusters, filter) with the same bands x rows and 5-grams

Equal work: a speed ratio is printed only for a pair whose kept documents agree (Jaccard of
the kept ids >= 0.99; below it the ratio is withheld and the disagreement shown). Both sides
follow c4_utils.clean_page line by line (citations cut, "lorem ipsum" and "{" judged on lines
that survive the punctuation and length rules); they differ by default in two choices:
datatrove counts sentences with its sentence splitter (spacy) where ours counts terminal-mark
runs (a regex), and it also ends lines with "'". The "same_rules" row runs datatrove's
C4QualityFilter with ours' choices on both (its sentence splitter swapped for ours' regex, its
end marks for c4_utils'): it is the ratio's denominator, and its time against the default
row's is what datatrove's own rules cost, printed beside it.

Printed and written to benchmarks/results/data_throughput.json: documents/s and MB/s of
input, peak RSS (the largest process of the run), kept documents and their Jaccard with the
counterpart, ours/datatrove, and the machine (benchmarks/machine.py).

datatrove is not a dependency of llamaworks; install it into the project venv (it changes
none of torch, numpy, transformers, tokenizers, lm-eval; its quality filters need spacy):

    .venv/bin/pip install -c .venv/constraints.txt "datatrove[io]" spacy

If it is absent the datatrove rows are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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

def run_ours(name: str, corpus: Path, out: Path, workers: int) -> None:
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
    LocalExecutor(out, workers=workers, progress=False).run("web", reader, steps, [corpus])


def run_datatrove(name: str, corpus: Path, out: Path, workers: int) -> None:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

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
    # sha1: datatrove 0.10's xxhash path passes str, which xxhash >= 4 rejects.
    cfg = MinhashConfig(n_grams=ours.ngram, num_buckets=ours.bands, hashes_per_bucket=ours.rows,
                        hash_config=HashConfig(hash_fc="sha1"))
    stages = [
        ([reader(), MinhashDedupSignature(output_folder=str(out / "sigs"), config=cfg)], tasks),
        ([MinhashDedupBuckets(input_folder=str(out / "sigs"), output_folder=str(out / "buckets"), config=cfg)],
         cfg.num_buckets),
        ([MinhashDedupCluster(input_folder=str(out / "buckets"), output_folder=str(out / "remove"), config=cfg)], 1),
        ([reader(), MinhashDedupFilter(input_folder=str(out / "remove")), JsonlWriter(str(out / "documents"))],
         tasks),
    ]
    for i, (pipe, n) in enumerate(stages):
        LocalPipelineExecutor(pipeline=pipe, tasks=n, logging_dir=str(out / f"logs{i}"), **common).run()


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


def timed(name: str, corpus: Path, out: Path, workers: int) -> dict:
    """Run one variant in a child process; wall time and the peak RSS of its largest process."""
    cmd = [sys.executable, __file__, "--run", name, "--corpus", str(corpus), "--out", str(out),
           "--workers", str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ,
                            "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    _, status, usage = os.wait4(proc.pid, 0)  # rusage of the child and the descendants it waited for
    seconds = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed:\n{err[-3000:]}")
    return {"seconds": round(seconds, 3), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def kept_ids(out: Path) -> set[str]:
    from llamaworks.data.document import json_lines

    files = [p for p in (out / "documents").rglob("*") if p.is_file() and ".jsonl" in p.name]
    return {str(rec["id"]) for f in files for _, rec in json_lines(f)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


MIN_JACCARD = 0.99  # below it two runs did not do the same work: no speed ratio
# (ours, datatrove) pairs that do the same work; ours_c4 adds line dedup and has no counterpart.
PAIRS = (("ours_c4filter", "datatrove_c4filter_same_rules"), ("ours_minhash", "datatrove_minhash"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=100.0, help="corpus size in MiB (default 100)")
    ap.add_argument("--shards", type=int, default=8, help="JSONL files the corpus is split into")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where the corpus and outputs go (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="default benchmarks/results/data_throughput.json; --smoke: none")
    ap.add_argument("--smoke", action="store_true", help="a 0.5 MB corpus in 2 files, no JSON unless --json")
    add_label_argument(ap)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:  # a child: one timed variant
        fn = run_datatrove if args.run.startswith("datatrove") else run_ours
        fn(args.run, Path(args.corpus), Path(args.out), args.workers)
        return

    if args.smoke:
        args.mb, args.shards = 0.5, 2
    elif args.json is None:
        args.json = str(ROOT / "benchmarks" / "results" / "data_throughput.json")
    # In a child: the bandwidth probe's 1 GiB would become every timed child's peak RSS (ru_maxrss).
    machine = record_in_child(args.label, threads=args.workers, libraries=("datatrove", "spacy"))
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llamaworks-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        info = make_corpus(work / "corpus", args.mb, args.shards)
        print(f"corpus: {info['documents']} documents, {info['bytes'] / 2**20:.1f} MiB in {info['shards']} files "
              f"({time.perf_counter() - t0:.1f} s to generate)")
        try:
            import datatrove  # noqa: F401
            have_datatrove = True
        except ImportError:
            have_datatrove = False
            print("datatrove not installed: its rows are skipped (see this script's docstring)")
        variants = [("c4", "ours_c4"), ("c4", "ours_c4filter"), ("c4", "datatrove_c4filter"),
                    ("c4", "datatrove_c4filter_same_rules"), ("minhash", "ours_minhash"),
                    ("minhash", "datatrove_minhash")]
        rows, ids = {}, {}
        for group, name in variants:
            if name.startswith("datatrove") and not have_datatrove:
                continue
            r = timed(name, work / "corpus", work / name, args.workers)
            ids[name] = kept_ids(work / name)
            r.update(group=group, kept=len(ids[name]),
                     docs_per_s=round(info["documents"] / r["seconds"], 1),
                     mb_per_s=round(info["bytes"] / 2**20 / r["seconds"], 2))
            rows[name] = r
            print(f"{name:20s} {r['seconds']:8.2f} s {r['docs_per_s']:10.1f} docs/s {r['mb_per_s']:7.2f} MB/s "
                  f"peak RSS {r['peak_rss_mb']:7.1f} MB  kept {r['kept']}")
    ratios, agreement = {}, {}
    for ours, theirs in PAIRS + (("ours_c4filter", "datatrove_c4filter"),):
        if ours not in rows or theirs not in rows:
            continue
        a, b = ids[ours], ids[theirs]
        j = jaccard(a, b)
        agreement[f"{ours}~{theirs}"] = {"jaccard": round(j, 5), "only_ours": len(a - b), "only_theirs": len(b - a)}
        print(f"kept documents {ours} ~ {theirs}: Jaccard {j:.4f} ({len(a - b)} kept only by ours, "
              f"{len(b - a)} only by datatrove)")
        if (ours, theirs) not in PAIRS:
            continue  # datatrove's default C4 rules: the agreement is shown, the speed is not a like-for-like
        if j < MIN_JACCARD:
            print(f"  no speed ratio: below {MIN_JACCARD} the two did not do the same work")
            continue
        ratios[f"{ours}/{theirs}"] = round(rows[ours]["docs_per_s"] / rows[theirs]["docs_per_s"], 3)
        print(f"  throughput {ours} / {theirs}: {ratios[f'{ours}/{theirs}']:.2f}x")
    rules_cost = None
    if "datatrove_c4filter" in rows and "datatrove_c4filter_same_rules" in rows:
        rules_cost = round(rows["datatrove_c4filter"]["seconds"] / rows["datatrove_c4filter_same_rules"]["seconds"], 3)
        print(f"datatrove's own C4 rules (its sentence splitter, mainly) take {rules_cost:.2f}x the time of the same "
              "filter with ours' rules")
    result = {"corpus": info | {"mb": args.mb}, "workers": args.workers, "cpus": os.cpu_count(), "runs": rows,
              "kept_agreement": agreement, "min_jaccard_for_a_ratio": MIN_JACCARD, "ratio_docs_per_s": ratios,
              "datatrove_default_over_same_rules_time": rules_cost, "machine": machine}
    if args.json is None:
        return
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":  # datatrove's local executor forks workers that re-import this file
    main()
