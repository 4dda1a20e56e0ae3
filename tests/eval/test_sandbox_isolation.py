"""Hostile samples against their neighbours and the host (issue 17, items 7-9).

Each test runs a hostile sample next to a harmless one, or next to servers this test opens
on the host, and checks that the hostile sample achieved nothing. They are bounded: a few
seconds, a handful of processes, no real fork bomb.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import llamaworks.eval.sandbox as sandbox
from llamaworks.eval.sandbox import Limits, isolation_details, run_python

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="these isolation guarantees are Linux-only (namespaces, seccomp)")

LIMITS = Limits(cpu_seconds=5, wall_seconds=20, memory_mb=512, max_processes=8)


def _run(src: str, mode: str | None = None, limits: Limits = LIMITS):
    return run_python(src, allow_code_execution=True, limits=limits, mode=mode)


# A sample that looks for the files of other samples (marked by TOKEN) wherever they could be:
# the shared temporary directory, and through /proc, the working directory and root of every
# visible process. It overwrites each "verdict" file it finds with the value that makes a
# wrong sample pass, and reports what it saw.
HOSTILE_NEIGHBOUR = r'''
import glob, os, time
TOKEN = {token!r}
own = os.path.realpath(os.getcwd())
seen, written = set(), set()

def candidates():
    for d in glob.glob("/tmp/llamaworks-sandbox-*") + glob.glob("/tmp/llamaworks-sandbox-*/work"):
        yield d
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            yield f"/proc/{{pid}}/cwd"
            yield from glob.glob(f"/proc/{{pid}}/root/tmp/llamaworks-sandbox-*")

deadline = time.monotonic() + 4.0
while time.monotonic() < deadline:
    for d in candidates():
        try:
            if os.path.realpath(d) == own:
                continue
            names = os.listdir(d)
        except OSError:
            continue
        for name in names:
            if TOKEN not in name:
                continue
            path = os.path.join(d, name)
            seen.add(path)
            try:
                with open(path, "w") as f:
                    f.write("right")
                written.add(path)
            except OSError:
                pass
    time.sleep(0.05)
print(f"seen {{len(seen)}} written {{len(written)}}")
'''

# A wrong sample whose verdict lives in a file of its working directory: it passes only if a
# neighbour rewrites that file.
WRONG_VICTIM = r'''
import time
with open("verdict-{token}", "w") as f:
    f.write("wrong")
time.sleep(2.0)
with open("verdict-{token}") as f:
    assert f.read() == "right", "the sample is wrong"
'''


def test_a_sample_cannot_touch_a_concurrent_samples_files():
    # Issue 17 item 7: as one user under guessable paths, a hostile sample rewrote its
    # neighbours' files and 5 of 6 wrong samples passed.
    det = isolation_details()
    if not det.samples_separated:
        pytest.skip(f"samples are not separated from each other on this machine: {det.describe()}")
    token = uuid.uuid4().hex
    with ThreadPoolExecutor(4) as pool:
        hostile = pool.submit(_run, HOSTILE_NEIGHBOUR.format(token=token))
        time.sleep(0.5)  # the hostile sample is scanning before the victims start
        victims = [pool.submit(_run, WRONG_VICTIM.format(token=token)) for _ in range(3)]
        results = [v.result() for v in victims]
        h = hostile.result()
    assert h.status == "passed", h.stderr
    assert h.stdout.strip() == "seen 0 written 0"
    for r in results:
        assert r.status == "failed" and "the sample is wrong" in r.stderr, (r.status, r.stderr)


FORKER = r'''
import os, time
kids = []
try:
    for _ in range(64):  # bounded: RLIMIT_NPROC stops it far earlier
        pid = os.fork()
        if pid == 0:
            time.sleep(3.0)
            os._exit(0)
        kids.append(pid)
except BlockingIOError:
    pass
print(len(kids))
time.sleep(3.0)  # hold every process slot while the neighbour runs
for pid in kids:
    os.waitpid(pid, 0)
'''

HARMLESS = r'''
import subprocess, sys, threading
t = threading.Thread(target=lambda: None)
t.start()
t.join()
subprocess.run([sys.executable, "-I", "-c", "pass"], check=True)
print("ok")
'''


def test_a_fork_heavy_sample_does_not_starve_a_concurrent_one():
    # Issue 17 item 8: one process limit for all samples let a forking sample make its
    # neighbour fail with "can't start new thread".
    det = isolation_details()
    if not det.per_sample_process_limit:
        pytest.skip(f"the process limit is shared by all samples on this machine: {det.describe()}")
    with ThreadPoolExecutor(2) as pool:
        forker = pool.submit(_run, FORKER)
        time.sleep(1.0)  # the forker holds all its process slots by now
        harmless = pool.submit(_run, HARMLESS).result()
        f = forker.result()
    assert harmless.status == "passed" and harmless.stdout == "ok\n", (harmless.reason, harmless.stderr)
    assert f.status == "passed" and 0 < int(f.stdout) < LIMITS.max_processes, (f.stdout, f.stderr)


# Every way this test offers to reach the host, tried by the sample itself and again by a
# child interpreter (which, in the socket-patch mode, does not get the Python-level patch).
CONNECT = r'''
import socket, subprocess, sys
ATTEMPTS = {attempts!r}

def attempt(kind, where):
    try:
        if kind == "tcp":
            s = socket.create_connection(("127.0.0.1", where), timeout=2)
            s.sendall(b"stolen")
        elif kind == "unix-dgram":
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            a.sendto(b"stolen", where)
        else:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(2)
            s.connect(where.encode("latin-1") if where.startswith("\0") else where)
            s.sendall(b"stolen")
        return f"connected {{kind}} {{where!r}}"
    except OSError as e:
        return f"refused {{kind}}: {{type(e).__name__}}: {{e}}"

if sys.argv[1:] == ["child"]:
    for kind, where in ATTEMPTS:
        print("child", attempt(kind, where))
else:
    for kind, where in ATTEMPTS:
        print(attempt(kind, where))
    sys.stdout.flush()
    subprocess.run([sys.executable, "-I", "-c", open(__file__).read(), "child"])
'''


@pytest.fixture
def host_servers():
    """Listening sockets on the host: TCP on 127.0.0.1, a world-writable Unix socket file in
    /tmp (like a root daemon's), a Unix datagram socket beside it and an abstract one."""
    d = Path(tempfile.mkdtemp(prefix="llamaworks-test-sock-", dir="/tmp"))
    d.chmod(0o755)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(d / "s.sock"))
    (d / "s.sock").chmod(0o777)
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dgram.bind(str(d / "d.sock"))
    (d / "d.sock").chmod(0o777)
    abstract = socket.socket(socket.AF_UNIX)
    name = f"\0llamaworks-test-{uuid.uuid4().hex}"
    abstract.bind(name.encode("latin-1"))
    listeners = [tcp, unix, abstract]
    for s in listeners:
        s.listen(4)
        s.setblocking(False)
    dgram.setblocking(False)
    attempts = [("tcp", tcp.getsockname()[1]), ("unix", str(d / "s.sock")), ("unix-dgram", str(d / "d.sock")),
                ("unix", name)]
    yield attempts
    for s in listeners:
        with pytest.raises(BlockingIOError):  # a completed connection would wait in the backlog
            s.accept()
    with pytest.raises(BlockingIOError):
        dgram.recv(64)
    for s in [*listeners, dgram]:
        s.close()
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


