"""CCNet's model-based steps for CommonCrawl (Wenzek et al. 2020; paper section 2.1) and the
`data train-classifier` command that trains the Wikipedia-reference classifier they use.

The commoncrawl pipeline (data/sources.py) is: WET reader -> line dedup -> minimum length ->
`LanguageId` (fastText, keep English) -> `PerplexityFilter` (KenLM 5-gram on SentencePiece
pieces, head/middle/tail buckets) -> `WikiRefFilter` (fastText "referenced by Wikipedia vs
random page" classifier). CCNet also drops short pages right after dedup (its `min_len`);
doing it before the models spares them the pages that would go anyway.

Steps hold model *paths*, never loaded models: they are pickled into worker processes, and
each process loads a model once, on first use (`_load`).

The perplexity filter's n-gram model comes from `data train-lm` (data/ngram.py), which
tokenises its training text with this module's `tokenize_for_lm`, as the filter does.
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
from llamaworks.atomic import atomic_write_bytes
from llamaworks.data.document import Document, read_jsonl
from llamaworks.data.step import Dropped, Filter, Step
from llamaworks.tokenizer import load_tokenizer

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


def require_file(path: str | os.PathLike, what: str, option: str, howto: str) -> Path:
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
            tok = load_tokenizer(path)
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
        self.model = str(require_file(model, "language-id model", "--lid-model", LID_HOWTO))
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
        self.lm = str(require_file(lm, "KenLM model", "--lm-model", LM_HOWTO))
        self.tokenizer = str(require_file(tokenizer, "SentencePiece model", "--lm-tokenizer",
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
        self.model = str(require_file(model, "reference classifier", "--wikiref-model", WIKIREF_HOWTO))
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


def ccnet_steps(opts: CCNetOptions) -> list[Step]:
    """The model-based steps of the commoncrawl pipeline (after line dedup), in CCNet's order."""
    if opts.lid_model is None:
        raise ValueError(f"commoncrawl needs --lid-model (language id, section 2.1): {LID_HOWTO}")
    if opts.lm_model is None or opts.lm_tokenizer is None:
        raise ValueError("commoncrawl needs --lm-model and --lm-tokenizer (the perplexity filter, section 2.1): "
                         + LM_HOWTO)
    if opts.wikiref_model is None and not opts.skip_wikiref:
        raise ValueError("commoncrawl needs --wikiref-model (the paper drops pages not classified as Wikipedia "
                         f"references, section 2.1): {WIKIREF_HOWTO}")
    if opts.wikiref_model is not None and opts.skip_wikiref:
        raise ValueError("--wikiref-model and --skip-wikiref contradict each other: pass one")
    steps: list[Step] = [
        MinLength(opts.min_chars),
        LanguageId(opts.lid_model, opts.lid_languages, opts.lid_threshold),
        PerplexityFilter(opts.lm_model, opts.lm_tokenizer,
                         cutoffs=tuple(opts.perplexity_cutoffs) if opts.perplexity_cutoffs is not None else None,
                         percentiles=tuple(opts.perplexity_percentiles), keep=opts.keep_buckets,
                         sample=opts.perplexity_sample),
    ]
    if opts.skip_wikiref:
        steps.append(NotApplied("wikiref", "the Wikipedia-reference classifier of section 2.1 was skipped "
                                           "(--skip-wikiref)"))
    else:
        steps.append(WikiRefFilter(opts.wikiref_model, opts.wikiref_threshold))
    return steps


# ----------------------------------------------------------------------------- training data
# Text for `data train-classifier` (below) and `data train-lm` (data/ngram.py).

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
