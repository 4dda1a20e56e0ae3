#!/usr/bin/env bash
# Set-up and entry point in one: creates (or reuses) .venv at the repository root,
# installs llamaworks into it, then runs what you asked for.
#   ./dev.sh demo [--minutes M | --steps N] [...]   the main job (see README)
#   ./dev.sh test [pytest args]                      the whole test suite (fast, then slow)
#   ./dev.sh llamaworks COMMAND ...                  any CLI command
#   ./dev.sh extras                                  optional: llama.cpp (llama-cpp-python, builds
#                                                    from source: ~6-10 min once, then cached by pip)
# torch is pinned (LLAMAWORKS_TORCH, default torch==2.13.0) and installed first so
# nothing else can pull a different (multi-GB CUDA) build.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY=$VENV/bin/python
TORCH_SPEC=${LLAMAWORKS_TORCH:-torch==2.13.0}

native_build() {
  # The native decode kernels (src/llamaworks/inference/csrc): compiled once per version of their
  # sources and torch, a no-op after; without a compiler the PyTorch kernels are used.
  "$PY" -m llamaworks.inference.native build > /dev/null || echo "[dev.sh] continuing without native kernels" >&2
}

setup() {
  local stamp="$VENV/.llamaworks-$( (cat pyproject.toml; echo "$TORCH_SPEC") | sha1sum | cut -c1-12)"
  [ -f "$stamp" ] && { native_build; return 0; }
  echo "[dev.sh] setting up $VENV (once)" >&2
  [ -x "$PY" ] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "$TORCH_SPEC"
  local constraints="$VENV/constraints.txt"
  "$PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"
  "$PY" -m pip install -q -c "$constraints" -e ".[test]"
  rm -f "$VENV"/.llamaworks-*
  touch "$stamp"
  native_build
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
  test)
    setup
    # The fast suite, then the tests marked slow (multi-process, long training).
    # Exit code 5 means "no tests collected", which is fine for an empty selection.
    rc=0
    "$PY" -m pytest -q -m "not slow" "$@" || rc=$?
    if [ $rc -eq 0 ] || [ $rc -eq 5 ]; then
      rc=0
      "$PY" -m pytest -q -m slow "$@" || rc=$?
      [ $rc -eq 5 ] && rc=0
    fi
    exit $rc ;;
  demo)
    setup
    exec "$VENV/bin/llamaworks" demo "$@" ;;
  llamaworks)
    setup
    exec "$VENV/bin/llamaworks" "$@" ;;
  setup)
    setup ;;
  extras)
    setup
    # llama.cpp for the GGUF parity tests and the decode/serve benchmarks; its tests skip without it.
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
      timeout "${LLAMAWORKS_EXTRAS_TIMEOUT:-1200}" \
      "$PY" -m pip install -q -c "$VENV/constraints.txt" "llama-cpp-python[server]==0.3.36" ;;
  *)
    sed -n '2,10p' "$0"; exit 2 ;;
esac
