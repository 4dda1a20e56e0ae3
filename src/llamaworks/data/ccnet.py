"""CCNet's model-based steps for CommonCrawl (Wenzek et al. 2020; paper section 2.1) and the
commands that train their models.

The commoncrawl pipeline (data/command.py) is: WET reader -> line dedup -> minimum length ->
`LanguageId` (fastText, keep English) -> `PerplexityFilter` (KenLM 5-gram on SentencePiece
pieces, head/middle/tail buckets) -> `WikiRefFilter` (fastText "referenced by Wikipedia vs
random page" classifier). CCNet also drops short pages right after dedup (its `min_len`);
doing it before the models spares them the pages that would go anyway.

Steps hold model *paths*, never loaded models: they are pickled into worker processes, and
each process loads a model once, on first use (`_load`).

`train_lm_command` estimates the n-gram model itself (interpolated modified Kneser-Ney, in
memory, with numpy) because KenLM's `lmplz` is a separate C++ build; for corpora of billions
of tokens use lmplz on the same tokenised text (`data train-lm --pieces`), whose ARPA output
the filter reads the same way.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import random
import re
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from llamaworks.args import Arg
from llamaworks.atomic import atomic_open, atomic_write_bytes, atomic_write_text
from llamaworks.data.document import Document, read_jsonl
from llamaworks.data.step import Dropped, Filter, Step
from llamaworks.tokenizer import Tokenizer

log = logging.getLogger(__name__)

LID_THRESHOLD = 0.5  # CCNet keeps a language when fastText's top score is >= 0.5 (Wenzek et al. 2020, 3.2)
PERCENTILES = (30.0, 60.0)  # CCNet's head / middle / tail split at the 30th and 60th perplexity percentiles
BUCKETS = ("head", "middle", "tail")
MIN_CHARS = 300  # CCNet's min_len: pages shorter than this (characters, after line dedup) are dropped
PERPLEXITY_SAMPLE = 20_000  # documents scored to place percentile cut-offs (CCNet fixed its from a sample too)
REF_LABEL, RANDOM_LABEL = "__label__wikiref", "__label__random"

LID_HOWTO = ("download the public fastText model lid.176.bin "
             "(https://fasttext.cc/docs/en/language-identification.html) or train one with fastText "
             "(labels __label__<language code>)")
LM_HOWTO = ("train one with `llamaworks data train-lm --input DOCS --tokenizer TOKENIZER.model --output lm.arpa` "
            "(CCNet trained it on Wikipedia: the output of `llamaworks data run wikipedia`), or with KenLM's lmplz")
WIKIREF_HOWTO = ("train one with `llamaworks data train-classifier --positive REFERENCED_PAGES --negative "
                 "RANDOM_PAGES --output wikiref.bin`, or pass --skip-wikiref to run without this paper step")


# ----------------------------------------------------------------------------- models

_LOADED: dict[tuple, Any] = {}  # (kind, path, mtime, size) -> model; per process, filled on first use


def _require(path: str | os.PathLike, what: str, option: str, howto: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{option}: {what} {p} not found; {howto}")
    return p


def _load(kind: str, path: str) -> Any:
    st = Path(path).stat()
    key = (kind, str(Path(path).resolve()), st.st_mtime_ns, st.st_size)  # a rewritten file is loaded again
    if key not in _LOADED:
        if kind == "fasttext":
            try:
                import fasttext
            except ImportError:
                raise ValueError("fastText models need the `fasttext` module: pip install 'llamaworks[data]' "
                                 "(package fasttext-numpy2)") from None
            try:
                _LOADED[key] = fasttext.load_model(str(path))
            except ValueError as e:
                raise ValueError(f"{path} is not a fastText model ({e})") from None
        elif kind == "kenlm":
            try:
                import kenlm
            except ImportError:
                raise ValueError("the perplexity filter needs the `kenlm` module: pip install 'llamaworks[data]'") \
                    from None
            try:
                _LOADED[key] = kenlm.Model(str(path))
            except (OSError, RuntimeError) as e:
                raise ValueError(f"{path} is not a KenLM model (ARPA or binary): {e}") from None
        else:
            tok = Tokenizer(path)
            # Piece strings by id, once: the LM's words are the pieces (CCNet scores "▁the ▁cat").
            _LOADED[key] = (tok, [tok.id_to_piece(i) for i in range(tok.vocab_size)])
    return _LOADED[key]


def _one_line(text: str) -> str:
    return " ".join(text.split())  # fastText predicts on one line: newlines (and runs of spaces) -> one space


# ----------------------------------------------------------------------------- text normalisation

_DIGITS = re.compile(r"\d")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_QUOTES_DASHES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201c": '"', "\u201d": '"',
                                "\u201e": '"', "\u00ab": '"', "\u00bb": '"', "\u2013": "-", "\u2014": "-",
                                "\u2212": "-"})


def normalize_for_lm(line: str) -> str:
    """CCNet's normalisation before the LM (text_normalizer.normalize): lowercase, accents
    stripped, digits -> 0, Unicode punctuation mapped to ASCII (kept: unlike the dedup
    normalisation, punctuation is part of what the LM judges), control characters removed."""
    line = " ".join(line.split())
    if line.isascii():  # the common case, and 10x faster than the per-character path below
        return _DIGITS.sub("0", _CONTROL.sub("", line.lower()))
    # NFKC: full-width forms, ligatures and the ellipsis to ASCII; then NFD splits off the accents.
    line = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", line).translate(_QUOTES_DASHES).lower())
    line = "".join(c for c in line if unicodedata.category(c) not in ("Mn", "Cc", "Cf"))
    return " ".join(_DIGITS.sub("0", line).split())


def tokenize_for_lm(text: str, tokenizer: str | os.PathLike) -> Iterator[list[str]]:
    """The LM's sentences of a document: one per non-blank line, normalised, as SentencePiece pieces."""
    tok, pieces = _load("spm", str(tokenizer))
    for line in text.split("\n"):
        norm = normalize_for_lm(line)
        if norm:
            yield [pieces[i] for i in tok.encode(norm, bos=False)]


