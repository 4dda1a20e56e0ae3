"""Where the data pipeline's files live: local paths, or object storage through fsspec.

Every input and output path of `data run` (and the executor's markers and stats) may be
a local path or a URL: `s3://bucket/key`, `gs://...`, `hf://datasets/...`, or any other
fsspec protocol. Local paths never touch fsspec (the `remote` extra is optional), so a
local run writes exactly the bytes it always has. A path is a `Path` when local and a
`str` URL when remote; `join` keeps that kind.

Atomic outputs, so that a killed run never leaves a file that looks complete:
- local: a temporary name in the same folder, renamed into place (llamaworks.atomic);
- object stores whose PUT is atomic per object (S3, GCS, Azure): the object is written
  under its final key and committed only by `close()` (one PUT, or a multipart upload
  completed at close); an error aborts the upload, a killed process never completes it;
- other fsspec filesystems: a hidden temporary key, moved into place when complete.
The executor writes a shard's completion marker after the shard, so resume never trusts
a partial shard.

Endpoint and credentials come from the standard AWS variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), so MinIO or any
S3-compatible store works; the endpoint is passed to s3fs explicitly as well, for s3fs
versions that do not read AWS_ENDPOINT_URL themselves.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gzip
import io
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from llamaworks import atomic

StoragePath = str | Path

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Object stores whose single PUT / completed multipart upload is atomic: write the final key directly.
_ATOMIC_PUT = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}
# Remote reads fetch this much ahead per request: a shard streams in bounded memory (s3fs's default
# block is 50 MB) with few enough requests for throughput.
READ_BLOCK = 8 * 2**20


def is_remote(path: StoragePath) -> bool:
    """True for a URL other than file:// (those go through fsspec)."""
    s = str(path)
    return isinstance(path, str) and bool(_URL.match(s)) and not s.startswith("file://")


def as_path(path: StoragePath) -> StoragePath:
    """A local path as a `Path` (file:// stripped), a URL as a `str`."""
    if isinstance(path, Path):
        return path
    s = os.fspath(path)
    if s.startswith("file://"):
        return Path(s.removeprefix("file://"))
    return s if is_remote(s) else Path(s)


def join(base: StoragePath, *parts: str) -> StoragePath:
    base = as_path(base)
    if isinstance(base, Path):
        return base.joinpath(*parts)
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def name(path: StoragePath) -> str:
    p = as_path(path)
    return p.name if isinstance(p, Path) else p.rstrip("/").rsplit("/", 1)[-1]


def parent(path: StoragePath) -> StoragePath:
    p = as_path(path)
    if isinstance(p, Path):
        return p.parent
    return p.rstrip("/").rsplit("/", 1)[0]


def filesystem(url: str):
    """(fsspec filesystem, path inside it) of a URL; a clear error when the extra is missing."""
    try:
        import fsspec
    except ImportError:
        raise ValueError(f"{url} is a remote URL, which needs fsspec: pip install 'llamaworks[remote]'") from None
    protocol = url.split("://", 1)[0].lower()
    options: dict = {}
    if protocol in ("s3", "s3a"):
        # Listings are not cached: markers and shards appear while a run goes on (and other workers write them).
        options["use_listings_cache"] = False
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as e:
        need = "" if protocol in ("s3", "s3a") else f" and the fsspec package of {protocol}:// (gcsfs, hf...)"
        raise ValueError(f"{url}: no filesystem for {protocol}:// ({e}); pip install 'llamaworks[remote]'{need}") \
            from None


def _full(fs, path: str) -> str:
    return fs.unstrip_protocol(path)


def _missing_bucket(url: str, e: Exception) -> Exception:
    return FileNotFoundError(f"{url}: {e} (check the bucket name, AWS_ENDPOINT_URL and the credentials)")


def exists(path: StoragePath) -> bool:
    p = as_path(path)
    if isinstance(p, Path):
        return p.exists()
    fs, inner = filesystem(p)
    return fs.exists(inner)


def isfile(path: StoragePath) -> bool:
    p = as_path(path)
    if isinstance(p, Path):
        return p.is_file()
    fs, inner = filesystem(p)
    return fs.isfile(inner)


def size(path: StoragePath) -> int:
    p = as_path(path)
    if isinstance(p, Path):
        return p.stat().st_size
    fs, inner = filesystem(p)
    return int(fs.size(inner))


