"""The n-gram language model behind CCNet's perplexity buckets, and `llamaworks data train-lm`.

`kneser_ney` estimates an interpolated modified Kneser-Ney model in memory with numpy and
writes it as ARPA, which KenLM (and so `ccnet.PerplexityFilter`) reads. We estimate it
ourselves because KenLM's `lmplz` is a separate C++ build; for corpora of billions of tokens,
use lmplz on the same tokenised text (`data train-lm --pieces`), whose ARPA output the filter
reads the same way. The LM's words are the SentencePiece pieces of CCNet-normalised lines
(`ccnet.tokenize_for_lm`), the same the filter scores.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated

import numpy as np

from llamaworks.args import Arg
from llamaworks.atomic import atomic_open, atomic_write_text
from llamaworks.data.ccnet import iter_texts, require_file, tokenize_for_lm

__all__ = ["UNK", "BOS", "EOS", "NGramModel", "kneser_ney", "modified_kn_discounts", "train_lm_command"]

UNK, BOS, EOS = 0, 1, 2
_FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # as lmplz --discount_fallback, when count-of-counts are degenerate


def _as_records(rows: np.ndarray) -> np.ndarray:
    """(M, k) int rows -> (M,) structured records, which numpy compares lexicographically."""
    rows = np.ascontiguousarray(rows)
    return rows.view([(f"f{j}", rows.dtype) for j in range(rows.shape[1])]).ravel()


def _find(table: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Index of each query row in `table` (unique rows sorted lexicographically, as np.unique gives)."""
    t, q = _as_records(table), _as_records(queries)
    idx = np.minimum(np.searchsorted(t, q), len(t) - 1)
    assert bool(np.all(t[idx] == q)), "an n-gram's context or suffix is missing from the lower order"
    return idx


def modified_kn_discounts(adjusted: np.ndarray) -> tuple[float, float, float]:
    """Chen & Goodman (1998) discounts D1, D2, D3+ from the count-of-counts of adjusted counts."""
    t1, t2, t3, t4 = (int(np.count_nonzero(adjusted == k)) for k in (1, 2, 3, 4))
    if min(t1, t2, t3, t4) == 0:
        return _FALLBACK_DISCOUNTS
    y = t1 / (t1 + 2 * t2)
    d = (1 - 2 * y * t2 / t1, 2 - 3 * y * t3 / t2, 3 - 4 * y * t4 / t3)
    return d if all(0 < dk <= k + 1 for k, dk in enumerate(d)) else _FALLBACK_DISCOUNTS


@dataclass
class NGramModel:
    vocab: list[str]  # id -> word; 0 <unk>, 1 <s>, 2 </s>
    grams: list[np.ndarray]  # order n (index n-1): (M_n, n) int32 word ids, sorted
    logprob: list[np.ndarray]  # (M_n,) log10 p(w | context), interpolated
    backoff: list[np.ndarray]  # (M_n,) log10 backoff weight (zeros at the highest order)
    discounts: list[tuple[float, float, float]]

    def write_arpa(self, path: str | os.PathLike) -> None:
        out = ["\\data\\"] + [f"ngram {n + 1}={len(g)}" for n, g in enumerate(self.grams)]
        top = len(self.grams) - 1
        for n, (g, lp, bo) in enumerate(zip(self.grams, self.logprob, self.backoff)):
            out += ["", f"\\{n + 1}-grams:"]
            for row, p, b in zip(g.tolist(), lp.tolist(), bo.tolist()):
                words = " ".join(self.vocab[i] for i in row)
                out.append(f"{p:.7g}\t{words}\t{b:.7g}" if n < top else f"{p:.7g}\t{words}")
        out += ["", "\\end\\", ""]
        atomic_write_text(path, "\n".join(out))


