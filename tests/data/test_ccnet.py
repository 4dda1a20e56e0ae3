from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest

from llamaworks.data.ccnet import (
    CCNetOptions,
    LanguageId,
    MinLength,
    PerplexityFilter,
    WikiRefFilter,
    bucket,
    ccnet_steps,
    normalize_for_lm,
    percentile_cutoffs,
    perplexity,
    tokenize_for_lm,
    train_classifier_command,
)
from llamaworks.data.command import run_command
from llamaworks.data.commoncrawl import write_wet
from llamaworks.data.document import Document, ShardWriter, read_jsonl
from llamaworks.data.ngram import train_lm_command
from llamaworks.data.step import Dropped

kenlm = pytest.importorskip("kenlm")
fasttext = pytest.importorskip("fasttext")

FR = ("le la les un une des et est dans sur avec pour pas que qui nous vous elle il très bien maison chat chien "
      "jardin ville enfant voiture matin soir aujourd'hui toujours parce beaucoup petit grand belle nouveau mangé "
      "parlé travaille regarde pendant depuis leur notre votre cette être avoir fait").split()
DE = ("der die das ein eine und ist nicht mit auf für von zu im dem den sehr gut Haus Katze Hund Garten Stadt "
      "Kind Auto Morgen Abend heute immer weil viel klein groß schön neu gegessen gesprochen arbeitet schaut "
      "während seit ihre unsere diese würde können").split()
SPAM = ("buy cheap pills online click here best price free shipping casino bonus win now login register cart "
        "discount offer deal limited sale order today").split()
BOILERPLATE = "Home | About us | Contact | Privacy policy | Sitemap"


def sentences(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 14))).capitalize() + "." for _ in range(n)]


@pytest.fixture(scope="module")
def models(tmp_path_factory, english, tiny_tokenizer):
    d = tmp_path_factory.mktemp("ccnet-models")
    rows = [f"__label__en {x}" for x in english[:400]] + [f"__label__fr {x}" for x in sentences(FR, 400, 1)] + \
        [f"__label__de {x}" for x in sentences(DE, 400, 2)]
    random.Random(0).shuffle(rows)
    (d / "lid.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    lid = fasttext.train_supervised(str(d / "lid.txt"), dim=16, epoch=10, minn=2, maxn=4, thread=1, seed=0,
                                    verbose=0)
    lid.save_model(str(d / "lid.bin"))
    (d / "lm.txt").write_text("\n".join(english[:2000]) + "\n", encoding="utf-8")
    train_lm_command([str(d / "lm.txt")], str(tiny_tokenizer.path), str(d / "lm.arpa"), order=5)
    (d / "pos.txt").write_text("\n".join(" ".join(english[i:i + 6]) for i in range(0, 1800, 6)) + "\n")
    (d / "neg.txt").write_text("\n".join(" ".join(sentences(SPAM, 6, i)) for i in range(300)) + "\n")
    result = train_classifier_command([str(d / "pos.txt")], [str(d / "neg.txt")], str(d / "wikiref.bin"),
                                      epochs=5, lr=0.5, dim=16, threads=1)
    return {"lid": d / "lid.bin", "lm": d / "lm.arpa", "tok": tiny_tokenizer.path, "wikiref": d / "wikiref.bin",
            "classifier": result}


def run(step, *texts):
    return list(step.run([Document(str(i), t, "t") for i, t in enumerate(texts)]))


# ----------------------------------------------------------------------------- language id

