"""Structured output libraries side by side: llguidance (what serve/structured.py uses) and
xgrammar, doing equal work on one 32k-token vocabulary.

    python benchmarks/structured.py [--tokenizer PATH] [--label contended]

xgrammar is not a dependency of llamaworks: install it for this script with
`pip install -c .venv/constraints.txt --no-deps xgrammar apache-tvm-ffi` (its package also
requires triton, a GPU kernel compiler its CPU masks do not use, and torch and transformers,
which the venv has).

The vocabulary: `--tokenizer` (any tokenizer file llamaworks reads), by default a 32,000-piece
SentencePiece BPE with byte fallback (the paper's recipe) trained here on the running Python's
standard library (cached in --work). Both libraries get the same token bytes (llguidance
through serve/structured.py's wrapper, xgrammar as a RAW vocabulary), one thread each, and
compact JSON (no whitespace between tokens, "," and ":").

Measured, per library:
- compile: a schema -> a matcher ready for its first mask (llguidance: grammar text and
  LLMatcher; xgrammar: GrammarCompiler.compile_json_schema without its cache, GrammarMatcher);
  each repetition compiles a schema never seen before (a property renamed), as a server
  receiving a new schema per request does;
- mask: per token of a reply that follows the schema (the JSON text of a valid instance,
  tokenised longest-match over the vocabulary's bytes), the time to compute the next-token
  bitmask, then the matcher advancing on the token (timed apart);
- the tokenizer set-up, once per server;
- per reply: compile + every mask + every advance, from the means: what one request costs.

Prints one row per measure with the ratio xgrammar / llguidance, and writes
benchmarks/results/structured_<label>.json with the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import add_label_argument, machine_record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "maxLength": 40},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue", "other"]}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                           "geo": {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90,
                                                                            "maximum": 90},
                                                                    "lon": {"type": "number"}},
                                   "required": ["lat", "lon"], "additionalProperties": False}},
            "required": ["street", "city", "zip"], "additionalProperties": False},
        "scores": {"type": "array", "items": {"type": "number"}, "minItems": 1},
        "active": {"type": "boolean"},
        "notes": {"type": ["string", "null"]},
    },
    "required": ["name", "age", "tags", "address", "scores", "active"],
    "additionalProperties": False,
}

INSTANCE = {
    "name": "Ada Lovelace, Countess of Lovelace", "age": 36, "email": "ada@example.org",
    "tags": ["blue", "other", "red"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "10001",
                "geo": {"lat": 51.5074, "lon": -0.1278}},
    "scores": [0.5, 12.25, -3, 1e3, 42], "active": True,
    "notes": "Wrote the first published algorithm meant for a machine: the Bernoulli numbers on the Analytical Engine.",
}


def stdlib_tokenizer(work: Path, vocab_size: int):
    from llamaworks.tokenizer import Tokenizer, load_tokenizer

    path = work / f"stdlib_sp{vocab_size}.model"
    if path.exists():
        return load_tokenizer(path)
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, size = [], 0
    for p in sorted(root.rglob("*.py")):
        if "test" in p.parts or "tests" in p.parts:
            continue
        try:
            docs.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        size += len(docs[-1])
        if size > 8_000_000:
            break
    work.mkdir(parents=True, exist_ok=True)
    print(f"training a {vocab_size}-piece SentencePiece tokenizer on {size / 1e6:.1f} MB of the standard library ...",
          file=sys.stderr)
    return Tokenizer.train(path, documents=docs, vocab_size=vocab_size, input_sentence_size=200_000)


def reply_tokens(tok, table: list[bytes], data: bytes) -> list[int]:
    """Token ids spelling `data` exactly that the schema's grammar allows at each step: the
    longest allowed token that continues the text (llguidance allows only its tokenisation of
    text the grammar forces; xgrammar allows any token the grammar does, these included)."""
    import llguidance

    from llamaworks.serve import structured

    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=structured.JSON_OPTIONS)
    m = llguidance.LLMatcher(structured.ll_tokenizer(tok), grammar, log_level=0)
    out, at = [], 0
    while at < len(data):
        bits = m.compute_bitmask()
        best = max((i for i, t in enumerate(table) if t and data.startswith(t, at) and bits[i // 8] >> (i % 8) & 1),
                   key=lambda i: len(table[i]), default=None)
        if best is None:
            raise ValueError(f"the grammar allows no token at byte {at} of the reply: {data[at - 20 : at + 20]!r}")
        out.append(best)
        assert m.consume_token(best), m.get_error()
        at += len(table[best])
    assert m.is_accepting()
    return out


def renamed(schema: dict, k: int) -> dict:
    """The schema with one more optional property, named for k: a schema no cache has seen."""
    props = dict(schema["properties"], **{f"extra_{k}": {"type": "integer"}})
    return dict(schema, properties=props)


def bench_llguidance(tok, vocab: int, ids: list[int], reps: int) -> dict:
    import llguidance

    from llamaworks.serve import structured

    t = time.perf_counter()
    structured._LL_TOKENIZERS.clear()
    lltok = structured.ll_tokenizer(tok)
    setup = time.perf_counter() - t
    compile_s = []
    for k in range(reps):
        t = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(renamed(SCHEMA, k), defaults=structured.JSON_OPTIONS)
        m = llguidance.LLMatcher(lltok, grammar, log_level=0)
        compile_s.append(time.perf_counter() - t)
        assert not m.is_error(), m.get_error()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=structured.JSON_OPTIONS)
    mask_s, accept_s = [], []
    for _ in range(reps):
        m = llguidance.LLMatcher(lltok, grammar, log_level=0)
        for i in ids:
            t = time.perf_counter()
            bits = m.compute_bitmask()
            t1 = time.perf_counter()
            assert bits[i // 8] >> (i % 8) & 1, f"llguidance masks out token {i} of the reply"
            assert m.consume_token(i), m.get_error()
            accept_s.append(time.perf_counter() - t1)
            mask_s.append(t1 - t)
        assert m.is_accepting()
    return {"setup_s": setup, "compile_s": compile_s, "mask_s": mask_s, "accept_s": accept_s}


def bench_xgrammar(tok, vocab: int, ids: list[int], reps: int) -> dict:
    import xgrammar as xgr

    from llamaworks.serve.structured import token_bytes_table

    table, special = token_bytes_table(tok)
    t = time.perf_counter()
    info = xgr.TokenizerInfo(table, xgr.VocabType.RAW, vocab_size=vocab, stop_token_ids=[tok.eos_id])
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    setup = time.perf_counter() - t
    kw = dict(any_whitespace=False, separators=(",", ":"))
    compile_s = []
    for k in range(reps):
        t = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(renamed(SCHEMA, k)), **kw)
        xgr.GrammarMatcher(compiled)
        compile_s.append(time.perf_counter() - t)
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), **kw)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    mask_s, accept_s = [], []
    for _ in range(reps):
        m = xgr.GrammarMatcher(compiled)
        for i in ids:
            t = time.perf_counter()
            m.fill_next_token_bitmask(bitmask)
            t1 = time.perf_counter()
            word = int(bitmask[0, i // 32])
            assert word >> (i % 32) & 1, f"xgrammar masks out token {i} of the reply"
            assert m.accept_token(i), f"xgrammar refused token {i}"
            accept_s.append(time.perf_counter() - t1)
            mask_s.append(t1 - t)
    return {"setup_s": setup, "compile_s": compile_s, "mask_s": mask_s, "accept_s": accept_s}


def summary(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"mean_us": 1e6 * statistics.fmean(s), "p50_us": 1e6 * s[len(s) // 2],
            "p99_us": 1e6 * s[min(len(s) - 1, int(0.99 * len(s)))], "max_us": 1e6 * s[-1], "n": len(s)}


def per_reply(row: dict, tokens: int) -> float:
    """What one request of this reply costs in grammar work (ms), from the means."""
    return row["compile"]["mean_us"] / 1e3 + tokens * (row["mask"]["mean_us"] + row["accept"]["mean_us"]) / 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default=None, help="a tokenizer file (default: a 32k SentencePiece on the stdlib)")
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=10, help="compiles, and passes over the reply")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_structured"))
    ap.add_argument("--out", default=None)
    add_label_argument(ap)
    a = ap.parse_args(argv)

    from llamaworks.serve.structured import token_bytes_table
    from llamaworks.tokenizer import load_tokenizer

    tok = load_tokenizer(a.tokenizer) if a.tokenizer else stdlib_tokenizer(Path(a.work), a.vocab_size)
    vocab = tok.vocab_size
    table, special = token_bytes_table(tok)
    text = json.dumps(INSTANCE, separators=(",", ":"), ensure_ascii=False)
    ids = reply_tokens(tok, table, text.encode("utf-8"))
    print(f"vocabulary {vocab} tokens; reply {len(text)} characters, {len(ids)} tokens; {a.reps} repetitions")
    results = {"llguidance": bench_llguidance(tok, vocab, ids, a.reps),
               "xgrammar": bench_xgrammar(tok, vocab, ids, a.reps)}
    rows = {}
    for name, r in results.items():
        rows[name] = {"setup_ms": 1e3 * r["setup_s"], "compile": summary(r["compile_s"]), "mask": summary(r["mask_s"]),
                      "accept": summary(r["accept_s"])}
    lg, xg = rows["llguidance"], rows["xgrammar"]
    print(f"{'measure':44} {'llguidance':>12} {'xgrammar':>12} {'xgrammar/llguidance':>20}")
    lines = [("tokenizer set-up (ms)", lg["setup_ms"], xg["setup_ms"]),
             ("schema compile, mean (ms)", lg["compile"]["mean_us"] / 1e3, xg["compile"]["mean_us"] / 1e3),
             ("mask per token, mean (us)", lg["mask"]["mean_us"], xg["mask"]["mean_us"]),
             ("mask per token, p50 (us)", lg["mask"]["p50_us"], xg["mask"]["p50_us"]),
             ("mask per token, p99 (us)", lg["mask"]["p99_us"], xg["mask"]["p99_us"]),
             ("advance per token, mean (us)", lg["accept"]["mean_us"], xg["accept"]["mean_us"]),
             ("per reply: compile + masks + advances (ms)", per_reply(lg, len(ids)), per_reply(xg, len(ids)))]
    for label, x, y in lines:
        print(f"{label:44} {x:12.1f} {y:12.1f} {y / x:20.2f}")
    record = machine_record(a.label, bandwidth=False, threads=1, libraries=("llguidance", "xgrammar"))
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"structured_{record['label'].split()[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": record, "command": sys.argv[1:], "vocab_size": vocab,
                               "tokenizer": a.tokenizer or f"SentencePiece {a.vocab_size} trained on the stdlib",
                               "reply_tokens": len(ids), "schema": SCHEMA, "results": rows,
                               "ratios_xgrammar_over_llguidance": {label: y / x for label, x, y in lines}},
                              indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
