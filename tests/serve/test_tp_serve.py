"""Tensor-parallel serving (issue 18): `torchrun --nproc-per-node 2 -m llamaworks serve ... --tp 2`
answers a batch of concurrent requests as one process does (greedy tokens equal, log-probabilities
within 1e-4: the ranks' partial sums are added in another order), and every rank stops cleanly
when the server is told to stop. The step broadcast's packing is tested on its own."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torchrun import spawn, torchrun

from llamaworks.inference.paged import BlockTable
from llamaworks.serve.command import serve_command
from llamaworks.serve.tp import _DECODE, _FORWARD, _STOP, TPRunner, _pack, _receive, _unpack, control_group

from .conftest import running_server

httpx = pytest.importorskip("httpx")

PROMPTS = ["The king", "Love is", "O fair lady of the night, speak", "Thou art", "A", "What say you, my lord?"]


def test_a_pass_packs_and_unpacks():
    tokens, pos = torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.tensor([[0, 1, 2], [3, 4, 5]])
    blocks = torch.tensor([[1, 2], [3, 0], [0, 0]])  # three table rows, two sequences (rows picks them)
    rows = torch.tensor([0, 1])
    last = torch.tensor([2, 1])
    got = _unpack(_pack(_FORWARD, tokens, pos, blocks, rows, last), "cpu")
    assert got[0] == _FORWARD
    for a, b in zip(got[1:], (tokens, pos, blocks, rows, last)):
        assert torch.equal(a, b)
    op, t, p, b, r, lst = _unpack(_pack(_DECODE, tokens[:, :1], torch.tensor([[3], [4]]), blocks[:2]), "cpu")
    assert op == _DECODE and r is None and lst is None and torch.equal(b, blocks[:2]) and p.tolist() == [[3], [4]]
    got = _unpack(_pack(_FORWARD, tokens, pos, blocks, None, last), "cpu")
    assert got[4] is None and torch.equal(got[5], last)


def _broadcast_worker(rank: int, world: int, capacity: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        group = control_group()
        tokens = torch.arange(3 * 40).view(3, 40)  # a pass larger than the capacity: two broadcasts
        pos, blocks, rows = tokens + 7, torch.arange(12).view(3, 4), torch.tensor([2, 0, 1])
        if rank == 0:
            runner = TPRunner(None, group)
            runner.capacity, runner.table = capacity, BlockTable(4)
            runner.table.blocks = blocks
            runner._send(_FORWARD, tokens, pos, rows, torch.tensor([39, 0, 5]))
            runner._send(_DECODE, tokens[:, :1], pos[:, :1])
            runner.close()
        else:
            got = _receive(group, capacity, "cpu")
            want = (tokens, pos, blocks, rows, torch.tensor([39, 0, 5]))
            assert got[0] == _FORWARD and all(torch.equal(a, b) for a, b in zip(got[1:], want))
            got = _receive(group, capacity, "cpu")
            assert got[0] == _DECODE and torch.equal(got[1], tokens[:, :1]) and got[4] is None
            assert _receive(group, capacity, "cpu")[0] == _STOP
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes: 12-23 s on the shared machine
def test_a_pass_larger_than_the_broadcast_buffer_arrives_whole():
    spawn(_broadcast_worker, 64)


@pytest.mark.parametrize(("tp", "match"), [(2, "torchrun --nproc-per-node 2"), (0, "integer >= 1")])
def test_tp_needs_as_many_processes(tiny_model_dir, tp, match):
    with pytest.raises(ValueError, match=match):
        serve_command(str(tiny_model_dir), tp=tp)


def _complete_all(url: str) -> list[dict]:
    def one(prompt):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 2}
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: they share decode steps
        return list(pool.map(one, PROMPTS))


def _children(pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) != pid:
                continue
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = int(d.name)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["rank0", "torchrun"])
def test_tp2_serve_answers_as_one_process_and_stops_every_rank(tiny_model_dir, tmp_path, stop):
    with running_server(tiny_model_dir, max_batch=4) as served:
        want = _complete_all(served.url) + _complete_all(served.url)  # the second round hits the prefix cache
    log = tmp_path / "serve.log"
    launcher = Path(sys.executable).with_name("torchrun")
    argv = [str(launcher), "--standalone", "--nproc-per-node", "2", "-m", "llamaworks", "serve", "--checkpoint",
            str(tiny_model_dir), "--model-name", "tiny", "--port", "0", "--max-batch", "4", "--tp", "2",
            "--device", "cpu"]
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while not (m := re.search(r"on http://127\.0\.0\.1:(\d+)/v1", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        url = f"http://127.0.0.1:{m.group(1)}"
        while True:  # the port is printed just before uvicorn listens
            try:
                httpx.get(url + "/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        got = _complete_all(url) + _complete_all(url)
        hits = re.search(r"^llamaworks_engine_prefix_cache_hits (\S+)$", httpx.get(url + "/metrics").text, re.M)
        assert hits and float(hits.group(1)) > 0
        ranks = _children(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        # Rank 0 drains and stops the others (kill RANK0), or torchrun passes SIGTERM to every rank,
        # which the workers ignore until rank 0 stops them.
        os.kill(ranks[0] if stop == "rank0" else proc.pid, signal.SIGTERM)
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "llamaworks serve: stopped" in text and "rank 1 stopped after" in text, text
    assert not re.search(r'File "[^"]*/llamaworks/', text), text  # no rank failed
    if stop == "rank0":  # (torchrun itself, killed, prints its SignalException and exits 1)
        assert code == 0 and "Traceback" not in text, text
    for a, b in zip(got, want):
        assert a["text"] == b["text"] and a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
        assert a["logprobs"]["token_logprobs"] == pytest.approx(b["logprobs"]["token_logprobs"], abs=1e-4)
        for ta, tb in zip(a["logprobs"]["top_logprobs"], b["logprobs"]["top_logprobs"]):
            assert ta.keys() == tb.keys() and list(ta.values()) == pytest.approx(list(tb.values()), abs=1e-4)


@pytest.mark.slow
def test_tp2_serve_that_fails_to_start_stops_every_rank(tiny_model_dir):
    # The engine refuses the cache size on rank 0, before its setup: the worker is told to stop.
    proc = torchrun(["serve", "--checkpoint", str(tiny_model_dir), "--port", "0", "--tp", "2", "--device", "cpu",
                     "--kv-cache-gb", "1e-9"], timeout=240)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "raise it" in text, text
    assert "rank 1 stopped after 0 forward passes" in text, text
    assert not re.search(r'File "[^"]*/llamaworks/serve/tp\.py"', text), text  # the worker did not fail
