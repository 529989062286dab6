"""Atomic writes: nothing partial ever appears at the final path, and outputs get normal permissions."""

from __future__ import annotations

import os
import stat

import pytest

from hai_medqa.io_utils import atomic_dir, atomic_path, write_jsonl


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "data.jsonl"
    write_jsonl(out, [{"a": 1}])
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("half", encoding="utf-8")
        raise RuntimeError("interrupted")
    assert out.read_text(encoding="utf-8") == '{"a": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_interrupt_inside_a_directory_write_keeps_the_old_folder(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "w.bin").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(final) as tmp:
        (tmp / "w.bin").write_bytes(b"new, unfinished")
        raise KeyboardInterrupt
    assert (final / "w.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_outputs_get_umask_permissions_not_private_temp_ones(tmp_path):
    old = os.umask(0o022)
    try:
        write_jsonl(tmp_path / "x.jsonl", [{"a": 1}])
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.jsonl").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
