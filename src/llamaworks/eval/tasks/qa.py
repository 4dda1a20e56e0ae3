"""Closed-book question answering (paper section 3.2, Tables 4 and 5): NaturalQuestions and
TriviaQA, exact match of a greedy answer, 0/1/5/64-shot.

Prompt (the paper's Figure 3, Appendix A): "Answer these questions:" then the few-shot
pairs and the question, each as "Q: ...\\nA: ...". Generation is greedy and stops at a line
break; the answer is cut at the first line break, final dot or comma and normalised before
comparison with every alias (`eval.metrics.exact_match`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from llamaworks.eval.tasks.base import parse_records

QA_HEADER = "Answer these questions:"
FEWSHOT_SEED = 1234  # few-shot examples: a fixed sample of the train/dev file (as lm-evaluation-harness)
MAX_ANSWER_TOKENS = 32


@dataclass
class QAExample:
    question: str
    answers: list[str]
    id: str = ""


@dataclass(frozen=True)
class QATask:
    name: str
    title: str
    parse: Callable[[dict], QAExample]
    layout: str
    source: str
    paper: dict[int, dict[str, float]] = field(default_factory=dict)  # shots -> {"7B", "65B"}, exact match %
    method: str = "exact_match"

    def load(self, path, limit: int | None = None) -> list[QAExample]:
        return parse_records(self, path, limit, id_keys=("id", "question_id"))


def parse_triviaqa(r: dict) -> QAExample:
    a = r["answer"]  # HF trivia_qa: {"aliases": [...], "value": ..., "normalized_aliases": [...]}
    if isinstance(a, dict):
        answers = list(dict.fromkeys([a["value"], *a.get("aliases", [])]))
    else:
        answers = [a] if isinstance(a, str) else list(a)
    return QAExample(r["question"], answers, str(r.get("question_id", "")))


def parse_nq(r: dict) -> QAExample:
    # nq_open (HF google-research-datasets/nq_open, NQ-open JSONL): {"question", "answer": [...]}.
    answers = r["answer"] if "answer" in r else r["answers"]
    return QAExample(r["question"], [answers] if isinstance(answers, str) else list(answers))


def fewshot_examples(pool: list[QAExample], k: int, exclude: str | None = None) -> list[QAExample]:
    # The same k examples for every question (deterministic), never the question itself.
    if k == 0:
        return []
    cands = [e for e in pool if e.question != exclude]
    if len(cands) < k:
        raise ValueError(f"{k}-shot needs {k} examples in the few-shot file, it has {len(cands)}")
    return random.Random(FEWSHOT_SEED).sample(cands, k)


def qa_prompt(question: str, shots: list[QAExample]) -> str:
    lines = [QA_HEADER] + [f"Q: {s.question}\nA: {s.answers[0]}" for s in shots] + [f"Q: {question}\nA:"]
    return "\n".join(lines)


QA_TASKS = [
    QATask("naturalquestions", "NaturalQuestions", parse_nq,
           "records {question, answer: [aliases]} (NQ-open, HF google-research-datasets/nq_open)",
           "https://github.com/google-research-datasets/natural-questions (NQ-open split)",
           # Table 4 of the paper.
           {0: {"7B": 16.8, "65B": 23.8}, 1: {"7B": 18.7, "65B": 31.0}, 5: {"7B": 22.0, "65B": 35.0},
            64: {"7B": 26.1, "65B": 39.9}}),
    QATask("triviaqa", "TriviaQA", parse_triviaqa,
           "records {question, answer: {value, aliases}} (HF mandarjoshi/trivia_qa, rc.nocontext)",
           "https://nlp.cs.washington.edu/triviaqa/",
           # Table 5 of the paper (filtered dev set).
           {0: {"7B": 50.0, "65B": 68.2}, 1: {"7B": 53.4, "65B": 71.6}, 5: {"7B": 56.3, "65B": 72.6},
            64: {"7B": 57.6, "65B": 73.0}}),
]
