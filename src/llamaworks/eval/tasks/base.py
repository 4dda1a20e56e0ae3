from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class MCExample:
    context: str
    choices: list[str]  # continuations as scored, with their leading space
    gold: int
    id: str = ""
    # WinoGrande partial scoring: one context per choice and a shared continuation.
    contexts: list[str] | None = None
    continuation: str | None = None
    # The subsets the example is counted in besides the whole set (an MMLU category, a
    # CrowS-Pairs bias type, a WinoGender pronoun set), for GroupedMCTask's per-group rows.
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class MCTask:
    name: str
    title: str  # as the paper's Table 3 header
    method: str  # "char_norm", "calibrated" or "partial" (see eval.metrics)
    parse: Callable[[dict], MCExample]
    layout: str  # the fields of one record, for error messages
    source: str  # where the public data lives
    paper: dict[str, float] = field(default_factory=dict)  # {"7B": ..., "65B": ...}, accuracy in %

    def load(self, path: str | os.PathLike | None, limit: int | None = None) -> list[MCExample]:
        return parse_records(self, path, limit, id_keys=("id", "idx"))


@dataclass(frozen=True)
class GroupedMCTask(MCTask):
    """Multiple choice reported per subset, as the paper's Tables 9, 12 and 13: one row for
    the whole set (`overall`) and one per group in `groups` order; `paper` maps row -> sizes."""

    overall: str = "Average"
    groups: tuple[str, ...] = ()
    score_name: str = "accuracy"  # what the rows measure, for the table's scoring column


def parse_records(task, path: str | os.PathLike | None, limit: int | None, id_keys: tuple[str, ...] = ("id",),
                  records: list[dict] | None = None):
    """The task's examples from its data file, each given an id (its own, the first of id_keys
    in the record, else its index); a record the task cannot parse is an error naming it.
    `records`: already read from `path` (a release's own layout: a folder, CSV or TSV)."""
    if path is None:
        raise ValueError(f"task {task.name} needs --data FILE: {task.layout}. Public data: {task.source}")
    if records is None:
        records = read_records(path, task)
    if limit is not None:
        records = records[:limit]
    out = []
    for i, r in enumerate(records):
        try:
            ex = task.parse(r)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"{path}: record {i} is not in {task.name}'s format ({task.layout}): "
                             f"{type(e).__name__}: {e}") from None
        fallback = i
        for key in reversed(id_keys):
            fallback = r.get(key, fallback)
        ex.id = ex.id or str(fallback)
        out.append(ex)
    return out


def read_records(path: str | os.PathLike, task: MCTask | None = None) -> list[dict]:
    path = Path(path)
    name = f"task {task.name}: " if task else ""
    if not path.is_file():
        hint = f" Expected {task.layout}. Public data: {task.source}" if task else ""
        raise FileNotFoundError(f"{name}data file {path} does not exist.{hint}")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{name}{path} is Parquet: pip install pyarrow, or convert it to JSONL") from None
        return pq.read_table(path).to_pylist()
    if path.suffix in (".csv", ".tsv"):  # a header row names the fields
        import csv

        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, list) else data.get("data", [data])
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{name}{path}:{lineno}: not JSON ({e})") from None
    return records
