"""Training tests run with one intra-op thread (token_shards and make_config: tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # every module here: one intra-op thread (tests/conftest.py)
    yield
