"""Structured output: replies constrained to a JSON schema, any JSON object, or a grammar.

A request's `response_format` ({"type": "json_object"} or {"type": "json_schema",
"json_schema": {"name", "schema", "strict"}}) or `grammar` (a GBNF grammar, llama.cpp's
format; llguidance also reads Lark there) is compiled once, when the request is parsed, into
a `Constraint`. The engine gives each constrained request a `Matcher`, which says at every
step which tokens may come next (a (vocab,) bool row; the engine sets the others' logits to
-inf in that row of the batch only) and advances on each accepted token. The reply ends with
finish_reason "stop" when the grammar is complete: when nothing can follow (a closed JSON
value), or when the model picks a stop token, which the mask allows only where the grammar may
end. A reply cut by max_tokens ends with "length" and, as with OpenAI, need not parse.

JSON is compiled compact (no whitespace between tokens, "," and ":" separators): flexible
whitespace lets a model write newlines for ever without ever breaking the grammar. Strings,
arrays and numbers are as long as the schema allows: a schema without maxLength, maxItems or
a numeric range leaves the length to the model, and to max_tokens.

The library is llguidance (the `structured` extra), chosen over xgrammar by measurement:
`python benchmarks/structured.py --label contended` (benchmarks/results/structured_contended.json;
2 vCPUs shared with other work, load ~12: contended figures), a 32,000-piece SentencePiece
vocabulary with byte fallback, a nested schema (objects, enums, arrays, ranges, a pattern), a
153-token reply, one thread each, compact JSON in both:

                                            llguidance 1.9.1   xgrammar 0.2.9
    schema compile, new schema (ms)                    3.5            40.0
    mask per token, mean / p50 / p99 (us)    73 / 10 / 286    30 / 2.4 / 54
    advance per token, mean (us)                      15.3            17.6
    one reply: compile + masks + advances (ms)        17.0            47.4
    tokenizer set-up, once per server (ms)             210              41

xgrammar's masks are faster (it precompiles a per-grammar token cache), llguidance's
compile is ~11x faster (it computes masks lazily from a token trie), so a request with a
schema the server has not seen costs ~2.8x less grammar time with llguidance; with one
schema repeated and xgrammar's compile cache, xgrammar would cost ~7 ms a reply to
llguidance's 17. Either is well under 1% of a decode step of the models served here. The
choice also weighs that llguidance reads GBNF and Lark, takes a tokenizer as a list of token
bytes, and depends on nothing (xgrammar's package requires torch, transformers and triton).

The tokenizer is given to llguidance as each token's bytes, from our tokenizer protocol:
byte-level BPE has them (`token_bytes`); SentencePiece's pieces are their text with "▁" as a
space, and its byte-fallback pieces <0xNN> the byte NN; control tokens are special (never
allowed by a grammar).
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# JSON compile options (llguidance's JsonCompileOptions); a schema's "x-guidance" overrides them.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
GRAMMAR_FORMAT = "gbnf"  # llama.cpp's GBNF (llguidance reads Lark there too)
# The largest grammar or schema text a request may send (characters).
MAX_GRAMMAR_CHARS = 100_000


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ValueError("structured output needs the llguidance package: pip install 'llamaworks[structured]'") \
            from None
    return llguidance


@dataclass(frozen=True)
class Constraint:
    """A compiled grammar (llguidance's grammar text) and what it came from."""

    kind: str  # "json_object", "json_schema" or "grammar"
    grammar: str


def compile_constraint(kind: str, spec: Any = None) -> Constraint:
    """A Constraint for `kind`: "json_object" (no spec), "json_schema" (spec: the schema, a
    dict) or "grammar" (spec: GBNF text). ValueError saying what is wrong with the spec."""
    llg = _llguidance()
    if kind == "json_object":
        grammar = llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    elif kind == "json_schema":
        if not isinstance(spec, (dict, bool)):
            raise ValueError(f"the schema must be a JSON object, got {type(spec).__name__}")
        if len(json.dumps(spec)) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"the schema is longer than {MAX_GRAMMAR_CHARS} characters")
        grammar = llg.LLMatcher.grammar_from_json_schema(spec, defaults=JSON_OPTIONS)
    elif kind == "grammar":
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError("the grammar must be a non-empty string (GBNF)")
        if len(spec) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"the grammar is longer than {MAX_GRAMMAR_CHARS} characters")
        grammar = llg.grammar_from(GRAMMAR_FORMAT, spec)
    else:
        raise AssertionError(kind)
    error = llg.LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(error[:500])
    return Constraint(kind, grammar)


