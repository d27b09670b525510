"""autoencoderkl.atomic: the one way files that others read are written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from autoencoderkl import atomic
from autoencoderkl.atomic import atomic_dir, atomic_path, write_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path):
    target = write_atomic(tmp_path / "report.json", "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_the_temporary_name_is_hidden_and_keeps_the_suffix(tmp_path: Path):
    with atomic_path(tmp_path / "sub" / "grid.png") as tmp:
        assert tmp.parent == tmp_path / "sub" and tmp.name.startswith(".") and tmp.suffix == ".png"
        tmp.write_bytes(b"png")
    assert (tmp_path / "sub" / "grid.png").read_bytes() == b"png"


def test_files_and_folders_are_fsynced_before_and_after_the_rename(tmp_path: Path, monkeypatch):
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (calls.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    write_atomic(tmp_path / "a.txt", b"x")
    assert calls[0].startswith(str(tmp_path / ".a.txt.tmp-"))  # the file, under its temporary name
    assert calls[-1] == str(tmp_path)  # then the folder that holds the new name
    calls.clear()
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert any(c.endswith("config.json") for c in calls) and calls[-1] == str(tmp_path)


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path: Path):
    with atomic_dir(tmp_path / "vae") as tmp:
        (tmp / "v1").write_text("1")
    with pytest.raises(ValueError):
        with atomic_dir(tmp_path / "vae") as tmp:
            (tmp / "v2").write_text("2")
            raise ValueError("export failed")
    assert [p.name for p in (tmp_path / "vae").iterdir()] == ["v1"]
    with atomic_dir(tmp_path / "vae") as tmp:
        (tmp / "v3").write_text("3")
    assert [p.name for p in (tmp_path / "vae").iterdir()] == ["v3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]
