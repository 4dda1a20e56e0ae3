"""Running model-written code for HumanEval and MBPP (paper section 3.5), as safely as an
unprivileged library can.

Model-written code is untrusted: it can loop forever, fork without end, exhaust memory,
delete or upload files. Nothing runs unless the caller passes `allow_code_execution=True`
(the CLI flag `--allow-code-execution`). Each sample runs in its own process with:

- limits: CPU time (RLIMIT_CPU), address space (RLIMIT_AS), processes (RLIMIT_NPROC),
  file size (RLIMIT_FSIZE, which also caps stdout/stderr), no core dumps, and a wall-clock
  limit after which its whole process group is killed;
- a fresh temporary working directory (HOME and TMPDIR point there), deleted afterwards, a
  scrubbed environment and `python -I` (no user site, no PYTHON* variables);
- where the kernel allows it ("namespaces" isolation): new network, PID and IPC namespaces
  (a user namespace too when not root), so there is no network at all (not even
  loopback), and every process the sample starts dies with it;
- when started as root: the sample runs as user `nobody`, so it cannot write files owned
  by other users (it can still write world-writable places such as /tmp);
- without namespaces ("socket-patch" isolation, weaker): socket creation is disabled by
  replacing `socket.socket` in the child before the program runs. Code that loads the C
  module another way, or starts another program (curl), can still reach the network, and
  a process that detaches itself (setsid) can outlive the wall-clock limit.

What is NOT prevented: reading any file the sample's user can read, writing files a
non-root user can write outside the working directory (run the evaluation as a dedicated
user, in a container or a VM for stronger isolation). `isolation()` says which mode this
machine gets.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["Limits", "ExecResult", "run_python", "isolation", "DANGER"]

DANGER = ("running model-written code is dangerous: it can delete or upload files, exhaust memory or "
          "fork without end. The sandbox limits CPU, memory, processes, time and network, but it is not "
          "a security boundary like a VM. Pass allow_code_execution=True (--allow-code-execution) to "
          "accept this, preferably inside a disposable container")


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int = 10
    wall_seconds: float = 20.0
    memory_mb: int = 2048  # address space: Python itself needs ~30 MB, numpy a few hundred
    max_processes: int = 32  # beyond the user's current processes, when not dropping to nobody
    max_file_mb: int = 64
    max_output_chars: int = 20_000  # of stdout / stderr kept in the result


@dataclass
class ExecResult:
    status: str  # "passed" (exit 0), "failed" (an error or nonzero exit) or "timeout" (CPU or wall clock)
    returncode: int | None
    stdout: str
    stderr: str
    isolation: str
    wall_s: float
    reason: str = ""


# The launcher runs in the child before the sample: namespaces, user, limits, then exec.
_LAUNCHER = r'''
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWIPC, CLONE_NEWUSER = 0x40000000, 0x20000000, 0x08000000, 0x10000000
uid, gid = os.getuid(), os.getgid()
isolated = False
if cfg["namespaces"]:
    libc = ctypes.CDLL(None, use_errno=True)
    flags = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | (0 if uid == 0 else CLONE_NEWUSER)
    if libc.unshare(flags) == 0:
        isolated = True
        if uid != 0:
            with open("/proc/self/setgroups", "w") as f: f.write("deny")
            with open("/proc/self/uid_map", "w") as f: f.write(f"{uid} {uid} 1")
            with open("/proc/self/gid_map", "w") as f: f.write(f"{gid} {gid} 1")
    elif cfg["require_namespaces"]:
        sys.stderr.write("sandbox: unshare failed (errno %d)\n" % ctypes.get_errno()); os._exit(125)

def status(st):
    return 128 + os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)

def run_sample():
    if uid == 0 and cfg["uid"] != 0:
        os.setgroups([]); os.setgid(cfg["gid"]); os.setuid(cfg["uid"])
    mb = 1 << 20
    nproc = cfg["nproc"]
    resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu"], cfg["cpu"] + 1))
    resource.setrlimit(resource.RLIMIT_AS, (cfg["mem_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    argv = [cfg["python"], "-I", "-B"]
    if isolated:
        argv.append(cfg["program"])
    else:
        argv += ["-c", cfg["patch"], cfg["program"]]
    os.execve(cfg["python"], argv, cfg["env"])

if not isolated:
    run_sample()
# The first child is PID 1 of the new PID namespace: when it exits, the kernel kills every
# process the sample started. It forks the sample (PID 2, ordinary signal semantics).
init = os.fork()
if init == 0:
    try:
        sample = os.fork()
        if sample == 0:
            try:
                run_sample()
            finally:
                os._exit(126)
        os._exit(status(os.waitpid(sample, 0)[1]))
    finally:
        os._exit(126)
os._exit(status(os.waitpid(init, 0)[1]))
'''

# Weaker network guard for machines without namespaces (see the module docstring).
_SOCKET_PATCH = r'''
import runpy, socket, sys, _socket
def _no_network(*args, **kwargs):
    raise PermissionError("network access is disabled in the llamaworks sandbox")
for _name in ("socket", "socketpair", "create_connection", "create_server", "fromfd"):
    if hasattr(socket, _name): setattr(socket, _name, _no_network)
for _name in ("socket", "socketpair"):
    if hasattr(_socket, _name): setattr(_socket, _name, _no_network)
_path = sys.argv[1]; sys.argv = sys.argv[1:]; sys.path[0] = __import__("os").path.dirname(_path)
runpy.run_path(_path, run_name="__main__")
'''


def _nobody() -> tuple[int, int]:
    try:
        import pwd

        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid
    except (ImportError, KeyError):
        return 65534, 65534


def _world_runnable(path: str) -> bool:
    # Whether any user can run this interpreter: o+rx on the file, o+x on every directory above.
    real = Path(os.path.realpath(path))
    try:
        if real.stat().st_mode & 0o005 != 0o005:
            return False
        return all(d.stat().st_mode & 0o001 for d in real.parents)
    except OSError:
        return False


@lru_cache(maxsize=1)
def _sample_user() -> tuple[int, int, str]:
    """(uid, gid, python) for the sample. As root: `nobody` with an interpreter nobody can
    run (this one, else the system's python3); root only if there is none."""
    euid = os.geteuid()
    if euid != 0:
        return euid, os.getegid(), sys.executable
    uid, gid = _nobody()
    system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    for cand in (sys.executable, getattr(sys, "_base_executable", None), system):
        if cand and _world_runnable(cand):
            return uid, gid, cand
    return 0, 0, sys.executable


def _processes_of(uid: int) -> int:
    n = 0
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                n += d.stat().st_uid == uid
            except OSError:
                pass
    return n


@lru_cache(maxsize=1)
def isolation() -> str:
    """'namespaces' when this machine lets the sandbox unshare network and PID namespaces,
    else 'socket-patch' (the weaker guarantee described in the module docstring)."""
    if not sys.platform.startswith("linux"):
        return "socket-patch"
    res = _spawn("pass", Limits(cpu_seconds=5, wall_seconds=20), namespaces=True, require=True)
    return "namespaces" if res.returncode == 0 else "socket-patch"


def run_python(source: str, *, allow_code_execution: bool = False, limits: Limits | None = None,
               mode: str | None = None) -> ExecResult:
    """Run a Python program in the sandbox; 'passed' means it exited with status 0.
    mode: None (the best this machine allows), "namespaces" (fail if unavailable) or "socket-patch"."""
    if not allow_code_execution:
        raise ValueError(DANGER)
    if sys.platform == "win32":
        raise ValueError("the code-execution sandbox needs a POSIX system (Linux or macOS)")
    if mode not in (None, "namespaces", "socket-patch"):
        raise ValueError(f"unknown sandbox mode {mode!r}; use 'namespaces', 'socket-patch' or None (auto)")
    best = isolation()
    if mode == "namespaces" and best != "namespaces":
        raise ValueError("sandbox mode 'namespaces' is not available here (unshare of the network and PID "
                         "namespaces failed: unprivileged user namespaces may be disabled); leave mode unset "
                         "to accept the weaker 'socket-patch' isolation")
    return _spawn(source, limits or Limits(), namespaces=(mode or best) == "namespaces", require=mode is not None)


def _spawn(source: str, limits: Limits, namespaces: bool, require: bool) -> ExecResult:
    root = Path(tempfile.mkdtemp(prefix="llamaworks-sandbox-"))
    try:
        work = root / "work"
        work.mkdir()
        program = work / "program.py"
        program.write_text(source, encoding="utf-8")
        uid, gid, python = _sample_user()
        if uid != os.geteuid():
            os.chmod(root, 0o711)
            for p in (work, program):
                os.chown(p, uid, gid)
        # RLIMIT_NPROC counts all processes of the user (and does not bind root at all).
        nproc = limits.max_processes + (0 if uid != os.geteuid() else _processes_of(uid))
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work),
               "TMPDIR": str(work), "PYTHONDONTWRITEBYTECODE": "1"}
        cfg = {"namespaces": namespaces, "require_namespaces": require, "uid": uid, "gid": gid,
               "cpu": int(limits.cpu_seconds), "mem_mb": limits.memory_mb, "file_mb": limits.max_file_mb,
               "nproc": nproc, "python": python, "program": str(program), "env": env, "patch": _SOCKET_PATCH}
        out_path, err_path = root / "stdout", root / "stderr"
        t0 = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-c", _LAUNCHER, json.dumps(cfg)], cwd=work,
                                    env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True)
            timed_out = False
            try:
                rc = proc.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                rc = proc.wait()
            _kill_group(proc.pid)  # stragglers of the socket-patch mode
        wall = time.perf_counter() - t0
        stdout = _read(out_path, limits.max_output_chars)
        stderr = _read(err_path, limits.max_output_chars)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    sig = -rc if rc < 0 else rc - 128 if rc > 128 else 0
    if timed_out:
        status, reason = "timeout", f"wall-clock limit of {limits.wall_seconds:g} s"
    elif sig in (signal.SIGXCPU, signal.SIGKILL):
        status, reason = "timeout", f"CPU-time limit of {limits.cpu_seconds} s (signal {sig})"
    elif rc == 0:
        status, reason = "passed", ""
    else:
        status = "failed"
        reason = f"signal {signal.Signals(sig).name}" if sig else f"exit status {rc}"
        if sig == getattr(signal, "SIGXFSZ", -1):
            reason += f" (file or output larger than {limits.max_file_mb} MB)"
    mode = "namespaces" if namespaces else "socket-patch"
    return ExecResult(status, rc, stdout, stderr, mode, wall, reason)


def _kill_group(pgid: int) -> None:
    # Repeat until the group is empty: a process forking while the group is killed can leave
    # a child behind (only the socket-patch mode; a PID namespace dies with its first process).
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        if not _live_members(pgid):
            return
        time.sleep(0.005)


def _live_members(pgid: int) -> bool:
    # Whether the process group has a member that is not a zombie (Linux /proc; elsewhere: assume not).
    proc = Path("/proc")
    if not proc.is_dir():
        return False
    for d in proc.iterdir():
        if d.name.isdigit():
            try:
                state, _, pgrp = (d / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue
            if int(pgrp) == pgid and state != "Z":
                return True
    return False


def _read(path: Path, max_chars: int) -> str:
    with open(path, "rb") as f:
        data = f.read(max_chars * 4)
    return data.decode("utf-8", errors="replace")[:max_chars]


def result_dict(r: ExecResult) -> dict:
    return asdict(r)
