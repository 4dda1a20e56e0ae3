"""The sources `llamaworks data run SOURCE` can clean: one table, `SOURCES`, name -> `Source`.

A source is its reader (the public format, one document per page / book / paper) and the
steps that clean it (section 2.1). The command's `source` choices, its --help listing and
`pipeline()` all read this table, so adding a source is adding one `Source` here.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from llamaworks.data.arxiv import ArxivCleaner, ArxivReader
from llamaworks.data.books import GutenbergCleaner, GutenbergReader
from llamaworks.data.c4 import C4Filter
from llamaworks.data.ccnet import CCNetOptions, LanguageId, ccnet_steps
from llamaworks.data.commoncrawl import WetReader
from llamaworks.data.dedup import ExactDedup, LineDedup, MinHashDedup
from llamaworks.data.executor import JsonlReader, Reader
from llamaworks.data.github import CodeQualityFilter, GithubReader, LicenseFilter, LicenseHeaderCleaner
from llamaworks.data.stackexchange import SiteFilter, StackExchangeReader
from llamaworks.data.step import Step
from llamaworks.data.wikipedia import LanguageFilter, WikiCleaner, WikipediaReader

__all__ = ["PipelineOptions", "Source", "SOURCES", "SourceName", "get_source", "pipeline", "describe_sources"]


@dataclass(frozen=True)
class PipelineOptions:
    """The `data run` options that shape a source's steps; each source reads the ones it lists."""

    badwords: str | None = None
    dedup_threshold: float = 0.9
    sites: list[str] | None = None
    languages: list[str] | None = None
    ccnet: CCNetOptions | None = None  # the model options of CommonCrawl (and C4's optional language id)


@dataclass(frozen=True)
class Source:
    name: str  # the `data run` argument, and the data card's source
    help: str  # one line for `data run --help`
    table1: str | None  # the row of the paper's Table 1 it feeds (None: a plain JSONL pass-through)
    reader: Callable[[], Reader]
    steps: Callable[[PipelineOptions], list[Step]]
    options: tuple[str, ...] = ()  # the `data run` parameters its steps read, listed in --help


def commoncrawl_steps(opts: PipelineOptions) -> list[Step]:
    # CCNet dedups lines within a group of shards; here the whole run is one group (the dedup state
    # spills to disk past --dedup-memory-mb), which removes at least as much as CCNet's groups.
    return [LineDedup(), *ccnet_steps(opts.ccnet or CCNetOptions())]


def c4_steps(opts: PipelineOptions) -> list[Step]:
    # Line dedup first (CCNet order: dedup, then quality), so repeated boilerplate lines do
    # not count toward C4's sentence minimum. Language id last, on the cleaned page as C4 did;
    # optional because the public C4 (c4/en) is already English-only.
    steps: list[Step] = [LineDedup(), C4Filter(badwords=opts.badwords)]
    if opts.ccnet is not None and opts.ccnet.lid_model is not None:
        steps.append(LanguageId(opts.ccnet.lid_model, opts.ccnet.lid_languages, opts.ccnet.lid_threshold))
    return steps


CCNET_OPTIONS = ("lid_model", "lid_languages", "lid_threshold", "lm_model", "lm_tokenizer", "perplexity_cutoffs",
                 "perplexity_percentiles", "perplexity_sample", "keep_buckets", "wikiref_model", "wikiref_threshold",
                 "skip_wikiref", "min_chars")

SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("commoncrawl", "WET files; CCNet: line dedup, length, fastText language id, KenLM perplexity buckets, "
           "Wikipedia-reference classifier", "CommonCrawl", WetReader, commoncrawl_steps, CCNET_OPTIONS),
    Source("books", "Project Gutenberg .txt files; header/licence removed, MinHash near-dedup", "Books",
           GutenbergReader, lambda opts: [GutenbergCleaner(), MinHashDedup(threshold=opts.dedup_threshold)],
           ("dedup_threshold",)),
    Source("c4", "JSONL pages of C4 (c4/en); line dedup, C4's rules, optional language id", "C4", JsonlReader,
           c4_steps, ("badwords", "lid_model", "lid_languages", "lid_threshold")),
    Source("github", "repository folders or BigQuery-layout JSONL; permissive licences, quality rules, licence "
           "headers removed, exact dedup", "Github", GithubReader,
           lambda opts: [LicenseFilter(), CodeQualityFilter(), LicenseHeaderCleaner(), ExactDedup()]),
    Source("arxiv", "LaTeX sources (.tex, paper folders, tars); preamble, comments and bibliography removed, "
           "macros expanded", "ArXiv", ArxivReader, lambda opts: [ArxivCleaner()]),
    Source("stackexchange", "the dump's per-site Posts.xml; questions with answers by score, HTML removed",
           "StackExchange", StackExchangeReader, lambda opts: [SiteFilter(opts.sites)], ("sites",)),
    Source("wikipedia", "MediaWiki XML dumps; the paper's 20 languages, markup removed", "Wikipedia",
           WikipediaReader, lambda opts: [LanguageFilter(opts.languages), WikiCleaner()], ("languages",)),
    Source("jsonl", "JSONL documents, written as they are (no step)", None, JsonlReader, lambda opts: []),
]}

# The `source` argument's type: its choices are the table's names (the CLI reads them from the Literal).
SourceName = Literal[tuple(SOURCES)]  # type: ignore[valid-type]


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; choose one of {', '.join(SOURCES)}")
    return SOURCES[name]


def pipeline(source: str, *, badwords: str | None = None, dedup_threshold: float = 0.9,
             sites: list[str] | None = None, languages: list[str] | None = None, ccnet: CCNetOptions | None = None):
    """(reader, steps) for a source; `ccnet` (data.ccnet.CCNetOptions) holds the model options."""
    s = get_source(source)
    return s.reader(), s.steps(PipelineOptions(badwords=badwords, dedup_threshold=dedup_threshold, sites=sites,
                                               languages=languages, ccnet=ccnet))


def describe_sources(width: int = 100) -> str:
    """The table as text: `data run --help` lists it under the command's description."""
    name_width = max(map(len, SOURCES))
    indent = " " * (name_width + 4)
    lines = ["sources ([Table 1 row] what the pipeline does; the options it reads):"]
    for s in SOURCES.values():
        row = f"[{s.table1}]" if s.table1 else "[not in Table 1]"
        lines.append(textwrap.fill(f"{row} {s.help}", width, initial_indent=f"  {s.name:<{name_width}}  ",
                                   subsequent_indent=indent))
        if s.options:
            lines.append(textwrap.fill("options: " + " ".join("--" + opt.replace("_", "-") for opt in s.options), width,
                                       initial_indent=indent, subsequent_indent=indent + "  "))
    return "\n".join(lines)
