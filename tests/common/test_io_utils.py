"""Atomic writes: nothing partial ever appears at the final path, outputs get normal permissions, and
the partial files of a killed writer are recognised and removed by the next write (never a live one's)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from hai_medqa.io_utils import (
    atomic_dir,
    atomic_path,
    fault_point,
    partial_prefix,
    remove_stale_partials,
    write_jsonl,
)


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


# --- partial files: recognisable names, live writers kept, dead writers' leftovers removed (issue 15) ---

REPO = Path(__file__).resolve().parents[2]


def _python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, **kwargs)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"helper process ended early (rc {proc.returncode})"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


def _partials(folder: Path, final_name: str) -> list[Path]:
    return sorted(folder.glob(f"{partial_prefix(folder / final_name)}*"))


def test_partial_file_is_named_recognisably_and_removed_on_error(tmp_path):
    out = tmp_path / "data.jsonl"
    with pytest.raises(KeyboardInterrupt), atomic_path(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".data.jsonl.partial-")
        assert tmp.name.endswith(".tmp") and f"-{os.getpid()}-" in tmp.name
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fork_a_child", [False, True], ids=["alone", "with-forked-child"])
def test_partial_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path, fork_a_child):
    """SIGKILL cannot be cleaned up after; the next atomic write of the same file removes the leftover
    and says so. A child forked while the file was being written (a pool or DataLoader worker) must
    not keep it looking alive after the writer died."""
    out = tmp_path / "data.jsonl"
    out.write_text("previous\n", encoding="utf-8")
    ready = tmp_path / "ready"
    lines = [
        "import os, sys, time",
        "from pathlib import Path",
        "from hai_medqa.io_utils import atomic_path",
        f"with atomic_path({str(out)!r}) as tmp:",
        "    tmp.write_text('half of it')",
    ]
    if fork_a_child:
        lines += ["    if os.fork() == 0:", "        time.sleep(60)", "        os._exit(0)"]
    lines += [f"    Path({str(ready)!r}).write_text('x')", "    time.sleep(60)"]
    proc = _python("\n".join(lines))
    children: list[psutil.Process] = []
    try:
        _wait_for(ready, proc)
        children = psutil.Process(proc.pid).children()
        assert len(children) == int(fork_a_child)
        assert len(_partials(tmp_path, out.name)) == 1
        assert remove_stale_partials(out) == []  # the writer is alive: its file is left alone
        proc.kill()
        proc.wait(30)
        leftover = _partials(tmp_path, out.name)
        assert len(leftover) == 1 and leftover[0].read_text() == "half of it"
        actions = remove_stale_partials(out)  # the forked child still runs, the writer does not
        assert len(actions) == 1 and str(leftover[0]) in actions[0] and "interrupted run" in actions[0]
        assert _partials(tmp_path, out.name) == []
        assert out.read_text(encoding="utf-8") == "previous\n"  # the previous file was never touched
    finally:
        proc.kill()
        for child in children:
            child.kill()


def test_atomic_path_cleans_a_dead_writers_leftover_itself(tmp_path):
    out = tmp_path / "data.jsonl"
    stale = tmp_path / f"{partial_prefix(out)}999999999-abcdefgh.tmp"  # no such process, no lock
    stale.write_text("half", encoding="utf-8")
    other = tmp_path / f"{partial_prefix(tmp_path / 'other.jsonl')}999999999-abcdefgh.tmp"
    other.write_text("someone else's", encoding="utf-8")
    write_jsonl(out, [{"a": 1}])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, other.name])


def test_leftover_of_an_older_version_is_named_not_removed(tmp_path):
    out = tmp_path / "data.jsonl"
    legacy = tmp_path / ".data.jsonl.k2j4h5g6.tmp"  # what mkstemp made before the .partial- tag
    legacy.write_text("half", encoding="utf-8")
    actions = remove_stale_partials(out)
    assert len(actions) == 1 and str(legacy) in actions[0] and "remove it by hand" in actions[0]
    assert legacy.exists()


def test_folder_moved_aside_by_an_interrupted_swap_is_restored(tmp_path):
    final = tmp_path / "model"
    old = tmp_path / f"{partial_prefix(final)}999999999-abcdefgh.old"  # killed between the two moves
    old.mkdir()
    (old / "w.bin").write_bytes(b"old")
    new = old.with_suffix(".tmp")
    new.mkdir()
    (new / "w.bin").write_bytes(b"new, complete")
    actions = remove_stale_partials(final)
    assert (final / "w.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert any("restored" in a for a in actions)


def test_interrupt_between_the_two_moves_puts_the_old_folder_back(tmp_path, monkeypatch):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "w.bin").write_bytes(b"old")
    real_replace = os.replace
    calls = []

    def replace_then_interrupt(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder is about to move in: a Ctrl-C lands here
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt), atomic_dir(final) as tmp:
        (tmp / "w.bin").write_bytes(b"new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert (final / "w.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_fault_point_pauses_only_at_its_name(tmp_path, monkeypatch):
    announce = tmp_path / "at"
    fault_point("anything")  # not armed: returns at once
    code = (
        "from hai_medqa.io_utils import fault_point\nfault_point('elsewhere')\nfault_point('here')\n"
    )
    proc = _python(
        code, env={**os.environ, "HAI_MEDQA_FAULT_POINT": "here", "HAI_MEDQA_FAULT_FILE": str(announce)}
    )
    _wait_for(announce, proc)
    assert announce.read_text(encoding="utf-8").split() == [str(proc.pid), "here"]
    assert proc.poll() is None  # paused
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == -signal.SIGTERM
