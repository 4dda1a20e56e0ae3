"""The data pipeline's compiled text kernels (csrc/text_kernels.cpp, jsonl.cpp, bpe.cpp): building, loading, calling.

The word cache's hot loop (tokenizer/word_cache.py: cutting a batch into chunks, packing and
probing their keys, gathering the ids), MinHash's shingles and minima (data/dedup.py) and the
mix's gather of documents' tokens (data/mix.py) are numpy passes over every byte, shingle or
token; compiled, each is one pass (a memcpy per document for the gather). JSONL lines become the
word cache's buffer in one pass too (jsonl_docs: data/shards.py's parse, split hash and join per
document), and the word cache's new chunks are encoded by SentencePiece's BPE written out (bpe_encode).
The numpy, Python and SentencePiece code stays the reference and the fallback: the kernels return its
results bit for bit (the tests compare).

A plain C library loaded with ctypes, not a torch extension: the tokenising workers of `prepare`
and `data mix` import numpy and the tokenizer, never torch. Built by an explicit step, never while
a command runs:
    python -m llamaworks.tokenizer.native build      (python -m llamaworks.inference.native build runs it)
into a folder keyed by the source and the compiler's flags (beside the inference kernels: under
the virtual environment, or LLAMAWORKS_NATIVE_DIR). Not built, or LLAMAWORKS_NATIVE=0: the numpy paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).resolve().parent / "csrc" / name for name in ("text_kernels.cpp", "jsonl.cpp", "bpe.cpp")]
NAME = "llamaworks_text"
# No -march: the MinHash loop picks AVX-512DQ / AVX2 / plain x86-64 at run time (target_clones).
CFLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fno-math-errno"]

_i64, _u64, _ptr = ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p


def compiler() -> list[str]:
    """The C++ compiler command: $CXX, else Python's own, else c++."""
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    return shlex.split(cxx)


def native_root() -> Path:
    """Where every native build of llamaworks lives (this library and inference/native.py's):
    LLAMAWORKS_NATIVE_DIR, else beside the virtual environment, else the user's cache."""
    root = os.environ.get("LLAMAWORKS_NATIVE_DIR")
    if root:
        return Path(root)
    if sys.prefix != sys.base_prefix:  # a virtual environment: keep the build with it
        return Path(sys.prefix) / "llamaworks-native"
    return Path.home() / ".cache" / "llamaworks" / "native"


def library_path() -> Path:
    h = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES))
    h.update(f"{platform.machine()} {' '.join(compiler() + CFLAGS)}".encode())
    return native_root() / f"text-{h.hexdigest()[:16]}" / f"{NAME}.so"


def build() -> Path:
    """Compile the library unless this version is built; returns its path. Raises OSError (no
    compiler) or subprocess.CalledProcessError (a compile error)."""
    path = library_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{NAME}.{os.getpid()}.tmp.so")  # renamed into place: never half a library
    subprocess.run([*compiler(), *CFLAGS, *map(str, SOURCES), "-o", str(tmp)], check=True, capture_output=True)
    os.replace(tmp, path)
    _state.update(lib=None, tried=False)
    return path


_state: dict = {"lib": None, "tried": False}


