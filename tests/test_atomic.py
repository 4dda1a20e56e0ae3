from __future__ import annotations

import os

import pytest

from llamaworks.atomic import atomic_directory, atomic_open, atomic_write_text


def test_atomic_files_and_folders_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "hi")
        with atomic_directory(tmp_path / "d") as d:
            (d / "x").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "d" / "x").read_text() == "y"


def test_atomic_directory_replaces_and_cleans_up(tmp_path):
    with atomic_directory(tmp_path / "d") as d:
        (d / "v").write_text("1")
    with pytest.raises(ValueError, match="already exists"):
        with atomic_directory(tmp_path / "d"):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "d", overwrite=True) as d:
            (d / "v").write_text("2")
            raise RuntimeError("interrupted")
    assert (tmp_path / "d" / "v").read_text() == "1"
    with atomic_directory(tmp_path / "d", overwrite=True) as d:
        (d / "v").write_text("3")
    assert (tmp_path / "d" / "v").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_atomic_open_streams_and_keeps_the_old_file_on_error(tmp_path):
    p = tmp_path / "out.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(p, "w", encoding="utf-8") as f:
            f.write("half")
            raise RuntimeError("killed")
    assert p.read_text() == "old" and [x.name for x in tmp_path.iterdir()] == ["out.txt"]
    with atomic_open(p, "w", encoding="utf-8") as f:
        f.write("new\n")
    assert p.read_text() == "new\n"
