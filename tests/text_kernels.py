"""The `text_kernels` and `lib` fixtures (registered by tests/tokenizer/conftest.py and tests/data/conftest.py)."""

from __future__ import annotations

import os
import subprocess

import pytest

from llamaworks.data import document
from llamaworks.tokenizer import native


@pytest.fixture(params=["compiled", "numpy"])
def text_kernels(request):
    """The test once with the compiled text kernels (tokenizer/native.py: the word cache's chunks, MinHash, the
    mix's gather; skipped where they cannot be built) and orjson's parse of JSONL lines (data/document.py,
    when installed), and once with the reference paths they stand in for: numpy, json."""
    if request.param == "compiled":
        if os.environ.get("LLAMAWORKS_NATIVE") == "0":
            pytest.skip("LLAMAWORKS_NATIVE=0: the numpy paths only")
        try:
            native.build()
        except OSError as e:  # no compiler on this machine
            pytest.skip(f"the text kernels cannot be built here: {e}")
        except subprocess.CalledProcessError as e:  # a compile error is a failure, never a skip
            pytest.fail(f"the text kernels do not compile:\n{e.stderr.decode(errors='replace')[-3000:]}")
    native.set_enabled(request.param == "compiled")
    document.set_fast_json(request.param == "compiled")
    assert (native.library() is not None) == (request.param == "compiled")
    yield request.param
    native.set_enabled(True)
    document.set_fast_json(True)


@pytest.fixture
def lib():
    """The compiled text kernels themselves (built here when they are not; skipped without a compiler or with
    LLAMAWORKS_NATIVE=0; a compile error fails)."""
    try:
        native.build()
    except OSError as e:
        pytest.skip(f"the text kernels cannot be built here: {e}")
    native.set_enabled(True)
    if native.library() is None:
        pytest.skip("LLAMAWORKS_NATIVE=0")
    return native.library()
