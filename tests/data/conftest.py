"""Fixtures of the data tests: real English lines (the CCNet steps and the n-gram estimator); `text_kernels`
runs a test on the compiled and the numpy paths (tests/text_kernels.py)."""

from __future__ import annotations

import pytest
from text_kernels import lib, text_kernels  # noqa: F401  (tests/ is on sys.path: a fixture shared with tests/tokenizer)


@pytest.fixture(scope="module")
def english(corpus_docs) -> list[str]:
    """Lines of real English (Shakespeare when the shared corpus is there, else the synthetic fallback)."""
    lines = [" ".join(x.split()) for doc in corpus_docs for x in doc.split("\n")]
    return [x for x in lines if len(x.split()) >= 6 and len(x) >= 30][:3000]