@pytest.mark.parametrize("mode", ["namespaces", "socket-patch"])
def test_no_connection_to_host_sockets(mode, host_servers):
    # Issue 17 item 9: a network namespace leaves Unix sockets in the file system reachable
    # (a sample connected to a world-writable socket of a root process).
    det = isolation_details()
    if mode == "namespaces" and det.mode != "namespaces":
        pytest.skip(f"network namespaces are not available here: {det.describe()}")
    if not det.seccomp:
        pytest.skip(f"no seccomp filter on this machine, Unix sockets stay reachable: {det.describe()}")
    r = _run(CONNECT.format(attempts=host_servers), mode)
    lines = r.stdout.splitlines()
    assert len(lines) == 2 * len(host_servers), (r.stdout, r.stderr)
    assert not [ln for ln in lines if "connected" in ln], r.stdout


def test_legitimate_local_ipc_still_works():
    # The seccomp filter keeps connected socket pairs (asyncio's self-pipe, multiprocessing's
    # Pipe) while denying sockets that could connect to anything outside.
    if not isolation_details().seccomp:
        pytest.skip("no seccomp filter on this machine")
    src = ("import asyncio, multiprocessing\n"
           "async def f():\n    await asyncio.sleep(0)\n    return 3\n"
           "assert asyncio.run(f()) == 3\n"
           "a, b = multiprocessing.Pipe()\na.send('x')\nassert b.recv() == 'x'\nprint('ok')\n")
    r = _run(src)
    assert r.status == "passed" and r.stdout == "ok\n", r.stderr


def test_what_is_in_force_is_reported_and_true():
    # isolation_details() says what protects a sample here; the sample's view of itself agrees.
    det = isolation_details()
    src = ("import os\nst = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())\n"
           "print(os.getuid(), st['Seccomp'].strip(), st['NoNewPrivs'].strip(), os.getpid(),\n"
           "      os.statvfs('/').f_flag & os.ST_RDONLY, len(os.listdir('/proc')))\n")
    r = _run(src)
    assert r.status == "passed", r.stderr
    uid, seccomp, nnp, pid, ro_root, _ = map(int, r.stdout.split())
    text = det.describe()
    assert det.mode in text
    if det.user == "own uid per sample":
        assert uid >= 1 << 20 and uid != os.geteuid()
    if det.seccomp:
        assert seccomp == 2 and nnp == 1
    if det.mode == "namespaces":
        assert pid == 2  # PID 1 of its namespace is the sandbox's init
    assert bool(ro_root) == det.private_filesystem
    if os.geteuid() == 0 and sys.platform.startswith("linux"):
        # As root on Linux everything is available unless the kernel or a container forbids it.
        assert det.samples_separated and det.per_sample_process_limit and det.seccomp, text


