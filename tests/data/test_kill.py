from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from llamaworks.data.document import Document, ShardWriter, read_jsonl

SCRIPT = textwrap.dedent("""
    import sys, time
    from llamaworks.data.executor import JsonlReader, LocalExecutor
    from llamaworks.data.step import Step

    class Slow(Step):
        name = "slow"
        def run(self, docs, rank=0, world_size=1):
            for d in docs:
                time.sleep(float(sys.argv[3]))
                yield d

    if __name__ == "__main__":
        LocalExecutor(sys.argv[2], workers=2, progress=False).run("t", JsonlReader(), [Slow()], [sys.argv[1]])
""")


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path):
    src = tmp_path / "in"
    for f in range(8):
        with ShardWriter(src / f"{f}.jsonl.gz") as w:
            for i in range(4):
                w.write(Document(f"{f}-{i}", f"text {f} {i}", "t"))
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), str(src), str(out), "0.15"], start_new_session=True)
    markers = out / ".state" / "stage0"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(markers.glob("*.done")) if markers.is_dir() else []) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers, mid-shard
    proc.wait()
    done_before = {p.name for p in markers.glob("*.done")}
    assert 2 <= len(done_before) < 8
    for shard in (out / "documents").glob("*.jsonl.gz"):  # every visible shard is complete
        assert len(list(read_jsonl(shard))) == 4
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "documents").glob("*.jsonl.gz")
              if p.name.replace(".jsonl.gz", ".done") in done_before}
    subprocess.run([sys.executable, str(script), str(src), str(out), "0"], check=True)
    docs = sorted(d.id for p in (out / "documents").glob("*.jsonl.gz") for d in read_jsonl(p))
    assert docs == sorted(f"{f}-{i}" for f in range(8) for i in range(4))
    assert all((out / "documents" / n).stat().st_mtime_ns == t for n, t in mtimes.items())  # not redone
    assert not list((out / "documents").glob(".*.tmp"))
