"""benchmarks/gpu_check.py: its CPU smoke mode end to end (so the script and the `gpu` tests
cannot rot before a GPU is lent), and its pure parts: the datasheet lookup, the decode
roofline's byte count, the README section it renders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_benchmarks import load_benchmark  # tests/ is on sys.path

from llamaworks.model import ModelArgs, build_model

ROOT = Path(__file__).resolve().parents[1]
gpu_check = load_benchmark("gpu_check")


@pytest.mark.parametrize("name, key", [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100-sxm"),
                                       ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
                                       ("NVIDIA A100-SXM4-40GB", "a100-40gb"), ("NVIDIA GeForce RTX 4090", None)])
def test_datasheet_lookup(name, key):
    got, flops, bandwidth = gpu_check.datasheet(name)
    assert got == key
    assert (flops is None) == (bandwidth is None) == (key is None)


def test_decode_bytes_per_token_counts_weights_and_cache():
    args = ModelArgs.from_name("tiny")
    model = build_model(args, device="meta", dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    head_dim = args.dim // args.n_heads
    # bf16: 2 bytes; the embedding table but one row is not read; K and V for 10 positions
    want = 2 * (n - args.vocab_size * args.dim + args.dim) + 2 * 2 * args.n_layers * 10 * args.n_kv_heads * head_dim
    assert gpu_check.decode_bytes_per_token(model, 10) == want


@pytest.mark.slow
def test_cpu_smoke_mode_runs_the_gpu_tests_and_writes_the_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--out",
                           str(out), "--label", "contended (test)"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    tests = result["tests"]
    assert tests["passed"] == 6 and tests["failed"] == tests["error"] == tests["skipped"] == 0, tests
    assert {"test_flash_sdpa_backend_is_selected", "test_fsdp_mixed_precision_step",
            "test_single_process_group_all_reduce",
            "test_profiled_steps_write_a_trace_and_a_memory_snapshot"} <= set(tests["tests"])
    (train,), (decode,) = result["train"], result["decode"]
    assert train["preset"] == "tiny" and train["tokens_per_s"] > 0 and 0 < train["mfu_vs_measured"]
    assert train["mfu_vs_datasheet"] is None  # no GPU, no datasheet
    assert decode["tokens_per_s"] > 0 and decode["roofline_tokens_per_s_measured"] > 0
    assert result["machine"]["label"] == "contended (test)"
    # the markdown it prints is the README section rendered from the JSON
    markdown = gpu_check.render_markdown(result)
    assert markdown in proc.stdout and "CPU smoke mode" in markdown and "6 passed" in markdown
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## GPU\n\n{gpu_check.BEGIN}\nold\n{gpu_check.END}\n\nafter\n")
    gpu_check.update_readme(markdown, readme)
    text = readme.read_text()
    assert "old" not in text and markdown in text and text.endswith(f"{gpu_check.END}\n\nafter\n")
