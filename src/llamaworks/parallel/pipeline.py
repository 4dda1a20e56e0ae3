"""Pipeline parallelism: the layer stack split into stages that run on different ranks
(GPipe, Huang et al. 2019; 1F1B, Narayanan et al. 2019; interleaved 1F1B, Narayanan et al.
2021), with torch's own `torch.distributed.pipelining` schedules.

How the model is split (torchtitan's approach, written for this model):
- `resolve_pipeline` is the policy, pure and checked: how many stages, which layers each owns
  (an even split by default, the first stages taking the remainder, since stage 0's embedding
  costs no compute while the last stage's output layer is the widest matmul; or
  `parallel.pp_split_points`), which schedule and how many microbatches per schedule step.
  Stage s runs on pipeline rank s % pp (the "loop" placement of the interleaved schedules).
- `StageModule` is one stage: the Transformer's own submodules that stage owns (embedding on
  the first, final norm and output layer on the last), under the model's attribute names and
  with `layers` keyed by the global layer index, so its state-dict keys are Meta's
  (`layers.4.attention.wq.weight`). model.py is untouched.
- `PipelineModel` is what a rank holds: the submodules of all its stages under the same
  names (parameters, optimizer, DCP checkpoints, init all see one module with Meta keys, so
  a checkpoint of a PP run loads into a run without PP, and back), and `stages`, the
  StageModules that `parallelize()` applies TP/AC/compile/FSDP to, one by one.
- `Pipeline` runs a schedule step over a rank's stages, returns the microbatch losses of the
  last stage, and shares their mean with every rank of the pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from llamaworks.model import Transformer

log = logging.getLogger("llamaworks")

# parallel.pp_schedule (any case) -> torch's schedule name (get_schedule_class). The others torch
# offers place stages in a V (ZBVZeroBubble, DualPipeV) or split backward into input and weight
# parts (InterleavedZeroBubble); they are not wired here.
SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved1f1b": "Interleaved1F1B", "loopedbfs": "LoopedBFS"}
# Schedules that run several stages on each rank (torch's PipelineScheduleMulti).
MULTI_STAGE = {"Interleaved1F1B", "LoopedBFS"}


@dataclass(frozen=True)
class PipelinePlan:
    pp: int  # pipeline-parallel ranks
    schedule: str  # torch's name: "1F1B", "Interleaved1F1B", ...
    microbatches: int  # per schedule step (torch's n_microbatches)
    rounds: int  # schedule steps per optimizer step (gradient accumulation on top of the pipeline)
    layers: tuple[tuple[int, ...], ...]  # the global layer ids of each stage, in stage order

    @property
    def num_stages(self) -> int:
        return len(self.layers)

    @property
    def stages_per_rank(self) -> int:
        return self.num_stages // self.pp

    def stage_ids(self, pp_rank: int) -> list[int]:
        """The stages pipeline rank `pp_rank` runs: pp_rank, pp_rank + pp, ... (loop placement)."""
        return list(range(pp_rank, self.num_stages, self.pp))

    def bubble_fraction(self) -> float:
        """The idle share of a schedule step in the ideal model (equal stage times, no
        communication): (p - 1) / (v * m + p - 1) for p ranks, v stages per rank and m
        microbatches (Narayanan et al. 2021, section 2.2; v = 1 for GPipe and 1F1B)."""
        p, v, m = self.pp, self.stages_per_rank, self.microbatches
        return (p - 1) / (v * m + p - 1)


def even_split(n_layers: int, stages: int) -> list[tuple[int, ...]]:
    """n_layers into `stages` consecutive runs as equal as can be; the first stages take one
    layer more (stage 0's embedding is a lookup, the last stage's output layer a matmul)."""
    base, extra = divmod(n_layers, stages)
    out, start = [], 0
    for s in range(stages):
        size = base + (s < extra)
        out.append(tuple(range(start, start + size)))
        start += size
    return out


def split_at(n_layers: int, points: list[str]) -> list[tuple[int, ...]]:
    """The stages `parallel.pp_split_points` describes: each name "layers.N" starts a stage at
    layer N (so k names make k + 1 stages)."""
    ids = []
    for p in points:
        head, _, num = p.partition(".")
        if head != "layers" or not num.isdigit():
            raise ValueError(f"parallel.pp_split_points: {p!r} is not a layer name; write the first layer of "
                             'each stage after the first, e.g. ["layers.4", "layers.8"]')
        ids.append(int(num))
    if ids != sorted(set(ids)) or not all(0 < i < n_layers for i in ids):
        raise ValueError(f"parallel.pp_split_points={points} must name increasing layers between layers.1 and "
                         f"layers.{n_layers - 1} (the model has {n_layers} layers), each once")
    bounds = [0, *ids, n_layers]
    return [tuple(range(a, b)) for a, b in zip(bounds, bounds[1:])]


def schedule_name(schedule: str) -> str:
    """torch's name of `parallel.pp_schedule` (any case), or a ValueError listing the choices.
    Checked even without a pipeline, so that a typo fails on the laptop, not when pp > 1 on the cluster."""
    name = SCHEDULES.get(schedule.lower()) if isinstance(schedule, str) else None
    if name is None:
        raise ValueError(f"parallel.pp_schedule={schedule!r} is not a schedule; choose one of "
                         f"{', '.join(SCHEDULES.values())} (any case)")
    return name


def resolve_pipeline(pp: int, schedule: str, microbatches: int, split_points: list[str], stages_per_rank: int,
                     n_layers: int, accum: int, tied_embeddings: bool = False) -> PipelinePlan:
    """The pipeline the [parallel] keys describe, or a ValueError that names the key and the fix.

    accum: the micro-batches (train.micro_batch_size sequences each) one data-parallel rank
    trains on per optimizer step; each schedule step runs `microbatches` of them through the
    pipeline (0: all of them, the smallest bubble), so `microbatches` must divide accum.
    """
    if pp < 2:
        raise ValueError(f"parallel.pp={pp}: a pipeline needs at least 2 ranks (pp = 1 is no pipeline)")
    name = schedule_name(schedule)
    for key, value in (("pp_microbatches", microbatches), ("pp_stages_per_rank", stages_per_rank)):
        if value < 0:
            raise ValueError(f"parallel.{key}={value} must be >= 0 (0: the default)")
    if tied_embeddings:
        raise ValueError("parallel.pp > 1 with a tied output layer (model.tie_word_embeddings): the embedding "
                         "and the output layer would sit on different stages; train without pipeline "
                         "parallelism (models with tied embeddings are small) or untie them")
    multi = name in MULTI_STAGE
    if split_points:
        layers = split_at(n_layers, split_points)
        if len(layers) % pp:
            raise ValueError(f"parallel.pp_split_points makes {len(layers)} stages, not a multiple of "
                             f"parallel.pp={pp}; give {pp - 1} points (one stage per rank) or "
                             f"{2 * pp - 1} (two, for {name})")
        if stages_per_rank and len(layers) != stages_per_rank * pp:
            raise ValueError(f"parallel.pp_split_points makes {len(layers)} stages but parallel.pp_stages_per_rank="
                             f"{stages_per_rank} x parallel.pp={pp} = {stages_per_rank * pp}; give "
                             f"{stages_per_rank * pp - 1} points or set pp_stages_per_rank = 0")
    else:
        v = stages_per_rank or (2 if multi else 1)
        if pp * v > n_layers:
            raise ValueError(f"parallel.pp={pp} x {v} stage(s) per rank = {pp * v} stages but the model has "
                             f"{n_layers} layers: lower parallel.pp (or parallel.pp_stages_per_rank)")
        layers = even_split(n_layers, pp * v)
    v = len(layers) // pp
    if multi and v < 2:
        raise ValueError(f"parallel.pp_schedule={schedule!r} interleaves several stages on each rank but this "
                         f"pipeline has 1 per rank: set parallel.pp_stages_per_rank = 2 (or give "
                         f"{2 * pp - 1} parallel.pp_split_points), or use 1F1B")
    if not multi and v > 1:
        raise ValueError(f"parallel.pp_schedule={schedule!r} runs one stage per rank but this pipeline has {v}: "
                         "use Interleaved1F1B, or set parallel.pp_stages_per_rank = 1")
    m = microbatches or accum
    if m < 1 or accum % m:
        raise ValueError(f"parallel.pp_microbatches={microbatches} does not divide the {accum} micro-batches a "
                         "data-parallel rank trains on per step (train.batch_tokens / (train.micro_batch_size x "
                         "train.seq_len x data-parallel ranks)); choose a divisor of it, or 0 for all of them")
    if name == "1F1B" and m < pp:
        raise ValueError(f"parallel.pp_microbatches={m} is fewer than the {pp} stages: 1F1B needs at least one "
                         f"microbatch per stage; raise parallel.pp_microbatches (and train.batch_tokens) or lower "
                         "train.micro_batch_size")
    if name == "Interleaved1F1B":
        rounds = max(1, m // pp)  # torch's rule: the microbatches go round the ranks in equal rounds
        if m % rounds:
            raise ValueError(f"parallel.pp_microbatches={m} with parallel.pp={pp}: Interleaved1F1B sends the "
                             f"microbatches round the ranks {rounds} times, so it needs a multiple of {rounds}; "
                             f"use a multiple of parallel.pp")
    return PipelinePlan(pp, name, m, accum // m, tuple(layers))


class StageModule(nn.Module):
    """One pipeline stage: the Transformer's submodules it owns, under the Transformer's names.

    Input: token ids (bsz, seq) on the first stage, else the previous stage's hidden states
    (bsz, seq / seq_shards, dim); output: hidden states, or fp32 logits on the last stage.
    """

    def __init__(self, model, layer_ids: tuple[int, ...], first: bool, last: bool):
        super().__init__()
        self.args = model.args
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})  # keys: global layer ids
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        self.register_buffer("freqs_cis", model.freqs_cis, persistent=False)
        # With sequence parallelism the hidden states travel split along the sequence (tp
        # shards); the rotary table must still cover the whole sequence (parallelize sets it).
        self.seq_shards = 1

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        seqlen = h.shape[1] if self.tok_embeddings is not None else h.shape[1] * self.seq_shards
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(h)
        if seqlen > self.freqs_cis.shape[0]:
            self.init_rope(self.freqs_cis.device, seqlen)
        freqs = self.freqs_cis[:seqlen]
        for layer in self.layers.values():
            h = layer(h, freqs)
        if self.output is None:
            return h
        return self.output(self.norm(h)).float()

    def init_rope(self, device: torch.device, positions: int = 0) -> None:
        Transformer.init_rope(self, device, positions)  # the model's rule; it reads args and freqs_cis only


class PipelineModel(nn.Module):
    """What one pipeline rank holds: the submodules of its stages, under the Transformer's names
    (state dict, parameters, optimizer and checkpoints see one module with Meta keys), and
    `stages`, the StageModules that run them (not registered as children: the same modules,
    seen per stage)."""

    def __init__(self, model, plan: PipelinePlan, pp_rank: int):
        super().__init__()
        self.args = model.args
        self.plan = plan
        self.stage_ids = plan.stage_ids(pp_rank)
        last = plan.num_stages - 1
        self.tok_embeddings = model.tok_embeddings if 0 in self.stage_ids else None
        own = sorted(i for s in self.stage_ids for i in plan.layers[s])
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in own})
        self.norm = model.norm if last in self.stage_ids else None
        self.output = model.output if last in self.stage_ids else None
        stages = [StageModule(model, plan.layers[s], s == 0, s == last) for s in self.stage_ids]
        object.__setattr__(self, "stages", stages)  # a plain list: their modules are already ours

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.plan.num_stages - 1 in self.stage_ids

    def init_parameter(self, name: str, p: torch.Tensor, generator: torch.Generator | None = None) -> None:
        Transformer.init_parameter(self, name, p, generator)  # the whole model's scheme (reads args only)

    def init_rope(self, device: torch.device | None = None, positions: int = 0) -> None:
        device = device or next(self.parameters()).device
        for stage in self.stages:
            stage.init_rope(device, positions)


def apply_pp(model, pp_mesh, plan: PipelinePlan) -> PipelineModel:
    """This rank's part of `model` (a Transformer, on the meta device in training): the
    PipelineModel of its stages. The rest of the model is dropped with the caller's reference."""
    part = PipelineModel(model, plan, pp_mesh.get_local_rank())
    log.info("applied pipeline parallelism (pp=%d, %s, %d stage(s) of %d per rank, %d microbatches): this rank "
             "runs stage(s) %s with layers %s", plan.pp, plan.schedule, plan.stages_per_rank, plan.num_stages,
             plan.microbatches, part.stage_ids, [plan.layers[s] for s in part.stage_ids])
    return part


