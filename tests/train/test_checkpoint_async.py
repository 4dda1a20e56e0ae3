"""Asynchronous checkpoints (checkpoint.async_mode = "async"): the checkpoint holds the state of its
step although training goes on while it is written, it appears only once complete, the step
after a save starts before the write ends, a run killed mid-write resumes from the checkpoint
before, and resuming gives the loss curve of the blocking saves; on one process and on two
(gloo, FSDP: DCP's async_save)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch.multiprocessing import ProcessExitedException
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torchrun import spawn

from llamaworks.configfile import dumps, load_config
from llamaworks.model import ModelArgs, build_model
from llamaworks.train import checkpoint as ckpt_io
from llamaworks.train.config import JobConfig, OptimConfig
from llamaworks.train.loader import TokenLoader
from llamaworks.train.metrics_log import read_metrics
from llamaworks.train.optim import build_optimizer
from llamaworks.train.trainer import train
from llamaworks.weights import read_safetensors

WAIT_S = 120  # how long a held write waits for the next step: a deadlock guard, not a timing


def column(out: Path, key: str = "loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(out / "metrics.jsonl") if key in r]


@pytest.fixture(scope="module")
def reference(make_config, tmp_path_factory):
    """8 uninterrupted steps with blocking checkpoints (at 3, 6 and the end, all kept)."""
    out = tmp_path_factory.mktemp("sync")
    train(make_config(out, checkpoint={"keep_last": 3}))
    return out


class Timeline:
    """Records, in order, the optimizer steps a process starts and the checkpoint writes, holding
    each write until the next optimizer step has started or the loop waits for the write (the
    run's end); WAIT_S guards against a deadlock, so that a loop that blocks on the write shows up
    as a wrong order, not a hang."""

    def __init__(self):
        self.events: list[tuple[str, int]] = []
        self.steps = self.waiting = 0  # optimizer steps started; threads inside Checkpointer.wait
        self.stepped = threading.Condition()

    def optimizer_step(self, optimizer, args, kwargs) -> None:
        with self.stepped:
            self.steps += 1
            self.events.append(("step", self.steps))
            self.stepped.notify_all()

    def watch_wait(self, wait):
        def watched(*args, **kwargs):
            with self.stepped:
                self.waiting += 1
                self.stepped.notify_all()
            try:
                return wait(*args, **kwargs)
            finally:
                with self.stepped:
                    self.waiting -= 1

        return watched

    def hold(self, write):
        """`write` (a function given the checkpoint's path, or a DCP writer whose .path is in it), held until
        the step after the checkpoint's has started, or the loop waits for the write."""

        def held(*args, **kwargs):
            where = " ".join(str(x) for x in args) + str(getattr(args[0], "path", ""))
            step = int(re.search(r"step_(\d{8})", where).group(1))  # the checkpoint's step
            with self.stepped:
                self.events.append(("write starts", step))
                self.stepped.wait_for(lambda: self.steps > step or self.waiting, timeout=WAIT_S)
            result = write(*args, **kwargs)
            with self.stepped:
                self.events.append(("write ends", step))
            return result

        return held

    def overlapped(self) -> list[int]:
        """The checkpoints whose write was still running when the optimizer step after theirs began
        (the write may have started after that step did: DCP plans in the background first)."""
        return [step for what, step in self.events if what == "write starts"
                and ("step", step + 1) in self.events
                and self.events.index(("step", step + 1)) < self.events.index(("write ends", step))]


# ---------------------------------------------------------------------------- one process


def test_the_snapshot_is_the_saved_step_and_appears_only_when_complete(tmp_path, token_shards, tiny_tokenizer,
                                                                      monkeypatch):
    torch.manual_seed(0)
    model = build_model(ModelArgs.from_name("tiny", n_layers=2, vocab_size=tiny_tokenizer.vocab_size), seed=0)
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    loader = TokenLoader(token_shards, "train", batch_size=4, seq_len=32, seed=0)

    def step():
        x, y = next(loader)
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
        opt.zero_grad()

    step()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_m = {k: s["exp_avg"].clone() for k, s in opt.state_dict()["state"].items()}
    release = threading.Event()
    real = ckpt_io.save_safetensors

    def held(*args, **kwargs):
        assert release.wait(WAIT_S)
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_io, "save_safetensors", held)
    writer = ckpt_io.Checkpointer(tmp_path, keep_last=2, async_mode="async")
    path = writer.save(1, model, tiny_tokenizer, opt, loader, {"tokens": 128})
    step()  # training changes weights and optimizer state while the write is held
    step()
    assert ckpt_io.list_checkpoints(tmp_path) == [] and not path.exists()  # only the hidden folder
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()][0].startswith(".step_00000001")
    release.set()
    writer.close()
    assert ckpt_io.list_checkpoints(tmp_path) == [path]
    weights = read_safetensors(path / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in saved.items())
    assert not torch.equal(weights["output.weight"], model.output.weight.detach())  # not vacuous
    state = torch.load(path / ckpt_io.STATE, weights_only=False)
    assert state["step"] == 1
    for k, m in saved_m.items():
        assert torch.equal(state["optimizer"]["state"][k]["exp_avg"], m), k