# ----------------------------------------------------------------------------- steps

class LanguageId(Filter):
    name = "language_id"

    def __init__(self, model: str | os.PathLike, languages: Sequence[str] = ("en",),
                 threshold: float = LID_THRESHOLD):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"--lid-threshold must be in [0, 1], got {threshold} (CCNet: {LID_THRESHOLD})")
        if not languages:
            raise ValueError("--lid-languages is empty: name at least one language code, e.g. en")
        self.model = str(_require(model, "language-id model", "--lid-model", LID_HOWTO))
        self.languages, self.threshold = tuple(languages), threshold

    def reason(self, doc):
        text = _one_line(doc.text)
        if not text:
            return "no text for language id"
        (label,), (score,) = _load("fasttext", self.model).predict(text, k=1)
        lang = label.removeprefix("__label__")
        doc.metadata = {**doc.metadata, "language": lang, "language_score": round(float(score), 4)}
        if lang not in self.languages:
            return f"language {lang} not kept"
        if score < self.threshold:
            return f"language score below {self.threshold}"
        return None

    def describe(self):
        return (f"fastText language id ({Path(self.model).name}): keep {', '.join(self.languages)} "
                f"with score >= {self.threshold}")


def perplexity(text: str, lm: str | os.PathLike, tokenizer: str | os.PathLike) -> float | None:
    """CCNet's document perplexity: 10 ** (-sum of log10 p / tokens) over its lines, each line
    scored as a sentence (<s> ... </s>, the </s> counted as a token). None: no token to score."""
    model = _load("kenlm", str(lm))
    logp, n = 0.0, 0
    for pieces in tokenize_for_lm(text, tokenizer):
        logp += model.score(" ".join(pieces), bos=True, eos=True)
        n += len(pieces) + 1
    return 10.0 ** (-logp / n) if n else None


def bucket(ppl: float, cutoffs: tuple[float, float]) -> str:
    """head: perplexity <= first cut-off; middle: <= second; tail: above (lower = more like the LM's text)."""
    return "head" if ppl <= cutoffs[0] else "middle" if ppl <= cutoffs[1] else "tail"