def names(folder: StoragePath) -> set[str]:
    """Names of the files directly in `folder` (empty when it does not exist): one listing, not
    one request per file, for checking many markers on an object store."""
    p = as_path(folder)
    if isinstance(p, Path):
        return {c.name for c in p.iterdir() if c.is_file()} if p.is_dir() else set()
    fs, inner = filesystem(p)
    try:
        return {e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(inner, detail=True) if e["type"] == "file"}
    except FileNotFoundError:
        return set()


def is_empty_dir(folder: StoragePath) -> bool:
    """True when `folder` does not exist or holds nothing."""
    p = as_path(folder)
    if isinstance(p, Path):
        return not p.exists() or not any(p.iterdir())
    fs, inner = filesystem(p)
    try:
        return not fs.ls(inner)
    except FileNotFoundError:
        return True


def rmtree(path: StoragePath) -> None:
    """Remove a folder or file if it is there."""
    p = as_path(path)
    if isinstance(p, Path):
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        return
    fs, inner = filesystem(p)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(inner, recursive=True)


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def list_files(root: StoragePath, patterns: Iterable[str] = ("*",)) -> list[StoragePath]:
    """A file as itself; a folder as its files matching any of `patterns` (by name), recursively,
    sorted, hidden files and folders left out; a URL with a glob (*, ?, [) as its matches."""
    patterns = tuple(patterns)
    p = as_path(root)
    if isinstance(p, Path):
        if not p.exists():
            raise FileNotFoundError(str(root))
        if p.is_file():
            return [p]
        return sorted({f for pat in patterns for f in p.rglob(pat)
                       if f.is_file() and not any(x.startswith(".") for x in f.relative_to(p).parts)})
    fs, inner = filesystem(p)
    try:
        if any(c in inner for c in "*?["):
            static = inner[:min(inner.index(c) for c in "*?[" if c in inner)].rsplit("/", 1)[0] + "/"
            return [_full(fs, f) for f in sorted(fs.glob(inner))
                    if not _hidden(f.removeprefix(static)) and fs.isfile(f)]
        if fs.isfile(inner):
            return [p]
        found = fs.find(inner)
    except FileNotFoundError as e:
        raise _missing_bucket(p, e) from None
    base = inner.rstrip("/") + "/"
    out = [f for f in found if not _hidden(f.removeprefix(base))
           and any(fnmatch.fnmatch(f.rsplit("/", 1)[-1], pat) for pat in patterns)]
    if not out and not found and not fs.isdir(inner):
        raise FileNotFoundError(str(root))
    return [_full(fs, f) for f in sorted(out)]


class _Stacked(io.BufferedReader):
    """A decompressing reader over a remote file: line iteration, and `close` closes both."""

    def __init__(self, top, below):
        super().__init__(top)
        self._below = below

    def close(self):
        try:
            super().close()
        finally:
            self._below.close()


def zstandard_module(path: StoragePath | None = None):
    try:
        import zstandard
    except ImportError:
        what = f"{path} is zstd-compressed but" if path is not None else "zstd shards need"
        raise ValueError(f"{what} the `zstandard` package is not installed: pip install zstandard "
                         "(or 'llamaworks[data]'), or use gzip") from None
    return zstandard


def _gzip_choice():
    """zlib-ng's gzip module where installed (the `data` extra) and LLAMAWORKS_FAST_GZIP is not 0,
    else the standard library's."""
    if os.environ.get("LLAMAWORKS_FAST_GZIP", "1") != "0":
        try:
            from zlib_ng import gzip_ng

            return gzip_ng
        except ImportError:
            pass
    return gzip


# gzip's format and levels through zlib-ng (gzip_ng.GzipNGFile, a gzip.GzipFile): at level 6, the
# level of every final shard, it compressed JSONL at 65 MB/s against zlib's 21 (same ratio, 0.398
# against 0.396; Sapphire Rapids, one core), and the level-6 writes were a quarter of a MinHash
# run's CPU. Its streams differ from zlib's byte for byte (any gzip reader reads both), and are
# the same from run to run, as zlib's are.
_GZIP = _gzip_choice()


def gzip_module():
    """The gzip module the pipeline writes .gz files with and reads local ones with (see _GZIP)."""
    return _GZIP