def token_bytes_table(tokenizer) -> tuple[list[bytes], list[int]]:
    """Each token's bytes and the special (control) ids, from the tokenizer protocol."""
    get = getattr(tokenizer, "token_bytes", None)
    table, special = [], []
    for i, piece in enumerate(tokenizer.piece_table()):
        if piece is None:
            table.append(b"")
            special.append(i)
        elif get is not None:  # byte-level BPE: exact bytes, partial characters included
            table.append(get(i))
        elif isinstance(piece, int):  # SentencePiece's byte fallback <0xNN>
            table.append(bytes([piece]))
        else:
            table.append(piece.encode("utf-8"))
    unk = getattr(tokenizer, "unk_id", -1)
    if 0 <= unk < len(table) and unk not in special:  # <unk> decodes to " ⁇ ", not its piece: never allowed
        special.append(unk)
    return table, special


class _Wrapper:
    """llguidance's tokenizer interface (TokenizerWrapper's fields) over ours."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.tokens, self.special_token_ids = token_bytes_table(tokenizer)
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id if tokenizer.bos_id >= 0 else None
        special = set(self.special_token_ids)
        self._ids = {}
        for i, t in enumerate(self.tokens):
            if t and i not in special:
                self._ids.setdefault(t, i)
        self._longest = max(map(len, self._ids), default=1)

    def __call__(self, text) -> list[int]:
        # llguidance tokenises text the grammar forces (a JSON key and its quotes, say), and then
        # allows only those tokens there, so this is the tokenisation of forced text. Our
        # encoder's ids when they spell exactly these bytes (byte-level BPE: its canonical
        # tokens); else (SentencePiece puts a space in front of any text) the longest token at
        # each position.
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        try:
            ids = self._tok.encode(data.decode("utf-8"), bos=False)
            if b"".join(self.tokens[i] for i in ids) == data:
                return ids
        except (UnicodeDecodeError, ValueError):
            pass
        out, at = [], 0
        while at < len(data):
            for n in range(min(self._longest, len(data) - at), 0, -1):
                i = self._ids.get(data[at : at + n])
                if i is not None:
                    out.append(i)
                    at += n
                    break
            else:  # a byte no token holds (a vocabulary without byte fallback): skipped
                at += 1
        return out


_LL_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def ll_tokenizer(tokenizer):
    """llguidance's tokenizer for ours (built once per tokenizer: ~0.1 s for 128k tokens)."""
    llg = _llguidance()
    try:
        return _LL_TOKENIZERS[tokenizer]
    except (KeyError, TypeError):
        pass
    out = llg.LLTokenizer(llg.TokenizerWrapper(_Wrapper(tokenizer)))
    try:
        _LL_TOKENIZERS[tokenizer] = out
    except TypeError:  # not weakly referenceable: built per request
        pass
    return out


class Matcher:
    """One running request's grammar state: the tokens allowed next, advanced per token."""

    def __init__(self, constraint: Constraint, tokenizer, vocab_size: int, stop_ids):
        llg = _llguidance()
        self._m = llg.LLMatcher(ll_tokenizer(tokenizer), constraint.grammar, log_level=0)
        if self._m.is_error():
            raise ValueError(f"grammar: {self._m.get_error()}")
        self.vocab_size = vocab_size  # the logits' width (a padded output layer may exceed the tokenizer's)
        self._eos = tokenizer.eos_id
        self._stops = np.array([t for t in sorted(stop_ids) if 0 <= t < vocab_size], dtype=np.int64)

    def allowed(self) -> torch.Tensor:
        """(vocab_size,) bool: the tokens the grammar allows next. Where the grammar may end,
        every stop id of the request is allowed (llguidance knows only eos)."""
        raw = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)  # one bit per token, token i at bit i
        bits = np.unpackbits(raw, bitorder="little")  # (8 * bytes,); numpy's is ~15x faster than shifts in torch
        out = np.zeros(self.vocab_size, dtype=bool)
        n = min(self.vocab_size, bits.size)
        out[:n] = bits[:n]
        if self._m.is_error():
            raise RuntimeError(f"grammar: {self._m.get_error()}")
        if self._stops.size:
            out[self._stops] = 0 <= self._eos < n and bool(out[self._eos])
        return torch.from_numpy(out)

    def accept(self, token: int) -> None:
        if not self._m.consume_token(token):
            raise RuntimeError(f"grammar: token {token} was not allowed: {self._m.get_error()}")

    @property
    def done(self) -> bool:
        """Nothing can follow: the reply is complete."""
        return self._m.is_stopped()


def apply_masks(logits: torch.Tensor, masks: list[torch.Tensor | None]) -> torch.Tensor:
    """Logits (bsz, vocab) with -inf where a row's mask (vocab,) bool is False; rows with no
    mask (None) are unchanged."""
    if all(m is None for m in masks):
        return logits
    ones = torch.ones(logits.shape[-1], dtype=torch.bool)
    allowed = torch.stack([ones if m is None else m for m in masks]).to(logits.device)  # (bsz, vocab)
    return logits.masked_fill(~allowed, float("-inf"))