def test_never_two_in_flight(tmp_path, token_shards, tiny_tokenizer, monkeypatch):
    model = build_model(ModelArgs.from_name("tiny", n_layers=1, vocab_size=tiny_tokenizer.vocab_size), seed=0)
    opt = build_optimizer(model, OptimConfig())
    loader = TokenLoader(token_shards, "train", batch_size=4, seq_len=32)
    running, overlaps, real = [], [], ckpt_io.save_safetensors

    def counted(*args, **kwargs):
        running.append(1)
        overlaps.append(len(running))
        try:
            return real(*args, **kwargs)
        finally:
            running.pop()

    monkeypatch.setattr(ckpt_io, "save_safetensors", counted)
    writer = ckpt_io.Checkpointer(tmp_path, keep_last=1, async_mode="async")
    for s in range(1, 5):
        writer.save(s, model, tiny_tokenizer, opt, loader, {"tokens": 0})
    writer.close()
    assert overlaps == [1, 1, 1, 1]
    # keep_last=1 is safe: the one kept is complete before the next save starts
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000004"]


def test_async_run_writes_the_sync_checkpoints_and_resumes_exactly(reference, make_config, tmp_path,
                                                                  monkeypatch):
    out = tmp_path / "run"
    timeline = Timeline()
    monkeypatch.setattr(ckpt_io, "save_safetensors", timeline.hold(ckpt_io.save_safetensors))
    monkeypatch.setattr(ckpt_io.Checkpointer, "wait", timeline.watch_wait(ckpt_io.Checkpointer.wait))
    handle = register_optimizer_step_pre_hook(timeline.optimizer_step)
    try:  # half the run; decay_steps pins the cosine to the full run's length
        train(make_config(out, train={"max_steps": 5}, schedule={"decay_steps": 8},
                          checkpoint={"async_mode": "async"}))
    finally:
        handle.remove()
        monkeypatch.undo()
    # The save after step 3 is written while step 4 trains; the final one (step 5) the run waits for.
    assert timeline.overlapped() == [3]
    assert ("write ends", 5) in timeline.events
    assert [p.name for p in ckpt_io.list_checkpoints(out)] == ["step_00000003", "step_00000005"]
    ref = read_safetensors(reference / "checkpoints" / "step_00000003" / "model.safetensors")
    mine = read_safetensors(out / "checkpoints" / "step_00000003" / "model.safetensors")
    assert all(torch.equal(mine[k], ref[k]) for k in ref)  # the step-3 state, not a later one

    train(load_config(JobConfig, out / "config.toml", ["--train.max_steps", "8"]), resume=True)
    for key in ("loss", "grad_norm", "lr"):
        assert column(out, key) == column(reference, key), key  # bitwise: fp32 on CPU
    final, ref_final = read_safetensors(out / "model" / "model.safetensors"), read_safetensors(
        reference / "model" / "model.safetensors")
    assert all(torch.equal(final[k], ref_final[k]) for k in ref_final)


KILL_DURING_SECOND_WRITE = """
import os, signal, sys, threading
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

torch.set_num_threads(1)
stepped, steps = threading.Condition(), [0]


def count(*args):
    with stepped:
        steps[0] += 1
        stepped.notify_all()


register_optimizer_step_pre_hook(count)
real_save, calls = torch.save, []


def save(*args, **kwargs):
    calls.append(threading.current_thread() is threading.main_thread())
    if len(calls) == 2:  # the second checkpoint (step 6): its weights are written, the state not yet
        print("main thread" if calls[-1] else "background thread", file=sys.stderr, flush=True)
        with stepped:  # killed while training goes on: step 7 has started
            stepped.wait_for(lambda: steps[0] >= 7, timeout=120)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(*args, **kwargs)


torch.save = save
from llamaworks.cli import main

sys.exit(main(["pretrain", "--config", sys.argv[1]]))
"""


