"""Small file helpers shared by every stage: atomic writes, jsonl, hashing, partial-file clean-up.

Everything the pipeline writes goes through `atomic_path`/`atomic_dir`, so an interrupted run never
leaves a truncated file at the final path (write to a temporary sibling, fsync, rename).

Partial files are named so that a later run can recognise them and tell a dead writer's leftovers
from a live writer's work:

    .<final name>.partial-<pid>-<random>.tmp   the file or folder being written
    .<final name>.partial-<pid>-<random>.old   atomic_dir only: the previous folder during the swap

The writer holds an exclusive `flock` on each of them while it works; the kernel drops the lock when
the process dies, however it dies (SIGKILL and power loss included). `remove_stale_partials` (called
by `atomic_path`/`atomic_dir` before they start) removes those whose lock nobody holds, restores a
previous folder an interrupted swap had moved aside, and logs each action. Without flock (Windows)
the pid in the name is checked instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from loguru import logger

try:  # POSIX only; Windows falls back to the pid in the name
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS
    fcntl = None  # type: ignore[assignment]

PARTIAL_TAG = ".partial-"
_PARTIAL_REST = re.compile(r"(?P<pid>\d+)-[A-Za-z0-9_]+\.(?P<kind>tmp|old)")
_LEGACY_TMP = re.compile(r"[a-z0-9_]{8}\.tmp")  # mkstemp names of versions before the .partial- tag

# Lock descriptors this process holds on its partial files. A forked child (a DataLoader or pool
# worker) closes its copies at once, so the lock lives exactly as long as the process that writes.
_HELD_LOCKS: set[int] = set()


def _close_held_locks_in_child() -> None:
    for fd in list(_HELD_LOCKS):
        with contextlib.suppress(OSError):
            os.close(fd)  # closing a duplicate never releases the parent's flock
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_locks_in_child)


def partial_prefix(final: str | os.PathLike) -> str:
    """Start of the name of every partial file or folder written for `final`."""
    return f".{Path(final).name}{PARTIAL_TAG}"


def _hold_lock(path: Path) -> int | None:
    """Open `path` (a file or a folder) and take an exclusive flock on it; return the descriptor."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a file system without flock: the pid in the name still identifies the writer
        os.close(fd)
        return None
    _HELD_LOCKS.add(fd)
    return fd


