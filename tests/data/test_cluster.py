from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llamaworks.data.c4 import C4Filter
from llamaworks.data.dedup import LineDedup, MinHashDedup
from llamaworks.data.document import Document, ShardWriter
from llamaworks.data.executor import JsonlReader, LocalExecutor

distributed = pytest.importorskip("distributed", reason="dask[distributed] absent (pip install 'llamaworks[cluster]')")

from llamaworks.data.cluster import DaskExecutor, parse_cluster  # noqa: E402

SENTENCES = ["The river ran quietly past the old mill.", "Nobody remembered who had built the bridge!",
             "Was the harvest good that year?", "Children played in the square until dusk.",
             "The baker sold bread to every family in town.", "Rain came late in the season.",
             "Please enable JavaScript to view this page.", "Home | About | Contact",
             "This site uses cookies to improve your experience."]


def write_corpus(folder: Path, n_files: int = 6, per_file: int = 12) -> None:
    rng = random.Random(3)
    for f in range(n_files):
        with ShardWriter(folder / f"in{f}.jsonl.gz") as w:
            for i in range(per_file):
                lines = [rng.choice(SENTENCES) for _ in range(rng.randint(3, 9))]
                lines.append(f"Page {chr(97 + f)}{chr(97 + i)} has its own closing sentence here.")
                w.write(Document(f"{f}-{i}", "\n".join(lines), "web"))


def steps():
    return [C4Filter(), LineDedup(), C4Filter(min_sentences=2), MinHashDedup(threshold=0.8)]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.jsonl.gz"))}


@pytest.fixture(scope="module")
def client():
    # Threads in this process: the real scheduler and workers, started in ~1 s.
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as c, \
            distributed.Client(c) as cl:
        yield cl


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    write_corpus(root / "in")
    stats = LocalExecutor(root / "out", workers=1, keep_excluded=True, progress=False).run(
        "web", JsonlReader(), steps(), [root / "in"])
    return root, stats


def test_parse_cluster():
    assert parse_cluster("local:3") == ("local", 3)
    assert parse_cluster("tcp://10.0.0.1:8786") == ("address", "tcp://10.0.0.1:8786")
    for bad in ("local:0", "local:x", "myhost:8786"):
        with pytest.raises(ValueError, match="--cluster"):
            parse_cluster(bad)


def test_dask_matches_local_executor(tmp_path, client, reference):
    root, ref_stats = reference
    stats = DaskExecutor(tmp_path / "out", client, keep_excluded=True, progress=False).run(
        "web", JsonlReader(), steps(), [root / "in"])
    assert stats == ref_stats
    assert stats["steps"][1]["lines_removed"] and stats["steps"][0]["dropped"]  # the steps did real work
    ref = files(root / "out")
    assert files(tmp_path / "out") == ref and any(k.startswith("documents/") for k in ref)
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == ref_stats
    assert (tmp_path / "out" / "DATACARD.md").read_text() == (root / "out" / "DATACARD.md").read_text()


class Boom(Exception):
    pass


@pytest.mark.parametrize("kill_at", [(0, 2), (2, 1)])  # in a parallel stage, and mid global stage
def test_dask_resumes_after_killed_run(tmp_path, client, reference, kill_at):
    root, ref_stats = reference
    calls: list[tuple[int, int]] = []

    def kill(s, i):
        calls.append((s, i))
        if (s, i) == kill_at or (kill_at[0] == 0 and len(calls) == 3):
            raise Boom

    with pytest.raises(Boom):
        DaskExecutor(tmp_path / "out", client, progress=False, keep_excluded=True, dedup_memory_mb=0).run(
            "web", JsonlReader(), steps(), [root / "in"], on_shard=kill)
    markers = {p for p in (tmp_path / "out" / ".state").rglob("*.done")}
    assert markers
    before = {p: p.stat().st_mtime_ns for p in markers}
    redone: list[tuple[int, int]] = []
    stats = DaskExecutor(tmp_path / "out", client, progress=False, keep_excluded=True, dedup_memory_mb=0).run(
        "web", JsonlReader(), steps(), [root / "in"], on_shard=lambda s, i: redone.append((s, i)))
    finished = {(int(p.parent.name.removeprefix("stage")), int(p.name[:5])) for p in markers}
    assert not finished & set(redone)  # nothing finished before the kill ran again
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert stats == ref_stats and files(tmp_path / "out") == files(root / "out")


@pytest.mark.slow
def test_dask_local_cluster_processes_via_cli(tmp_path, reference):
    from llamaworks.cli import main

    root, _ = reference
    ref = LocalExecutor(tmp_path / "ref", workers=1, progress=False).run("c4", *c4_pipeline(), [root / "in"])
    assert main(["data", "run", "c4", "--input", str(root / "in"), "--output", str(tmp_path / "out"),
                 "--cluster", "local:2", "--dedup-memory-mb", "0"]) == 0
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == ref
    assert files(tmp_path / "out" / "documents") == files(tmp_path / "ref" / "documents")


def c4_pipeline():
    from llamaworks.data.sources import pipeline

    return pipeline("c4")


def test_cli_dedup_partitions_match_the_single_process_run(tmp_path, reference):
    from llamaworks.cli import main

    root, _ = reference
    ref = LocalExecutor(tmp_path / "ref", workers=1, progress=False).run("c4", *c4_pipeline(), [root / "in"])
    assert main(["data", "run", "c4", "--input", str(root / "in"), "--output", str(tmp_path / "out"),
                 "--workers", "2", "--dedup-partitions", "3"]) == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    (line,) = [st for st in stats["steps"] if st["name"] == "line_dedup"]
    assert line.pop("partitioned")["partitions_done"] == 3 and line["lines_removed"]
    assert stats == ref
    assert files(tmp_path / "out" / "documents") == files(tmp_path / "ref" / "documents")
    assert "ran in hash partitions" in (tmp_path / "out" / "DATACARD.md").read_text()


def _worker_malloc_trim():
    import os

    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


@pytest.mark.slow
def test_local_cluster_workers_start_without_malloc_trim(tmp_path, monkeypatch):
    # Dask's nanny would set it (and leave it in this process's environment for the next cluster):
    # it makes large numpy temporaries mmap'ed per call, MinHash signatures 2-3x slower.
    import os

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")  # as an earlier cluster of this process leaves it
    with DaskExecutor(tmp_path / "out", "local:1", progress=False)._connect() as client:
        assert client.submit(_worker_malloc_trim, pure=False).result() is None
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"  # this process's environment as it was