def library() -> ctypes.CDLL | None:
    """The loaded library, or None (not built, or LLAMAWORKS_NATIVE=0): callers take their numpy path."""
    if _state["tried"]:
        return _state["lib"]
    _state["tried"] = True
    if os.environ.get("LLAMAWORKS_NATIVE", "1") == "0":
        return None
    path = library_path()
    if not path.exists():
        log.info("text kernels not built (python -m llamaworks.tokenizer.native build): numpy paths")
        return None
    lib = ctypes.CDLL(str(path))
    lib.lw_chunks.restype = _i64
    lib.lw_chunks.argtypes = [ctypes.c_char_p, _i64, ctypes.c_char_p, _i64, _ptr, _i64, _ptr,
                              _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64]
    lib.lw_isas.restype = _i64
    lib.lw_isas.argtypes = []
    lib.lw_doc_lengths.restype = _i64
    lib.lw_doc_lengths.argtypes = [_ptr, _ptr, _i64, _ptr, _i64, _ptr]
    lib.lw_assemble.restype = _i64
    lib.lw_assemble.argtypes = [_ptr, _ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _i64, _i64, _ptr]
    lib.lw_distinct.restype = _i64
    lib.lw_distinct.argtypes = [ctypes.c_char_p, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _ptr]
    lib.lw_place.restype = None
    lib.lw_place.argtypes = [_ptr, _i64, _ptr, _ptr, _i64]
    lib.lw_copy_runs.restype = None
    lib.lw_copy_runs.argtypes = [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _ptr]
    lib.lw_minhash.restype = None
    lib.lw_minhash.argtypes = [_ptr, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _i64, _ptr, _ptr]
    lib.lw_jsonl_docs.restype = _i64
    lib.lw_jsonl_docs.argtypes = [_ptr, _i64, _i64, ctypes.c_char_p, _i64, ctypes.c_char_p, _i64, _u64, _ptr, _ptr,
                                  _ptr, _ptr, _ptr, _ptr]
    lib.lw_plain_run.restype = _i64
    lib.lw_plain_run.argtypes = [ctypes.c_char_p, _i64, _i64]
    lib.lw_bpe_new.restype = _ptr
    lib.lw_bpe_new.argtypes = [ctypes.c_char_p, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _i64, ctypes.c_char_p]
    lib.lw_bpe_free.restype = None
    lib.lw_bpe_free.argtypes = [_ptr]
    lib.lw_bpe_encode.restype = _i64
    lib.lw_bpe_encode.argtypes = [_ptr, ctypes.c_char_p, _ptr, _ptr, _i64, _ptr, _i64, _ptr]
    lib.lw_blake2b_64.restype = _u64
    lib.lw_blake2b_64.argtypes = [ctypes.c_char_p, _i64]
    _state["lib"] = lib
    return lib


def set_enabled(on: bool) -> None:
    """Use the kernels (when built) or the numpy paths, for the rest of the process (tests, A/B runs)."""
    _state.update(tried=not on, lib=None)


def _p(a: np.ndarray, dtype) -> int:
    assert a.dtype == dtype and a.flags.c_contiguous, (a.dtype, dtype)
    return a.ctypes.data


class Scratch:
    """Kernels' output arrays kept by their caller across calls, by name: fresh arrays of a batch's size
    each call cost their page faults (several ms per MiB of text), reused ones none."""

    def __init__(self):
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, n: int, dtype, rows: int = 1) -> np.ndarray:
        """The array `name`, (rows, >= n) of `dtype` ((>= n,) for one row), grown (doubling) when short."""
        a = self._arrays.get(name)
        if a is None or a.shape[-1] < n:
            size = max(n, 2 * (0 if a is None else a.shape[-1]))
            a = self._arrays[name] = np.empty((rows, size) if rows > 1 else size, dtype)
        return a


# lw_chunks' byte classification (csrc/text_kernels.cpp, ISA_*): the portable one is the reference.
ISAS = {"portable": 0, "avx2": 1, "avx512": 2}


def chunk_isas(lib) -> list[str]:
    """The ISAs lw_chunks can classify bytes with on this CPU, by name (tests run each)."""
    have = lib.lw_isas()
    return [name for name, k in ISAS.items() if have >> k & 1]


# The word cache's rows of its chunks (word_cache.FlatEncoder): each key packed (lo, hi), read by
# lw_chunks' probe, and each chunk's span of ids (first, count), read by the gather; the kernels see
# them as structs of two int64.
KEY = np.dtype([("lo", "<u8"), ("hi", "<u8")])
SPAN = np.dtype([("start", "<i8"), ("count", "<i8")])


def _rows(rows: np.ndarray, dtype: np.dtype) -> int:
    assert rows.dtype == dtype and rows.flags.c_contiguous, (rows.dtype, rows.flags.c_contiguous)
    return rows.ctypes.data