def test_a_run_killed_during_an_async_write_resumes_from_the_last_complete_checkpoint(reference, make_config,
                                                                                      tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "job.toml"
    config.write_text(dumps(make_config(out, checkpoint={"async_mode": "async"})))
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SECOND_WRITE, str(config)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "background thread" in proc.stderr
    assert [p.name for p in ckpt_io.list_checkpoints(out)] == ["step_00000003"]
    (partial,) = [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".step_00000006")]
    assert (partial / "model.safetensors").is_file() and not (partial / ckpt_io.STATE).exists()
    assert [s for s, _ in column(out)][:6] == list(range(1, 7))

    summary = train(load_config(JobConfig, out / "config.toml"), resume=True)
    assert summary["steps"] == 8
    assert column(out) == column(reference)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------- two processes (gloo, FSDP)


def _fsdp_worker(rank: int, world: int, cfg: JobConfig, resume: bool, mode: str) -> None:
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    timeline = Timeline()
    register_optimizer_step_pre_hook(timeline.optimizer_step)
    if mode == "kill":  # rank 0 dies while the step-6 checkpoint's shards are written, training going on
        real = FileSystemWriter.write_data

        def write_data(self, *args, **kwargs):
            if rank == 0 and "step_00000006" in str(self.path):
                with timeline.stepped:
                    timeline.stepped.wait_for(lambda: timeline.steps > 6, timeout=WAIT_S)
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, *args, **kwargs)

        FileSystemWriter.write_data = write_data
    elif mode == "timeline":
        FileSystemWriter.write_data = timeline.hold(FileSystemWriter.write_data)
        ckpt_io.Checkpointer.wait = timeline.watch_wait(ckpt_io.Checkpointer.wait)
    train(cfg, resume=resume)
    Path(cfg.run.out_dir, f"timeline_{rank}.json").write_text(json.dumps(timeline.overlapped()))


@pytest.mark.slow
def test_fsdp_async_checkpoints_overlap_survive_a_kill_and_resume_like_one_process(reference, make_config,
                                                                                    tmp_path):
    os.environ["OMP_NUM_THREADS"] = "1"
    fsdp = {"train": {"micro_batch_size": 2}, "parallel": {"dp_shard": -1}, "checkpoint": {"async_mode": "async"}}

    # 5 steps on 2 processes: DCP checkpoints at 3 (written while step 4 trains) and 5 (waited for)
    out = tmp_path / "half"
    spawn(_fsdp_worker, make_config(out, **{**fsdp, "train": {"micro_batch_size": 2, "max_steps": 5}},
                                    schedule={"decay_steps": 8}), False, "timeline")
    for rank in (0, 1):
        assert json.loads((out / f"timeline_{rank}.json").read_text()) == [3], rank
    assert [p.name for p in ckpt_io.list_checkpoints(out)] == ["step_00000003", "step_00000005"]
    assert all(ckpt_io.is_dcp_checkpoint(p) for p in ckpt_io.list_checkpoints(out))
    # ... which resumes to step 8 on 2 processes along the one-process curve
    spawn(_fsdp_worker, load_config(JobConfig, out / "config.toml", ["--train.max_steps", "8"]), True, "")
    want = dict(column(reference))
    got = dict(column(out))
    assert sorted(got) == list(range(1, 9))
    assert max(abs(got[s] - want[s]) for s in want) < 1e-5, (got, want)

    # A run killed while writing the step-6 checkpoint resumes from step 3's.
    killed = tmp_path / "killed"
    with pytest.raises(ProcessExitedException):
        spawn(_fsdp_worker, make_config(killed, **fsdp), False, "kill")
    assert [p.name for p in ckpt_io.list_checkpoints(killed)] == ["step_00000003"]
    assert [p for p in (killed / "checkpoints").iterdir() if p.name.startswith(".step_00000006")]
    spawn(_fsdp_worker, load_config(JobConfig, killed / "config.toml"), True, "")
    got = dict(column(killed))
    assert sorted(got) == list(range(1, 9))
    assert max(abs(got[s] - want[s]) for s in want) < 1e-5, (got, want)
    assert not [p for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")]
