"""Zero-shot common-sense reasoning (paper section 3.1, Table 3), prompts as
lm-evaluation-harness (Gao et al. 2021), which the paper follows for multiple choice.

Each parser takes one record of the Hugging Face datasets layout and, where it differs, of
the original release, and returns the context and the choices as scored.
"""

from __future__ import annotations

import re

from llamaworks.eval.scoring import winogrande_partial_requests
from llamaworks.eval.tasks.base import MCExample, MCTask


def _label_index(labels: list[str], key: str) -> int:
    # ARC/OpenBookQA answer keys are letters ("A".."E") or digits ("1".."5").
    return labels.index(str(key))


def _choices_and_labels(choices) -> tuple[list[str], list[str]]:
    if isinstance(choices, dict):  # HF: {"text": [...], "label": [...]}
        return list(choices["text"]), [str(x) for x in choices["label"]]
    return [c["text"] for c in choices], [str(c["label"]) for c in choices]  # original: [{"text", "label"}]


def parse_arc(r: dict) -> MCExample:
    q = r["question"]
    if isinstance(q, dict):  # original release: {"question": {"stem", "choices"}, "answerKey"}
        stem, (texts, labels) = q["stem"], _choices_and_labels(q["choices"])
    else:
        stem, (texts, labels) = q, _choices_and_labels(r["choices"])
    return MCExample(f"Question: {stem}\nAnswer:", [" " + t for t in texts], _label_index(labels, r["answerKey"]))


def parse_openbookqa(r: dict) -> MCExample:
    if "question_stem" in r:  # HF
        stem, (texts, labels) = r["question_stem"], _choices_and_labels(r["choices"])
    else:  # original release, as ARC
        stem, (texts, labels) = r["question"]["stem"], _choices_and_labels(r["question"]["choices"])
    return MCExample(stem, [" " + t for t in texts], _label_index(labels, r["answerKey"]))


def parse_boolq(r: dict) -> MCExample:
    # HF google/boolq: answer (bool); super_glue/boolq: label (0/1).
    gold = int(r["answer"]) if "answer" in r else int(r["label"])
    q = r["question"].rstrip("?")
    return MCExample(f"{r['passage']}\nQuestion: {q}?\nAnswer:", [" no", " yes"], gold)


def parse_piqa(r: dict) -> MCExample:
    return MCExample(f"Question: {r['goal']}\nAnswer:", [" " + r["sol1"], " " + r["sol2"]], int(r["label"]))


def parse_siqa(r: dict) -> MCExample:
    ctx = f"Q: {r['context']} {r['question']}\nA:"
    return MCExample(ctx, [" " + r[k] for k in ("answerA", "answerB", "answerC")], int(r["label"]) - 1)


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def parse_hellaswag(r: dict) -> MCExample:
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize() if "ctx_a" in r else r["ctx"]
    query = _hellaswag_clean(r["activity_label"] + ": " + ctx)
    return MCExample(query, [" " + _hellaswag_clean(e) for e in r["endings"]], int(r["label"]))


def parse_winogrande(r: dict) -> MCExample:
    options = [r["option1"], r["option2"]]
    reqs = winogrande_partial_requests(r["sentence"], options)
    return MCExample("", options, int(r["answer"]) - 1, contexts=[c for c, _ in reqs], continuation=reqs[0][1])


_ARC_LAYOUT = ("JSONL/Parquet records {question, choices: {text, label}, answerKey} (HF allenai/ai2_arc) or "
               "{question: {stem, choices: [{text, label}]}, answerKey} (AI2's release)")

# Table 3 of the paper: LLaMA-7B and LLaMA-65B zero-shot accuracy (%).
COMMON_SENSE = [
    MCTask("boolq", "BoolQ", "calibrated", parse_boolq,
           "records {question, passage, answer: bool} (google/boolq) or {question, passage, label: 0/1} "
           "(super_glue)", "https://github.com/google-research-datasets/boolean-questions",
           {"7B": 76.5, "65B": 85.3}),
    MCTask("piqa", "PIQA", "char_norm", parse_piqa, "records {goal, sol1, sol2, label: 0/1} (ybisk/piqa)",
           "https://yonatanbisk.com/piqa/", {"7B": 79.8, "65B": 82.8}),
    MCTask("siqa", "SIQA", "char_norm", parse_siqa,
           "records {context, question, answerA, answerB, answerC, label: '1'..'3'} (allenai/social_i_qa)",
           "https://leaderboard.allenai.org/socialiqa", {"7B": 48.9, "65B": 52.3}),
    MCTask("hellaswag", "HellaSwag", "char_norm", parse_hellaswag,
           "records {activity_label, ctx_a, ctx_b (or ctx), endings: [4], label} (Rowan/hellaswag or the "
           "original hellaswag_val.jsonl)", "https://github.com/rowanz/hellaswag", {"7B": 76.1, "65B": 84.2}),
    MCTask("winogrande", "WinoGrande", "partial", parse_winogrande,
           "records {sentence with '_', option1, option2, answer: '1'/'2'} (allenai/winogrande, dev.jsonl)",
           "https://github.com/allenai/winogrande", {"7B": 70.1, "65B": 77.0}),
    MCTask("arc_easy", "ARC-e", "char_norm", parse_arc, _ARC_LAYOUT, "https://allenai.org/data/arc",
           {"7B": 72.8, "65B": 78.9}),
    MCTask("arc_challenge", "ARC-c", "char_norm", parse_arc, _ARC_LAYOUT, "https://allenai.org/data/arc",
           {"7B": 47.6, "65B": 56.0}),
    MCTask("openbookqa", "OBQA", "calibrated", parse_openbookqa,
           "records {question_stem, choices: {text, label}, answerKey} (allenai/openbookqa) or AI2's release "
           "{question: {stem, choices}, answerKey}", "https://allenai.org/data/open-book-qa",
           {"7B": 57.2, "65B": 60.2}),
]
