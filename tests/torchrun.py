"""Launching a test's processes as torchrun does, on this machine's CPU (gloo): `spawn` runs a
function in `world` processes with torchrun's environment; `torchrun` runs a llamaworks command
through the real launcher (`torchrun --standalone -m llamaworks ...`), the documented way."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank: int, fn, world: int, port: int, args: tuple) -> None:
    # What torchrun would set for this process.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # 2 shared cores: one thread per process
    fn(rank, world, *args)


def spawn(fn, *args, world: int = 2) -> None:
    """fn(rank, world, *args) in `world` processes (a module-level function: it is pickled), each
    with torchrun's variables (MASTER_ADDR/PORT on a free port, RANK, WORLD_SIZE, LOCAL_RANK) and one
    thread; an exception in any process fails the caller."""
    mp.spawn(_run, args=(fn, world, free_port(), args), nprocs=world, join=True)


def torchrun(argv: list[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m llamaworks ARGV` with one thread per process;
    the completed process, its stdout and stderr captured as text."""
    launcher = Path(sys.executable).with_name("torchrun")
    return subprocess.run([str(launcher), "--standalone", "--nproc-per-node", str(nproc), "-m", "llamaworks", *argv],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=timeout)