def set_fast_gzip(on: bool) -> None:
    """zlib-ng (when installed) or the standard library's gzip, for the rest of the process (tests, A/B runs)."""
    global _GZIP
    _GZIP = _gzip_choice() if on else gzip


def open_read(path: StoragePath):
    """Binary reader that undoes .gz / .zst / .bz2 / .xz by file name; remote files stream
    (read ahead in blocks, never downloaded whole first)."""
    p = as_path(path)
    lower = str(p).lower()
    if isinstance(p, Path):
        if lower.endswith(".gz"):
            return _GZIP.open(p, "rb")
        if lower.endswith(".zst"):
            # The zstd reader has no readline; BufferedReader adds line iteration on top of readinto.
            return io.BufferedReader(zstandard_module(p).open(p, "rb"))
        if lower.endswith(".bz2"):
            import bz2

            return bz2.open(p, "rb")
        if lower.endswith(".xz"):
            import lzma

            return lzma.open(p, "rb")
        return open(p, "rb")
    fs, inner = filesystem(p)
    try:
        raw = fs.open(inner, "rb", block_size=READ_BLOCK, cache_type="readahead")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{p}: {e}") from None
    if lower.endswith(".gz"):
        # The standard library's reader here: zlib-ng's reads ahead in larger steps (~600 KB before
        # a first line, where this one asks for READ_BLOCK at a time), and a stream is read as it comes.
        return _Stacked(gzip.GzipFile(fileobj=raw, mode="rb"), raw)
    if lower.endswith(".zst"):
        return _Stacked(zstandard_module(p).ZstdDecompressor().stream_reader(raw), raw)
    if lower.endswith(".bz2"):
        import bz2

        return _Stacked(bz2.BZ2File(raw, "rb"), raw)
    if lower.endswith(".xz"):
        import lzma

        return _Stacked(lzma.LZMAFile(raw, "rb"), raw)
    return raw


def open_raw(path: StoragePath):
    """Binary reader of the stored bytes (no decompression)."""
    p = as_path(path)
    if isinstance(p, Path):
        return open(p, "rb")
    fs, inner = filesystem(p)
    return fs.open(inner, "rb", block_size=READ_BLOCK, cache_type="readahead")


def read_bytes(path: StoragePath) -> bytes:
    p = as_path(path)
    if isinstance(p, Path):
        return p.read_bytes()
    fs, inner = filesystem(p)
    return fs.cat_file(inner)


