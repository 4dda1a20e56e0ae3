"""`llamaworks data run SOURCE`: one pipeline (reader + steps) per source of Table 1."""

from __future__ import annotations

from typing import Literal

from llamaworks.cli import Annotated, Arg

SOURCES = ("books", "c4", "github", "arxiv", "stackexchange", "wikipedia", "jsonl")


def pipeline(source: str, *, badwords: str | None = None, dedup_threshold: float = 0.9,
             sites: list[str] | None = None, languages: list[str] | None = None):
    """(reader, steps) for a source."""
    if source == "books":
        from llamaworks.data.books import GutenbergCleaner, GutenbergReader
        from llamaworks.data.dedup import MinHashDedup

        return GutenbergReader(), [GutenbergCleaner(), MinHashDedup(threshold=dedup_threshold)]
    if source == "c4":
        from llamaworks.data.c4 import C4Filter
        from llamaworks.data.dedup import LineDedup
        from llamaworks.data.executor import JsonlReader

        # Line dedup first (CCNet order: dedup, then quality), so repeated boilerplate lines do
        # not count toward C4's sentence minimum.
        return JsonlReader(), [LineDedup(), C4Filter(badwords=badwords)]
    if source == "github":
        from llamaworks.data.dedup import ExactDedup
        from llamaworks.data.github import CodeQualityFilter, GithubReader, LicenseFilter, LicenseHeaderCleaner

        return GithubReader(), [LicenseFilter(), CodeQualityFilter(), LicenseHeaderCleaner(), ExactDedup()]
    if source == "arxiv":
        from llamaworks.data.arxiv import ArxivCleaner, ArxivReader

        return ArxivReader(), [ArxivCleaner()]
    if source == "stackexchange":
        from llamaworks.data.stackexchange import SiteFilter, StackExchangeReader

        return StackExchangeReader(), [SiteFilter(sites)]
    if source == "wikipedia":
        from llamaworks.data.wikipedia import LanguageFilter, WikiCleaner, WikipediaReader

        return WikipediaReader(), [LanguageFilter(languages), WikiCleaner()]
    if source == "jsonl":
        from llamaworks.data.executor import JsonlReader

        return JsonlReader(), []
    raise ValueError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")


def run_command(
    source: Annotated[Literal["books", "c4", "github", "arxiv", "stackexchange", "wikipedia", "jsonl"],
                      Arg("which source's pipeline to run (section 2.1)", positional=True)],
    input: Annotated[list[str], Arg("input files or folders in the source's public format", metavar="PATH")],
    output: Annotated[str, Arg("output folder: documents/, stats.json, DATACARD.md", metavar="DIR")],
    workers: Annotated[int | None, Arg("worker processes (default: all cores)")] = None,
    keep_excluded: Annotated[bool, Arg("write dropped documents with their reason under DIR/excluded/")] = False,
    on_malformed: Annotated[Literal["skip", "stop"], Arg("a malformed input file: skip it, or stop the run")] = "skip",
    compression: Annotated[Literal["gzip", "zstd"], Arg("shard compression")] = "gzip",
    overwrite: Annotated[bool, Arg("replace an existing run in DIR instead of resuming it")] = False,
    badwords: Annotated[str | None, Arg("c4: bad-words list, one per line (C4 used LDNOOBW 'en')")] = None,
    dedup_threshold: Annotated[float, Arg("books: MinHash Jaccard threshold for near-duplicates")] = 0.9,
    sites: Annotated[list[str] | None, Arg("stackexchange: sites to keep (default: the 28 largest)")] = None,
    languages: Annotated[list[str] | None, Arg("wikipedia: language codes to keep (default: the paper's 20)")] = None,
) -> int:
    """Run a source's cleaning pipeline; kept documents go to DIR/documents/ as JSONL shards that
    `llamaworks prepare --input DIR/documents` tokenises. A killed run resumes where it stopped."""
    from llamaworks.data.executor import LocalExecutor

    reader, steps = pipeline(source, badwords=badwords, dedup_threshold=dedup_threshold, sites=sites,
                             languages=languages)
    ex = LocalExecutor(output, workers=workers, keep_excluded=keep_excluded, on_malformed=on_malformed,
                       compression=compression, overwrite=overwrite)
    stats = ex.run(source, reader, steps, input)
    last = stats["steps"][-1]["kept"]["documents"] if stats["steps"] else stats["read"]["documents"]
    print(f"{source}: read {stats['read']['documents']} documents, kept {last}; see {output}/DATACARD.md")
    return 0
