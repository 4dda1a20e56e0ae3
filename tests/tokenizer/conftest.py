"""Fixtures of the tokenizer tests: `text_kernels` runs a test on the compiled and the numpy paths."""

from text_kernels import lib, text_kernels  # noqa: F401  (tests/ is on sys.path: a fixture shared with tests/data)
