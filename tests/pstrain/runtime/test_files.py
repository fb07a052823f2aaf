"""pstrain.runtime.files.atomic_write: all or nothing, fsynced, permissions as asked."""
from __future__ import annotations

import json
import os
import stat

import pytest

from pstrain.runtime import files
from pstrain.runtime.files import atomic_write


def test_writes_text_and_binary(tmp_path):
    with atomic_write(tmp_path / "a.json", text=True) as f:
        json.dump({"x": 1}, f)
    with atomic_write(tmp_path / "b.bin") as f:
        f.write(b"\x00\x01")
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def test_creates_the_parent_directory(tmp_path):
    with atomic_write(tmp_path / "deep" / "er" / "f.txt", text=True) as f:
        f.write("hi")
    assert (tmp_path / "deep" / "er" / "f.txt").read_text() == "hi"


def test_a_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path, text=True) as f:
            f.write("half of the new")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_a_failed_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def crash(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError, match="rename failed"):
        with atomic_write(path, text=True) as f:
            f.write("new")
    monkeypatch.undo()
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


@pytest.mark.parametrize("mode", [0o600, 0o644])
def test_mode(tmp_path, mode):
    with atomic_write(tmp_path / "f", mode=mode) as f:
        f.write(b"x")
    assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == mode


def test_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(files.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b)))
    with atomic_write(tmp_path / "f") as f:
        f.write(b"x")
    assert events == ["fsync", "replace", "fsync"]