def kneser_ney(sentences: Iterable[Sequence[str]], order: int = 5) -> NGramModel:
    """Interpolated modified Kneser-Ney (Chen & Goodman 1998; the method of KenLM's lmplz, unpruned;
    lmplz's conventions for <s> and <unk> may differ in small details):

    p(w|h) = (a(hw) - D_n(a(hw))) / sum_x a(hx) + gamma(h) p(w|h'),
    gamma(h) = (D1 N1(h.) + D2 N2(h.) + D3 N3+(h.)) / sum_x a(hx),

    with a() the raw count at the highest order and for n-grams starting with <s>, else the
    number of distinct words seen before the n-gram; three discounts per order; unigrams
    interpolate with the uniform distribution over the vocabulary (<unk> included, <s> never
    predicted). In ARPA form an n-gram stores its interpolated p(w|h) and a context h stores
    gamma(h) as its backoff weight, so KenLM's backoff query returns exactly p(w|h).
    """
    if order < 2:
        raise ValueError(f"--order must be at least 2 (KenLM reads no unigram-only model), got {order}")
    index = {"<unk>": UNK, "<s>": BOS, "</s>": EOS}
    ids: list[int] = []
    for sent in sentences:
        ids.append(BOS)
        ids.extend(index.setdefault(w, len(index)) for w in sent)
        ids.append(EOS)
    if not ids:
        raise ValueError("no training text: the input has no non-blank line")
    toks = np.asarray(ids, dtype=np.int32)
    vocab = sorted(index, key=index.get)
    ends = np.concatenate([[0], np.cumsum(toks == EOS)])
    grams, raw = [], []
    for n in range(1, order + 1):
        if n == 1:  # every word, <unk> included even when unseen
            grams.append(np.arange(len(vocab), dtype=np.int32)[:, None])
            raw.append(np.bincount(toks, minlength=len(vocab)))
            continue
        starts = np.flatnonzero(ends[n - 1:len(toks)] == ends[:len(toks) - n + 1])  # no </s> before the last word
        windows = np.lib.stride_tricks.sliding_window_view(toks, n)[starts]  # (windows, n)
        g, c = np.unique(windows, axis=0, return_counts=True)
        grams.append(g.astype(np.int32))
        raw.append(c)
    # Adjusted counts: distinct left neighbours, except at the top order and after <s>.
    adjusted = [r.astype(np.float64) for r in raw]
    for n in range(1, order):  # orders 1..order-1 (index n-1)
        suffixes, left = np.unique(grams[n][:, 1:], axis=0, return_counts=True)
        a = np.where(grams[n - 1][:, 0] == BOS, raw[n - 1], 0).astype(np.float64)
        a[_find(grams[n - 1], suffixes)] = left
        adjusted[n - 1] = a
    adjusted[0][BOS] = 0.0  # <s> is never predicted
    logprob, backoff, discounts = [], [], []
    gammas: list[tuple[np.ndarray, np.ndarray]] = []  # per order: (context rows, gamma)
    lower = None
    for n in range(1, order + 1):
        g, a = grams[n - 1], adjusted[n - 1]
        d = modified_kn_discounts(a)
        discounts.append(d)
        disc = np.select([a >= 3, a == 2, a == 1], [d[2], d[1], d[0]], 0.0)
        if n == 1:
            group = np.zeros(len(g), dtype=np.int64)
            ctx = np.zeros((1, 0), dtype=np.int32)
        else:
            new = np.r_[True, np.any(g[1:, :-1] != g[:-1, :-1], axis=1)]  # rows sorted: contexts are runs
            group = np.cumsum(new) - 1
            ctx = g[new, :-1]
        total = np.bincount(group, weights=a)
        gamma = np.bincount(group, weights=disc * (a > 0)) / total
        p = (a - disc) / total[group]
        if n == 1:
            p = p + gamma[0] / (len(vocab) - 1)  # uniform over the predictable words (all but <s>)
        else:
            p = p + gamma[group] * lower[_find(grams[n - 2], g[:, 1:])]
        lower = p
        with np.errstate(divide="ignore"):
            lp = np.log10(p)
        if n == 1:
            lp[BOS] = -99.0  # ARPA convention for <s>
        logprob.append(lp)
        gammas.append((ctx, gamma))
    for n in range(1, order + 1):
        bo = np.zeros(len(grams[n - 1]))
        if n < order:
            ctx, gamma = gammas[n]
            bo[_find(grams[n - 1], ctx)] = np.log10(gamma)
        backoff.append(bo)
    return NGramModel(vocab, grams, logprob, backoff, discounts)


def train_lm_command(
    input: Annotated[list[str], Arg("clean text to model (CCNet: Wikipedia): JSONL document shards, .txt files "
                                    "or folders", metavar="PATH")],
    tokenizer: Annotated[str, Arg("SentencePiece model whose pieces are the LM's words (pass the same file as "
                                  "--lm-tokenizer to data run)", metavar="FILE")],
    output: Annotated[str, Arg("where to write the ARPA model, e.g. lm.arpa", metavar="FILE")],
    order: Annotated[int, Arg("n-gram order (CCNet: 5)")] = 5,
    max_lines: Annotated[int | None, Arg("stop after this many lines (the estimator holds all n-grams in "
                                         "memory)")] = None,
    pieces: Annotated[bool, Arg("write the tokenised text (one sentence of pieces per line) to --output instead, "
                                "for KenLM's lmplz")] = False,
) -> dict:
    """Estimate an interpolated modified Kneser-Ney n-gram model (unpruned, as KenLM's lmplz) on
    normalised SentencePiece pieces and write it as ARPA for KenLM. In-memory and single-process:
    fine up to some tens of millions of tokens; for billions, write the pieces with --pieces and
    run KenLM's `lmplz -o 5` on them, which gives the same ARPA format."""
    require_file(tokenizer, "SentencePiece model", "--tokenizer", "pass the project tokenizer .model "
             "(`llamaworks tokenizer train`)")
    sentences = (s for text in iter_texts(input, "--input") for s in tokenize_for_lm(text, tokenizer))
    if max_lines is not None:
        sentences = itertools.islice(sentences, max_lines)
    if pieces:
        n = 0
        with atomic_open(output, "w", encoding="utf-8") as f:  # streamed: it can be large
            for sent in sentences:
                f.write(" ".join(sent) + "\n")
                n += 1
        print(f"wrote {output}: {n} lines of pieces; e.g. lmplz -o {order} < {output} > lm.arpa")
        return {"lines": n}
    model = kneser_ney(sentences, order)
    model.write_arpa(output)
    counts = [len(g) for g in model.grams]
    print(f"wrote {output}: order {order}, {len(model.vocab)} words, n-grams {counts}; discounts "
          + "; ".join(f"{n + 1}: " + ", ".join(f"{x:.3f}" for x in d) for n, d in enumerate(model.discounts)))
    return {"ngrams": counts, "discounts": model.discounts}

