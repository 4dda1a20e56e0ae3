"""The dedup steps split into hash partitions (data/dedup_partitioned.py) against the
single-process steps: the same kept documents, excluded documents and stats, byte for byte."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llamaworks.data.dedup import ExactDedup, LineDedup, MinHashDedup
from llamaworks.data.document import Document, ShardWriter
from llamaworks.data.executor import JsonlReader, LocalExecutor

WORDS = [f"w{i}" for i in range(400)]


def _variant(rng: random.Random, words: list[str], change: float) -> list[str]:
    return [rng.choice(WORDS) if rng.random() < change else w for w in words]


def write_corpus(folder: Path, n_files: int = 5, per_file: int = 30, seed: int = 0) -> None:
    """Web-like documents with exact copies, near copies at several distances, chains of edits
    (A -> A' -> A'': each close to the one before, farther from the first), repeated lines,
    blank and too-short documents, spread across shards."""
    rng = random.Random(seed)
    bases = [[rng.choice(WORDS) for _ in range(rng.randint(40, 120))] for _ in range(12)]
    chain: dict[int, list[str]] = {}
    lines = [" ".join(rng.choice(WORDS) for _ in range(6)) + "." for _ in range(20)]
    for f in range(n_files):
        with ShardWriter(folder / f"in{f}.jsonl.gz") as w:
            for i in range(per_file):
                kind = rng.random()
                b = rng.randrange(len(bases))
                if kind < 0.2:
                    words = list(bases[b])  # an exact copy
                elif kind < 0.5:
                    words = _variant(rng, bases[b], rng.choice([0.02, 0.05, 0.1, 0.2, 0.4]))
                elif kind < 0.7:
                    chain[b] = _variant(rng, chain.get(b, bases[b]), 0.06)
                    words = chain[b]
                elif kind < 0.75:
                    words = rng.choice([[], ["short"], ["a", "b"]])
                else:
                    words = [rng.choice(WORDS) for _ in range(rng.randint(5, 80))]
                body = [" ".join(words[k:k + 12]) for k in range(0, len(words), 12)]
                text = "\n".join(body + rng.sample(lines, rng.randint(0, 3)) + ["", "!!"][:rng.randint(0, 2)])
                meta = {"n": i} if rng.random() < 0.5 else {}
                w.write(Document(f"{f}-{i}", text, "web", meta))


def outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.jsonl.gz"))
            if not p.relative_to(folder).parts[0].startswith(".")}


def without_partitioned(stats: dict) -> dict:
    stats = json.loads(json.dumps(stats))
    for st in stats["steps"]:
        st.pop("partitioned", None)
    return stats


PIPELINES = {
    "minhash": lambda: [MinHashDedup(threshold=0.6, num_perm=64)],
    "minhash_paper": lambda: [MinHashDedup()],
    "exact": lambda: [ExactDedup()],
    "line": lambda: [LineDedup()],
    "all": lambda: [ExactDedup(), MinHashDedup(threshold=0.5, num_perm=32), LineDedup()],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root)
    return root


@pytest.fixture(scope="module")
def references(tmp_path_factory, corpus):
    out = {}
    for name, make in PIPELINES.items():
        root = tmp_path_factory.mktemp(f"ref-{name}")
        stats = LocalExecutor(root, workers=1, keep_excluded=True, progress=False).run(
            "web", JsonlReader(), make(), [corpus])
        out[name] = root, stats
    return out


@pytest.mark.parametrize("name", list(PIPELINES))
@pytest.mark.parametrize("partitions,workers", [(1, 1), (3, 2), (8, 2)])
def test_partitioned_equals_single_process(tmp_path, corpus, references, name, partitions, workers):
    ref_root, ref_stats = references[name]
    stats = LocalExecutor(tmp_path / "out", workers=workers, keep_excluded=True, progress=False,
                          dedup_partitions=partitions).run("web", JsonlReader(), PIPELINES[name](), [corpus])
    assert without_partitioned(stats) == ref_stats
    ref = outputs(ref_root)
    assert outputs(tmp_path / "out") == ref and any(k.startswith("documents/") for k in ref)
    dedup = [st for st in stats["steps"] if "partitioned" in st]
    assert len(dedup) == len(PIPELINES[name]())
    for st in dedup:
        part = st["partitioned"]
        assert part["partitions"] == part["partitions_done"] == partitions
        removed = sum(v["documents"] for v in st["dropped"].values())
        if st["name"] == "minhash_dedup":
            assert part["removed"] == removed and part["pairs"] >= removed and part["clusters"] >= (removed > 0)
        assert removed or st["lines_removed"]  # the corpus has duplicates of every kind
    assert "ran in hash partitions" in (tmp_path / "out" / "DATACARD.md").read_text()


def test_minhash_keeps_the_far_end_of_a_chain_as_the_single_process_step_does(tmp_path):
    # A, B, C: B near A and C near B, C far from A. The greedy step keeps A and C (C's only
    # near neighbour, B, was dropped); a union-find over the pairs would drop C too.
    rng = random.Random(5)
    a = [rng.choice(WORDS) for _ in range(300)]
    b = list(a)
    for k in range(0, 300, 20):  # every 20th word changed: Jaccard of the 5-grams ~0.6
        b[k] = "x" + str(k)
    c = list(b)
    for k in range(10, 300, 20):  # as far from B, ~0.33 from A
        c[k] = "y" + str(k)
    with ShardWriter(tmp_path / "in" / "0.jsonl.gz") as w:
        for i, words in enumerate([a, b]):
            w.write(Document(f"d{i}", " ".join(words), "t"))
    with ShardWriter(tmp_path / "in" / "1.jsonl.gz") as w:
        w.write(Document("d2", " ".join(c), "t"))
    step = lambda: [MinHashDedup(threshold=0.5, num_perm=128)]  # signatures: A~B 0.63, B~C 0.54, A~C 0.29  # noqa: E731
    kept = {}
    for p in (0, 4):
        out = tmp_path / f"out{p}"
        stats = LocalExecutor(out, workers=1, progress=False, dedup_partitions=p).run(
            "t", JsonlReader(), step(), [tmp_path / "in"])
        kept[p] = outputs(out)
        if p:
            assert stats["steps"][-1]["partitioned"]["clusters"] == 1
    assert kept[0] == kept[4]
    from llamaworks.data.document import read_jsonl
    ids = sorted(d.id for f in sorted((tmp_path / "out4" / "documents").glob("*.jsonl.gz")) for d in read_jsonl(f))
    assert ids == ["d0", "d2"]


class Boom(Exception):
    pass


@pytest.mark.parametrize("fail_in", ["reduce", "merge", "filter"])
def test_a_failed_run_resumes_per_partition(tmp_path, corpus, references, fail_in, monkeypatch):
    from llamaworks.data import dedup_partitioned, executor

    ref_root, ref_stats = references["minhash"]
    calls = {"n": 0}
    orig = {"reduce": dedup_partitioned.MinHashPartitioned.reduce, "merge": dedup_partitioned.MinHashPartitioned.merge,
            "filter": dedup_partitioned.MinHashPartitioned.filter}[fail_in]

    def failing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3 or fail_in == "merge":
            raise Boom
        return orig(self, *a, **k)

    monkeypatch.setattr(dedup_partitioned.MinHashPartitioned, fail_in, failing)
    run = lambda: LocalExecutor(tmp_path / "out", workers=1, keep_excluded=True, progress=False,  # noqa: E731
                                dedup_partitions=5).run("web", JsonlReader(), PIPELINES["minhash"](), [corpus])
    with pytest.raises(Boom):
        run()
    state = tmp_path / "out" / ".state" / "stage1"
    files = {p: p.stat().st_mtime_ns for p in state.rglob("*") if p.is_file()}
    assert len(list((state / "index").glob("*.done"))) == 5  # every shard was indexed before the reduce
    monkeypatch.setattr(dedup_partitioned.MinHashPartitioned, fail_in, orig)
    ran = {"index": [], "reduce": []}
    for phase in ran:
        task = getattr(executor, f"{phase}_task")
        monkeypatch.setattr(executor, f"{phase}_task",
                            lambda r, s, k, task=task, phase=phase: (ran[phase].append(k), task(r, s, k))[1])
    stats = run()
    assert ran["index"] == []  # finished tasks are not redone
    assert len(ran["reduce"]) == (3 if fail_in == "reduce" else 0)
    assert all(p.stat().st_mtime_ns == t for p, t in files.items() if p.suffix in (".done", ".bin"))
    assert without_partitioned(stats) == ref_stats and outputs(tmp_path / "out") == outputs(ref_root)


def test_partitions_must_not_be_negative(tmp_path):
    with pytest.raises(ValueError, match="dedup_partitions"):
        LocalExecutor(tmp_path, dedup_partitions=-1)


KILLED_RUN = """
import sys, time
from llamaworks.data import dedup_partitioned
from llamaworks.data.dedup import MinHashDedup
from llamaworks.data.executor import JsonlReader, LocalExecutor

reduce = dedup_partitioned.MinHashPartitioned.reduce

def slow(self, *a, **k):
    time.sleep(float(sys.argv[3]))
    return reduce(self, *a, **k)

dedup_partitioned.MinHashPartitioned.reduce = slow
if __name__ == "__main__":
    LocalExecutor(sys.argv[2], workers=2, progress=False, keep_excluded=True, dedup_partitions=8).run(
        "web", JsonlReader(), [MinHashDedup(threshold=0.6, num_perm=64)], [sys.argv[1]])
"""


@pytest.mark.slow
def test_sigkill_mid_reduce_then_resume(tmp_path, corpus, references):
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), str(corpus), str(out), "0.4"], start_new_session=True)
    reduce = out / ".state" / "stage1" / "reduce"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(reduce.glob("*.done")) if reduce.is_dir() else []) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers, mid-partition
    proc.wait()
    done = {p: p.stat().st_mtime_ns for p in reduce.glob("*.done")}
    assert 2 <= len(done) < 8
    subprocess.run([sys.executable, str(script), str(corpus), str(out), "0"], check=True)
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())  # finished partitions were not redone
    assert len(list(reduce.glob("*.done"))) == 8 and not list(out.rglob(".*.tmp"))
    ref_root, ref_stats = references["minhash"]
    assert outputs(out) == outputs(ref_root)
    assert without_partitioned(json.loads((out / "stats.json").read_text())) == ref_stats


def test_dask_local_cluster_with_processes_equals_single_process(tmp_path, corpus, references):
    pytest.importorskip("distributed", reason="dask[distributed] absent (pip install 'llamaworks[cluster]')")
    from llamaworks.data.cluster import DaskExecutor

    ref_root, ref_stats = references["all"]
    stats = DaskExecutor(tmp_path / "out", "local:2", keep_excluded=True, progress=False, dedup_partitions=6).run(
        "web", JsonlReader(), PIPELINES["all"](), [corpus])
    assert without_partitioned(stats) == ref_stats
    assert outputs(tmp_path / "out") == outputs(ref_root)
    assert [st["partitioned"]["partitions_done"] for st in stats["steps"] if "partitioned" in st] == [6, 6, 6]


def test_the_exchange_of_a_run_is_read_back_from_its_files(tmp_path, corpus):
    from llamaworks.data.executor import partition_exchange

    stats = LocalExecutor(tmp_path / "out", workers=1, progress=False, dedup_partitions=4).run(
        "web", JsonlReader(), PIPELINES["minhash"](), [corpus])
    (stage,) = partition_exchange(tmp_path / "out").values()
    assert stage["partitions"] == 4 and stage["shards"] == 5
    assert len(stage["index"]) == 5 and all(len(x) == 4 for x in stage["index"])
    assert len(stage["reduce"]) == 4 and all(len(x) == 5 for x in stage["reduce"])
    part = stats["steps"][-1]["partitioned"]
    assert sum(map(sum, stage["index"])) == part["bytes_in"] and sum(map(sum, stage["reduce"])) == part["bytes_out"]


def test_the_signature_stage_keeps_no_documents_and_the_filter_rereads_the_input(tmp_path, corpus):
    # MinHash's signature stage before a partitioned MinHash writes one signature file per shard, not
    # its documents again; the filter phase reads the input again through the reader, so a record it
    # skips (malformed) must be skipped there too for the positions to line up.
    src = tmp_path / "in"
    src.mkdir()
    for p in sorted(corpus.glob("*.jsonl.gz")):
        (src / p.name).write_bytes(p.read_bytes())
    with ShardWriter(src / "in9.jsonl.gz") as w:  # a malformed record between duplicates
        w._f.write(b'{"id": "x", "text": 5}\n')
        for i in range(4):
            w.write(Document(f"9-{i}", "the same words in the same order " * 8, "web"))
    runs = {}
    for partitions in (0, 4):
        out = tmp_path / f"out{partitions}"
        runs[partitions] = LocalExecutor(out, workers=1, keep_excluded=True, progress=False,
                                         dedup_partitions=partitions).run(
            "web", JsonlReader(), [MinHashDedup(threshold=0.6, num_perm=64)], [src])
    assert without_partitioned(runs[4]) == runs[0] and runs[0]["read"]["malformed_records"] == 1
    assert outputs(tmp_path / "out4") == outputs(tmp_path / "out0")
    scratch = sorted(p.name for p in (tmp_path / "out4" / ".stages" / "0").iterdir())
    assert scratch == [f"{i:05d}.signatures.bin" for i in range(6)]


def test_a_run_begun_with_documents_in_the_signature_stage_resumes(tmp_path, corpus, references, monkeypatch):
    # Before signature files, the signature stage wrote its documents (with their signatures): a run
    # killed then, after that stage, is resumed from those documents.
    from llamaworks.data import dedup_partitioned
    from llamaworks.data.document import read_jsonl

    ref_root, ref_stats = references["minhash"]
    orig = dedup_partitioned.MinHashPartitioned.index_signatures

    def failing(self, *a, **k):
        raise Boom

    monkeypatch.setattr(dedup_partitioned.MinHashPartitioned, "index_signatures", failing)
    run = lambda: LocalExecutor(tmp_path / "out", workers=1, keep_excluded=True, progress=False,  # noqa: E731
                                dedup_partitions=3).run("web", JsonlReader(), PIPELINES["minhash"](), [corpus])
    with pytest.raises(Boom):
        run()
    step = PIPELINES["minhash"]()[0].parallel_part()
    stage = tmp_path / "out" / ".stages" / "0"
    for i, f in enumerate(sorted(corpus.glob("*.jsonl.gz"))):  # the old layout: documents, no signature file
        (stage / f"{i:05d}.signatures.bin").unlink()
        with ShardWriter(stage / f"{i:05d}.jsonl.gz", scratch=True) as w:
            for doc in step.run(read_jsonl(f)):
                w.write(doc)
    monkeypatch.setattr(dedup_partitioned.MinHashPartitioned, "index_signatures", orig)
    stats = run()
    assert without_partitioned(stats) == ref_stats and outputs(tmp_path / "out") == outputs(ref_root)
