"""`plan` with pipeline parallelism and FSDP2 mixed precision: the bubble against a simulated 1F1B
schedule, the memory of a 65B layout by hand, and the layout it recommends for the paper's run."""

from __future__ import annotations

import pytest

from llamaworks.model import ModelArgs
from llamaworks.plan import (
    GIB,
    activation_bytes,
    explain_recommendation,
    pipeline_activation_bytes,
    pipeline_bubble,
    plan,
    recommend,
    step_time,
)


def simulated_1f1b_bubble(p: int, m: int, forward: float = 1.0, backward: float = 2.0) -> float:
    """Run 1F1B on p stages as a list of ops per stage, each starting as soon as its stage is free
    and its inputs exist (forward i after the previous stage's forward i; backward i after this
    stage's forward i and the next stage's backward i); the bubble is the idle share of the span."""
    orders = []
    for s in range(p):
        warm = min(p - s - 1, m)  # forwards before the first backward
        ops, f, b = [("F", i) for i in range(warm)], warm, 0
        while f < m:
            ops += [("F", f), ("B", b)]
            f, b = f + 1, b + 1
        ops += [("B", i) for i in range(b, m)]
        orders.append(ops)
    done, free, pos = {}, [0.0] * p, [0] * p
    while any(pos[s] < len(orders[s]) for s in range(p)):
        moved = False
        for s in range(p):
            if pos[s] == len(orders[s]):
                continue
            kind, i = orders[s][pos[s]]
            if kind == "F":
                deps = [("F", s - 1, i)] if s > 0 else []
            else:
                deps = [("F", s, i)] + ([("B", s + 1, i)] if s < p - 1 else [])
            if all(d in done for d in deps):
                start = max([free[s]] + [done[d] for d in deps])
                done[(kind, s, i)] = free[s] = start + (forward if kind == "F" else backward)
                pos[s] += 1
                moved = True
        assert moved, "the schedule deadlocked"
    return 1 - m * (forward + backward) / max(free)


@pytest.mark.parametrize("p, m", [(1, 4), (2, 4), (4, 4), (4, 8), (8, 32), (4, 2)])
def test_1f1b_bubble_matches_a_simulated_schedule(p, m):
    assert pipeline_bubble(p, m) == pytest.approx((p - 1) / (m + p - 1), abs=0)
    assert pipeline_bubble(p, m) == pytest.approx(simulated_1f1b_bubble(p, m), abs=1e-12)


def test_interleaving_divides_the_bubble_by_the_stages_per_rank():
    assert pipeline_bubble(4, 8, 2) == 3 / 19  # (p-1)/(v*m+p-1)
    assert pipeline_bubble(4, 8, 1) == 3 / 11
    assert pipeline_bubble(1, 8, 1) == 0.0
    # for m >> p the bubble is ~ (p-1)/(v*m): v stages per rank divide it by v
    assert pipeline_bubble(8, 1000, 4) / pipeline_bubble(8, 1000, 1) == pytest.approx(1 / 4, rel=0.01)


def test_pipeline_activations_by_hand():
    args = ModelArgs.from_name("65B")  # 80 layers, dim 8192, vocabulary 32000
    s, b, t, h, v = 2048, 1, 8, 8192, 32000
    layer = 34 * s * b * h / t  # Korthikanti, selective, sequence parallel
    logits = 4 * s * b * v / t
    # pp = 1 is the plain formula
    assert pipeline_activation_bytes(args, s, b, t, "selective") == pytest.approx(
        activation_bytes(args, s, b, t, "selective"), rel=1e-12)
    # 1F1B, p = 4, m = 8: the first stage holds p = 4 micro-batches through its 20 layers
    assert pipeline_activation_bytes(args, s, b, t, "selective", pp=4, microbatches=8) == pytest.approx(
        20 * 4 * layer, rel=1e-12)
    # ... m = 2 < p: only 2 in flight, and the last stage (20 layers + logits) may weigh more
    assert pipeline_activation_bytes(args, s, b, t, "selective", pp=4, microbatches=2) == pytest.approx(
        max(20 * 2 * layer, 20 * layer + logits), rel=1e-12)
    # interleaved, v = 2: L * (1 + (p-1)/(p*v)) layers' worth
    assert pipeline_activation_bytes(args, s, b, t, "selective", pp=4, microbatches=8,
                                     stages_per_rank=2) == pytest.approx(80 * (1 + 3 / 8) * layer, rel=1e-12)
    # fp32 compute doubles the activations, not the fp32 logits
    assert pipeline_activation_bytes(args, s, b, t, "selective", dtype_bytes=4) == pytest.approx(
        2 * 80 * layer + logits, rel=1e-12)


