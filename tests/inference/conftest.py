"""Fixtures of the inference tests that need the native kernels (test_kernels*, test_step_ops,
test_paged_attention, test_int4_tiles)."""

import os

import pytest

from llamaworks.inference import native


@pytest.fixture(scope="module")
def native_lib():
    """The native library built and loaded at the CPU's own instruction set; skips where it
    cannot be built (no compiler) or is turned off, and leaves the default set chosen after."""
    if os.environ.get("LLAMAWORKS_NATIVE") == "0":
        pytest.skip("LLAMAWORKS_NATIVE=0: the suite runs the PyTorch paths")
    try:
        native.build()
    except (RuntimeError, OSError, ImportError) as e:  # no compiler or ninja on this machine
        pytest.skip(f"native kernels cannot be built here: {e}")
    native.reset()
    assert native.load(), "built but not loaded"
    yield
    native.reset()
    native.configure()