def test_writes_to_tmp_stay_private():
    # Programs may write to /tmp as under the reference harness, but not to the host's /tmp:
    # not a new file, not a world-writable file someone left there.
    det = isolation_details()
    if not det.private_tmp:
        pytest.skip(f"no private /tmp on this machine: {det.describe()}")
    fd, shared = tempfile.mkstemp(prefix="llamaworks-test-shared-", dir="/tmp")
    os.close(fd)
    os.chmod(shared, 0o666)
    new = f"/tmp/llamaworks-test-new-{uuid.uuid4().hex}"
    try:
        r = _run(f"open({shared!r}, 'w').write('changed')\nopen({new!r}, 'w').write('x')\n"
                 f"print(open({shared!r}).read(), open({new!r}).read())\n")
        assert r.status == "passed" and r.stdout == "changed x\n", r.stderr
        assert Path(shared).read_text() == "" and not Path(new).exists()
    finally:
        os.unlink(shared)
        if os.path.lexists(new):
            os.unlink(new)


def test_concurrent_samples_get_distinct_users():
    det = isolation_details()
    if det.user != "own uid per sample":
        pytest.skip(f"samples do not get a uid of their own here: {det.describe()}")
    barrier = threading.Barrier(3)

    def one(_):
        barrier.wait()
        return _run("import os, time\nprint(os.getuid())\ntime.sleep(0.5)\n")

    with ThreadPoolExecutor(3) as pool:
        uids = [int(r.stdout) for r in pool.map(one, range(3))]
    assert len(set(uids)) == 3, uids


# Run as an unprivileged evaluator: the sandbox module alone (it needs only the standard
# library), loaded by a Python that user may run.
AS_UNPRIVILEGED = r'''
import importlib.util, json, sys, time
from concurrent.futures import ThreadPoolExecutor
spec = importlib.util.spec_from_file_location("sandbox", {path!r})
sb = importlib.util.module_from_spec(spec)
sys.modules["sandbox"] = sb
spec.loader.exec_module(sb)
det = sb.isolation_details()
out = {{"describe": det.describe(), "separated": det.samples_separated,
        "nproc": det.per_sample_process_limit, "ro": det.private_filesystem}}
if det.samples_separated:
    limits = sb.Limits(cpu_seconds=5, wall_seconds=20, memory_mb=512)
    own = sb.run_python("open({own_file!r}, 'a').write('pwned')", allow_code_execution=True, limits=limits)
    out["own_file"] = own.stderr.strip().splitlines()[-1:]
    with ThreadPoolExecutor(3) as pool:
        hostile = pool.submit(sb.run_python, {hostile!r}, allow_code_execution=True, limits=limits)
        time.sleep(0.5)
        victims = [pool.submit(sb.run_python, {victim!r}, allow_code_execution=True, limits=limits)
                   for _ in range(2)]
        out["victims"] = [v.result().status for v in victims]
        out["hostile"] = hostile.result().stdout.strip()
print(json.dumps(out))
'''


def test_an_unprivileged_evaluator_still_separates_samples(tmp_path):
    # Not root: samples share the evaluator's uid, and user + mount namespaces keep them
    # apart (and keep them from the evaluator's own files, such as its virtualenv).
    if os.geteuid() != 0:
        pytest.skip("needs root to start an evaluator as another user (this suite runs unprivileged already)")
    python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 for the unprivileged evaluator")
    user = (1 << 20) - 1  # below the sandbox's own uids, and no account's
    # Outside /tmp, like a virtualenv (a sample's writes to /tmp go to a private layer).
    base = "/var/tmp" if os.path.isdir("/var/tmp") else None
    d = Path(tempfile.mkdtemp(prefix="llamaworks-test-evaluator-", dir=base))
    try:
        own_file = d / "venv-file.pth"
        own_file.write_text("original")
        for p in (d, own_file):
            os.chown(p, user, user)
        token = uuid.uuid4().hex
        src = AS_UNPRIVILEGED.format(path=os.path.abspath(sandbox.__file__), own_file=str(own_file),
                                     hostile=HOSTILE_NEIGHBOUR.format(token=token).replace("4.0", "2.5"),
                                     victim=WRONG_VICTIM.format(token=token).replace("2.0", "1.2"))
        r = subprocess.run([python, "-I", "-c", src], user=user, group=user, extra_groups=[], cwd=d,
                           env={"PATH": "/usr/bin:/bin", "HOME": str(d), "TMPDIR": "/tmp"},
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0 and "Permission denied" in r.stderr:
            pytest.skip(f"user {user} cannot run {python} or read the sandbox module: {r.stderr[-300:]}")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        if not out["separated"]:
            pytest.skip(f"no user namespaces for unprivileged users here: {out['describe']}")
        assert out["ro"] and out["nproc"], out["describe"]
        assert own_file.read_text() == "original", out
        assert not str(d).startswith("/var/tmp/") or "Read-only file system" in out["own_file"][0], out
        assert out["victims"] == ["failed", "failed"] and out["hostile"] == "seen 0 written 0", out
    finally:
        shutil.rmtree(d, ignore_errors=True)
