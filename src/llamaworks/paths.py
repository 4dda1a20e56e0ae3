"""What a path names, in words, for errors about files a user handed us.

`Path.is_file()` and `Path.exists()` answer False for a symlink loop, a FIFO or a device
alike, so a check built on them reports all of those as "missing" (and opening a FIFO or
/dev/zero instead would hang or read forever). These helpers look with one `os.stat` and
say what is there instead.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def path_kind(path: str | os.PathLike) -> str:
    """'file', 'directory', 'missing', or a phrase for anything else ('a FIFO (named pipe)',
    'a symlink loop', 'a broken symlink to X', 'a character device', ...)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            if path.is_symlink():
                return f"a broken symlink to {os.readlink(path)}"
            return "missing"
        return f"unreadable ({e.strerror})"
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    for test, words in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                        (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return "not a regular file"


def require_file(path: str | os.PathLike, hint: str = "") -> Path:
    """`path` if it is a regular file (or a symlink to one). Missing: FileNotFoundError
    "PATH is missing"; anything else: ValueError naming what it is. `hint` ends both."""
    return _require(path, "file", "a regular file", "is missing", hint)


def require_dir(path: str | os.PathLike, hint: str = "") -> Path:
    """`path` if it is a directory; FileNotFoundError if missing, ValueError naming what it is otherwise."""
    return _require(path, "directory", "a directory", "does not exist", hint)


def _require(path: str | os.PathLike, want: str, noun: str, missing: str, hint: str) -> Path:
    path = Path(path)
    kind = path_kind(path)
    if kind == want:
        return path
    tail = f": {hint}" if hint else ""
    if kind == "missing":
        raise FileNotFoundError(f"{path} {missing}{tail}")
    what = {"directory": "a directory", "file": "a file"}.get(kind, kind)
    raise ValueError(f"{path} is {what}, not {noun}{tail}")