def test_language_id(models, english):
    lid = LanguageId(models["lid"])
    page = "\n".join(english[3000 - 40:3000 - 30])  # lines the model was not trained on
    en, fr, de, empty, huge = run(lid, page, "\n".join(sentences(FR, 6, 99)), " ".join(sentences(DE, 6, 98)),
                                  " \n\n ", ("the word " * 300_000) + "\n")
    assert isinstance(en, Document) and en.metadata["language"] == "en" and en.metadata["language_score"] >= 0.5
    assert isinstance(fr, Dropped) and fr.reason == "language fr not kept" and fr.doc.metadata["language"] == "fr"
    assert isinstance(de, Dropped) and de.reason == "language de not kept"
    assert isinstance(empty, Dropped) and empty.reason == "no text for language id"
    assert isinstance(huge, Document)  # a 2.7 MB line is one fastText input, not an error
    (strict,) = run(LanguageId(models["lid"], threshold=1.0), page)
    assert isinstance(strict, Dropped) and strict.reason == "language score below 1.0"
    (kept_fr,) = run(LanguageId(models["lid"], languages=["fr", "de"]), "\n".join(sentences(FR, 6, 97)))
    assert isinstance(kept_fr, Document)
    # Steps travel to worker processes by pickle: only the path goes, never the loaded model.
    assert len(pickle.dumps(lid)) < 1000 and pickle.loads(pickle.dumps(lid)).reason(Document("x", page, "t")) is None


def test_missing_models_say_how_to_get_one(tmp_path, models):
    with pytest.raises(FileNotFoundError, match=r"--lid-model: .*nope\.bin not found.*lid\.176\.bin"):
        LanguageId(tmp_path / "nope.bin")
    with pytest.raises(FileNotFoundError, match=r"--lm-model: .*llamaworks data train-lm"):
        PerplexityFilter(tmp_path / "nope.arpa", models["tok"], cutoffs=(1, 2))
    with pytest.raises(FileNotFoundError, match=r"--wikiref-model: .*llamaworks data train-classifier"):
        WikiRefFilter(tmp_path / "nope.bin")
    with pytest.raises(ValueError, match="--skip-wikiref"):
        ccnet_steps(CCNetOptions(lid_model=str(models["lid"]), lm_model=str(models["lm"]),
                                 lm_tokenizer=str(models["tok"])))
    with pytest.raises(ValueError, match="--lid-model"):
        ccnet_steps(CCNetOptions())
    (tmp_path / "fake.bin").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a fastText model"):
        run(LanguageId(tmp_path / "fake.bin"), "some text")
    with pytest.raises(ValueError, match="not a reference classifier"):
        run(WikiRefFilter(models["lid"]), "some text")  # a language-id model has no __label__wikiref


# ----------------------------------------------------------------------------- perplexity

def test_normalize_for_lm():
    assert normalize_for_lm("  The  Year 1984,\tfine!  ") == "the year 0000, fine!"
    assert normalize_for_lm("Héllo Wörld — “quoted” ‘x’ … ＡＢＣ１２") == "hello world - \"quoted\" 'x' ... abc00"
    assert normalize_for_lm("a\x00b\u200bc") == "abc"  # control and zero-width format characters
    assert normalize_for_lm(" \t ") == ""


def test_perplexity_is_ccnets_formula(models):
    text = "To be, or not to be, that is the question.\n\nWhether 'tis nobler in the mind to suffer."
    model = kenlm.Model(str(models["lm"]))
    lines = list(tokenize_for_lm(text, models["tok"]))
    assert len(lines) == 2 and all(p.startswith("▁") for p in (lines[0][0], lines[1][0]))
    logp = sum(model.score(" ".join(x)) for x in lines)
    expected = 10 ** (-logp / (len(lines[0]) + 1 + len(lines[1]) + 1))  # </s> counts as a token
    assert perplexity(text, models["lm"], models["tok"]) == pytest.approx(expected, rel=1e-9)
    assert perplexity(" \n ", models["lm"], models["tok"]) is None


def test_buckets_and_percentiles():
    assert [bucket(x, (10.0, 20.0)) for x in (1, 10, 10.5, 20, 20.1)] == ["head", "head", "middle", "middle", "tail"]
    assert percentile_cutoffs(list(range(1, 11))) == pytest.approx((3.7, 6.4))  # linear interpolation: 1 + 0.3*9
    with pytest.raises(ValueError, match="--perplexity-cutoffs"):
        percentile_cutoffs([5.0])


