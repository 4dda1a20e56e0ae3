"""Remote storage (data/storage.py) against a real S3-compatible server: moto's server mode,
started on a free port, reached by s3fs over HTTP exactly as MinIO or S3 would be (the
endpoint and keys come from the AWS_* variables, as in production)."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from llamaworks.data import storage  # noqa: E402
from llamaworks.data.books import GutenbergReader  # noqa: E402
from llamaworks.data.document import Document, ShardWriter, read_jsonl  # noqa: E402
from llamaworks.data.executor import JsonlReader, LocalExecutor  # noqa: E402
from llamaworks.data.sources import pipeline  # noqa: E402
from llamaworks.data.step import Step  # noqa: E402

from .test_kill import SCRIPT as KILLED_RUN  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A running S3 server; yields a function that makes a fresh bucket and returns its URL."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)

    def bucket() -> str:
        # moto keeps its buckets per process, not per server: the fixture of another test module (test_dedup_s3
        # imports it) made "bucket0" before, so names are unique in the process.
        name = f"bucket-{uuid.uuid4().hex[:16]}"
        fs, _ = storage.filesystem(f"s3://{name}")
        fs.mkdir(name)
        return f"s3://{name}"

    yield bucket
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _fs():
    return storage.filesystem("s3://x")[0]


LINES = ["The quick brown fox jumps over the lazy dog near the river bank.",
         "She sells sea shells by the sea shore every single summer morning.",
         "Please enable javascript to view this page properly today.",
         "Short line",
         "We use cookies to improve your experience on this website.",
         "A journey of a thousand miles begins with a single step forward.",
         "All that glitters is not gold, as the old saying goes in town.",
         "Knowledge is power, and power is the ability to act on it well.",
         "Lorem ipsum dolor sit amet consectetur.",
         "The early bird catches the worm, but the second mouse gets the cheese."]


def _sentence(rng: random.Random) -> str:
    """A sentence no other page has (line dedup normalises digits away, so it is made of letters)."""
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(8)]
    return " ".join(words).capitalize() + "."


def _c4_corpus(folder: Path, files: int = 4, docs: int = 12) -> list[Path]:
    """JSONL shards of pages that C4's rules and line dedup partly keep, partly drop."""
    rng = random.Random(0)
    paths = []
    for f in range(files):
        path = folder / f"part-{f:02d}.jsonl.gz"
        with ShardWriter(path) as w:
            for i in range(docs):
                lines = rng.sample(LINES, rng.randint(3, 9)) + \
                    [_sentence(rng) for _ in range(rng.randint(2, 7))]
                rng.shuffle(lines)
                w.write(Document(f"{f}-{i}", "\n".join(lines), "c4", {"url": f"http://x/{f}/{i}"}))
        paths.append(path)
    return paths


def _upload(local: Path, url: str) -> None:
    fs = _fs()
    for p in sorted(local.rglob("*")):
        if p.is_file():
            fs.put_file(str(p), storage.join(url, p.relative_to(local).as_posix()).removeprefix("s3://"))


def _download(url: str) -> dict[str, bytes]:
    fs = _fs()
    base = url.removeprefix("s3://").rstrip("/") + "/"
    return {f.removeprefix(base): fs.cat_file(f) for f in fs.find(base)}


def _tree(local: Path) -> dict[str, bytes]:
    return {p.relative_to(local).as_posix(): p.read_bytes() for p in sorted(local.rglob("*")) if p.is_file()}


def _outputs(tree: dict[str, bytes]) -> dict[str, bytes]:
    """What a run publishes: documents, excluded, stats and the data card (not .state: it names the inputs)."""
    return {k: v for k, v in tree.items() if not k.startswith(".")}


def test_c4_from_s3_to_s3_equals_the_local_run(tmp_path, s3):
    _c4_corpus(tmp_path / "in")
    bucket = s3()
    _upload(tmp_path / "in", f"{bucket}/c4/in")
    reader, steps = pipeline("c4")
    LocalExecutor(tmp_path / "out", workers=2, progress=False, keep_excluded=True).run(
        "c4", reader, steps, [tmp_path / "in"])
    reader, steps = pipeline("c4")
    LocalExecutor(f"{bucket}/c4/out", workers=2, progress=False, keep_excluded=True).run(
        "c4", reader, steps, [f"{bucket}/c4/in"])
    local, remote = _outputs(_tree(tmp_path / "out")), _outputs(_download(f"{bucket}/c4/out"))
    assert sorted(local) == sorted(remote)
    assert any(k.startswith("documents/") for k in local) and any(k.startswith("excluded/") for k in local)
    for k in local:
        assert local[k] == remote[k], k  # byte for byte, shards, stats.json and DATACARD.md alike
    # the global stage (line dedup) ran and left its markers in the bucket
    assert "00003.done" in storage.names(f"{bucket}/c4/out/.state/stage1")


