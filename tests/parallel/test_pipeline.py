"""Pipeline parallelism, the parts that need no process group: the split policy and its errors
(parallel/pipeline.py resolve_pipeline), and stage modules that, run one after another, are the
Transformer (same logits, same gradients, Meta's state-dict keys). The distributed runs are in
test_pipeline_train.py."""

from __future__ import annotations

import pytest
import torch

from llamaworks.model import ModelArgs, build_model
from llamaworks.parallel.parallelize import ParallelDims
from llamaworks.parallel.pipeline import (
    MULTI_STAGE,
    SCHEDULES,
    PipelineModel,
    even_split,
    resolve_pipeline,
    split_at,
)


def test_even_split_gives_the_remainder_to_the_first_stages():
    assert even_split(8, 4) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert even_split(10, 4) == [(0, 1, 2), (3, 4, 5), (6, 7), (8, 9)]
    assert [len(s) for s in even_split(32, 3)] == [11, 11, 10]


def test_split_points_name_the_first_layer_of_each_stage():
    assert split_at(6, ["layers.1", "layers.4"]) == [(0,), (1, 2, 3), (4, 5)]
    for bad in (["layers.0"], ["layers.6"], ["layers.3", "layers.2"], ["layers.2", "layers.2"], ["norm"],
                ["layers.x"]):
        with pytest.raises(ValueError, match="parallel.pp_split_points"):
            split_at(6, bad)


def test_resolve_defaults():
    plan = resolve_pipeline(2, "1f1b", 0, [], 0, n_layers=4, accum=4)
    assert (plan.schedule, plan.microbatches, plan.rounds, plan.layers) == ("1F1B", 4, 1, ((0, 1), (2, 3)))
    assert plan.stage_ids(0) == [0] and plan.stage_ids(1) == [1]
    # interleaved: two stages per rank by default, placed round the ranks (loop placement)
    plan = resolve_pipeline(2, "INTERLEAVED1F1B", 2, [], 0, n_layers=4, accum=4)
    assert (plan.schedule, plan.num_stages, plan.rounds) == ("Interleaved1F1B", 4, 2)
    assert plan.stage_ids(0) == [0, 2] and plan.stage_ids(1) == [1, 3]
    plan = resolve_pipeline(2, "GPipe", 0, ["layers.3"], 0, n_layers=4, accum=1)
    assert plan.layers == ((0, 1, 2), (3,))


def test_bubble_fraction_is_the_papers():
    # (p - 1) / (v m + p - 1): Narayanan et al. 2021, 1F1B and its interleaved variant
    assert resolve_pipeline(4, "1f1b", 8, [], 0, 8, 8).bubble_fraction() == pytest.approx(3 / 11)
    assert resolve_pipeline(4, "interleaved1f1b", 8, [], 2, 8, 8).bubble_fraction() == pytest.approx(3 / 19)


@pytest.mark.parametrize("kwargs, key", [
    (dict(schedule="zigzag"), "parallel.pp_schedule"),
    (dict(pp=1), "parallel.pp"),
    (dict(microbatches=3), "parallel.pp_microbatches"),  # does not divide accum = 4
    (dict(microbatches=1), "1F1B needs at least one microbatch per stage"),
    (dict(microbatches=-1), "parallel.pp_microbatches=-1 must be >= 0"),
    (dict(stages_per_rank=-1), "parallel.pp_stages_per_rank=-1 must be >= 0"),
    (dict(schedule="ZBVZeroBubble"), "choose one of GPipe, 1F1B, Interleaved1F1B, LoopedBFS"),  # not wired
    (dict(schedule="interleaved1f1b", stages_per_rank=1), "parallel.pp_stages_per_rank = 2"),
    (dict(stages_per_rank=2), "parallel.pp_stages_per_rank = 1"),
    (dict(pp=8), "the model has 4 layers"),
    (dict(split_points=["layers.1", "layers.2"]), "not a multiple of parallel.pp=2"),
    (dict(tied=True), "tie_word_embeddings"),
])
def test_invalid_combinations_name_the_key(kwargs, key):
    args = dict(pp=2, schedule="1F1B", microbatches=0, split_points=[], stages_per_rank=0)
    tied = kwargs.pop("tied", False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=key.replace("(", r"\(").replace(".", r"\.")):
        resolve_pipeline(args["pp"], args["schedule"], args["microbatches"], args["split_points"],
                         args["stages_per_rank"], n_layers=4, accum=4, tied_embeddings=tied)


