"""benchmarks/mix_stages.py keeps running: its smoke mode (a 2 MiB mix), every CPU second in a stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_mix_stages_smoke(tmp_path):
    out = tmp_path / "stages.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mix_stages.py"), "--smoke", "--json", str(out),
                           "--label", "test"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    d = json.loads(out.read_text())
    assert d["machine"]["label"] == "test" and "numpy" in d["paths"]
    for path, rows in d["paths"].items():
        one = rows["one_process"]
        stages = one["stages_cpu_s"]
        assert {"tokenise: parse JSON", "mix: gather documents' tokens", "mix: shard writes"} <= set(stages)
        assert abs(sum(stages.values()) - one["cpu_s"]) < 0.03, (path, stages)  # every CPU second in a stage
        assert ("tokenise: encode: cut + pack + probe (compiled)" in stages) == (path == "compiled")
        assert rows["2_workers"]["workers_cpu_s"] > 0
