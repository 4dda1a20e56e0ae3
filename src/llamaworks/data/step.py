"""The one interface every pipeline step shares.

A step turns a stream of documents into a stream of documents:
`run(docs, rank, world_size)`. It may yield, besides the documents it keeps,

- `Dropped(doc, reason)` for a document it removes, and
- `LinesRemoved(reason, lines, chars)` when it cuts lines out of a document it keeps,

and nothing else about bookkeeping: the executor counts documents, lines, characters
and bytes going in, kept and dropped, writes stats files and the excluded documents.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llamaworks.data.document import Document


@dataclass
class Dropped:
    doc: Document
    reason: str


@dataclass
class LinesRemoved:
    reason: str
    lines: int
    chars: int
    example: str = ""  # one removed line, for the data card's examples (optional)


Event = Document | Dropped | LinesRemoved


class Step:
    name = "step"
    # True: the step needs every document of the run in one stream (cross-document dedup);
    # the executor then runs it in a single process after the parallel steps before it.
    global_state = False

    def run(self, docs: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Event]:
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the data card: what the step does, with its settings."""
        return self.name

    # Only for global_state steps, called by the executor on a fresh copy before the stage runs.
    def configure_state(self, directory: Path, memory_bytes: int | None) -> None:
        """Where the step may keep state on disk, and how much memory it may hold before spilling
        there (None: no limit, keep everything in memory)."""

    def parallel_part(self) -> Step | None:
        """Only for global_state steps: an ordinary step that the executor appends to the
        parallel stage before this one, so that per-document work independent of the state
        (MinHash signatures) runs on every worker; it leaves its results in doc.metadata for
        this step to take. None (the default): everything runs in the global stage."""
        return None

    def restore(self, kept: Iterable[Document]) -> bool:
        """Rebuild the state from the documents this step kept on the shards a killed run finished,
        so a global stage resumes shard by shard; False (the default): it cannot, and the stage
        is redone from its first shard."""
        return False


class Filter(Step):
    """Keeps or drops whole documents: `reason(doc)` is None to keep, else why it goes."""

    def reason(self, doc: Document) -> str | None:
        raise NotImplementedError

    def run(self, docs, rank=0, world_size=1):
        for doc in docs:
            why = self.reason(doc)
            yield doc if why is None else Dropped(doc, why)


class LineCleaner(Step):
    """Rewrites documents line by line. `clean(doc)` returns the kept text and, per reason,
    the removed lines; a document left without text is dropped with `empty_reason`."""

    empty_reason = "empty after cleaning"

    def clean(self, doc: Document) -> tuple[str | None, dict[str, list[str]]]:
        raise NotImplementedError

    def run(self, docs, rank=0, world_size=1):
        for doc in docs:
            text, removed = self.clean(doc)
            if text is None:  # the cleaner decided the whole page goes (its reason is the one key)
                (why,) = removed or {self.empty_reason: []}
                yield Dropped(doc, why)
                continue
            for why, lines in removed.items():
                if lines:
                    yield LinesRemoved(why, len(lines), sum(len(x) + 1 for x in lines), lines[0])
            if not text.strip():
                yield Dropped(doc, self.empty_reason)
                continue
            doc.text = text
            yield doc