def percentile_cutoffs(perplexities: Sequence[float], percentiles: tuple[float, float] = PERCENTILES) \
        -> tuple[float, float]:
    if len(perplexities) < 2:
        raise ValueError(f"{len(perplexities)} documents reached the perplexity filter: too few to place "
                         "percentile cut-offs; pass explicit --perplexity-cutoffs HEAD_MAX MIDDLE_MAX")
    lo, hi = np.percentile(np.asarray(perplexities, dtype=np.float64), percentiles)
    return float(lo), float(hi)


class PerplexityFilter(Step):
    """Buckets pages by perplexity under an LM of clean text and keeps the chosen buckets.

    Percentile cut-offs need the perplexities of other documents before the first page can be
    bucketed. A global_state step cannot provide that here: the executor streams a global stage
    shard by shard and writes each shard's output before reading the next one, so no step sees
    all perplexities before it must decide. We use two passes instead, as CCNet did (its
    cut-offs were computed once from a sample and then applied as fixed numbers):
    `fit_perplexity_cutoffs` scores the first `sample` documents that reach this step (through
    the steps before it) and fixes the cut-offs, then the run applies them in parallel. The
    sample is the head of the run's own input, deterministic, so a resumed run gets the same
    cut-offs (they are part of describe(), hence of the run's fingerprint).
    """

    name = "perplexity"

    def __init__(self, lm: str | os.PathLike, tokenizer: str | os.PathLike,
                 cutoffs: tuple[float, float] | None = None, percentiles: tuple[float, float] = PERCENTILES,
                 keep: Sequence[str] = ("head", "middle"), sample: int = PERPLEXITY_SAMPLE):
        self.lm = str(_require(lm, "KenLM model", "--lm-model", LM_HOWTO))
        self.tokenizer = str(_require(tokenizer, "SentencePiece model", "--lm-tokenizer",
                                      "pass the tokenizer .model the LM was trained with"))
        bad = sorted(set(keep) - set(BUCKETS))
        if bad or not keep:
            raise ValueError(f"--keep-buckets {list(keep)}: choose among {', '.join(BUCKETS)} (at least one)")
        if cutoffs is not None and not (len(cutoffs) == 2 and 0 < cutoffs[0] <= cutoffs[1]):
            raise ValueError(f"--perplexity-cutoffs {list(cutoffs)}: give two increasing positive perplexities "
                             "HEAD_MAX MIDDLE_MAX")
        if not (len(percentiles) == 2 and 0 < percentiles[0] <= percentiles[1] < 100):
            raise ValueError(f"--perplexity-percentiles {list(percentiles)}: give two increasing percentiles in "
                             f"(0, 100), CCNet's are {PERCENTILES[0]:g} {PERCENTILES[1]:g}")
        if sample < 2:
            raise ValueError(f"--perplexity-sample must be at least 2, got {sample}")
        self.cutoffs = None if cutoffs is None else (float(cutoffs[0]), float(cutoffs[1]))
        self.percentiles, self.keep, self.sample = tuple(percentiles), tuple(keep), sample
        self.fitted_on: int | None = None  # documents the percentile cut-offs were computed from

    def score(self, doc: Document) -> float | None:
        return perplexity(doc.text, self.lm, self.tokenizer)

    def run(self, docs, rank=0, world_size=1):
        if self.cutoffs is None:
            raise ValueError("the perplexity filter has percentile cut-offs but was not fitted: call fit_perplexity_"
                             "cutoffs(reader, steps, inputs) before running, or pass --perplexity-cutoffs")
        for doc in docs:
            ppl = self.score(doc)
            if ppl is None:
                yield Dropped(doc, "no tokens to score")
                continue
            b = bucket(ppl, self.cutoffs)
            doc.metadata = {**doc.metadata, "perplexity": round(ppl, 1), "bucket": b}
            yield doc if b in self.keep else Dropped(doc, f"perplexity bucket {b} not kept")

    def describe(self):
        if self.cutoffs is None:
            cut = f"cut-offs at the {self.percentiles[0]:g}th / {self.percentiles[1]:g}th percentiles (not fitted)"
        elif self.fitted_on is not None:
            cut = (f"head <= {self.cutoffs[0]:.6g} < middle <= {self.cutoffs[1]:.6g} < tail (the "
                   f"{self.percentiles[0]:g}th / {self.percentiles[1]:g}th percentiles of {self.fitted_on} documents)")
        else:
            cut = f"head <= {self.cutoffs[0]:.6g} < middle <= {self.cutoffs[1]:.6g} < tail (given)"
        return (f"KenLM perplexity ({Path(self.lm).name}, pieces of {Path(self.tokenizer).name}): {cut}; "
                f"keep {', '.join(self.keep)}")


