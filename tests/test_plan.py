from __future__ import annotations

import pytest

from llamaworks.cli import main
from llamaworks.model import ModelArgs, count_parameters
from llamaworks.plan import (
    GIB,
    GPUS,
    activation_bytes,
    flops_per_token,
    forward_flops_per_token,
    gpu_spec,
    matmul_parameters,
    plan,
    plan_command,
)

A100 = 312e12  # dense bf16 FLOP/s


def test_flops_per_token_7b_by_hand():
    # 7B (Table 2): d 4096, 32 layers, SwiGLU hidden 11008, vocabulary 32000, T 2048.
    d, L, f, v, T = 4096, 32, 11008, 32000, 2048
    n = L * (4 * d * d + 3 * d * f) + v * d  # q, k, v, o + w1, w2, w3 per layer, plus the output projection
    assert n == 6_607_077_376
    args = ModelArgs.from_name("7B")
    assert matmul_parameters(args) == n
    assert count_parameters(args) == n + v * d + (2 * L + 1) * d  # + embedding + RMSNorm gains
    expected = 6 * n + 12 * L * d * T  # 39.64e9 + 3.22e9
    assert flops_per_token(args, 2048) == expected
    assert flops_per_token(args, 2048) == pytest.approx(4.2864e10, rel=1e-4)
    assert forward_flops_per_token(args, 2048) == pytest.approx(expected / 3)
    # The attention term grows with the context; the 6N part does not.
    assert flops_per_token(args, 4096) - flops_per_token(args, 2048) == 12 * L * d * 2048


def test_paper_65b_21_days():
    # Section 2.4: 380 tokens/s/GPU on 2048 A100-80GB -> 1.4T tokens in about 21 days.
    p = plan("65B", 2048, "a100-80gb", tokens_per_gpu_s=380)
    assert p.tokens == 1.4e12
    assert p.days == pytest.approx(1.4e12 / (380 * 2048) / 86400)
    assert p.days == pytest.approx(20.82, abs=0.01)
    assert round(p.days) == 21
    # Table 15 reports 1,022,362 GPU-hours for 65B; 380 is the rounded 380.4 tokens/s.
    assert p.gpu_hours == pytest.approx(1_022_362, rel=2e-3)


def test_paper_65b_implied_mfu():
    p = plan("65B", 2048, tokens_per_gpu_s=380)
    args = ModelArgs.from_name("65B")
    L, d, T = args.n_layers, args.dim, 2048
    n_matmul = L * (4 * d * d + 3 * d * args.hidden_dim) + args.vocab_size * d
    assert p.mfu_implied
    assert p.mfu == pytest.approx((6 * n_matmul + 12 * L * d * T) * 380 / A100, rel=1e-12)
    # Bounds from the formula itself: the 6N part alone is a lower bound, and counting every
    # parameter (embedding and norms too) plus attention an upper one.
    lower = 6 * n_matmul * 380 / A100
    upper = (6 * count_parameters(args) + 12 * L * d * T) * 380 / A100
    assert lower < p.mfu < upper
    assert 0.47 < lower and upper < 0.51  # ~49.5%: a well-tuned run, as the paper claims
    assert p.tokens_per_gpu_s == 380


def test_default_mfu_and_assumed_mfu():
    p = plan("7B", 8)
    assert not p.mfu_implied and p.mfu == 0.4
    assert p.tokens_per_gpu_s == pytest.approx(0.4 * A100 / p.flops_per_token)
    q = plan("7B", 8, "h100-sxm", mfu=0.5)
    assert q.tokens_per_gpu_s == pytest.approx(0.5 * 989e12 / q.flops_per_token)
    assert q.gpu_hours == pytest.approx(1e12 / q.tokens_per_gpu_s / 3600)
    assert q.total_flops == pytest.approx(q.flops_per_token * 1e12)


def test_state_memory_is_16_bytes_per_param_over_shards():
    n = count_parameters(ModelArgs.from_name("7B"))
    p = plan("7B", 64, tp=2)  # FSDP full shard: states over tp x dp = 64 GPUs
    assert (p.dp, p.dp_shard) == (32, 32)
    assert p.weight_bytes == n * 4 / 64  # FSDP2 mixed precision: the fp32 shard is the master copy
    assert p.grad_bytes == n * 4 / 64
    assert p.optimizer_bytes == n * 8 / 64
    q = plan("7B", 64, tp=2, dp_shard=4)  # hybrid sharding: 8 shards
    assert q.weight_bytes + q.grad_bytes + q.optimizer_bytes == pytest.approx(n * 16 / 8)
    ddp = plan("7B", 8, dp_shard=1)  # plain data parallel: every GPU holds everything
    assert ddp.weight_bytes == n * 4 and ddp.gathered_bytes == 0 and ddp.accumulated_grad_bytes == 0
    assert ddp.total_bytes > 80 * GIB and not ddp.fits  # 16 x 6.7e9 = 108 GB: why the paper shards