def chunks(lib, buf: bytes, flags: bytes, texts: int, table: np.ndarray, keys: np.ndarray,
           scratch: Scratch | None = None, isa: str | None = None) -> tuple[np.ndarray, ...]:
    """(start, length, lo, hi, found, per_text) of word_cache's chunks of `buf` (lw_chunks): found is
    the cached chunk, -1 when not cached, -2 for a key over 15 bytes (not in the table). `table`:
    slot -> entry (word_cache._tag; -1 empty); `keys`: the chunks' keys (KEY). With `scratch` the first five are views
    of its arrays, valid until its next use. `isa` (a key of ISAS): classify the bytes with that one
    (None: the widest this CPU runs)."""
    n = len(buf)
    scratch = scratch or Scratch()
    # a chunk starts at a distinct byte: at most n of them
    out = scratch.get("ints", n, np.int64, rows=3)  # start, length, found
    words = scratch.get("words", n, np.uint64, rows=2)  # lo, hi
    per_text = np.zeros(texts, np.int64)
    k = lib.lw_chunks(buf, n, flags, texts, _p(table, np.int64), len(table) - 1, _rows(keys, KEY),
                      out[0].ctypes.data, out[1].ctypes.data, words[0].ctypes.data,
                      words[1].ctypes.data, out[2].ctypes.data, per_text.ctypes.data, -1 if isa is None else ISAS[isa])
    assert k != -3, f"lw_chunks cannot run isa {isa!r} here (it has {chunk_isas(lib)})"
    assert k >= 0, "the buffer's documents are not `texts`: 0xFF inside a text?"
    return out[0, :k], out[1, :k], words[0, :k], words[1, :k], out[2, :k], per_text