def _docs_only(events) -> Iterator[Document]:
    return (e for e in events if isinstance(e, Document))


def _read_quietly(reader, files) -> Iterator[Document]:
    for f in files:
        try:
            yield from reader.read(f)
        except Exception as e:  # the run proper reports (or stops on) malformed files
            log.warning("perplexity sample: skipping the rest of %s (%s)", f, e)


def fit_perplexity_cutoffs(reader, steps: list[Step], inputs: Iterable[str | os.PathLike]) -> None:
    """First pass for percentile cut-offs (see PerplexityFilter): run the input's first documents
    through fresh copies of the steps before each unfitted PerplexityFilter and fix its cut-offs."""
    for i, step in enumerate(steps):
        if not isinstance(step, PerplexityFilter) or step.cutoffs is not None:
            continue
        stream = _read_quietly(reader, reader.files(inputs))
        for before in copy.deepcopy(steps[:i]):
            stream = _docs_only(before.run(stream, 0, 1))
        scores = [p for p in map(step.score, itertools.islice(stream, step.sample)) if p is not None]
        step.cutoffs = percentile_cutoffs(scores, step.percentiles)
        step.fitted_on = len(scores)


class WikiRefFilter(Filter):
    name = "wikiref"

    def __init__(self, model: str | os.PathLike, threshold: float = 0.5):
        # 0.5: with two labels and a softmax, P(reference) >= 0.5 is the classifier's own decision, i.e.
        # the paper's "pages not classified as references are discarded" (section 2.1).
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"--wikiref-threshold must be in [0, 1], got {threshold}")
        self.model = str(_require(model, "reference classifier", "--wikiref-model", WIKIREF_HOWTO))
        self.threshold = threshold

    def probability(self, text: str) -> float:
        model = _load("fasttext", self.model)
        if REF_LABEL not in model.labels:
            raise ValueError(f"{self.model} has labels {model.labels}, not {REF_LABEL}: it is not a reference "
                             f"classifier from `llamaworks data train-classifier`")
        labels, probs = model.predict(classifier_text(text), k=-1)
        return float(dict(zip(labels, probs)).get(REF_LABEL, 0.0))

    def reason(self, doc):
        p = self.probability(doc.text)
        doc.metadata = {**doc.metadata, "wikiref_score": round(p, 4)}
        return None if p >= self.threshold else f"not classified as a Wikipedia reference (p < {self.threshold})"

    def describe(self):
        return f"fastText Wikipedia-reference classifier ({Path(self.model).name}): keep P(reference) >= " \
               f"{self.threshold}"


class NotApplied(Step):
    """Stands in the data card for a paper step the user chose to skip, so the omission is on record."""

    def __init__(self, name: str, why: str):
        self.name, self.why = name, why

    def run(self, docs, rank=0, world_size=1):
        yield from docs

    def describe(self):
        return f"NOT APPLIED: {self.why}"


class MinLength(Filter):
    name = "min_length"

    def __init__(self, min_chars: int = MIN_CHARS, min_words: int = 0):
        if min_chars < 0 or min_words < 0:
            raise ValueError(f"--min-chars / min_words must be >= 0, got {min_chars} / {min_words}")
        self.min_chars, self.min_words = min_chars, min_words

    def reason(self, doc):
        if len(doc.text.strip()) < self.min_chars:
            return f"fewer than {self.min_chars} characters"
        if self.min_words and len(doc.text.split()) < self.min_words:
            return f"fewer than {self.min_words} words"
        return None

    def describe(self):
        words = f" and {self.min_words} words" if self.min_words else ""
        return f"drop documents under {self.min_chars} characters{words}"