def read_range(path: StoragePath, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file: one ranged GET on an object store (a partition's slice of a
    shard's dedup index, without reading the rest)."""
    p = as_path(path)
    if isinstance(p, Path):
        with open(p, "rb") as f:
            f.seek(start)
            return f.read(end - start)
    fs, inner = filesystem(p)
    return fs.cat_file(inner, start=start, end=end)


def read_text(path: StoragePath) -> str:
    return read_bytes(path).decode("utf-8")


class _RemoteWriter:
    """A binary file under its final key (atomic-PUT stores) or a hidden temporary key, that
    becomes visible at `commit()` only; `abort()` leaves nothing behind."""

    def __init__(self, url: str):
        self.fs, self.inner = filesystem(url)
        self.url = url
        protocol = url.split("://", 1)[0].lower()
        head, _, leaf = self.inner.rpartition("/")
        self.target = self.inner if protocol in _ATOMIC_PUT else f"{head}/.{leaf}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            self.f = self.fs.open(self.target, "wb")
        except FileNotFoundError as e:
            raise _missing_bucket(url, e) from None

    def write(self, data) -> int:
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def commit(self) -> None:
        try:
            self.f.close()
        except FileNotFoundError as e:
            raise _missing_bucket(self.url, e) from None
        if self.target != self.inner:
            self.fs.mv(self.target, self.inner)

    def abort(self) -> None:
        discard = getattr(self.f, "discard", None)
        if discard is not None and self.target == self.inner:
            discard()  # s3fs: abort the multipart upload; nothing was PUT
            self.f.closed = True  # so that closing (or collecting) it uploads nothing
        else:
            with contextlib.suppress(Exception):
                self.f.close()
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.target)


@contextlib.contextmanager
def atomic_open(path: StoragePath) -> Iterator:
    """A binary file for streaming a large output; it appears at `path` only when the block ends
    without an error."""
    p = as_path(path)
    if isinstance(p, Path):
        with atomic.atomic_open(p, "wb") as f:
            yield f
        return
    w = _RemoteWriter(p)
    try:
        yield w
    except BaseException:
        w.abort()
        raise
    w.commit()


def open_writer(path: StoragePath) -> _RemoteWriter:
    """The remote writer behind `atomic_open`, for callers that commit or abort themselves."""
    p = as_path(path)
    assert not isinstance(p, Path), p
    return _RemoteWriter(p)


def atomic_write_bytes(path: StoragePath, data: bytes) -> None:
    p = as_path(path)
    if isinstance(p, Path):
        atomic.atomic_write_bytes(p, data)
        return
    with atomic_open(p) as f:
        f.write(data)


def atomic_write_text(path: StoragePath, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: StoragePath, obj) -> None:
    p = as_path(path)
    if isinstance(p, Path):
        atomic.atomic_write_json(p, obj)
        return
    atomic_write_text(p, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def remove_temporaries(folder: StoragePath) -> None:
    """Delete the hidden `.*.tmp` files a killed run left under `folder` (never read as shards)."""
    p = as_path(folder)
    if isinstance(p, Path):
        for tmp in p.rglob(".*.tmp") if p.is_dir() else ():
            tmp.unlink(missing_ok=True)
        return
    if p.split("://", 1)[0].lower() in _ATOMIC_PUT:
        # Never any: objects are written under their final key. (An upload a kill interrupted is an
        # incomplete multipart upload, invisible to listings; a bucket lifecycle rule reclaims it.)
        return
    fs, inner = filesystem(p)
    try:
        found = fs.find(inner)
    except FileNotFoundError:
        return
    for f in found:
        leaf = f.rsplit("/", 1)[-1]
        if leaf.startswith(".") and leaf.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):
                fs.rm(f)


def _identity(fs, inner: str) -> list:
    info = fs.info(inner)
    return [int(info.get("size") or 0), str(info.get("ETag") or info.get("etag") or info.get("mtime")
                                            or info.get("LastModified") or "")]


def mirror(url: str, dest: Path) -> Path:
    """A local copy of a remote file or folder at dest/<its name>, for readers that need local files
    (memory maps, the tokeniser's file walk). Files whose size and ETag are unchanged since the last
    mirror are kept as they are (same bytes, same mtime), so what depends on them is not redone;
    files gone from the store are removed. Returns the local path."""
    fs, inner = filesystem(url)
    base = inner.rstrip("/")
    local_root = dest / base.rsplit("/", 1)[-1]
    index_path = dest / ".mirror.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    if index.get("url") != url:
        index = {"url": url, "files": {}}
        rmtree(local_root)
    files = {}  # path below `url` ("" for a single file) -> key in the store
    for u in list_files(url):
        key = fs._strip_protocol(u)
        files[key.removeprefix(base).lstrip("/")] = key
    seen = {}
    for rel, key in sorted(files.items()):
        ident = _identity(fs, key)
        target = local_root / rel if rel else local_root
        if index["files"].get(rel) != ident or not target.is_file():
            with fs.open(key, "rb", block_size=READ_BLOCK, cache_type="readahead") as src, \
                    atomic.atomic_open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 2**20)
        seen[rel] = ident
    if local_root.is_dir():
        for f in local_root.rglob("*"):
            if f.is_file() and f.relative_to(local_root).as_posix() not in seen:
                f.unlink()
    atomic.atomic_write_json(index_path, {"url": url, "files": seen})
    return local_root


def upload(local: Path, url: str, names: Iterable[str]) -> None:
    """Copy the files `names` (relative to `local`, in order) to url/<name>, each atomically;
    a file already there with the same size is skipped (a resumed upload)."""
    fs, inner = filesystem(url)
    for rel in names:
        key = f"{inner.rstrip('/')}/{rel}"
        src = local / rel
        if fs.exists(key) and fs.size(key) == src.stat().st_size and not rel.endswith(".json"):
            continue  # .json files are small and may change size-preservingly: always rewritten
        with open(src, "rb") as f, atomic_open(_full(fs, key)) as dst:
            shutil.copyfileobj(f, dst, 8 * 2**20)