def test_local_output_is_unchanged_by_the_storage_layer(tmp_path):
    """The local path writes the same shard bytes as the writer before remote storage existed:
    a gzip member named after the shard, mtime 0, level 6 (through the pipeline's gzip module:
    zlib-ng's where installed, tests/data/test_gzip_shards.py)."""
    docs = [Document(str(i), f"text {i}", "t", {"k": i}) for i in range(50)]
    with ShardWriter(tmp_path / "00000.jsonl.gz") as w:
        for d in docs:
            w.write(d)
    buf = io.BytesIO()
    with storage.gzip_module().GzipFile(filename="00000.jsonl.gz", fileobj=buf, mode="wb", compresslevel=6,
                                        mtime=0) as g:
        for d in docs:
            g.write(d.to_json().encode() + b"\n")
    assert (tmp_path / "00000.jsonl.gz").read_bytes() == buf.getvalue()
    assert not list(tmp_path.glob(".*"))


# the same slow two-worker run that test_kill.py kills locally
KILL_SCRIPT = KILLED_RUN


class Slow(Step):
    name = "slow"  # the killed script's step, without its sleep: the same pipeline, so the run resumes

    def run(self, docs, rank=0, world_size=1):
        yield from docs


def test_a_killed_run_resumes_from_the_bucket_without_redoing_shards(tmp_path, s3):
    bucket = s3()
    for f in range(8):
        with ShardWriter(f"{bucket}/in/{f}.jsonl.gz") as w:
            for i in range(4):
                w.write(Document(f"{f}-{i}", f"text {f} {i}", "t"))
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    out = f"{bucket}/out"
    proc = subprocess.Popen([sys.executable, str(script), f"{bucket}/in", out, "0.2"], start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline and len({n for n in storage.names(f"{out}/.state/stage0") if n.endswith(".done")}) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers, mid-shard (uploads in flight never complete)
    proc.wait()
    done_before = {n for n in storage.names(f"{out}/.state/stage0") if n.endswith(".done")}
    assert 2 <= len(done_before) < 8
    fs = _fs()
    shards = storage.list_files(f"{out}/documents", ["*.jsonl.gz"])
    for shard in shards:  # every visible shard is complete
        assert len(list(read_jsonl(shard))) == 4
    stamps = {storage.name(s): fs.info(s)["LastModified"] for s in shards
              if storage.name(s).replace(".jsonl.gz", ".done") in done_before}
    time.sleep(1.1)  # S3 timestamps have one-second resolution
    redone = []
    LocalExecutor(out, workers=1, progress=False).run("t", JsonlReader(), [Slow()], [f"{bucket}/in"],
                                                      on_shard=lambda s, i: redone.append(i))
    assert not {f"{i:05d}.done" for i in redone} & done_before  # finished shards are skipped
    assert sorted(redone) == sorted(i for i in range(8) if f"{i:05d}.done" not in done_before)
    docs = sorted(d.id for s in storage.list_files(f"{out}/documents", ["*.jsonl.gz"]) for d in read_jsonl(s))
    assert docs == sorted(f"{f}-{i}" for f in range(8) for i in range(4))
    for shard in storage.list_files(f"{out}/documents", ["*.jsonl.gz"]):
        if storage.name(shard) in stamps:
            assert fs.info(shard)["LastModified"] == stamps[storage.name(shard)]  # not rewritten


def _docs(n: int, seed: int) -> list[Document]:
    rng = random.Random(seed)
    return [Document(f"d{i}", " ".join(f"{rng.getrandbits(64):x}" for _ in range(rng.randint(5, 60))), "t")
            for i in range(n)]


@pytest.mark.parametrize("ext", ["gz", "zst", "bz2", "xz"])
def test_compressed_shards_stream_from_the_bucket(s3, ext, monkeypatch):
    import bz2
    import lzma

    import zstandard

    monkeypatch.setattr(storage, "READ_BLOCK", 64 * 2**10)
    bucket = s3()
    docs = _docs(3000, 1)  # ~1 MB of hex: barely compressible, so the object is far larger than one block
    raw = b"".join(d.to_json().encode() + b"\n" for d in docs)
    packed = {"gz": gzip.compress, "zst": zstandard.ZstdCompressor().compress, "bz2": lambda b: bz2.compress(b, 1),
              "xz": lzma.compress}[ext](raw)
    url = f"{bucket}/shards/a.jsonl.{ext}"
    _fs().pipe_file(url.removeprefix("s3://"), packed)
    assert [d.to_json() for d in read_jsonl(url)] == [d.to_json() for d in docs]
    with storage.open_read(url) as f:  # the first line comes before the whole object has been fetched
        assert f.readline() == docs[0].to_json().encode() + b"\n"
        assert f._below.cache.total_requested_bytes < len(packed) / 2


def test_listing_with_a_glob_and_folders(tmp_path, s3):
    bucket = s3()
    fs = _fs()
    for key in ("c/a.jsonl.gz", "c/b.jsonl", "c/sub/c.jsonl.zst", "c/notes.txt", "c/.hidden/d.jsonl", "c/.e.jsonl",
                "other/x.jsonl"):
        fs.pipe_file(f"{bucket}/{key}".removeprefix("s3://"), b"")
    got = storage.list_files(f"{bucket}/c", JsonlReader.patterns)
    assert got == [f"{bucket}/c/a.jsonl.gz", f"{bucket}/c/b.jsonl", f"{bucket}/c/sub/c.jsonl.zst"]
    assert storage.list_files(f"{bucket}/c/*.jsonl*") == [f"{bucket}/c/a.jsonl.gz", f"{bucket}/c/b.jsonl"]
    assert storage.list_files(f"{bucket}/c/b.jsonl") == [f"{bucket}/c/b.jsonl"]
    assert JsonlReader().files([f"{bucket}/c/**/*.zst", f"{bucket}/other"]) == \
        [f"{bucket}/c/sub/c.jsonl.zst", f"{bucket}/other/x.jsonl"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        JsonlReader().files([f"{bucket}/nothing-here"])


def test_a_missing_bucket_is_a_clear_error(tmp_path, s3):
    bucket = s3()
    with ShardWriter(f"{bucket}/in/0.jsonl.gz") as w:
        w.write(Document("a", "some text here", "t"))
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket.*bucket"):
        LocalExecutor("s3://no-such-bucket/out", workers=1, progress=False).run(
            "t", JsonlReader(), [], [f"{bucket}/in"])
    with pytest.raises(FileNotFoundError, match="no-such-bucket"):
        LocalExecutor(tmp_path / "out", workers=1, progress=False).run(
            "t", JsonlReader(), [], ["s3://no-such-bucket/in"])


def test_an_interrupted_remote_write_leaves_no_object(s3):
    bucket = s3()
    with pytest.raises(RuntimeError), ShardWriter(f"{bucket}/x/0.jsonl.gz") as w:
        w.write(Document("a", "text", "t"))
        raise RuntimeError("killed mid-shard")
    with pytest.raises(RuntimeError), storage.atomic_open(f"{bucket}/x/big.bin") as f:
        f.write(os.urandom(6 * 2**20))  # past s3fs's first multipart part: the upload is aborted, not completed
        f.write(os.urandom(6 * 2**20))
        raise RuntimeError("killed")
    assert storage.is_empty_dir(f"{bucket}/x")
    storage.atomic_write_text(f"{bucket}/x/done", "")
    assert storage.names(f"{bucket}/x") == {"done"}


def test_a_url_without_the_remote_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)
    with pytest.raises(ValueError, match=r"llamaworks\[remote\]"):
        storage.exists("s3://bucket/key")
    assert storage.exists(Path(__file__))  # local paths never need fsspec


def test_a_local_only_reader_refuses_urls_clearly():
    with pytest.raises(ValueError, match="reads local files only"):
        GutenbergReader().files(["s3://bucket/books"])


def test_paths_keep_their_kind():
    assert storage.join(Path("/a"), "b", "c") == Path("/a/b/c")
    assert storage.join("s3://b/k/", "x", "y.gz") == "s3://b/k/x/y.gz"
    assert storage.as_path("file:///tmp/x") == Path("/tmp/x")
    assert storage.as_path("rel/dir") == Path("rel/dir")
    assert storage.name("gs://b/k/f.jsonl.gz") == "f.jsonl.gz"
    assert not storage.is_remote(Path("s3:/x")) and storage.is_remote("hf://datasets/x/y")


def test_dask_and_the_cli_run_c4_from_s3_to_s3_like_a_local_run(tmp_path, s3, capsys):
    """The Dask executor (its global line-dedup stage on a worker, spilling to the worker's local disk)
    and `llamaworks data run` with URLs write what the local executor writes locally."""
    distributed = pytest.importorskip("distributed")
    from llamaworks.cli import main
    from llamaworks.data.cluster import DaskExecutor

    _c4_corpus(tmp_path / "in", files=3, docs=10)
    bucket = s3()
    _upload(tmp_path / "in", f"{bucket}/in")
    reader, steps = pipeline("c4")
    LocalExecutor(tmp_path / "out", workers=1, progress=False).run("c4", reader, steps, [tmp_path / "in"])
    local = _outputs(_tree(tmp_path / "out"))
    reader, steps = pipeline("c4")
    with distributed.Client(processes=False, n_workers=2, threads_per_worker=1, dashboard_address=":0") as client:
        DaskExecutor(f"{bucket}/dask", client, progress=False).run("c4", reader, steps, [f"{bucket}/in"])
    assert _outputs(_download(f"{bucket}/dask")) == local
    assert main(["data", "run", "c4", "--input", f"{bucket}/in/*.jsonl.gz", "--output", f"{bucket}/cli",
                 "--workers", "1"]) == 0
    assert f"see {bucket}/cli/DATACARD.md" in capsys.readouterr().out
    assert _outputs(_download(f"{bucket}/cli")) == local


def test_mix_from_s3_sources_to_s3_equals_the_local_mix(tmp_path, s3, tiny_tokenizer, monkeypatch):
    from llamaworks.data.mix import MixConfig, mix

    monkeypatch.setenv("LLAMAWORKS_MIX_STAGING", str(tmp_path / "staging"))
    rng = random.Random(3)
    src = tmp_path / "src"
    for name, n in (("web", 60), ("wiki", 15)):
        docs = [Document(f"{name}-{i}", " ".join(_sentence(rng) for _ in range(rng.randint(1, 6))), name)
                for i in range(n)]
        for k in range(2):  # the layout `llamaworks data run` writes
            with ShardWriter(src / name / "documents" / f"{k:05d}.jsonl.gz") as w:
                for d in docs[k::2]:
                    w.write(d)
        (src / name / "stats.json").write_text("{}")
    bucket = s3()
    _upload(src, f"{bucket}/runs")

    def config(where, out):
        sources = {n: {"inputs": [f"{where}/{n}"], "weight": w} for n, w in (("web", 70.0), ("wiki", 30.0))}
        return MixConfig(tokenizer=str(tiny_tokenizer.path), output=str(out), shard_tokens=500, val_fraction=0.1,
                         workers=1, sources=sources, seed=7)

    local = mix(config(str(src), tmp_path / "local"), progress=False)
    remote = mix(config(f"{bucket}/runs", f"{bucket}/mix"), progress=False)
    assert remote["splits"] == local["splits"]
    got = _download(f"{bucket}/mix")
    want = {k: v for k, v in _tree(tmp_path / "local").items() if k.endswith(".bin") and not k.startswith(".")}
    assert want and {k: v for k, v in got.items() if k.endswith(".bin")} == want  # the same token bytes
    manifest = json.loads(got["manifest.json"])
    assert manifest["splits"] == json.loads((tmp_path / "local" / "manifest.json").read_text())["splits"]
    # a rerun finds the finished mix (nothing re-tokenised or rewritten); another config is refused
    again = mix(config(f"{bucket}/runs", f"{bucket}/mix"), progress=False)
    assert again["splits"] == local["splits"]
    other = config(f"{bucket}/runs", f"{bucket}/mix")
    other.seed = 8
    with pytest.raises(ValueError, match="overwrite"):
        mix(other, progress=False)


def test_stores_without_atomic_puts_write_a_hidden_temporary_then_move_it():
    """memory:// stands for any fsspec filesystem that is not an object store with atomic PUTs."""
    base = f"memory://llamaworks-test-{random.getrandbits(32):x}"
    fs = storage.filesystem(base)[0]
    with pytest.raises(RuntimeError), ShardWriter(f"{base}/d/0.jsonl.gz") as w:
        w.write(Document("a", "text", "t"))
        raise RuntimeError("killed")
    assert storage.is_empty_dir(f"{base}/d")
    w = storage.open_writer(f"{base}/d/1.bin")
    w.write(b"partial")
    assert [storage.name(f) for f in fs.find(base)] == [f".1.bin.{w.target.rsplit('.', 2)[1]}.tmp"]
    assert storage.list_files(f"{base}/d") == []  # a temporary is never an input
    storage.remove_temporaries(f"{base}/d")  # what a resumed run does with a killed run's temporaries
    assert fs.find(base) == []
    with ShardWriter(f"{base}/d/0.jsonl.gz") as w:
        w.write(Document("a", "text", "t"))
    assert [d.id for d in read_jsonl(f"{base}/d/0.jsonl.gz")] == ["a"]
    assert storage.names(f"{base}/d") == {"0.jsonl.gz"}
