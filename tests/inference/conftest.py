"""Fixtures of the inference tests that need the native kernels (test_kernels*, test_step_ops,
test_paged_attention, test_prefill_kernel, test_int4_tiles)."""

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


@pytest.fixture
def isa(request, native_lib):
    """Run the test under instruction set `request.param` (indirect parametrisation; skipped where
    the CPU lacks it), then go back to the CPU's own."""
    best = native.choose_isa(native.cpu_features())
    if native.ISAS.index(request.param) > native.ISAS.index(best):
        pytest.skip(f"this CPU cannot run {request.param}")
    native.configure(limit=request.param)
    assert native.current_isa() == request.param
    yield request.param
    native.configure()
