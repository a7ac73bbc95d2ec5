"""Small file utilities: atomic writes."""

from __future__ import annotations

import os

import pytest

from llm2vec_fast.files import write_atomically


def test_an_atomic_write_lands_whole_with_the_umask_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        write_atomically(tmp_path / "a.json", lambda tmp: tmp.write_text('{"a": 1}'))
    finally:
        os.umask(previous)
    target = tmp_path / "a.json"
    assert target.read_text() == '{"a": 1}'
    assert target.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert [path.name for path in tmp_path.iterdir()] == ["a.json"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, fail)
    assert target.read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["a.json"]
