"""C4's cleaning rules (Raffel et al. 2020, section 2.2; tensorflow/datasets c4_utils.clean_page).

Per line, in c4_utils' order: a line with a word over 1000 characters goes; citation marks
([1], [edit], [citation needed]) are cut; a line goes when it lacks terminal punctuation or has
fewer than 3 words; of the lines left, one with "lorem ipsum" or a curly brace drops the whole
page, one mentioning javascript or cookie/privacy-policy boilerplate goes. The page goes when its
kept lines hold fewer than 5 sentences or (c4's badwords filter, run on the cleaned page) a word
of the bad-words list. A brace on a line the punctuation rules already removed (a menu, a CSS
fragment without a full stop) does not drop the page, exactly as in C4.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from llamaworks.data.step import LineCleaner

END_MARKS = (".", "?", "!", '"')  # c4_utils._END_MARKS
MIN_WORDS_PER_LINE = 3  # c4_utils: min_words_per_line=3
MIN_NUM_SENTENCES = 5  # c4_utils: min_num_sentences=5
MAX_WORD_LENGTH = 1000  # c4_utils: lines with a word longer than this are dropped
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
                     "use cookies")  # c4_utils._POLICY_SUBSTRINGS
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")  # c4_utils.clean_page's citation_regex
_SENTENCE = re.compile(r"[^.!?]+[.!?]+")  # c4 uses nltk's punkt; a terminal-mark split is its plain stand-in
_WORDS = re.compile(r"[\w']+")


def load_badwords(path: str | os.PathLike | None) -> frozenset[str]:
    if path is None:
        return frozenset()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"bad-words list {p} not found; pass a file with one word or phrase per line "
                                "(C4 used the LDNOOBW 'en' list)")
    return frozenset(w.strip().lower() for w in p.read_text(encoding="utf-8").splitlines() if w.strip())


class C4Filter(LineCleaner):
    name = "c4_rules"
    empty_reason = "no lines left after C4 line rules"

    def __init__(self, badwords: str | os.PathLike | None = None, min_sentences: int = MIN_NUM_SENTENCES,
                 min_words_per_line: int = MIN_WORDS_PER_LINE):
        self.badwords_path = str(badwords) if badwords else None
        self.badwords = load_badwords(badwords)
        self.min_sentences, self.min_words_per_line = min_sentences, min_words_per_line

    def clean(self, doc):
        kept: list[str] = []
        removed: dict[str, list[str]] = {"line without terminal punctuation": [],
                                         f"line with fewer than {self.min_words_per_line} words": [],
                                         "line mentions javascript": [], "cookie / policy boilerplate line": [],
                                         f"line with a word longer than {MAX_WORD_LENGTH} characters": []}
        sentences = 0
        for line in doc.text.splitlines():
            line = line.strip()
            if not line:
                continue
            if max(len(w) for w in line.split()) > MAX_WORD_LENGTH:
                removed[f"line with a word longer than {MAX_WORD_LENGTH} characters"].append(line)
                continue
            line = _CITATION.sub("", line)
            if not line.endswith(END_MARKS) or line.endswith("..."):  # c4: "..." is not an end
                removed["line without terminal punctuation"].append(line)
                continue
            if len(line.split()) < self.min_words_per_line:
                removed[f"line with fewer than {self.min_words_per_line} words"].append(line)
                continue
            lower = line.lower()
            if "lorem ipsum" in lower:
                return None, {"contains 'lorem ipsum' (placeholder text)": []}
            if "javascript" in lower:
                removed["line mentions javascript"].append(line)
            elif "{" in line:  # c4_utils tests javascript first: a notice line with a brace is only cut
                return None, {"contains a curly brace (code, not prose)": []}
            elif any(p in lower for p in POLICY_SUBSTRINGS):
                removed["cookie / policy boilerplate line"].append(line)
            else:
                sentences += len(_SENTENCE.findall(line))  # c4 sums its sentence count line by line
                kept.append(line)
        if sentences < self.min_sentences:
            return None, {f"fewer than {self.min_sentences} sentences after line rules": []}
        page = "\n".join(kept)
        if self.badwords:  # c4's badwords filter runs on the cleaned page
            low = page.lower()
            words = set(_WORDS.findall(low))
            if any((w in words) if " " not in w else (w in low) for w in self.badwords):
                return None, {"contains a word of the bad-words list": []}
        return page, removed

    def describe(self):
        bad = f"bad words from {self.badwords_path}" if self.badwords_path else "no bad-words list given"
        return (f"C4 rules: lines need terminal punctuation and >= {self.min_words_per_line} words, no javascript "
                f"or policy boilerplate; pages need >= {self.min_sentences} sentences, no lorem ipsum or '{{' "
                f"on a kept line; {bad}")
