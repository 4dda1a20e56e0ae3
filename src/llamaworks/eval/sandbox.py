"""Running model-written code for HumanEval and MBPP (paper section 3.5), as safely as a
library can without a VM.

Model-written code is untrusted: it can loop forever, fork without end, exhaust memory,
delete or upload files, and attack the samples running beside it. Nothing runs unless the
caller passes `allow_code_execution=True` (the CLI flag `--allow-code-execution`). Each
sample runs in its own process with:

- limits: CPU time (RLIMIT_CPU), address space (RLIMIT_AS), processes (RLIMIT_NPROC),
  file size (RLIMIT_FSIZE, which also caps stdout/stderr), no core dumps, and a wall-clock
  limit after which its whole process group is killed;
- a scrubbed environment and `python -I` (no user site, no PYTHON* variables); the program
  reaches the sandbox on stdin and its output goes to unlinked files, so no path names them;
- a directory of its own (random name, mode 0700; HOME and TMPDIR point there), deleted
  afterwards.

Then, as far as this machine allows (`isolation_details()` says what is in force here):

- an identity of its own: when started as root, each concurrent sample runs as a uid of
  its own (`UID_BASE` + a slot no other sample holds, across processes too), so samples
  cannot read, write or signal each other, and RLIMIT_NPROC (counted per uid) is a limit
  per sample. Not root: samples run as the evaluating user (in a user namespace of their
  own where allowed, which also makes the process count per sample);
- namespaces ("namespaces" mode): new network, PID, IPC and mount namespaces. No network
  at all (no interfaces but a loopback that is down, and the host's abstract Unix sockets
  are in another namespace); every process the sample starts dies with it; it sees only
  its own processes in /proc; the whole file system is read-only except its own directory,
  /dev/shm and /tmp (the host's, read-only, under a writable layer of its own), all kept in
  private memory file systems (tmpfs, capped in size) that vanish with it;
- seccomp (Linux on x86-64 or arm64), with no_new_privs, so setuid programs gain nothing:
  the only sockets a sample can create are IP sockets inside its empty network namespace
  (none at all without one) and connected Unix socket pairs (asyncio, multiprocessing.Pipe);
  no Unix socket that could connect to a host's socket file, no netlink, vsock or other
  family, no io_uring (which could create sockets past the filter).

Without namespaces ("socket-patch" mode, weaker), sockets are also disabled in Python by
replacing `socket.socket` before the program runs, which without seccomp a sample can
undo (ctypes, a child program such as curl), and a process that detaches itself (setsid)
can outlive the wall-clock limit unless the sample has a uid of its own.

What is NOT prevented: reading files the sample's user can read (the host file system is
visible, read-only), using CPU time up to the limit on every core, and attacks on the
kernel itself. This is not a VM: run untrusted evaluations in a disposable container or VM.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["Limits", "ExecResult", "Isolation", "run_python", "isolation", "isolation_details", "DANGER",
           "UID_BASE"]

DANGER = ("running model-written code is dangerous: it can delete or upload files, exhaust memory or "
          "fork without end. The sandbox limits CPU, memory, processes, time and network, but it is not "
          "a security boundary like a VM. Pass allow_code_execution=True (--allow-code-execution) to "
          "accept this, preferably inside a disposable container")

# Samples run as UID_BASE + slot when the evaluator is root: above the system and user ranges
# and above the subordinate ranges container runtimes hand out (100000 + 65536 k for small k).
UID_BASE = 1 << 20
_UID_SLOTS = 4096


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int = 10
    wall_seconds: float = 20.0
    memory_mb: int = 2048  # address space: Python itself needs ~30 MB, numpy a few hundred
    max_processes: int = 32  # per sample where it has a uid or user namespace of its own (see Isolation)
    max_file_mb: int = 64  # per file; its private directory and /dev/shm hold twice this each
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


@dataclass(frozen=True)
class Isolation:
    """What protects a sample on this machine, as measured by running one (`isolation_details`)."""

    mode: str  # "namespaces" or "socket-patch": what run_python uses by default
    user: str  # "own uid per sample", "evaluating user" or "root"
    network_namespace: bool
    private_filesystem: bool  # read-only host file system, private directory and /dev/shm
    private_proc: bool  # /proc shows only the sample's own processes
    private_tmp: bool  # /tmp: the host's, read-only, under a writable layer of its own
    seccomp: bool
    per_sample_process_limit: bool  # RLIMIT_NPROC counts only this sample's processes
    missing: tuple[str, ...] = ()  # why each absent protection is absent

    @property
    def samples_separated(self) -> bool:
        """Whether no sample can see or change another's files: a uid per sample, or (same
        uid, not root) private directories in a mount namespace, with /proc showing no other
        sample. A root sample could undo the mounts."""
        return self.user == "own uid per sample" or (
            self.user != "root" and self.private_filesystem and self.private_proc)

    def describe(self) -> str:
        have = []
        if self.user == "own uid per sample":
            have.append(f"a uid of its own per concurrent sample ({UID_BASE} + slot)")
        if self.network_namespace:
            have.append("own network, PID and IPC namespaces (no network, not even loopback)")
        if self.private_filesystem:
            have.append("read-only file system except a private directory and /dev/shm")
        if self.private_tmp:
            have.append("/tmp private: the host's, read-only, under a writable layer of its own")
        if self.private_proc:
            have.append("/proc shows only its own processes")
        if self.seccomp:
            have.append("seccomp: no Unix or other non-IP sockets, no io_uring, no privilege gain by setuid")
        if self.per_sample_process_limit:
            have.append("a process limit per sample")
        lines = [f"sandbox isolation '{self.mode}'; samples run as {self.user}"]
        lines += [f"  in force: {h}" for h in have]
        lines += [f"  missing: {m}" for m in self.missing]
        return "\n".join(lines)


@lru_cache(maxsize=1)
def isolation_details() -> Isolation:
    """Which protections this machine gives a sample, found by running one with all that
    the kernel might allow; run_python then insists on each (an error, never a silent
    downgrade, if one stops working)."""
    missing = []
    if not sys.platform.startswith("linux"):
        missing.append("not Linux: no namespaces, seccomp or uid per sample; samples run as the evaluating user "
                       "and share its files and process limit, and the network is only blocked inside Python")
        return Isolation("socket-patch", "evaluating user", False, False, False, False, False, False,
                         tuple(missing))
    root = os.geteuid() == 0
    want = {"namespaces", "mount", "tmp", "proc"}
    if os.uname().machine in _SECCOMP_ARCHES:
        want.add("seccomp")
    else:
        missing.append(f"seccomp: no filter for machine {os.uname().machine!r} (x86_64 and aarch64 only), "
                       "so Unix sockets of the host are reachable")
    if root and _runnable_by_others() is not None:
        want.add("own_user")
    elif root:
        missing.append("uid per sample: no Python interpreter that an unprivileged user may run (such as "
                       "/usr/bin/python3), so samples run as root and nothing but namespaces confine them")
    else:
        missing.append(f"uid per sample: needs root; samples run as the evaluating user (uid {os.geteuid()}), "
                       "kept apart only by user and mount namespaces where those are in force")
    # The most the kernel allows, then less: a step may fail in the probe without breaking the
    # sample (it is then left out), or break it (then the next, smaller set is tried).
    got: set[str] = set()
    notes: dict[str, str | None] = {}
    for cand in (want, want - {"tmp"}, want - {"mount", "tmp", "proc"}, want - {"namespaces", "mount", "tmp", "proc"},
                 want & {"own_user"}):
        try:
            result, notes = _spawn("pass", Limits(cpu_seconds=5, wall_seconds=20), frozenset(cand), frozenset())
        except RuntimeError as e:
            missing.append(f"the probe with {sorted(cand)} failed: {e}")
            continue
        if result.status == "passed":
            got = {step for step in cand if notes.get(step, "not reached") is None}
            break
        missing.append(f"the probe with {sorted(cand)} failed ({result.reason}: {result.stderr.strip()[-200:]})")
    for step, what in (("namespaces", "network/PID/IPC namespaces"), ("mount", "private mounts"),
                       ("tmp", "private /tmp"), ("proc", "private /proc"), ("seccomp", "seccomp"),
                       ("own_user", "uid per sample")):
        if step in want and step not in got:
            missing.append(f"{what}: {notes.get(step) or 'not available'}")
    ns = "namespaces" in got
    user = "own uid per sample" if "own_user" in got else "root" if root else "evaluating user"
    # RLIMIT_NPROC is counted per uid, and since Linux 5.14 per user namespace too.
    userns_counts = ns and not root and _kernel_at_least(5, 14)
    det = Isolation(mode="namespaces" if ns else "socket-patch", user=user, network_namespace=ns,
                    private_filesystem=ns and "mount" in got, private_proc=ns and "proc" in got,
                    private_tmp=ns and "mount" in got and "tmp" in got,
                    seccomp="seccomp" in got, per_sample_process_limit="own_user" in got or userns_counts)
    # Spell out the consequences, so that a log shows what a sample here could do.
    if user == "root":
        missing.append("so samples run as root, who can undo the namespaces' mounts and write anywhere")
    if not det.samples_separated:
        missing.append("so samples can read and change each other's files and signal each other")
    if not det.per_sample_process_limit:
        missing.append("so all samples share one process limit: a forking sample can starve the others")
    if not det.seccomp:
        missing.append("so samples can connect to Unix sockets of the host" if ns else
                       "so samples can reach the network and the host's sockets past the Python-level patch")
    return dataclasses.replace(det, missing=tuple(missing))


@lru_cache(maxsize=1)
def isolation() -> str:
    """'namespaces' when this machine lets the sandbox unshare network and PID namespaces,
    else 'socket-patch' (the weaker guarantee described in the module docstring)."""
    return isolation_details().mode


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
    det = isolation_details()
    if mode == "namespaces" and det.mode != "namespaces":
        raise ValueError("sandbox mode 'namespaces' is not available here (unshare of the network and PID "
                         "namespaces failed: unprivileged user namespaces may be disabled); leave mode unset "
                         "to accept the weaker 'socket-patch' isolation")
    features = {"seccomp"} if det.seccomp else set()
    if det.user == "own uid per sample":
        features.add("own_user")
    if (mode or det.mode) == "namespaces":
        features.add("namespaces")
        features |= {"mount"} if det.private_filesystem else set()
        features |= {"tmp"} if det.private_tmp else set()
        features |= {"proc"} if det.private_proc else set()
    features = frozenset(features)
    return _spawn(source, limits or Limits(), features, required=features)[0]


def _spawn(source: str, limits: Limits, features: frozenset[str], required: frozenset[str]
           ) -> tuple[ExecResult, dict[str, str | None]]:
    """Run `source` with the given protections; (result, {step: error or None}) as reported
    by the launcher. A step in `required` that fails raises RuntimeError."""
    namespaces = "namespaces" in features
    with ExitStack() as stack:
        if "own_user" in features:
            uid = stack.enter_context(_uid_slot())
            gid, python = uid, _runnable_by_others()
        else:
            uid, gid, python = os.geteuid(), os.getegid(), sys.executable
        work = tempfile.mkdtemp(prefix="llamaworks-sandbox-")  # mode 0700; with "mount", a tmpfs covers it
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        src, out, err = (stack.enter_context(tempfile.TemporaryFile()) for _ in range(3))
        src.write(source.encode("utf-8"))
        src.seek(0)
        report_r, report_w = os.pipe()
        stack.callback(os.close, report_r)
        euid = os.geteuid()
        if uid != euid:  # a uid of its own: the count starts from zero
            nproc = limits.max_processes
        elif namespaces and euid != 0 and _kernel_at_least(5, 14):  # counted per user namespace
            nproc = limits.max_processes + 2  # the launcher and init count too
        else:  # one count for all of this user's processes (and root is not bound at all)
            nproc = limits.max_processes + len(_pids_of_user(uid))
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work,
               "PYTHONDONTWRITEBYTECODE": "1"}
        cfg = {"features": sorted(features), "required": sorted(required), "uid": uid, "gid": gid,
               "cpu": int(limits.cpu_seconds), "mem_mb": limits.memory_mb, "file_mb": limits.max_file_mb,
               "nproc": nproc, "python": python, "work": work, "env": env, "patch": _SOCKET_PATCH,
               "report_fd": report_w}
        t0 = time.perf_counter()
        try:
            # The launcher runs this file as a script, before any sample code: stdlib only, -S for speed.
            proc = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(cfg)],
                                    cwd="/", env=env, stdin=src, stdout=out, stderr=err, pass_fds=(report_w,),
                                    start_new_session=True, close_fds=True)
        finally:
            os.close(report_w)
        timed_out = False
        try:
            rc = proc.wait(timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            rc = proc.wait()
        _kill_group(proc.pid)  # stragglers of the socket-patch mode
        if "own_user" in features and not namespaces:
            _kill_user(uid, python)  # ... including those that left the process group
        wall = time.perf_counter() - t0
        notes = _read_notes(report_r)
        stdout = _read(out, limits.max_output_chars)
        stderr = _read(err, limits.max_output_chars)
    fatal = [(step, e) for step, e, is_fatal in notes if is_fatal]
    if fatal:
        why = f"the sandbox could not set up {fatal[0][0]} ({fatal[0][1]})"
        if fatal[0][0] in features:
            why += ", which this machine allowed when probed; not running samples with less isolation than reported"
        raise RuntimeError(why)
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
    return ExecResult(status, rc, stdout, stderr, mode, wall, reason), {s: e for s, e, _ in notes}


def _read_notes(fd: int) -> list[tuple[str, str | None, bool]]:
    # Every writer is gone by now (the sample's exec closed its copy, the launcher has exited).
    os.set_blocking(fd, False)  # never hang on a writer that should not exist
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except BlockingIOError:
        pass
    notes = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        n = json.loads(line)
        notes.append((n["step"], n["error"], n["fatal"]))
    return notes


def _read(f, max_chars: int) -> str:
    f.seek(0)
    return f.read(max_chars * 4).decode("utf-8", errors="replace")[:max_chars]


# --- identities -------------------------------------------------------------------------

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
def _runnable_by_others() -> str | None:
    """An interpreter a sample's own uid can run: this one, else the system's python3."""
    system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    for cand in (sys.executable, getattr(sys, "_base_executable", None), system):
        if cand and _world_runnable(cand):
            return cand
    return None


def _slot_dir() -> Path:
    # Lock files of the uid slots, shared by every evaluator on the machine: root-only, so no
    # sample (and no other user) can hold or fake a slot.
    base = Path("/run") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir())
    d = base / "llamaworks-sandbox-uids"
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
        raise RuntimeError(f"{d} must be a directory owned by root with mode 0700 (it holds the sandbox's uid "
                           "locks); remove it and retry")
    return d


@contextmanager
def _uid_slot():
    """A uid of its own for one sample: UID_BASE + the first slot whose lock no other sample
    (of this or another process) holds and that no account or live process uses."""
    import fcntl
    import pwd

    d = _slot_dir()
    for slot in range(_UID_SLOTS):
        uid = UID_BASE + slot
        fd = os.open(d / str(slot), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            pwd.getpwuid(uid)
            taken = True  # a real account: never run samples as it
        except KeyError:
            taken = bool(_pids_of_user(uid))  # e.g. left over from an evaluator that was killed
        if taken:
            os.close(fd)
            continue
        try:
            yield uid
        finally:
            os.close(fd)  # releases the lock
        return
    raise RuntimeError(f"all {_UID_SLOTS} sandbox uids ({UID_BASE}...) are in use: too many samples at once; "
                       "use fewer workers")


def _pids_of_user(uid: int) -> list[int]:
    """Live processes with `uid` as real, effective, saved or file-system uid (from their
    status: /proc/PID itself is root's for non-dumpable processes)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                lines = (d / "status").read_text().splitlines()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in lines if ":" in line)
            if fields.get("State", "").split()[:1] != ["Z"] and str(uid) in fields.get("Uid", "").split():
                out.append(int(d.name))
    return out


def _kill_user(uid: int, python: str | None) -> None:
    # A process of the sample that left its process group (setsid) in the socket-patch mode:
    # kill(-1) as that uid reaches exactly its processes. (A PID namespace needs none of this.)
    deadline = time.monotonic() + 5.0
    while _pids_of_user(uid) and time.monotonic() < deadline and python:
        subprocess.run([python, "-I", "-S", "-c", "import os, signal; os.kill(-1, signal.SIGKILL)"],
                       user=uid, group=uid, extra_groups=[], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        got = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return got >= (major, minor)


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


# --- the launcher: runs in the child, before the sample ------------------------------------

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

_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_BIND, _MS_PRIVATE = 0x1, 0x2, 0x4, 0x8, 0x1000, 0x40000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = 0x1, 0x2
_SYS_MOUNT_SETATTR, _AT_FDCWD, _AT_RECURSIVE = 442, -100, 0x8000  # 442 on every architecture

# machine: (AUDIT_ARCH_*, socket, socketpair); io_uring_setup/enter/register are 425-427 on both.
_SECCOMP_ARCHES = {"x86_64": (0xC000003E, 41, 53), "aarch64": (0xC00000B7, 198, 199)}
_IO_URING = (425, 426, 427)


def _seccomp_filter(machine: str, allow_ip: bool) -> bytes:
    """The classic-BPF program of the sample's seccomp filter.

    socket(): AF_INET and AF_INET6 only where `allow_ip` (an empty network namespace),
    nothing else: a Unix socket could connect to a host's socket file, whatever the
    namespaces. socketpair(): AF_UNIX SOCK_STREAM only (a connected pair; a datagram pair
    could still sendto() a host's socket file). io_uring: none (it creates sockets without
    socket()). Other ABIs (x32, 32-bit) get nothing, as their syscall numbers differ.
    """
    import errno

    arch, nr_socket, nr_socketpair = _SECCOMP_ARCHES[machine]
    ld, jeq, jset, and_, ret = 0x20, 0x15, 0x45, 0x54, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JSET|K, ALU|AND|K, RET|K
    allow, deny = 0x7FFF0000, 0x00050000 | errno.EACCES  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EACCES
    af_unix, af_inet, af_inet6, sock_stream = 1, 2, 10, 1
    # Offsets into struct seccomp_data: nr 0, arch 4, args[0] 16, args[1] 24 (low halves, little-endian).
    asm: list = [
        (ld, None, None, 4), (jeq, None, "deny", arch),
        (ld, None, None, 0),
        *([(jset, "deny", None, 0x40000000)] if machine == "x86_64" else []),  # x32 ABI
        (jeq, "socket", None, nr_socket), (jeq, "socketpair", None, nr_socketpair),
        *[(jeq, "deny", None, nr) for nr in _IO_URING],
        (ret, None, None, allow),
        "socket", (ld, None, None, 16),
        *([(jeq, "allow", None, af_inet), (jeq, "allow", None, af_inet6)] if allow_ip else []),
        (ret, None, None, deny),
        "socketpair", (ld, None, None, 16), (jeq, None, "deny", af_unix),
        (ld, None, None, 24), (and_, None, None, 0xF),  # SOCK_TYPE_MASK: without SOCK_CLOEXEC etc.
        (jeq, "allow", "deny", sock_stream),
        "allow", (ret, None, None, allow),
        "deny", (ret, None, None, deny),
    ]
    labels, pos = {}, 0
    for item in asm:
        if isinstance(item, str):
            labels[item] = pos
        else:
            pos += 1
    out, pos = b"", 0
    for item in asm:
        if isinstance(item, str):
            continue
        code, jt, jf, k = item
        off = [labels[t] - pos - 1 if t else 0 for t in (jt, jf)]
        out += struct.pack("=HBBI", code, off[0], off[1], k & 0xFFFFFFFF)
        pos += 1
    return out


def _launch(cfg: dict) -> None:
    """The sandbox's first process (`python -I -S sandbox.py CFG`): namespaces and mounts; then
    PID 1 of the new PID namespace; then the sample: user, limits, seccomp, exec. Each step
    is reported on cfg["report_fd"]; a failed step in cfg["required"] ends it with status 125."""
    import ctypes
    import resource

    report = cfg["report_fd"]
    os.set_inheritable(report, False)  # the sample's exec closes it: only the sandbox reports there
    features, required = set(cfg["features"]), set(cfg["required"]) | {"program", "limits"}
    libc = ctypes.CDLL(None, use_errno=True)
    root = os.geteuid() == 0
    uid, gid, work = cfg["uid"], cfg["gid"], cfg["work"]

    def check(ret: int) -> None:
        if ret != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    def step(name: str, fn) -> bool:
        try:
            fn()
        except OSError as e:
            fatal = name in required
            os.write(report, (json.dumps({"step": name, "error": str(e), "fatal": fatal}) + "\n").encode())
            if fatal:
                os._exit(125)
            return False
        os.write(report, (json.dumps({"step": name, "error": None, "fatal": False}) + "\n").encode())
        return True

    source = sys.stdin.buffer.read()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)

    def unshare() -> None:
        flags = _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC | (0 if root else _CLONE_NEWUSER)
        flags |= _CLONE_NEWNS if features & {"mount", "proc", "tmp"} else 0
        check(libc.unshare(flags))
        if not root:  # map only ourselves: the sample keeps the evaluator's uid, without privileges
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)

    if "namespaces" in features and not step("namespaces", unshare):
        features -= {"namespaces", "mount", "proc", "tmp"}

    def private_mounts() -> None:
        # Everything read-only (and private: nothing propagates back to the host), then the
        # writable places: fresh memory file systems, capped in size and gone with the sample.
        # One covers the (host's, empty) directory `work`: the sample's directory and the upper
        # layer of its /tmp are in there.
        attr = struct.pack("=QQQQ", _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, _MS_PRIVATE, 0)
        buf = ctypes.create_string_buffer(attr, len(attr))
        check(libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_long(_AT_FDCWD), b"/",
                           ctypes.c_long(_AT_RECURSIVE), buf, ctypes.c_long(len(attr))))
        size = f"size={2 * cfg['file_mb']}m,nr_inodes=16384"
        check(libc.mount(b"tmpfs", work.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, f"{size},mode=0700".encode()))
        for name, mode in (("sample", 0o700), ("tmp-upper", 0o1777), ("tmp-work", 0o700)):
            os.mkdir(os.path.join(work, name))
            os.chmod(os.path.join(work, name), mode)  # past the umask
        if os.path.isdir("/dev/shm"):
            check(libc.mount(b"tmpfs", b"/dev/shm", b"tmpfs", _MS_NOSUID | _MS_NODEV, f"{size},mode=1777".encode()))

    def private_tmp() -> None:
        # /tmp as the host's, read-only, under a private writable layer: programs that write to
        # /tmp work, and nothing reaches the host (nor is a file of another user exposed).
        opts = f"lowerdir=/tmp,upperdir={work}/tmp-upper,workdir={work}/tmp-work"
        check(libc.mount(b"overlay", b"/tmp", b"overlay", _MS_NOSUID | _MS_NODEV, opts.encode()))

    def sample_dir() -> None:
        # The overlay may hide `work` (it is under /tmp): bind the sample's directory back
        # there through a descriptor opened before.
        check(libc.mount(f"/proc/self/fd/{sample_fd}".encode(), work.encode(), None, _MS_BIND, None))
        os.close(sample_fd)

    if "mount" in features and step("mount", private_mounts):
        sample_fd = os.open(os.path.join(work, "sample"), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        if "tmp" in features and not step("tmp", private_tmp):
            features.discard("tmp")
        step("mount", sample_dir)
    else:
        features -= {"mount", "tmp"}

    program = os.path.join(work, "program.py")

    def write_program() -> None:
        fd = os.open(program, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(source)

    step("program", write_program)

    def hand_over() -> None:
        # The directory (mode 0700) and program become the sample's: no other sample may enter.
        os.chown(work, uid, gid)
        os.chown(program, uid, gid)

    if "own_user" in features and not step("own_user", hand_over):
        features.discard("own_user")

    def run_sample() -> None:
        if "own_user" in features:
            step("own_user", lambda: (os.setgroups([]), os.setgid(gid), os.setuid(uid)))

        def limits() -> None:
            mb = 1 << 20
            resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu"], cfg["cpu"] + 1))
            resource.setrlimit(resource.RLIMIT_AS, (cfg["mem_mb"] * mb,) * 2)
            resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_mb"] * mb,) * 2)
            resource.setrlimit(resource.RLIMIT_NPROC, (cfg["nproc"],) * 2)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            os.chdir(work)

        step("limits", limits)
        if "seccomp" in features:
            step("seccomp", lambda: _install_seccomp(libc, check, allow_ip="namespaces" in features))
        argv = [cfg["python"], "-I", "-B"]
        argv += [program] if "namespaces" in features else ["-c", cfg["patch"], program]
        os.execve(cfg["python"], argv, cfg["env"])

    def status(st: int) -> int:
        return 128 + os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)

    if "namespaces" not in features:
        try:
            run_sample()
        finally:
            os._exit(126)
    # The first child is PID 1 of the new PID namespace: when it exits, the kernel kills every
    # process the sample started. It forks the sample (PID 2, ordinary signal semantics) and
    # reaps the orphans the sample leaves it, which would otherwise count against its limit.
    init = os.fork()
    if init == 0:
        try:
            if "proc" in features:
                step("proc", lambda: check(libc.mount(b"proc", b"/proc", b"proc",
                                                      _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)))
            sample = os.fork()
            if sample == 0:
                try:
                    run_sample()
                finally:
                    os._exit(126)
            while True:
                pid, st = os.wait()
                if pid == sample:
                    os._exit(status(st))
        finally:
            os._exit(126)
    os._exit(status(os.waitpid(init, 0)[1]))


def _install_seccomp(libc, check, allow_ip: bool) -> None:
    import ctypes

    prog = _seccomp_filter(os.uname().machine, allow_ip)
    buf = ctypes.create_string_buffer(prog, len(prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog) // 8, ctypes.addressof(buf))
    ulong = ctypes.c_ulong
    # PR_SET_NO_NEW_PRIVS (38): needed to install a filter unprivileged, and setuid programs stay powerless.
    check(libc.prctl(38, ulong(1), ulong(0), ulong(0), ulong(0)))
    check(libc.prctl(22, ulong(2), ctypes.byref(fprog), ulong(0), ulong(0)))  # PR_SET_SECCOMP, MODE_FILTER


if __name__ == "__main__":
    _launch(json.loads(sys.argv[1]))