def test_mixed_precision_memory_of_a_65b_pipeline_layout_by_hand():
    p = plan("65B", 2048, tp=8, pp=4, micro_batch=1)
    d, f, v = 8192, 22016, 32000
    assert (ModelArgs.from_name("65B").hidden_dim, ModelArgs.from_name("65B").n_layers) == (f, 80)
    layer = 4 * d * d + 3 * d * f  # q, k, v, o; w1, w2, w3
    stage = 20 * (layer + 2 * d) + v * d + d  # 20 blocks with their norms + output projection + final norm
    dp = 2048 // (8 * 4)
    m = 2048 // dp  # 2048 sequences of 2048 tokens: 32 micro-batches of 1 per data-parallel rank
    assert (p.dp, p.dp_shard, p.grad_accum, p.stage_params) == (64, 64, 32, stage)
    shards = 8 * 64
    assert p.weight_bytes == pytest.approx(4 * stage / shards)  # fp32 master shard
    assert p.grad_bytes == pytest.approx(4 * stage / shards)  # fp32 reduce dtype
    assert p.optimizer_bytes == pytest.approx(8 * stage / shards)  # m, v
    assert p.gathered_bytes == pytest.approx(2 * layer * 2 / 8)  # two bf16 layers, a tp slice each
    assert p.accumulated_grad_bytes == pytest.approx(4 * stage / 8)  # unsharded fp32 until the last micro-batch
    acts = 20 * 4 * 34 * 2048 * d / 8
    assert p.activation_bytes == pytest.approx(acts)
    total = 16 * stage / shards + 2 * layer * 2 / 8 + 4 * stage / 8 + acts
    assert p.total_bytes == pytest.approx(total)
    # 0.48 GiB of states, 0.38 gathered, 7.66 accumulated gradients, 5.31 activations
    assert total / GIB == pytest.approx(13.83, abs=0.01) and p.fits
    assert p.bubble == pytest.approx(3 / (m + 3))
    # the assumed MFU is the compute's: the bubble takes its share of the throughput
    no_pp = plan("65B", 2048, tp=8)
    assert p.tokens_per_gpu_s == pytest.approx(no_pp.tokens_per_gpu_s * (1 - 3 / 35))
    # fp32 compute: gathered weights and activations double, the fp32 states do not
    fp32 = plan("65B", 2048, tp=8, pp=4, mp_param_dtype="fp32")
    assert fp32.gathered_bytes == 2 * p.gathered_bytes and fp32.activation_bytes == pytest.approx(2 * acts)
    assert fp32.weight_bytes == p.weight_bytes


@pytest.mark.parametrize("kwargs, match", [
    (dict(pp=3), "tp x pp"),
    (dict(pp=4, pp_schedule="zb"), "--pp-schedule"),
    (dict(pp=4, stages_per_rank=2), "interleaved1f1b"),
    (dict(pp=64, pp_schedule="interleaved1f1b"), "exceed"),
    (dict(mp_param_dtype="fp8"), "--mp-param-dtype"),
])
def test_invalid_pipeline_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan("65B", 2048, **kwargs)


def test_step_time_of_the_recommended_65b_layout_by_hand():
    found = recommend("65B", 2048, "a100-80gb")
    assert found and all(p.fits for p, _ in found)
    assert [s.total for _, s in found] == sorted(s.total for _, s in found)
    best, t = found[0]
    assert best.tp <= 8 and best.dp * best.tp * best.pp == 2048
    # Hand check of the model for the layout it picks: tp 4, no pipeline, dp 512, 4 sequences per
    # micro-batch (one per step on each rank).
    assert (best.tp, best.pp, best.dp, best.micro_batch, best.grad_accum) == (4, 1, 512, 4, 1)
    fpt = best.flops_per_token
    compute = 4 * 2**20 / 2048 * fpt / (312e12 * 0.4)
    assert t.compute == pytest.approx(compute) and t.compute == pytest.approx(6.67, abs=0.01)
    tp = 80 * 1 * 8 * (3 / 4) * 2048 * 4 * 8192 * 2 / 300e9  # SP collectives of 80 blocks, bf16
    assert t.tp_comm == pytest.approx(tp)
    dp = (1 * 2 * 2 + 4) * (best.params / 4) * 511 / 512 / 25e9  # bf16 gathers fwd + bwd, fp32 reduce
    assert t.dp_comm == pytest.approx(dp)
    assert t.bubble == 0 and t.total == pytest.approx(compute + tp)  # the gathers hide behind compute
    assert step_time(best).total == t.total


def test_recommendation_explains_its_choice():
    found = recommend("65B", 2048, "a100-80gb")
    text = explain_recommendation(found)
    best = found[0][0]
    assert text.startswith(f"recommended layout for 2048 x a100-80gb: {best.layout}")
    for part in ("tp 4 stays inside a node", "pp 1:", "bubble", "dp 512 with FSDP", "hidden behind",
                 "micro-batch 4:", "runner-up", "selective checkpointing"):
        assert part in text, part
    # a GPU too small for the 65B without pipelining gets a pipelined layout and says why
    small = recommend("65B", 256, "a100-40gb")
    assert small and small[0][0].pp > 1
    assert f"pp {small[0][0].pp}: its bubble is" in explain_recommendation(small)


def test_pp_schedule_takes_torchs_names_in_any_case(capsys):
    from llamaworks.plan import plan_command

    assert plan("65B", 2048, pp=4, pp_schedule="Interleaved1F1B") == plan("65B", 2048, pp=4,
                                                                          pp_schedule="interleaved1f1b")
    assert plan_command("65B", 2048, pp=4, pp_schedule="1F1B") == 0  # the CLI does not restrict the case
    assert "tp 1 x pp 4 x dp 512" in capsys.readouterr().out