class Pipeline:
    """A schedule over this rank's stages: `step` runs one schedule step, forward and backward
    (or forward only) over plan.microbatches micro-batches."""

    def __init__(self, model: PipelineModel, pp_group, device: torch.device,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import get_schedule_class

        class Stage(PipelineStage):
            # torch reduces a stage's FSDP gradients at the end of every schedule step
            # (perform_reduce_grad: FSDP's post-backward with gradient sync on). With several
            # schedule steps per optimizer step (plan.rounds) all but the last skip it: their
            # unsharded gradients (the stage's backward ran with sync off) accumulate and the
            # last round reduce-scatters the sum once, as accumulate_gradients does without a pipeline.
            sync_grads = True

            def perform_reduce_grad(self, grad_scale_factor: int) -> None:
                if self.sync_grads:
                    super().perform_reduce_grad(grad_scale_factor)

        plan = model.plan
        self.model, self.plan, self.group, self.loss_fn = model, plan, pp_group, loss_fn
        self.weight = 1.0  # each microbatch loss's share of what step() returns
        self.stages = [Stage(m, s, plan.num_stages, device, group=pp_group)
                       for m, s in zip(model.stages, model.stage_ids)]
        stages = self.stages
        cls = get_schedule_class(plan.schedule)
        # scale_grads=False: torch would divide the parameters' whole .grad by the microbatches
        # after each schedule step, earlier rounds' gradients included; the loss is weighted instead.
        self.schedule = cls(stages if plan.schedule in MULTI_STAGE else stages[0], plan.microbatches,
                            loss_fn=self._weighted_loss, scale_grads=False)

    def _weighted_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(output, target) * self.weight

    def step(self, x: torch.Tensor, y: torch.Tensor, train: bool = True, sync: bool = True) -> torch.Tensor:
        """x, y: (microbatches * micro_batch_size, seq), this data-parallel rank's. Training: the
        microbatch losses weighted 1 / (rounds x microbatches), so that the gradients of a whole
        optimizer step's rounds are those of its mean loss, and their sum (this round's share of
        that mean) is returned; forward only (train=False): their mean. The same 0-dim detached
        value on every rank of the pipeline. sync=False: the gradients stay unreduced across the
        data-parallel ranks (every round of an optimizer step but the last)."""
        self.weight = 1 / (self.plan.microbatches * (self.plan.rounds if train else 1))
        for stage in self.stages:
            stage.sync_grads = sync
        losses: list[torch.Tensor] = []
        args = (x,) if self.model.has_first else ()
        target = y if self.model.has_last else None
        run = self.schedule.step if train else self.schedule.eval
        run(*args, target=target, losses=losses if self.model.has_last else None, return_outputs=False)
        if self.model.has_last:
            # Under loss parallelism each loss is a replicated DTensor over the tensor-parallel ranks.
            losses = [loss.full_tensor() if isinstance(loss, DTensor) else loss for loss in losses]
            total = torch.stack([loss.detach().float() for loss in losses]).sum()
        else:
            total = torch.zeros((), device=y.device)
        # The last stage's ranks hold the loss; summing over the pipeline group gives every rank it.
        dist.all_reduce(total, group=self.group)
        return total

def gather_full_model(model: PipelineModel, pp_group) -> Transformer | None:
    """The whole model as one plain Transformer on CPU, on the first rank of each pipeline (None
    elsewhere): every rank gathers its stages' tensors from their shards (a DCP full state dict
    over its data/tensor-parallel group) and the pipeline sends them to its first rank. Every
    rank must call it. Peak memory on that rank: the whole model, as for a model directory
    written from FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    sd = {k: v.detach().cpu() for k, v in sd.items()}
    first = dist.get_rank(pp_group) == 0
    parts = [None] * dist.get_world_size(pp_group) if first else None
    dist.gather_object(sd, parts, group=pp_group, group_dst=0)
    if not first:
        return None
    with torch.device("meta"):
        whole = Transformer(model.args)
    whole.load_state_dict({k: v for part in parts for k, v in part.items()}, strict=True, assign=True)
    whole.init_rope(torch.device("cpu"))
    return whole