def assemble(lib, found: np.ndarray, per_text: np.ndarray, spans: np.ndarray, tokens: np.ndarray,
             bos: int | None, eos: int | None, dtype: np.dtype | type = np.int64,
             bound: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, lengths): each text's <s> (bos not None), its chunks' ids (their SPAN in `tokens`), </s>
    (eos not None), the ids written as `dtype` (uint16, int32 or int64; the caller knows they fit).
    `bound`: at most that many ids (a view of an array that size is returned), written in one pass;
    without it, or past it, a first pass over the spans sizes the array."""
    found = np.ascontiguousarray(found, np.int64)
    dtype = np.dtype(dtype)
    assert dtype in (np.uint16, np.int32, np.int64), dtype
    assert not len(found) or (found.min() >= 0 and found.max() < len(spans)), "a chunk not cached"
    lengths = np.empty(len(per_text), np.int64)
    marks = int(bos is not None) + int(eos is not None)
    if bound is None:
        bound = lib.lw_doc_lengths(_p(found, np.int64), _p(per_text, np.int64), len(per_text), _rows(spans, SPAN),
                                   marks, lengths.ctypes.data)
    for _ in range(2):
        ids = np.empty(bound, dtype)
        done = lib.lw_assemble(_p(found, np.int64), _p(per_text, np.int64), len(per_text), _rows(spans, SPAN),
                               _p(tokens, np.int32), bos is not None, bos or 0, eos is not None, eos or 0,
                               ids.ctypes.data, dtype.itemsize, bound, lengths.ctypes.data)
        if done != -2:
            break
        bound = lib.lw_doc_lengths(_p(found, np.int64), _p(per_text, np.int64), len(per_text), _rows(spans, SPAN),
                                   marks, lengths.ctypes.data)
    assert done >= 0, (done, dtype)
    return ids[:done], lengths


def distinct(lib, buf: bytes, start: np.ndarray, length: np.ndarray, lo: np.ndarray, hi: np.ndarray,
             chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """word_cache._distinct by lw_distinct: (rows, which), the first of `chunks` holding each distinct key in
    order, and each chunk's key's index in rows."""
    start, length, chunks = (np.ascontiguousarray(x, np.int64) for x in (start, length, chunks))
    lo, hi = np.ascontiguousarray(lo, np.uint64), np.ascontiguousarray(hi, np.uint64)
    assert len(start) == len(length) == len(lo) == len(hi) and (not len(chunks) or chunks.max() < len(start))
    rows, which = np.empty(len(chunks), np.int64), np.empty(len(chunks), np.int64)
    n = lib.lw_distinct(buf, start.ctypes.data, length.ctypes.data, lo.ctypes.data, hi.ctypes.data, chunks.ctypes.data,
                        len(chunks), rows.ctypes.data, which.ctypes.data)
    return rows[:n], which


def place(lib, table: np.ndarray, keys: np.ndarray, chunks: np.ndarray) -> None:
    """Insert `chunks` (their keys short, distinct and not in `table`) into the table (lw_place): the caller
    keeps the table at most half full and its size a power of two."""
    chunks = np.ascontiguousarray(chunks, np.int64)
    assert (len(table) & (len(table) - 1)) == 0, len(table)
    assert not len(chunks) or chunks.max() < len(keys), (int(chunks.max()), len(keys))
    lib.lw_place(_p(table, np.int64), len(table) - 1, _rows(keys, KEY), chunks.ctypes.data, len(chunks))


def copy_runs(lib, src: np.ndarray, src_at: np.ndarray, count: np.ndarray, dst: np.ndarray,
              dst_at: np.ndarray) -> None:
    """dst[dst_at[r]:dst_at[r] + count[r]] = src[src_at[r]:src_at[r] + count[r]] for every r (lw_copy_runs);
    the caller keeps every run inside both arrays."""
    assert src.dtype == dst.dtype and src.flags.c_contiguous and dst.flags.c_contiguous and src.ndim == dst.ndim == 1
    src_at, count, dst_at = (np.ascontiguousarray(x, np.int64) for x in (src_at, count, dst_at))
    assert len(src_at) == len(count) == len(dst_at)
    if len(count):
        assert (count >= 0).all() and src_at.min() >= 0 and dst_at.min() >= 0
        assert (src_at + count).max() <= len(src) and (dst_at + count).max() <= len(dst), "a run out of bounds"
    lib.lw_copy_runs(src.ctypes.data, src_at.ctypes.data, count.ctypes.data, dst_at.ctypes.data, len(count),
                     src.itemsize, dst.ctypes.data)


def minhash(lib, word_hash: np.ndarray, words: np.ndarray, mult: np.ndarray, a: np.ndarray,
            b: np.ndarray) -> np.ndarray:
    """(texts, perms) uint32 MinHash signatures from the texts' word hashes (lw_minhash); a text
    without a shingle reads all ones."""
    word_hash = np.ascontiguousarray(word_hash, np.uint64)
    words = np.ascontiguousarray(words, np.int64)
    a, b, mult = (np.ascontiguousarray(x, np.uint64) for x in (a, b, mult))
    assert int(words.sum()) == len(word_hash), (int(words.sum()), len(word_hash))
    sig = np.empty((len(words), len(a)), np.uint32)
    scratch = np.empty(len(a), np.uint64)
    lib.lw_minhash(word_hash.ctypes.data, words.ctypes.data, len(words), mult.ctypes.data, len(mult),
                   a.ctypes.data, b.ctypes.data, len(a), scratch.ctypes.data, sig.ctypes.data)
    return sig


class JsonlDocs(NamedTuple):
    """lw_jsonl_docs' answer for data[at:]: the kept documents as word_cache's joined buffer (`text`),
    their val flags and source numbers (0: the file's; k: sources[k - 1]), the empty documents, and
    where it stopped: `at` (the end, or a line for the Python path, `stop` bytes long) and its line number."""

    text: bytes
    val: np.ndarray
    source: np.ndarray
    sources: list[str]
    empty: int
    at: int
    lineno: int
    stop: int  # the length of the line at `at` that the Python path reads, -1 at the end of the data


_JSONL_SCRATCH = Scratch()  # jsonl_docs' outputs, reused call after call


def jsonl_docs(lib, data: bytes | np.ndarray, at: int, lineno: int, name: bytes, seed: bytes,
               threshold: int) -> JsonlDocs:
    """The JSONL documents of data[at:] (whole lines, the first numbered `lineno`) up to the first line
    the Python path must read (csrc/jsonl.cpp). `name` is the file's name in default ids, `seed` the
    split's "{seed}\\0" prefix, `threshold` the val split's (shards._val_mask), below 2**64."""
    assert 0 <= at <= len(data) and 0 <= threshold < 1 << 64, (at, len(data), threshold)
    if isinstance(data, np.ndarray):
        assert data.dtype == np.uint8 and data.flags.c_contiguous, (data.dtype, data.flags.c_contiguous)
        base = data.ctypes.data + at
    else:
        base = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value + at
    n = len(data) - at
    docs = n // 11 + 2  # a kept document's line holds at least {"text":"x"}: 12 bytes
    scratch = _JSONL_SCRATCH
    text = scratch.get("text", n + 2 * docs, np.uint8)  # a text is never longer than its line; 0xFF and " " before it
    val, source = scratch.get("val", docs, np.uint8), scratch.get("source", docs, np.int32)
    source_bytes, source_ends = scratch.get("source_bytes", n + 1, np.uint8), scratch.get("source_ends", docs, np.int64)
    result = np.zeros(7, np.int64)
    lib.lw_jsonl_docs(base, n, lineno, name, len(name), seed, len(seed), threshold, text.ctypes.data, val.ctypes.data,
                      source.ctypes.data, source_bytes.ctypes.data, source_ends.ctypes.data, result.ctypes.data)
    used, lineno, kept, empty, size, distinct, stop = result.tolist()
    assert kept <= docs and size <= n + 2 * docs, (kept, docs, size, n)
    ends = source_ends[:distinct].tolist()
    sources = [source_bytes[a:b].tobytes().decode("utf-8") for a, b in zip([0, *ends], ends)]
    return JsonlDocs(text[:size].tobytes(), val[:kept].astype(np.bool_), source[:kept].copy(), sources, empty,
                     at + used, lineno, stop)


def plain_run(lib, data: bytes, isa: str) -> int | None:
    """How many bytes at the start of `data` a JSON string scan copies as they are (no '"', '\\\\', control
    or non-ASCII byte), found with `isa` (a key of ISAS); None where it does not run here."""
    k = lib.lw_plain_run(data, len(data), ISAS[isa])
    return None if k < 0 else k


class BpeModel:
    """A SentencePiece BPE model in the kernel (csrc/bpe.cpp): its normal pieces with ids and scores, the
    byte pieces' ids, the lone "▁"'s ids and the isolated bytes (word_cache). Freed with the object."""

    def __init__(self, lib, pieces: list[bytes], ids: list[int], scores: list[float], byte_ids: list[int],
                 lone: list[int], isolated: bytes):
        assert len(pieces) == len(ids) == len(scores) and len(byte_ids) == 256 and len(isolated) == 256
        ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
        ids_a, scores_a = np.asarray(ids, np.int32), np.asarray(scores, np.float32)
        bytes_a, lone_a = np.asarray(byte_ids, np.int32), np.asarray(lone, np.int32)
        self.lib = lib
        self.handle = lib.lw_bpe_new(b"".join(pieces), ends.ctypes.data, ids_a.ctypes.data, scores_a.ctypes.data,
                                     len(pieces), bytes_a.ctypes.data, lone_a.ctypes.data, len(lone_a), isolated)

    def __del__(self):
        if getattr(self, "handle", None):
            self.lib.lw_bpe_free(self.handle)
            self.handle = None

    def encode(self, buf: bytes, start: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(ids, counts) of the keys buf[start[k]:start[k] + length[k]] as word_cache's FlatEncoder._add
        gives them; None when one needs SentencePiece itself (a character without a byte piece)."""
        start, length = np.ascontiguousarray(start, np.int64), np.ascontiguousarray(length, np.int64)
        assert len(start) == len(length) and (not len(start) or (start + length).max() <= len(buf))
        counts = np.empty(len(start), np.int64)
        cap = 2 * len(buf) + 8 * len(start) + 16  # "▁" + a key: at most its bytes + 1 symbols, 3 ids on the lone "▁"
        while True:
            ids = np.empty(cap, np.int32)
            n = self.lib.lw_bpe_encode(self.handle, buf, start.ctypes.data, length.ctypes.data, len(start),
                                       ids.ctypes.data, cap, counts.ctypes.data)
            if n != -1:
                break
            cap *= 2
        return None if n < 0 else (ids[:n], counts)


def blake2b_64(lib, data: bytes) -> int:
    """hashlib.blake2b(data, digest_size=8)'s digest as a little-endian integer (lw_blake2b_64)."""
    return lib.lw_blake2b_64(data, len(data))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["build"]:
        print("usage: python -m llamaworks.tokenizer.native build", file=sys.stderr)
        return 2
    try:
        path = build()
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        print(f"text kernels not built ({e}) {detail.decode(errors='replace')[-2000:]}; numpy paths will be used",
              file=sys.stderr)
        return 1
    print(f"text kernels: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
