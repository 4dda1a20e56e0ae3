"""The native kernels on a CPU without AVX-512 (issue 16: "no precision or path may crash on a CPU
family the others run on"): the AVX2-only family (Zen 2 and 3, Haswell to Comet Lake), emulated on
whatever x86 machine runs the suite by qemu-user. `qemu-x86_64 -cpu max` reports and executes AVX2 and
FMA but no AVX-512 (QEMU's TCG does not implement it), so an AVX-512 instruction reached on any path
kills the process with SIGILL, and the instruction set chosen at run time is the one such a CPU gets.

Under it run the native kernels' own tests (every precision, every kernel level the emulated CPU has,
against the PyTorch reference) and the tokenizer's and MinHash's run-time dispatched kernels. Compiled
graphs are left out: inductor's compiler runs natively (outside the emulation) with -march=native, the
host's instruction set; the wrapper below keeps it at x86-64-v3 for anything else compiled at run time.
Hugepages' tests are left out too: they read the guest's addresses in the emulator's own /proc maps.

Skipped without qemu-x86_64 (Debian: qemu-user) unless LLAMAWORKS_REQUIRE_QEMU=1 (CI installs it)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
QEMU = shutil.which("qemu-x86_64")
TESTS = [*(f"tests/inference/test_{name}.py" for name in ("kernels", "kernels_q8", "step_ops", "int4_tiles", "block",
                                                          "prefill_kernel", "paged_attention", "quant")),
         "tests/tokenizer/test_text_kernels.py", "tests/tokenizer/test_bpe_kernel.py", "tests/data/test_minhash.py"]
# A C compiler run from the emulated process runs on the host: never for the host's instruction set.
WRAPPER = """#!/bin/sh
for a do shift
  case "$a" in -march=native) set -- "$@" -march=x86-64-v3;; -mtune=native) ;; *) set -- "$@" "$a";; esac
done
exec {real} "$@"
"""
PROBE = ("import json, torch; from llamaworks.inference import native; native.load(); "
         "print(json.dumps({'torch': torch.backends.cpu.get_cpu_capability(), 'native': native.current_isa(), "
         "'features': sorted(native.cpu_features())}))")


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The environment and command prefix of an AVX2-only process, checked to be one."""
    if QEMU is None or sys.platform != "linux" or os.uname().machine != "x86_64":
        if os.environ.get("LLAMAWORKS_REQUIRE_QEMU") == "1":
            pytest.fail("LLAMAWORKS_REQUIRE_QEMU=1 but qemu-x86_64 is missing: apt-get install qemu-user")
        pytest.skip("qemu-x86_64 not installed (Debian: qemu-user): the AVX2-only check needs it")
    tmp = tmp_path_factory.mktemp("avx2")
    (tmp / "bin").mkdir()
    for name, real in (("cc", "gcc"), ("gcc", "gcc"), ("c++", "g++"), ("g++", "g++")):
        found = shutil.which(real)
        if found:
            (tmp / "bin" / name).write_text(WRAPPER.format(real=found))
            (tmp / "bin" / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMAWORKS_REQUIRE", "PYTEST_"))}
    env.pop("LLAMAWORKS_ISA", None)
    env.update(PATH=f"{tmp / 'bin'}{os.pathsep}{env.get('PATH', '')}", CC=str(tmp / "bin" / "gcc"),
               CXX=str(tmp / "bin" / "g++"), TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")])))
    prefix = [QEMU, "-cpu", "max", sys.executable]
    # Built here (natively, no -march: the instruction sets are chosen per file at run time) so the
    # emulated tests load it instead of building it at emulated speed.
    subprocess.run([sys.executable, "-m", "llamaworks.inference.native", "build"], check=True, env=env, cwd=ROOT,
                   capture_output=True, timeout=900)
    probe = subprocess.run([*prefix, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0, probe.stderr[-3000:]
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    # The point of the check: without these the emulated CPU would not be the AVX2-only family.
    assert seen["torch"] == "AVX2" and seen["native"] == "avx2", seen
    assert "avx512f" not in seen["features"] and {"avx2", "fma"} <= set(seen["features"]), seen
    return prefix, env


def test_native_kernels_pass_their_tests_on_an_avx2_only_cpu(emulated):
    prefix, env = emulated
    cmd = [*prefix, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow and not gpu",
           "-k", "not compile and not inductor", *TESTS]
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    tail = (run.stdout + run.stderr)[-6000:]
    # -11 / -4 (SIGSEGV / SIGILL) is an instruction the family lacks or a fault on its code path.
    assert run.returncode == 0, f"exit {run.returncode} under {' '.join(prefix[:3])}:\n{tail}"
    assert " passed" in tail and "skipped" in tail, tail  # the AVX-512 levels skip: they must, here
