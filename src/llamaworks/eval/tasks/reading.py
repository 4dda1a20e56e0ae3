"""Reading comprehension (paper section 3.3, Table 6): RACE middle and high school, zero-shot.

Prompt as lm-evaluation-harness' race task, which follows GPT-3 (Brown et al. 2020,
appendix G): "Article: <article>\\n\\n" then "Question: <question>\\nAnswer:", each option a
continuation after one space. Two differences, both to score every question on its own as
the paper's zero-shot setting says: lm-eval groups the questions of one article into one
document and puts the earlier questions with their answers into the context, and it reports
plain accuracy (`acc`); here each question is one example and the options are ranked by
log-likelihood normalised by their number of characters, the paper's rule for multiple
choice (section 3, following Gao et al. 2021), which it applies to every multiple-choice
benchmark but OpenBookQA and BoolQ.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from llamaworks.eval.tasks.base import MCExample, MCTask, parse_records

LETTERS = "ABCD"


def _answer_index(answer) -> int:
    # RACE's answers are letters; accept 0-based integers as converted copies have them.
    return LETTERS.index(answer.strip()) if isinstance(answer, str) else int(answer)


def parse_race(r: dict) -> MCExample:
    # HF ehovy/race: {example_id, article, answer: "A".."D", question, options: [4]}.
    options = list(r["options"])
    if len(options) != 4:
        raise ValueError(f"RACE has 4 options, got {len(options)}")
    ctx = f"Article: {r['article']}\n\nQuestion: {r['question']}\nAnswer:"
    return MCExample(ctx, [" " + o for o in options], _answer_index(r["answer"]), str(r.get("example_id", "")))


def release_records(folder: Path) -> list[dict]:
    """One record per question from the original release's files (RACE/<split>/<level>/*.txt,
    each one JSON object {article, questions, options, answers, id}), sorted by file name."""
    files = sorted(folder.glob("*.txt"), key=lambda f: (len(f.stem), f.stem))
    records = []
    for f in files:
        doc = json.loads(f.read_text(encoding="utf-8"))
        doc_id = doc.get("id", f.name)
        for i, (q, opts, ans) in enumerate(zip(doc["questions"], doc["options"], doc["answers"], strict=True)):
            records.append({"example_id": f"{doc_id}/{i}", "article": doc["article"], "question": q,
                            "options": opts, "answer": ans})
    return records


@dataclass(frozen=True)
class RaceTask(MCTask):
    level: str = "high"  # "middle" or "high"
    reads_folders: ClassVar[bool] = True  # `llamaworks eval --data RACE/` passes the folder

    def release_folder(self, path: Path) -> Path | None:
        # The RACE/ root (its test split), a split folder holding middle/ and high/, or a level folder.
        for folder in (path / "test" / self.level, path / self.level, path):
            if folder.is_dir() and any(folder.glob("*.txt")):
                return folder
        return None

    def load(self, path: str | os.PathLike | None, limit: int | None = None) -> list[MCExample]:
        if path is not None and Path(path).is_dir():
            folder = self.release_folder(Path(path))
            if folder is None:
                raise FileNotFoundError(f"task {self.name}: no RACE files (*.txt) in {path}, {path}/{self.level} or "
                                        f"{path}/test/{self.level}. Expected {self.layout}. Public data: {self.source}")
            return parse_records(self, folder, limit, id_keys=("example_id",), records=release_records(folder))
        return parse_records(self, path, limit, id_keys=("example_id",))


_RACE_LAYOUT = ("the original release's folder RACE/ (test/{middle,high}/*.txt, each a JSON {article, questions, "
                "options, answers, id}) or JSONL/Parquet records {example_id, article, question, options: [4], "
                "answer: 'A'..'D'} (HF ehovy/race, config middle or high)")
_RACE_SOURCE = "https://www.cs.cmu.edu/~glai1/data/race/"

# Table 6 of the paper: zero-shot accuracy (%).
RACE_TASKS = [
    RaceTask("race_middle", "RACE-middle", "char_norm", parse_race, _RACE_LAYOUT, _RACE_SOURCE,
             {"7B": 61.1, "65B": 67.9}, level="middle"),
    RaceTask("race_high", "RACE-high", "char_norm", parse_race, _RACE_LAYOUT, _RACE_SOURCE,
             {"7B": 46.9, "65B": 51.6}, level="high"),
]
