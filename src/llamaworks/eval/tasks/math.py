"""Mathematical reasoning (paper section 3.4, Table 7): GSM8k and MATH with maj1@k.

k solutions are generated per problem, the final answer of each is extracted ("#### N" or
the last number for GSM8k, the last \\boxed{...} for MATH) and the majority answer is
compared with the reference one. The paper uses k=100 (GSM8k) and k=256 (MATH); k=1 is
greedy decoding, k>1 samples at temperature 0.6 (Minerva, Lewkowycz et al. 2022, which the
paper compares against).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from llamaworks.eval.scoring import MAJ_K, gsm8k_answer, math_answer
from llamaworks.eval.tasks.base import parse_records

SAMPLE_TEMPERATURE = 0.6


@dataclass
class MathExample:
    question: str
    solution: str  # the reference solution (few-shot demonstrations)
    answer: str  # its extracted final answer
    id: str = ""


@dataclass(frozen=True)
class MathTask:
    name: str
    title: str
    parse: Callable[[dict], MathExample]
    extract: Callable[[str], str | None]
    question_prefix: str
    answer_prefix: str
    until: tuple[str, ...]
    max_gen_toks: int
    layout: str
    source: str
    paper: dict[str, dict[str, float]] = field(default_factory=dict)  # "maj1@1"/"maj1@k" -> {"7B", "65B"}
    method: str = "maj1@k"

    @property
    def default_k(self) -> int:
        return MAJ_K[self.name]

    def prompt(self, question: str, shots: list[MathExample]) -> str:
        demos = "".join(f"{self.question_prefix}{s.question}{self.answer_prefix} {s.solution}\n\n" for s in shots)
        return f"{demos}{self.question_prefix}{question}{self.answer_prefix}"

    def load(self, path, limit: int | None = None) -> list[MathExample]:
        examples = parse_records(self, path, limit)
        for i, ex in enumerate(examples):
            if ex.answer is None:
                raise ValueError(f"{path}: record {i}: no final answer in its solution ({self.layout})")
        return examples


def parse_gsm8k(r: dict) -> MathExample:
    return MathExample(r["question"], r["answer"], gsm8k_answer(r["answer"]))  # type: ignore[arg-type]


def parse_math(r: dict) -> MathExample:
    return MathExample(r["problem"], r["solution"], math_answer(r["solution"]))  # type: ignore[arg-type]


MATH_TASKS = [
    MathTask("gsm8k", "GSM8k", parse_gsm8k, gsm8k_answer, "Question: ", "\nAnswer:",
             ("\n\nQuestion:", "Question:", "\n\n\n"), 256,
             "records {question, answer ending in '#### N'} (HF openai/gsm8k, main; test.jsonl)",
             "https://github.com/openai/grade-school-math",
             # Table 7 of the paper.
             {"maj1@1": {"7B": 11.0, "65B": 50.9}, "maj1@k": {"7B": 18.1, "65B": 69.7}}),
    MathTask("math", "MATH", parse_math, math_answer, "Problem:\n", "\n\nSolution:",
             ("\n\nProblem:", "Problem:"), 512,
             "records {problem, solution with \\boxed{answer}} (hendrycks/competition_math, JSONL of the "
             "test split)", "https://github.com/hendrycks/math",
             {"maj1@1": {"7B": 2.9, "65B": 10.6}, "maj1@k": {"7B": 6.9, "65B": 20.5}}),
]
