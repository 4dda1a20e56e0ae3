"""Experiment tracking (log.tensorboard, log.wandb) and profiling on demand (profile.steps): a tiny
run's event file read back with TensorBoard's own reader, the W&B offline run folder with its
summary, and the profiler's Chrome trace holding exactly the chosen steps."""

from __future__ import annotations

import json
import struct
import sys

import pytest

from llamaworks.train.metrics_log import read_metrics
from llamaworks.train.profiling import profile_window
from llamaworks.train.tracking import check_backends, tracked_scalars
from llamaworks.train.trainer import train

TRAIN_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_memory_gb")


def test_tracked_scalars_are_a_rows_numbers_without_the_step():
    row = {"step": 3, "loss": 2.5, "tokens": 128, "ok": True, "name": "x", "val_loss": None}
    assert tracked_scalars(row) == {"loss": 2.5, "tokens": 128.0}


def test_profile_window_is_checked():
    assert profile_window([]) is None
    assert profile_window([2, 2]) == (2, 2)
    for bad in ([0, 2], [3, 2], [1], [1, 2, 3]):
        with pytest.raises(ValueError, match="profile.steps"):
            profile_window(bad)


def test_a_missing_backend_is_a_clear_error(monkeypatch):
    from llamaworks.train.config import LogConfig

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ValueError, match=r"log.wandb = true needs the wandb package.*llamaworks\[wandb\]"):
        check_backends(LogConfig(wandb=True))


def test_tensorboard_event_file_holds_the_metrics_and_config(make_config, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(make_config(tmp_path, log={"tensorboard": True}))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1, events
    acc = EventAccumulator(str(events[0]), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    for key in TRAIN_KEYS:
        want = {r["step"]: r[key] for r in rows if key in r}
        got = {e.step: e.value for e in acc.Scalars(key)}
        assert sorted(got) == list(range(1, 9)), (key, sorted(got))
        for step, value in want.items():  # event files store float32
            assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-12), (key, step)
    val = {e.step: e.value for e in acc.Scalars("val_loss")}
    assert sorted(val) == [4, 8]
    assert "config/text_summary" in acc.Tags()["tensors"]  # add_text: the resolved config
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "tensorboard = true" in text and "max_steps = 8" in text
    # metrics.jsonl and the loss curve are still written
    assert (tmp_path / "loss_curve.png").exists() and len([r for r in rows if "loss" in r]) == 8


def _wandb_records(path):
    """The records of an offline run's .wandb file (LevelDB's log format behind W&B's 7-byte header:
    32 KiB blocks of chunks, each with a crc32, length and kind; FULL=1 or FIRST/MIDDLE/LAST=2/3/4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the block's zero padding
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def test_wandb_offline_run_folder_holds_the_summary(make_config, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default without it
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(make_config(tmp_path, log={"wandb": True, "wandb_name": "tiny"}))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    records = list(_wandb_records(next(runs[0].glob("run-*.wandb"))))
    summaries = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update} for r in records
                 if r.WhichOneof("record_type") == "summary"]
    summary = [s for s in summaries if "loss" in s][-1]
    last = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r][-1]
    for key in TRAIN_KEYS:
        assert summary[key] == pytest.approx(last[key]), key
    assert summary["_step"] == 8 and "val_loss" in summary
    assert sum(r.WhichOneof("record_type") == "history" for r in records) == 8
    config = [r.config for r in records if r.WhichOneof("record_type") == "config"]
    keys = {i.key or "/".join(i.nested_key) for c in config for i in c.update}
    assert {"train", "optim", "parallel", "log"} <= keys, keys
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # finished


def test_profile_steps_write_a_chrome_trace_of_those_steps(make_config, tmp_path):
    train(make_config(tmp_path, profile={"steps": [2, 3]}))
    folder = tmp_path / "profile"
    trace = folder / "trace_steps_2-3_rank0.json"
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"step 2", "step 3"} <= names and not names & {"step 1", "step 4"}, sorted(n for n in names if
                                                                                      str(n).startswith("step"))
    assert any(str(n).startswith("aten::mm") for n in names)  # the ops inside the steps
    memory = (folder / "memory_steps_2-3_rank0.txt").read_text()
    assert "CPU Mem" in memory


def test_a_resumed_run_logs_each_step_once_to_tensorboard(make_config, tmp_path):
    pytest.importorskip("tensorboard")
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_config(tmp_path, log={"tensorboard": True}, eval={"every": 0})
    train(cfg)
    first = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r}
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000008")  # as if killed after step 8's line, before its save
    train(cfg, resume=True)  # from step 6: steps 7 and 8 are logged again
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("loss")]
    assert steps == list(range(1, 9)), steps
    for e in acc.Scalars("loss"):  # the resumed steps reproduce the first run's losses
        assert e.value == pytest.approx(first[e.step], rel=1e-6)