# ----------------------------------------------------------------------------- pipeline options

@dataclass
class CCNetOptions:
    lid_model: str | None = None
    lid_languages: list[str] = field(default_factory=lambda: ["en"])
    lid_threshold: float = LID_THRESHOLD
    lm_model: str | None = None
    lm_tokenizer: str | None = None
    perplexity_cutoffs: list[float] | None = None
    perplexity_percentiles: list[float] = field(default_factory=lambda: list(PERCENTILES))
    perplexity_sample: int = PERPLEXITY_SAMPLE
    keep_buckets: list[str] = field(default_factory=lambda: ["head", "middle"])
    wikiref_model: str | None = None
    wikiref_threshold: float = 0.5
    skip_wikiref: bool = False
    min_chars: int = MIN_CHARS


def ccnet_steps(o: CCNetOptions) -> list[Step]:
    """The model-based steps of the commoncrawl pipeline (after line dedup), in CCNet's order."""
    if o.lid_model is None:
        raise ValueError(f"commoncrawl needs --lid-model (language id, section 2.1): {LID_HOWTO}")
    if o.lm_model is None or o.lm_tokenizer is None:
        raise ValueError("commoncrawl needs --lm-model and --lm-tokenizer (the perplexity filter, section 2.1): "
                         + LM_HOWTO)
    if o.wikiref_model is None and not o.skip_wikiref:
        raise ValueError("commoncrawl needs --wikiref-model (the paper drops pages not classified as Wikipedia "
                         f"references, section 2.1): {WIKIREF_HOWTO}")
    if o.wikiref_model is not None and o.skip_wikiref:
        raise ValueError("--wikiref-model and --skip-wikiref contradict each other: pass one")
    steps: list[Step] = [
        MinLength(o.min_chars),
        LanguageId(o.lid_model, o.lid_languages, o.lid_threshold),
        PerplexityFilter(o.lm_model, o.lm_tokenizer,
                         cutoffs=tuple(o.perplexity_cutoffs) if o.perplexity_cutoffs is not None else None,
                         percentiles=tuple(o.perplexity_percentiles), keep=o.keep_buckets,
                         sample=o.perplexity_sample),
    ]
    if o.skip_wikiref:
        steps.append(NotApplied("wikiref", "the Wikipedia-reference classifier of section 2.1 was skipped "
                                           "(--skip-wikiref)"))
    else:
        steps.append(WikiRefFilter(o.wikiref_model, o.wikiref_threshold))
    return steps


# ----------------------------------------------------------------------------- training data

_DOC_PATTERNS = ("*.jsonl", "*.jsonl.gz", "*.jsonl.zst", "*.txt")


def iter_texts(paths: Iterable[str | os.PathLike], option: str) -> Iterator[str]:
    """Texts of JSONL document shards (as `data run` writes them) and of .txt files (one document
    per non-blank line); folders are walked for both."""
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise FileNotFoundError(f"{option}: {p} does not exist; pass JSONL document shards, .txt files or "
                                    "folders of them")
        files = [p] if p.is_file() else sorted(f for pat in _DOC_PATTERNS for f in p.rglob(pat))
        for f in files:
            if f.name.endswith(".txt"):
                with open(f, encoding="utf-8", errors="replace") as fh:
                    yield from (line for line in fh if line.strip())
            else:
                yield from (d.text for d in read_jsonl(f))


def classifier_text(text: str) -> str:
    # The same normalisation as the LM's (case, accents, digits), on one line: fastText's input.
    return normalize_for_lm(text.replace("\n", " "))