def _release_lock(fd: int | None) -> None:
    if fd is not None:
        _HELD_LOCKS.discard(fd)
        with contextlib.suppress(OSError):
            os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, *, waiting: str) -> Iterator[None]:
    """Hold an exclusive flock on the file `path` (created if missing) for the block; when another process
    holds it, log `waiting` once and wait. Serialises work on a shared target, e.g. two runs converting
    the same checkpoint into one cache at once (the second then finds the first's result and reuses it).
    Without flock (Windows, some network file systems) the block runs unlocked, as before."""
    fd = None
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                _HELD_LOCKS.add(fd)
            except BlockingIOError:
                logger.info(waiting)
                fcntl.flock(fd, fcntl.LOCK_EX)
                _HELD_LOCKS.add(fd)
            except OSError:  # a file system without flock
                os.close(fd)
                fd = None
        yield
    finally:
        _release_lock(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def _writer_alive(path: Path, pid: int) -> bool:
    """True when a live process still holds the partial file (its flock), or when that cannot be told."""
    if fcntl is None:
        return _pid_alive(pid)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True  # gone already: nothing to do
    except OSError:
        return _pid_alive(pid)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no flock on this file system
        return _pid_alive(pid)
    finally:
        os.close(fd)  # also drops the probe's own lock
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _size(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def remove_stale_partials(final: str | os.PathLike) -> list[str]:
    """Remove the partial files an interrupted run left for `final` (no live writer holds them);
    return what was done, one line each (also logged as warnings).

    A `.old` folder whose swap was cut short is put back at `final` when `final` is missing (the
    run died between moving the old folder aside and moving the new one in), otherwise removed.
    Partial files of older versions of this project (no `.partial-` tag) are named, never removed:
    nothing tells whether their writer is still running.
    """
    final = Path(final)
    parent = final.parent
    prefix = partial_prefix(final)
    legacy_prefix = f".{final.name}."
    try:
        names = sorted(e.name for e in os.scandir(parent))
    except OSError:
        return []
    actions: list[str] = []
    olds: list[Path] = []
    for name in names:
        path = parent / name
        if name.startswith(prefix):
            m = _PARTIAL_REST.fullmatch(name[len(prefix) :])
            if m is None or _writer_alive(path, int(m["pid"])):
                continue
            if m["kind"] == "old":
                olds.append(path)
                continue
            with contextlib.suppress(OSError):
                size = _size(path)
                _remove(path)
                actions.append(f"removed {path} ({size:,} bytes), left unfinished by an interrupted run")
        elif name.startswith(legacy_prefix) and _LEGACY_TMP.fullmatch(name[len(legacy_prefix) :]):
            actions.append(
                f"found {path}, probably left unfinished by an older version of this project; "
                "remove it by hand unless another run is writing it"
            )
    for old in olds:
        with contextlib.suppress(OSError):
            if os.path.lexists(final):
                _remove(old)
                actions.append(f"removed {old}, the previous version of {final} (replaced)")
            else:
                os.replace(old, final)
                actions.append(f"restored {final} from {old}: an interrupted run had moved it aside")
    for line in actions:
        logger.warning(line)
    return actions


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds.

    The temporary file lives in the same folder so the rename is atomic on POSIX. On any error
    (KeyboardInterrupt included) it is removed and whatever was at `final` before stays untouched;
    after a SIGKILL or power loss the next atomic write of `final` removes it (see module doc).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final)
    tmp: Path | None = None
    lock: int | None = None
    try:  # the temporary file is removed on any error, a Ctrl-C right after mkstemp included
        fd, tmp_name = tempfile.mkstemp(
            prefix=f"{partial_prefix(final)}{os.getpid()}-", suffix=".tmp", dir=final.parent
        )
        tmp = Path(tmp_name)
        os.close(fd)
        lock = _hold_lock(tmp)
        yield tmp
        with open(tmp, "rb+") as f:  # flush to disk before the rename makes it visible
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        fault_point(f"before_rename:{final.name}")
        os.replace(tmp, final)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _release_lock(lock)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; it becomes `final` only when the block succeeds.

    An existing `final` is replaced only after the new folder is complete: it is moved aside
    (`.old`), the new folder moved in, then the old one deleted. An interrupt between the two moves
    puts the old folder back; after a SIGKILL there, the next atomic write of `final` does.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final)
    tmp = Path(
        tempfile.mkdtemp(prefix=f"{partial_prefix(final)}{os.getpid()}-", suffix=".tmp", dir=final.parent)
    )
    old = tmp.with_suffix(".old")
    locks = [_hold_lock(tmp)]
    moved_aside = False
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a shared cache must stay readable
        yield tmp
        fault_point(f"before_rename:{final.name}")
        if final.exists():
            locks.append(_hold_lock(final))  # the lock travels with the folder to its .old name
            os.replace(final, old)
            moved_aside = True
            os.replace(tmp, final)
            moved_aside = False
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        if moved_aside and not os.path.lexists(final):
            os.replace(old, final)  # interrupted between the two moves: the previous folder goes back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for lock in locks:
            _release_lock(lock)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as pretty UTF-8 JSON (Korean kept readable), atomically."""
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False) + "\n")


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in `path`, or {} when the file is missing, unreadable or not an object (for
    optional records: a run file, a report, a config a later stage may or may not find)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records one JSON object per line, atomically; return how many were written."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield (line_number, parsed_object) for each non-blank line; raise ValueError naming the line."""
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    """Hex SHA-256 of a string's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


FAULT_POINT_ENV = "HAI_MEDQA_FAULT_POINT"  # name of the point to pause at (tests only)
FAULT_FILE_ENV = "HAI_MEDQA_FAULT_FILE"  # written (pid and point) when the pause begins
FAULT_PAUSE_S = 60.0
FAULT_PAUSE_ENV = "HAI_MEDQA_FAULT_PAUSE_S"  # another pause length (a run that records signals goes on after it)


def fault_point(name: str) -> None:
    """Test hook for fault injection: when $HAI_MEDQA_FAULT_POINT equals `name`, announce it in
    $HAI_MEDQA_FAULT_FILE and pause (up to 60 s) so a test can kill the process at exactly this
    point. Costs one environment lookup otherwise."""
    if os.environ.get(FAULT_POINT_ENV) != name:
        return
    announce = os.environ.get(FAULT_FILE_ENV)
    if announce:
        tmp = Path(f"{announce}.{os.getpid()}")
        tmp.write_text(f"{os.getpid()} {name}\n", encoding="utf-8")
        os.replace(tmp, announce)
    deadline = time.monotonic() + float(os.environ.get(FAULT_PAUSE_ENV) or FAULT_PAUSE_S)
    while time.monotonic() < deadline:  # short sleeps: a signal handler runs at once
        time.sleep(0.01)
