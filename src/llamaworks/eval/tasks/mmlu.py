"""Massive Multitask Language Understanding (paper section 3.6, Table 9), 5-shot.

As Hendrycks et al. (2021)'s evaluation code: per subject, the prompt is the header "The
following are multiple choice questions (with answers) about <subject>.", then the first k
questions of the subject's dev split with their answers, then the question; the prediction
is the letter among " A".." D" with the highest log-likelihood after "Answer:". (Their code
writes the subject with a leading space, "about  abstract algebra" with two spaces; we write
one, as lm-evaluation-harness.) When the prompt does not fit the window, shots are dropped
from the end, as theirs does. Scores: accuracy over all questions (their "weighted
accuracy", the paper's Average), per category (the paper's four columns) and the mean of the
57 subjects' accuracies.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from llamaworks.eval.tasks.base import GroupedMCTask, MCExample, parse_records

LETTERS = ("A", "B", "C", "D")
DEFAULT_SHOTS = 5

# Hendrycks et al.'s categories (their categories.py, subject -> subcategory -> category),
# which the paper's Table 9 columns are.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "Humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios", "philosophy",
        "prehistory", "professional_law", "world_religions"),
    "STEM": (
        "abstract_algebra", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
        "college_mathematics", "college_physics", "computer_security", "conceptual_physics", "electrical_engineering",
        "elementary_mathematics", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
        "high_school_mathematics", "high_school_physics", "high_school_statistics", "machine_learning"),
    "Social Sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics", "high_school_macroeconomics",
        "high_school_microeconomics", "high_school_psychology", "human_sexuality", "professional_psychology",
        "public_relations", "security_studies", "sociology", "us_foreign_policy"),
    "Other": (
        "anatomy", "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
        "management", "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
        "professional_medicine", "virology"),
}
SUBJECT_CATEGORY = {s: cat for cat, subjects in CATEGORIES.items() for s in subjects}
SUBJECT_MEAN = "subject mean"  # the row of the mean of the subjects' accuracies


@dataclass
class MMLUExample(MCExample):
    subject: str = ""
    question_block: str = ""  # "<question>\nA. ...\nD. ...\nAnswer:", without header and shots


def format_question(question: str, choices: list[str]) -> str:
    options = "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, choices))
    return f"{question}{options}\nAnswer:"


def header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def mmlu_prompt(ex: MMLUExample, shots: list[MMLUExample]) -> str:
    demos = "".join(f"{s.question_block} {LETTERS[s.gold]}\n\n" for s in shots)
    return header(ex.subject) + demos + ex.question_block


def parse_mmlu(r: dict) -> MMLUExample:
    # HF cais/mmlu: {question, subject, choices: [4], answer: 0..3}; the release's CSV rows
    # arrive here as {question, choices, answer: "A".."D", subject (from the file name)}.
    choices = [str(c) for c in r["choices"]]
    if len(choices) != 4:
        raise ValueError(f"MMLU has 4 choices, got {len(choices)}")
    answer = r["answer"]
    gold = LETTERS.index(answer.strip()) if isinstance(answer, str) else int(answer)
    subject = r["subject"]
    if subject not in SUBJECT_CATEGORY:
        raise ValueError(f"unknown MMLU subject {subject!r}")
    block = format_question(str(r["question"]), choices)
    return MMLUExample(header(subject) + block, [" " + x for x in LETTERS], gold,
                       groups=(SUBJECT_CATEGORY[subject],), subject=subject, question_block=block)


def csv_records(files: list[Path], split: str) -> list[dict]:
    # The release's CSV files have no header: question, A, B, C, D, answer letter; the subject
    # is the file name minus "_<split>.csv". Subjects in sorted order, as Hendrycks et al.
    records = []
    for f in sorted(files, key=lambda f: f.name):
        subject = f.name.removesuffix(f"_{split}.csv")
        with open(f, encoding="utf-8", newline="") as fh:
            for i, row in enumerate(csv.reader(fh)):
                if len(row) != 6:
                    raise ValueError(f"{f}:{i + 1}: an MMLU row has 6 fields (question, A, B, C, D, answer), "
                                     f"got {len(row)}")
                records.append({"id": f"{subject}/{i}", "question": row[0], "choices": row[1:5], "answer": row[5],
                                "subject": subject})
    return records


@dataclass(frozen=True)
class MMLUTask(GroupedMCTask):
    default_shots: int = DEFAULT_SHOTS
    reads_folders: ClassVar[bool] = True

    def _release_files(self, path: Path, split: str) -> list[Path] | None:
        # The release's data/ folder (holding test/ and dev/), one split's folder, or one CSV.
        if path.is_file() and path.suffix == ".csv":
            return [path]
        for folder in (path / split, path):
            files = list(folder.glob(f"*_{split}.csv")) if folder.is_dir() else []
            if files:
                return files
        return None

    def _load_split(self, path, split: str, limit: int | None) -> list[MMLUExample]:
        if path is not None and (Path(path).is_dir() or Path(path).suffix == ".csv"):
            files = self._release_files(Path(path), split)
            if files is None:
                raise FileNotFoundError(f"task {self.name}: no *_{split}.csv in {path} or {path}/{split}. Expected "
                                        f"{self.layout}. Public data: {self.source}")
            return parse_records(self, path, limit, records=csv_records(files, split))
        return parse_records(self, path, limit)

    def load(self, path: str | os.PathLike | None, limit: int | None = None) -> list[MMLUExample]:
        return self._load_split(path, "test", limit)

    def load_fewshot(self, path: str | os.PathLike | None) -> list[MMLUExample]:
        """The dev split: from the release's data/ folder (its dev/), a folder of *_dev.csv, or
        a file of HF records (cais/mmlu, split dev)."""
        return self._load_split(path, "dev", None)

    def has_dev_split(self, path) -> bool:
        # Whether --data is the release's data/ folder, so that no --fewshot-data is needed.
        return path is not None and Path(path).is_dir() and self._release_files(Path(path), "dev") is not None


def fewshot_for(pool: list[MMLUExample], subject: str, k: int) -> list[MMLUExample]:
    # Deterministic, as Hendrycks et al.: the first k dev questions of the same subject.
    shots = [e for e in pool if e.subject == subject][:k]
    if len(shots) < k:
        raise ValueError(f"{k}-shot MMLU needs {k} dev questions of {subject}, the few-shot data has {len(shots)}")
    return shots


MMLU = MMLUTask(
    "mmlu", "MMLU", "sum", parse_mmlu,
    "the original release's data/ folder (test/<subject>_test.csv and dev/<subject>_dev.csv, rows without header: "
    "question, A, B, C, D, answer letter) or JSONL/Parquet records {question, subject, choices: [4], answer: 0..3} "
    "(HF cais/mmlu, config all: the test split as --data, the dev split as --fewshot-data)",
    "https://github.com/hendrycks/test (data.tar: https://people.eecs.berkeley.edu/~hendrycks/data.tar)",
    # Table 9 of the paper: 5-shot accuracy (%).
    {"Average": {"7B": 35.1, "65B": 63.4}, "Humanities": {"7B": 34.0, "65B": 61.8},
     "STEM": {"7B": 30.5, "65B": 51.7}, "Social Sciences": {"7B": 38.3, "65B": 72.9},
     "Other": {"7B": 38.1, "65B": 67.4}},
    overall="Average", groups=("Humanities", "STEM", "Social Sciences", "Other", SUBJECT_MEAN),
)
MMLU_TASKS = [MMLU]