def train_classifier_command(
    positive: Annotated[list[str], Arg("pages used as references in Wikipedia: JSONL document shards, .txt files "
                                       "(one page per line) or folders", metavar="PATH")],
    negative: Annotated[list[str], Arg("randomly sampled pages (e.g. CommonCrawl), same formats", metavar="PATH")],
    output: Annotated[str, Arg("where to write the fastText model, e.g. wikiref.bin", metavar="FILE")],
    epochs: Annotated[int, Arg("training epochs")] = 5,
    lr: Annotated[float, Arg("learning rate")] = 0.1,
    wordngrams: Annotated[int, Arg("word n-gram features (fastText -wordNgrams)")] = 2,
    dim: Annotated[int, Arg("embedding size")] = 100,
    min_count: Annotated[int, Arg("ignore words seen fewer times")] = 1,
    valid_fraction: Annotated[float, Arg("share of the pages held out to report precision / recall")] = 0.1,
    threads: Annotated[int | None, Arg("training threads (default: all cores)")] = None,
    seed: Annotated[int, Arg("seed of the shuffle and the held-out split")] = 0,
) -> dict:
    """Train the linear classifier of section 2.1 that tells pages used as references in
    Wikipedia from random pages (labels __label__wikiref / __label__random); `data run
    commoncrawl --wikiref-model FILE` drops pages it does not classify as references."""
    try:
        import fasttext
    except ImportError:
        raise ValueError("training the classifier needs `fasttext`: pip install 'llamaworks[data]'") from None
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"--valid-fraction must be in [0, 1), got {valid_fraction}")
    examples = [(REF_LABEL, t) for t in map(classifier_text, iter_texts(positive, "--positive")) if t]
    n_pos = len(examples)
    examples += [(RANDOM_LABEL, t) for t in map(classifier_text, iter_texts(negative, "--negative")) if t]
    n_neg = len(examples) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"need pages of both kinds, got {n_pos} positive and {n_neg} negative")
    random.Random(seed).shuffle(examples)
    n_valid = int(len(examples) * valid_fraction)
    valid, train = examples[:n_valid], examples[n_valid:]
    with tempfile.TemporaryDirectory(prefix="llamaworks-wikiref-") as tmp:
        data = Path(tmp) / "train.txt"
        data.write_text("".join(f"{label} {text}\n" for label, text in train), encoding="utf-8")
        model = fasttext.train_supervised(str(data), epoch=epochs, lr=lr, wordNgrams=wordngrams, dim=dim,
                                          minCount=min_count, thread=threads or os.cpu_count() or 1, seed=seed,
                                          verbose=0)
        model.save_model(str(Path(tmp) / "model.bin"))
        atomic_write_bytes(output, (Path(tmp) / "model.bin").read_bytes())
    result: dict[str, Any] = {"positive": n_pos, "negative": n_neg, "train": len(train), "valid": n_valid}
    if valid:
        tp = fp = fn = 0
        for label, text in valid:
            labels, probs = model.predict(text, k=-1)
            pred = dict(zip(labels, probs)).get(REF_LABEL, 0.0) >= 0.5
            truth = label == REF_LABEL
            tp, fp, fn = tp + (pred and truth), fp + (pred and not truth), fn + (truth and not pred)
        result["precision"] = tp / (tp + fp) if tp + fp else float("nan")
        result["recall"] = tp / (tp + fn) if tp + fn else float("nan")
        print(f"held-out {n_valid} pages: precision {result['precision']:.3f}, recall {result['recall']:.3f} "
              "(reference = positive, P >= 0.5)")
    print(f"wrote {output}: trained on {len(train)} pages ({n_pos} references, {n_neg} random in all)")
    return result


# ----------------------------------------------------------------------------- n-gram LM (Kneser-Ney)

UNK, BOS, EOS = 0, 1, 2
_FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # as lmplz --discount_fallback, when count-of-counts are degenerate


def _rec(rows: np.ndarray) -> np.ndarray:
    """(M, k) int rows -> (M,) structured records, which numpy compares lexicographically."""
    rows = np.ascontiguousarray(rows)
    return rows.view([(f"f{j}", rows.dtype) for j in range(rows.shape[1])]).ravel()


def _find(table: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Index of each query row in `table` (unique rows sorted lexicographically, as np.unique gives)."""
    t, q = _rec(table), _rec(queries)
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
    _require(tokenizer, "SentencePiece model", "--tokenizer", "pass the project tokenizer .model "
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