def test_activation_memory_korthikanti():
    args = ModelArgs.from_name("7B")
    s, b, h, a, L, v = 2048, 1, 4096, 32, 32, 32000
    logits = 4 * s * b * v
    assert activation_bytes(args, s, b, 1, "selective") == L * 34 * s * b * h + logits
    stored_scores = L * s * b * h * (34 + 5 * a * s / h) + logits
    assert activation_bytes(args, s, b, 1, "none") == pytest.approx(stored_scores)
    assert activation_bytes(args, s, b, 1, "full") == L * 2 * s * b * h + logits
    # Twice the micro-batch over 4 tensor-parallel ranks (sequence parallel): half per GPU.
    half = activation_bytes(args, s, 1, 1, "selective") / 2
    assert activation_bytes(args, s, 2, 4, "selective") == pytest.approx(half)
    p = plan("7B", 8, activation_checkpointing="full", micro_batch=2)
    assert p.activation_bytes == activation_bytes(args, s, 2, 1, "full")
    assert p.grad_accum == 2048 // (8 * 2)


def test_gpu_table():
    assert gpu_spec("A100-80GB") is GPUS["a100-80gb"]
    a100 = GPUS["a100-80gb"]
    assert (a100.peak_flops, a100.memory_gib, a100.tdp_w) == (312e12, 80, 400)
    assert GPUS["h100-sxm"].peak_flops == 989e12 and GPUS["v100"].peak_flops == 125e12
    assert {"a100-40gb", "h100-pcie", "h200"} <= set(GPUS)
    with pytest.raises(ValueError, match="a100-80gb.*--gpu"):
        gpu_spec("tpu-v4")


@pytest.mark.parametrize("kwargs, match", [
    (dict(preset="7B", gpus=10, tp=4), "not divisible by tp"),
    (dict(preset="70B", gpus=8), "unknown model preset"),
    (dict(preset="7B", gpus=8, gpu="a100"), "unknown gpu"),
    (dict(preset="7B", gpus=8, mfu=0.4, tokens_per_gpu_s=3000), "not both"),
    (dict(preset="7B", gpus=8, mfu=-0.1), "--mfu"),
    (dict(preset="7B", gpus=8, mfu=40), "fraction of peak"),
    (dict(preset="7B", gpus=8, tokens_per_gpu_s=-1), "--tokens-per-gpu-s"),
    (dict(preset="7B", gpus=8, tokens_per_gpu_s=1e5), "implies MFU"),
    (dict(preset="7B", gpus=0), "--gpus"),
    (dict(preset="33B", gpus=64, tp=8), "n_heads 52.*--tp"),  # 52 heads: Meta shipped 33B as 4 shards
    (dict(preset="7B", gpus=64, dp_shard=3), "--dp-shard"),
    (dict(preset="7B", gpus=8, batch_tokens=4_000_000), "multiple of seq_len"),
    (dict(preset="7B", gpus=4096), "do not split"),
    (dict(preset="tiny", gpus=1), "--tokens"),
    (dict(preset="7B", gpus=8, activation_checkpointing="some"), "--activation-checkpointing"),
])
def test_invalid_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan(**kwargs)


def test_small_presets_plan_with_tokens():
    p = plan("tiny", 1, tokens=1e6, batch_tokens=256 * 32)
    assert p.seq_len == 256 and p.grad_accum == 32 and p.fits
    assert p.gathered_bytes == 0  # a single GPU shards nothing


def test_plan_command_prints_paper_figures(capsys):
    plan_command("65B", 2048, "a100-80gb", tokens_per_gpu_s=380)
    out = capsys.readouterr().out
    for figure in ("LLaMA-65B on 2048 x a100-80gb", "65,285,660,672", "380 tokens/s/GPU", "MFU 49.5% implied",
                   "20.8 days", "fits", "MWh", "tCO2eq", "recommended layout for 2048 x a100-80gb: tp ", "why:",
                   "bubble"):
        assert figure in out, figure


def test_cli_plan(capsys):
    argv = ["plan", "--preset", "65B", "--gpus", "2048", "--gpu", "a100-80gb", "--tokens-per-gpu-s", "380"]
    assert main(argv) == 0
    assert "20.8 days" in capsys.readouterr().out
    assert main(["plan", "--preset", "7B", "--gpus", "10", "--tp", "4"]) == 2
    err = capsys.readouterr().err
    assert "tp" in err and "error" in err
    assert main(["plan", "--preset", "13B", "--gpus", "16", "--tp", "2", "--mfu", "0.5",
                 "--activation-checkpointing", "full"]) == 0
    out = capsys.readouterr().out
    assert "MFU 50.0% assumed" in out and "activations (full)" in out
