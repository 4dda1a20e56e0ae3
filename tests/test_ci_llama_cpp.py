"""CI runs the llama.cpp parity tests (.ci/run): under LLAMAWORKS_REQUIRE_LLAMA_CPP=1 a missing
llama_cpp stops the test session (tests/conftest.py) instead of the tests skipping."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Each test starts a pytest process (~8 s of imports on 2 cores).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _collect(tmp_path: Path, require: bool, broken_llama_cpp: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LLAMAWORKS_REQUIRE_LLAMA_CPP"}
    if require:
        env["LLAMAWORKS_REQUIRE_LLAMA_CPP"] = "1"
    if broken_llama_cpp:  # a llama_cpp package first on the path that cannot be imported
        (tmp_path / "llama_cpp").mkdir()
        (tmp_path / "llama_cpp" / "__init__.py").write_text("raise ImportError('no llama.cpp library here')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    argv = [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
            str(ROOT / "tests" / "test_atomic.py")]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_missing_llama_cpp_fails_the_session_under_ci(tmp_path):
    got = _collect(tmp_path, require=True, broken_llama_cpp=True)
    assert got.returncode == 1, got.stdout + got.stderr
    assert "LLAMAWORKS_REQUIRE_LLAMA_CPP=1 but llama_cpp cannot be imported" in got.stdout + got.stderr


def test_missing_llama_cpp_is_fine_for_users(tmp_path):
    got = _collect(tmp_path, require=False, broken_llama_cpp=True)
    assert got.returncode == 0, got.stdout + got.stderr


def test_installed_llama_cpp_passes_the_ci_check(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is optional (./dev.sh extras)")
    got = _collect(tmp_path, require=True, broken_llama_cpp=False)
    assert got.returncode == 0, got.stdout + got.stderr
