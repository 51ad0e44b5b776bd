"""Atomic writes: the old content or the new one, never half of either, and no temporary files left."""

import os

import pytest

from pg_pruning_plugin.resources.files import atomic_directory, atomic_file, write_atomic


def test_atomic_file_replaces_or_keeps(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    write_atomic(path, "one")
    assert path.read_text() == "one" and oct(os.stat(path).st_mode & 0o777) == "0o644"
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "one" and os.listdir(path.parent) == ["a.txt"]
    write_atomic(path, b"two")
    assert path.read_bytes() == b"two"


def test_atomic_directory_replaces_or_keeps_a_finished_copy(tmp_path):
    out = tmp_path / "model"
    with atomic_directory(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (out / "config.json").is_file()
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        (tmp / "partial").write_text("x")
        raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["model"] and not (out / "partial").exists()
    with atomic_directory(out, replace=False) as tmp:  # another process's finished copy is kept
        (tmp / "other").write_text("x")
    assert not (out / "other").exists() and sorted(os.listdir(tmp_path)) == ["model"]
    with atomic_directory(out) as tmp:
        (tmp / "new").write_text("x")
    assert sorted(os.listdir(out)) == ["new"]