def test_interleaved_microbatches_follow_torchs_rounds():
    with pytest.raises(ValueError, match="Interleaved1F1B sends the microbatches round the ranks 2 times"):
        resolve_pipeline(2, "interleaved1f1b", 5, [], 0, n_layers=4, accum=5)


def test_schedule_names_are_torchs():
    from torch.distributed.pipelining.schedules import PipelineScheduleMulti, get_schedule_class

    for name in SCHEDULES.values():
        assert issubclass(get_schedule_class(name), PipelineScheduleMulti) == (name in MULTI_STAGE), name


def test_mesh_degrees_include_pp():
    dims = ParallelDims.resolve(1, -1, 1, 8, n_heads=4, pp=2)
    assert (dims.pp, dims.dp_shard, dims.dp) == (2, 4, 4)
    # rank = ((pp * dp_replicate + r) * dp_shard + s) * tp + t: data-parallel rank (rank // tp) % dp
    dims = ParallelDims.resolve(1, 2, 2, 8, n_heads=4, pp=2)
    assert [dims.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="pp=2 x dp_replicate=1 x dp_shard=3"):
        ParallelDims.resolve(1, 3, 1, 4, n_heads=4, pp=2)
    with pytest.raises(ValueError, match="DDP"):
        ParallelDims.resolve(2, 1, 1, 4, n_heads=4, pp=2)


@pytest.mark.parametrize("schedule, stages_per_rank", [("1f1b", 0), ("interleaved1f1b", 2)])
def test_stages_in_order_are_the_model(schedule, stages_per_rank):
    """The stages of every rank, run in stage order, give the Transformer's logits and gradients;
    the ranks' PipelineModels hold Meta's keys, each once."""
    torch.manual_seed(0)
    args = ModelArgs.from_name("tiny", n_layers=4)
    model = build_model(args, seed=0)
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    want = model(tokens)
    want.square().mean().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    plan = resolve_pipeline(2, schedule, 0, [], stages_per_rank, n_layers=4, accum=2)
    parts = [PipelineModel(model, plan, rank) for rank in range(2)]
    stages = sorted((s, m) for p in parts for s, m in zip(p.stage_ids, p.stages))
    h = tokens
    for _, stage in stages:
        h = stage(h)
    torch.testing.assert_close(h, want, rtol=0, atol=0)
    h.square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[n], msg=n)
    keys = [k for p in parts for k in p.state_dict()]
    assert sorted(keys) == sorted(model.state_dict())
    assert parts[0].has_first and not parts[0].has_last and parts[1].has_last


@pytest.mark.parametrize("parallel, sections, match", [
    ({"pp": 2, "pp_schedule": "interleaved1f1b", "pp_stages_per_rank": 1}, {}, "parallel.pp_stages_per_rank = 2"),
    ({"pp": 2, "pp_microbatches": 3}, {}, "parallel.pp_microbatches=3"),  # the step has 4 micro-batches
    ({"pp": 2}, {"eval": {"tasks": ["arc_easy"]}}, "eval.tasks"),
    ({"pp": 2}, {"eval": {"every": 4, "batches": 2}}, "eval.batches=2"),
    ({"pp": 2, "dp_shard": 2}, {}, "world size is 2"),
    # without a pipeline the schedule is unused, but a typo in it is still an error now
    ({"pp": 1, "pp_schedule": "zigzag"}, {}, "parallel.pp_schedule='zigzag' is not a schedule"),
])
def test_bad_pipeline_is_an_error_before_any_process_group(make_config, tmp_path, monkeypatch, parallel, sections,
                                                           match):
    import torch.distributed as dist

    from llamaworks.train.trainer import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = make_config(tmp_path / "run", model={"n_layers": 4}, parallel=parallel,
                      train={"micro_batch_size": 1}, **sections)  # 4 x 32 tokens: 4 micro-batches a step
    with pytest.raises(ValueError, match=match):
        train(cfg)
    assert not dist.is_initialized()
