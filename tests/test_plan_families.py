"""`llamaworks plan` for the released families' presets (issue 15)."""

from __future__ import annotations

import pytest

from llamaworks.cli import main
from llamaworks.model import ModelArgs, count_parameters
from llamaworks.plan import flops_per_token, matmul_parameters, plan


def _by_hand(args: ModelArgs) -> int:
    # q and o: dim x dim; k and v: dim x (n_kv_heads * head_dim); w1, w2, w3: dim x hidden; the output.
    d, kv = args.dim, args.n_kv_heads * args.head_dim
    return args.n_layers * (2 * d * d + 2 * d * kv + 3 * d * args.hidden_dim) + args.vocab_size * d


@pytest.mark.parametrize("name", ["llama2-70b", "llama3-8b", "llama3.1-405b", "llama3.2-1b", "llama3.2-3b"])
def test_matmul_parameters_count_the_output_projection_once(name):
    args = ModelArgs.from_name(name)
    assert matmul_parameters(args) == _by_hand(args)
    norms = (2 * args.n_layers + 1) * args.dim
    embedding = 0 if args.tie_word_embeddings else args.vocab_size * args.dim  # tied: the same tensor
    assert count_parameters(args) == _by_hand(args) + embedding + norms


@pytest.mark.parametrize("name,tokens,seq_len", [
    ("llama2-7b", 2.0e12, 4096), ("llama2-70b", 2.0e12, 4096), ("codellama-7b", 0.5e12, 16384),
    ("llama3-8b", 15e12, 8192), ("llama3.1-405b", 15.6e12, 8192), ("llama3.2-1b", 9e12, 8192),
])  # fmt: skip
def test_family_presets_plan_with_their_budgets(name, tokens, seq_len):
    p = plan(name, 512, "h100-sxm", tp=8)
    assert p.tokens == tokens and p.seq_len == seq_len  # 3.1/3.2: pretrained at 8192, then extended
    assert p.params == count_parameters(ModelArgs.from_name(name))
    assert p.flops_per_token == flops_per_token(p.args, seq_len)
    assert p.format().startswith(f"{name} on 512 x h100-sxm")


def test_plan_and_carbon_commands_accept_family_presets(capsys):
    assert main(["plan", "--preset", "llama3-8b", "--gpus", "512", "--gpu", "h100-sxm", "--tp", "8"]) == 0
    out = capsys.readouterr().out
    assert "llama3-8b on 512 x h100-sxm" in out and "8,030,261,248" in out and "tCO2eq" in out
    assert main(["plan", "--preset", "7B", "--gpus", "2048"]) == 0
    assert capsys.readouterr().out.startswith("LLaMA-7B on 2048")
    assert main(["plan", "--preset", "tiny", "--gpus", "1"]) == 2
    assert "preset 'tiny' has no published token budget; pass tokens (--tokens)" in capsys.readouterr().err
    assert main(["plan", "--preset", "llama4", "--gpus", "1"]) == 2
    assert "llama3.2-1b" in capsys.readouterr().err  # the error lists the presets
    assert main(["carbon", "--gpu-hours", "1000", "--power-w", "700"]) == 0
    assert "770.0 kWh" in capsys.readouterr().out
