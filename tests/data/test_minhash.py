"""MinHash signatures (data/dedup.py): the batched, vectorised path against a per-shingle reference."""

from __future__ import annotations

import hashlib
import random
import re
import sys

import numpy as np

from llamaworks.data.dedup import (
    _NON_WORD_TO_SPACE,
    _WORD_HASHES,
    MinHashDedup,
    MinHashSignatures,
    _gram_multipliers,
    _mix32,
    _words,
    minhash_signature,
    minhash_signatures,
    shingles,
)
from llamaworks.data.document import Document
from llamaworks.tokenizer import native


def test_words_are_those_of_the_word_regex_on_every_code_point():
    text = "".join(chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c < 0xE000)
    table = type(_NON_WORD_TO_SPACE)()  # a fresh one: the module's stays as small as the corpus needs
    assert text.translate(table).split() == re.findall(r"\w+", text)


def _reference_shingles(text: str, n: int) -> set[int]:
    """One Python hash per word and per shingle: what the vectorised code computes in bulk."""
    words = re.findall(r"\w+", text.lower())
    if 0 < len(words) < n:
        words += [""] * (n - len(words))
    w = [int.from_bytes(hashlib.blake2b(x.encode(), digest_size=8).digest(), "little") for x in words]
    mult = [int(m) for m in _gram_multipliers(n)]
    out = set()
    for i in range(len(w) - n + 1):
        g = sum(w[i + k] * mult[k] for k in range(n)) % 2**64
        out.add(int(_mix32(np.array([g], dtype=np.uint64))[0]))
    return out


TEXTS = ["", "!!", "one", "Two words", "The cat sat on the mat, and the cat sat again.",
         "Ünïcode wörds_with digits 12 3 ½ and 日本語 text " * 3]


def test_shingles_match_the_per_shingle_reference():
    for t in TEXTS:
        assert set(shingles(t, 5).tolist()) == _reference_shingles(t, 5), t
    assert shingles("a b c d e f", 5).size == 2 and shingles("", 5).size == 0
    assert set(shingles("a b c d e f", 5).tolist()) != set(shingles("a b c d f e", 5).tolist())  # order matters


def test_batched_signatures_equal_one_text_at_a_time_and_the_definition(text_kernels):
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(300)]
    texts = TEXTS + [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 3000))) for _ in range(40)]
    m = MinHashDedup(num_perm=64)
    batch = minhash_signatures(texts, m.a, m.b, m.ngram)  # long texts cross the 8192-shingle blocks
    for t, sig in zip(texts, batch):
        one = minhash_signature(t, m.a, m.b, m.ngram)
        if not re.findall(r"\w+", t):
            assert sig is None and one is None
            continue
        h = shingles(t, m.ngram)
        ref = ((np.multiply.outer(h, m.a) + m.b) >> np.uint64(32)).min(axis=0).astype(np.uint32)
        assert sig.dtype == np.uint32 and np.array_equal(sig, ref) and np.array_equal(one, ref)


def test_the_signature_step_batches_but_changes_nothing_else(text_kernels):
    m = MinHashDedup(num_perm=32)
    step = m.parallel_part()
    assert isinstance(step, MinHashSignatures)
    step.batch_chars = 50  # several batches
    docs = [Document(str(i), t, "web", {"k": i}) for i, t in enumerate(TEXTS * 3)]
    out = list(step.run(iter(docs)))
    assert [d.id for d in out] == [d.id for d in docs]
    for d in out:
        sig = m.take_signature(d)
        ref = minhash_signature(d.text, m.a, m.b, m.ngram)
        assert (sig is None and ref is None) or np.array_equal(sig, ref)
        assert d.metadata == {"k": int(d.id)}


def test_compiled_signatures_are_the_numpy_ones_bit_for_bit(text_kernels):
    # tokenizer/native.py's lw_minhash against minhash_signatures' numpy path, for every n-gram size the
    # padding of short texts matters for, and both with and without text.
    rng = random.Random(1)
    texts = TEXTS + [" ".join(rng.choices(["a", "b", "Ünï", "12", "x_y", "!"], k=rng.randint(0, 12)))
                     for _ in range(300)]
    for ngram in (1, 3, 5):
        m = MinHashDedup(num_perm=128, ngram=ngram)
        got = minhash_signatures(texts, m.a, m.b, ngram)
        native.set_enabled(False)
        want = minhash_signatures(texts, m.a, m.b, ngram)
        native.set_enabled(text_kernels == "compiled")
        assert [g is None for g in got] == [w is None for w in want]
        assert all(np.array_equal(g, w) for g, w in zip(got, want) if w is not None)


def test_ascii_texts_take_the_bytes_path_to_the_same_words_and_hashes():
    # _words cuts ASCII text with bytes.translate (words as bytes), other text with str.translate: the words of
    # the word regex either way, and a word's hash is that of its UTF-8 whichever form it comes in.
    ascii_text = "".join(map(chr, range(128))) + " snake_case CamelCase x1y2 -- tabs\tand\nnew\x1clines_ " * 3
    words = _words(ascii_text, 5)
    assert all(isinstance(w, bytes) for w in words)
    assert [w.decode() for w in words] == re.findall(r"\w+", ascii_text.lower())
    assert all(isinstance(w, str) for w in _words(ascii_text + "\u00e9", 5))
    assert _WORD_HASHES[b"caf"] == _WORD_HASHES["caf"] and _WORD_HASHES[b""] == _WORD_HASHES[""]
    assert set(shingles(ascii_text, 5).tolist()) == _reference_shingles(ascii_text, 5)
