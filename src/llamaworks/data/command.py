"""`llamaworks data run SOURCE`: runs one source's pipeline (reader + steps) on the local or a
Dask executor. The sources, their pipelines and the options each reads are the table in
data/sources.py; this module turns the command line into `pipeline()`'s options."""

from __future__ import annotations

import inspect
from typing import Literal

from llamaworks.args import Annotated, Arg
from llamaworks.data.ccnet import CCNetOptions, fit_perplexity_cutoffs
from llamaworks.data.cluster import DaskExecutor
from llamaworks.data.executor import LocalExecutor
from llamaworks.data.sources import SourceName, describe_sources, pipeline

__all__ = ["run_command"]


def run_command(
    source: Annotated[SourceName, Arg("which source's pipeline to run (section 2.1)", positional=True)],
    input: Annotated[list[str], Arg("input files or folders in the source's public format; local paths or URLs "
                                    "(s3://bucket/prefix, globs allowed; pip install 'llamaworks[remote]')",
                                    metavar="PATH")],
    output: Annotated[str, Arg("output folder: documents/, stats.json, DATACARD.md; a local path or a URL "
                               "(s3://bucket/prefix; endpoint and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID...)",
                               metavar="DIR")],
    workers: Annotated[int | None, Arg("worker processes (default: all cores)")] = None,
    keep_excluded: Annotated[bool, Arg("write dropped documents with their reason under DIR/excluded/")] = False,
    on_malformed: Annotated[Literal["skip", "stop"], Arg("a malformed input file: skip it, or stop the run")] = "skip",
    compression: Annotated[Literal["gzip", "zstd"], Arg("shard compression")] = "gzip",
    overwrite: Annotated[bool, Arg("replace an existing run in DIR instead of resuming it")] = False,
    badwords: Annotated[str | None, Arg("c4: bad-words list, one per line (C4 used LDNOOBW 'en')")] = None,
    dedup_threshold: Annotated[float, Arg("books: MinHash Jaccard threshold for near-duplicates")] = 0.9,
    sites: Annotated[list[str] | None, Arg("stackexchange: sites to keep (default: the 28 largest)")] = None,
    languages: Annotated[list[str] | None, Arg("wikipedia: language codes to keep (default: the paper's 20)")] = None,
    cluster: Annotated[str | None, Arg("run on a Dask cluster: its scheduler address (tcp://host:8786), or local:N "
                                       "to start N worker processes here; DIR must be visible to every worker",
                                       metavar="ADDRESS")] = None,
    dedup_memory_mb: Annotated[float, Arg("memory per dedup step before its state spills to disk under DIR/.state "
                                          "(0: on disk from the start)", metavar="MB")] = 2048.0,
    dedup_partitions: Annotated[int, Arg("split each dedup step into P hash partitions whose tasks run on every "
                                         "worker (same kept documents; e.g. 4 x workers); 0: one process per "
                                         "dedup step", metavar="P")] = 0,
    lid_model: Annotated[str | None, Arg("commoncrawl (required), c4 (optional): fastText language-id model, e.g. "
                                         "the public lid.176.bin", metavar="FILE")] = None,
    lid_languages: Annotated[list[str] | None, Arg("languages to keep, fastText labels without __label__ "
                                                   "(default: en)")] = None,
    lid_threshold: Annotated[float, Arg("minimum language score (CCNet: 0.5; C4 used langdetect at 0.99, whose "
                                        "scores are on another scale)")] = 0.5,
    lm_model: Annotated[str | None, Arg("commoncrawl: KenLM model (ARPA or binary) of clean text, from `data "
                                        "train-lm`", metavar="FILE")] = None,
    lm_tokenizer: Annotated[str | None, Arg("commoncrawl: the SentencePiece model the LM was trained on",
                                            metavar="FILE")] = None,
    perplexity_cutoffs: Annotated[list[float] | None, Arg("commoncrawl: fixed perplexity cut-offs HEAD_MAX "
                                                          "MIDDLE_MAX (default: percentiles of this run)")] = None,
    perplexity_percentiles: Annotated[list[float] | None, Arg("commoncrawl: percentiles placing the head/middle/"
                                                              "tail cut-offs (default: CCNet's 30 60)")] = None,
    perplexity_sample: Annotated[int, Arg("commoncrawl: documents scored first to place percentile cut-offs")] \
        = 20_000,
    keep_buckets: Annotated[list[str] | None, Arg("commoncrawl: perplexity buckets kept, of head middle tail "
                                                  "(default: head middle)")] = None,
    wikiref_model: Annotated[str | None, Arg("commoncrawl: fastText Wikipedia-reference classifier, from `data "
                                             "train-classifier`", metavar="FILE")] = None,
    wikiref_threshold: Annotated[float, Arg("commoncrawl: minimum probability of the reference label")] = 0.5,
    skip_wikiref: Annotated[bool, Arg("commoncrawl: run without the reference classifier (a paper step; the data "
                                      "card records the omission)")] = False,
    min_chars: Annotated[int, Arg("commoncrawl: drop pages shorter than this after line dedup (CCNet)")] = 300,
    card_examples: Annotated[int, Arg("examples of each removal reason in DIR/DATACARD.md (document id and its first "
                                      "200 characters, or the removed line)", metavar="N")] = 3,
) -> int:
    """Run a source's cleaning pipeline; kept documents go to DIR/documents/ as JSONL shards that
    `llamaworks prepare --input DIR/documents` tokenises. A killed run resumes where it stopped."""
    ccnet = CCNetOptions(lid_model=lid_model, lid_threshold=lid_threshold, lm_model=lm_model, lm_tokenizer=lm_tokenizer,
                         perplexity_cutoffs=perplexity_cutoffs, perplexity_sample=perplexity_sample,
                         wikiref_model=wikiref_model, wikiref_threshold=wikiref_threshold, skip_wikiref=skip_wikiref,
                         min_chars=min_chars)
    for name, value in (("lid_languages", lid_languages), ("perplexity_percentiles", perplexity_percentiles),
                        ("keep_buckets", keep_buckets)):
        if value is not None:
            setattr(ccnet, name, list(value))
    reader, steps = pipeline(source, badwords=badwords, dedup_threshold=dedup_threshold, sites=sites,
                             languages=languages, ccnet=ccnet)
    fit_perplexity_cutoffs(reader, steps, input)  # first pass, when percentile cut-offs are asked for
    common = dict(keep_excluded=keep_excluded, on_malformed=on_malformed, compression=compression,
                  overwrite=overwrite, dedup_memory_mb=dedup_memory_mb, card_examples=card_examples,
                  dedup_partitions=dedup_partitions)
    if cluster is not None:
        if workers is not None:
            raise ValueError("--workers is for local runs; with --cluster the cluster's workers run the shards "
                             "(local:N sets their number)")
        executor = DaskExecutor(output, cluster, **common)
    else:
        executor = LocalExecutor(output, workers=workers, **common)
    stats = executor.run(source, reader, steps, input)
    last = stats["steps"][-1]["kept"]["documents"] if stats["steps"] else stats["read"]["documents"]
    print(f"{source}: read {stats['read']['documents']} documents, kept {last}; see {output}/DATACARD.md")
    return 0


# --help shows the run's description, then the sources table (the command's parser reads the docstring).
run_command.__doc__ = f"{inspect.cleandoc(run_command.__doc__ or '')}\n\n{describe_sources()}"