def test_perplexity_filter_with_given_cutoffs(models, english):
    good = "\n".join(english[:5])  # LM training text: low perplexity
    shuffled = " ".join(random.Random(0).sample(good.split(), len(good.split())))
    ppl_good = perplexity(good, models["lm"], models["tok"])
    ppl_bad = perplexity(shuffled, models["lm"], models["tok"])
    assert ppl_good < ppl_bad
    mid = (ppl_good + ppl_bad) / 2
    f = PerplexityFilter(models["lm"], models["tok"], cutoffs=(mid, mid), keep=["head"])
    kept, dropped, empty = run(f, good, shuffled, "")
    assert kept.metadata["bucket"] == "head" and kept.metadata["perplexity"] == round(ppl_good, 1)
    assert dropped.reason == "perplexity bucket tail not kept" and dropped.doc.metadata["bucket"] == "tail"
    assert empty.reason == "no tokens to score"
    assert "(given)" in f.describe()
    with pytest.raises(ValueError, match="not fitted"):
        run(PerplexityFilter(models["lm"], models["tok"]), good)
    with pytest.raises(ValueError, match="--keep-buckets"):
        PerplexityFilter(models["lm"], models["tok"], keep=["top"])
    with pytest.raises(ValueError, match="increasing"):
        PerplexityFilter(models["lm"], models["tok"], cutoffs=(20.0, 10.0))


# ----------------------------------------------------------------------------- reference classifier, length

def test_wikiref_filter(models, english):
    c = models["classifier"]
    assert c["valid"] > 0 and c["precision"] > 0.9 and c["recall"] > 0.9
    f = WikiRefFilter(models["wikiref"])
    good, spam = run(f, " ".join(english[2500:2506]), " ".join(sentences(SPAM, 6, 12345)))
    assert isinstance(good, Document) and good.metadata["wikiref_score"] >= 0.5
    assert isinstance(spam, Dropped) and spam.reason == "not classified as a Wikipedia reference (p < 0.5)"
    assert spam.doc.metadata["wikiref_score"] < 0.5
    (strict,) = run(WikiRefFilter(models["wikiref"], threshold=1.0), " ".join(english[2500:2506]))
    assert isinstance(strict, Dropped)


def test_min_length():
    f = MinLength(10, min_words=3)
    a, b, c, d = run(f, "x" * 10, "  " + "x" * 9 + "  \n", "", "0123456789 ab cd")
    assert isinstance(a, Dropped) and a.reason == "fewer than 3 words"
    assert b.reason == c.reason == "fewer than 10 characters"
    assert isinstance(d, Document)


# ----------------------------------------------------------------------------- the commoncrawl pipeline

