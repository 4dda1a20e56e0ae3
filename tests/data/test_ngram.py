"""The modified Kneser-Ney estimator and `data train-lm` (data/ngram.py), checked through KenLM."""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict

import pytest

from llamaworks.data.ccnet import normalize_for_lm, tokenize_for_lm
from llamaworks.data.ngram import BOS, kneser_ney, train_lm_command

kenlm = pytest.importorskip("kenlm")


def reference_kn(sents: list[list[str]], order: int):
    """Interpolated modified Kneser-Ney straight from the definition, with dictionaries (an
    independent check of the vectorised estimator and of the ARPA backoff encoding)."""
    sents = [["<s>", *s, "</s>"] for s in sents]
    raw = [Counter() for _ in range(order + 1)]
    for s in sents:
        for n in range(1, order + 1):
            for i in range(len(s) - n + 1):
                raw[n][tuple(s[i:i + n])] += 1
    adj = [Counter() for _ in range(order + 1)]
    adj[order] = Counter(raw[order])
    for n in range(1, order):
        left = defaultdict(set)
        for g in raw[n + 1]:
            left[g[1:]].add(g[0])
        for g, c in raw[n].items():
            adj[n][g] = c if g[0] == "<s>" else len(left[g])
    adj[1][("<s>",)] = 0
    vocab = {w for (w,) in raw[1]} | {"<unk>"}
    disc = {}
    for n in range(1, order + 1):
        t = [sum(1 for v in adj[n].values() if v == k) for k in (1, 2, 3, 4)]
        y = t[0] / (t[0] + 2 * t[1])
        disc[n] = (0, 1 - 2 * y * t[1] / t[0], 2 - 3 * y * t[2] / t[1], 3 - 4 * y * t[3] / t[2])
    follow = [defaultdict(list) for _ in range(order + 1)]
    for n in range(1, order + 1):
        for g, a in adj[n].items():
            if a:
                follow[n][g[:-1]].append(a)

    def prob(h, w):
        n = len(h) + 1
        if h not in follow[n]:
            return prob(h[1:], w)  # unseen context: backoff weight 1
        total = sum(follow[n][h])
        gamma = sum(disc[n][min(a, 3)] for a in follow[n][h]) / total
        a = adj[n].get((*h, w), 0)
        lower = 1 / (len(vocab) - 1) if n == 1 else prob(h[1:], w)
        return (a - disc[n][min(a, 3)]) / total + gamma * lower

    def score(words):
        s = ["<s>"] + [w if w in vocab else "<unk>" for w in words] + ["</s>"]
        return sum(math.log10(prob(tuple(s[max(0, i - order + 1):i]), s[i])) for i in range(1, len(s)))

    return score, vocab


@pytest.mark.parametrize("order", [2, 3, 5])
def test_kneser_ney_arpa_matches_the_definition(tmp_path, english, order):
    sents = [x.lower().split() for x in english[:1500]]
    model = kneser_ney(sents, order)
    model.write_arpa(tmp_path / "lm.arpa")
    lm = kenlm.Model(str(tmp_path / "lm.arpa"))
    score, vocab = reference_kn(sents, order)
    for words in [sents[3], sents[700], "the king is dead and gone".split(), "zzzz unseen words the".split(), []]:
        assert lm.score(" ".join(words)) == pytest.approx(score(words), abs=1e-4)
    # A distribution: p(. | <s> w) sums to one over every predictable word, through KenLM's backoffs.
    start, ctx = kenlm.State(), kenlm.State()
    lm.BeginSentenceWrite(start)
    lm.BaseScore(start, sents[0][0], ctx)
    total = sum(10 ** lm.BaseScore(ctx, w, kenlm.State()) for w in vocab - {"<s>"})
    assert total == pytest.approx(1.0, abs=1e-4)
    assert model.logprob[0][BOS] == -99.0 and len(model.discounts) == order


def test_train_lm_pieces_for_lmplz(tmp_path, tiny_tokenizer, english):
    (tmp_path / "in.txt").write_text("\n".join(english[:20]) + "\n", encoding="utf-8")
    out = tmp_path / "pieces.txt"
    tok = tiny_tokenizer.path
    assert train_lm_command([str(tmp_path / "in.txt")], str(tok), str(out), pieces=True) == {"lines": 20}
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines == [" ".join(p) for x in english[:20] for p in tokenize_for_lm(x, tok)]
    assert "".join(lines[0].split()).replace("▁", " ").strip() == normalize_for_lm(english[0])


def test_kneser_ney_prefers_in_domain_text(tmp_path, english):
    sents = [x.lower().split() for x in english[:1500]]
    kneser_ney(sents, 3).write_arpa(tmp_path / "lm.arpa")
    lm = kenlm.Model(str(tmp_path / "lm.arpa"))
    held_out = [x.lower() for x in english[1500:1600]]
    rng = random.Random(0)
    shuffled = [" ".join(rng.sample(x.split(), len(x.split()))) for x in held_out]
    ppl = lambda lines: 10 ** (-sum(lm.score(x) for x in lines) / sum(len(x.split()) + 1 for x in lines))
    assert ppl(held_out) < 0.8 * ppl(shuffled)
    with pytest.raises(ValueError, match="at least 2"):
        kneser_ney(sents, 1)
    with pytest.raises(ValueError, match="no training text"):
        kneser_ney([], 3)