def test_commoncrawl_end_to_end(tmp_path, models, english, capsys):
    en_pages = ["\n".join([BOILERPLATE, *english[2000 + 12 * i:2000 + 12 * (i + 1)]]) for i in range(8)]
    pages = [(f"http://en.example/{i}", p) for i, p in enumerate(en_pages)]
    pages += [
        ("http://fr.example/", "\n".join([BOILERPLATE, *sentences(FR, 12, 5)])),
        ("http://de.example/", "\n".join(sentences(DE, 12, 6))),
        ("http://short.example/", "Click here to continue."),
        ("http://empty.example/", ""),
        ("http://copy.example/", en_pages[0]),  # every line seen before: nothing left
        ("http://spam.example/", "\n".join(sentences(SPAM, 12, 7))),
        ("http://bytes.example/", en_pages[7].replace("the", "th\ufffde").encode() + b"\xff\xfe"),
    ]
    inp = tmp_path / "wet"
    write_wet(inp / "CC-MAIN-0.warc.wet.gz", pages[:8])
    write_wet(inp / "CC-MAIN-1.warc.wet.gz", pages[8:])
    out = tmp_path / "out"
    args = dict(source="commoncrawl", input=[str(inp)], output=str(out), workers=2, keep_excluded=True,
                lid_model=str(models["lid"]), lm_model=str(models["lm"]), lm_tokenizer=str(models["tok"]),
                wikiref_model=str(models["wikiref"]))
    assert run_command(**args) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["read"]["documents"] == len(pages) and not stats["read"]["malformed"]
    by = {s["name"]: s for s in stats["steps"]}
    assert list(by) == ["line_dedup", "min_length", "language_id", "perplexity", "wikiref"]
    assert by["line_dedup"]["lines_removed"]["line seen earlier in the shard group (CCNet)"]["lines"] >= 12 + 8
    assert by["line_dedup"]["dropped"]["no lines left after line dedup"]["documents"] == 2  # empty + copy
    assert by["min_length"]["dropped"]["fewer than 300 characters"]["documents"] == 1
    lang = by["language_id"]["dropped"]
    assert lang["language fr not kept"]["documents"] == 1 and lang["language de not kept"]["documents"] == 1
    reached = by["perplexity"]["in"]["documents"]
    assert reached >= 8

    kept = [d for p in sorted((out / "documents").glob("*.jsonl.gz")) for d in read_jsonl(p)]
    excluded = {d.id: d for p in sorted((out / "excluded").glob("*.jsonl.gz")) for d in read_jsonl(p)}
    scored = kept + [d for d in excluded.values() if d.metadata["excluded"]["step"] in ("perplexity", "wikiref")]
    assert len(scored) == reached
    # The cut-offs are the 30th / 60th percentiles of the perplexities of exactly these documents.
    lo, hi = np.percentile([d.metadata["perplexity"] for d in scored], [30, 60])
    desc = by["perplexity"]["description"]
    assert f"percentiles of {reached} documents" in desc
    cut_lo, cut_hi = (float(x.split()[0]) for x in desc.split("<= ")[1:3])
    assert cut_lo == pytest.approx(lo, abs=0.1) and cut_hi == pytest.approx(hi, abs=0.1)
    tail = [d for d in scored if d.metadata["bucket"] == "tail"]
    assert tail and by["perplexity"]["dropped"]["perplexity bucket tail not kept"]["documents"] == len(tail)
    assert kept and max(d.metadata["perplexity"] for d in kept) < min(d.metadata["perplexity"] for d in tail)
    for d in kept:
        assert d.metadata["language"] == "en" and d.metadata["bucket"] in ("head", "middle")
        assert d.metadata["wikiref_score"] >= 0.5 and d.metadata["url"].startswith("http://")
    assert "http://spam.example/" not in {d.metadata["url"] for d in kept}
    assert sum(d.text.count(BOILERPLATE) for d in kept) <= 1
    assert "KenLM perplexity" in (out / "DATACARD.md").read_text()
    # Resuming finds the same pipeline (the sampled cut-offs are deterministic) and redoes nothing.
    assert run_command(**args) == 0
    assert json.loads((out / "stats.json").read_text()) == stats
    # Opting out of the reference classifier is recorded in the data card.
    no_ref = {**args, "output": str(tmp_path / "out2"), "wikiref_model": None, "skip_wikiref": True,
              "perplexity_cutoffs": [1e9, 1e9]}
    assert run_command(**no_ref) == 0
    card = (tmp_path / "out2" / "DATACARD.md").read_text()
    assert "NOT APPLIED" in card and "--skip-wikiref" in card


def test_c4_language_id(tmp_path, models, english):
    en = " ".join(x.rstrip(".,;:!?") + "." for x in english[2200:2210])
    fr = " ".join(sentences(FR, 10, 11))
    with ShardWriter(tmp_path / "in" / "c4.jsonl.gz") as w:
        w.write(Document("en", en, "c4"))
        w.write(Document("fr", fr, "c4"))
    run_command(source="c4", input=[str(tmp_path / "in")], output=str(tmp_path / "out"), workers=1,
                lid_model=str(models["lid"]))
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert [s["name"] for s in stats["steps"]] == ["line_dedup", "c4_rules", "language_id"]
    assert stats["steps"][2]["dropped"] == {"language fr not kept": stats["steps"][2]["dropped"]["language fr "
                                                                                                  "not kept"]}
    (doc,) = read_jsonl(next((tmp_path / "out" / "documents").glob("*.jsonl.gz")))
    assert doc.id == "en" and doc.metadata["language"] == "en"
