"""Path guards every CLI runs before any work: no output may destroy an input, and a path of the
wrong kind is one line naming it - before a model loads or a file is read.

    from hai_medqa.guards import check_input_kinds, check_output_paths

    check_input_kinds(files={"--input": args.input}, folders={"--model": local_model})
    check_output_paths({"--input": args.input, "--model": local_model},
                       {"--output": args.output})                       # raises PathError

Identity is judged by (device, inode) of what exists, which sees through symlinks, ``..``, hard
links, bind mounts and case-insensitive file systems (``Q.jsonl`` and ``q.jsonl`` on macOS); a path
that does not exist yet is judged by its nearest existing folder, and two outputs that do not exist
yet are the same when they name the same folder and names equal up to case and Unicode
normalisation (conservative: refusing such a pair on a case-sensitive system costs nothing).
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path

from hai_medqa.errors import HaiMedQAError

PathLike = str | os.PathLike


class PathError(HaiMedQAError, ValueError):
    """A path argument of the wrong kind (folder for file or file for folder), or an output that
    collides with an input; the message names the option and the path."""


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _chain(path: Path) -> list[Path]:
    """`path` and the folders above it, nearest first, every symlink and ``..`` resolved the way the
    system will when writing (``link/x``'s parents are the link target's parents, not the link's)."""
    path = Path(os.path.realpath(path))
    return [path, *path.parents]


def _labelled(paths: Mapping[str, PathLike | None] | Iterable[PathLike | None]) -> list[tuple[str, Path]]:
    items = paths.items() if isinstance(paths, Mapping) else (("input", p) for p in paths)
    return [(label, Path(p)) for label, p in items if p is not None and str(p) != ""]


def _name_key(path: Path) -> tuple[tuple[int, int] | None, tuple[str, ...]]:
    """(identity of the nearest existing folder, the rest of the path up to case and Unicode form)."""
    chain = _chain(path)
    for depth, ancestor in enumerate(chain):
        ident = _identity(ancestor)
        if ident is not None:
            rest = [p.name for p in chain[:depth]][::-1]
            return ident, tuple(unicodedata.normalize("NFC", part).casefold() for part in rest)
    return None, ()


def _same_path(a: Path, b: Path) -> bool:
    ident = _identity(a)
    if ident is not None and ident == _identity(b):
        return True
    return os.path.abspath(a) == os.path.abspath(b) or _name_key(a) == _name_key(b)


def same_path(a: PathLike, b: PathLike) -> bool:
    """Whether `a` and `b` name the same file or folder (the identity rules above: symlinks, ``..``,
    hard links and case included; two paths that do not exist yet compare by folder and name)."""
    return _same_path(Path(a), Path(b))


def check_input_kinds(files: Mapping[str, PathLike | None] | None = None,
                      folders: Mapping[str, PathLike | None] | None = None) -> None:
    """Refuse a folder given where a file is read, or a file where a folder is read.

    `files` and `folders` map an option name (``--input``) to its path (None: not given). A path
    that does not exist is left to the stage that reads it (it names what it looked for).
    """
    for label, path in _labelled(files or {}):
        if path.is_dir():
            raise PathError(f"{label} {path} is a folder; expected a file")
    for label, path in _labelled(folders or {}):
        if path.exists() and not path.is_dir():
            raise PathError(f"{label} {path} is a file; expected a folder")


def check_output_paths(
    inputs: Mapping[str, PathLike | None] | Iterable[PathLike | None],
    outputs: Mapping[str, PathLike | None],
    *,
    folders: Iterable[str] = (),
) -> None:
    """Refuse, in one line naming the path, every output that cannot be written safely.

    `inputs`: what the run reads (files or folders; option name -> path, or bare paths); `outputs`:
    option name -> the file (or, for the names in `folders`, the folder) the run writes; None = not
    given. Refused: an output that is an input, lies inside an input folder, or contains an input;
    two outputs that are the same path; a file output that is a folder (and a folder output that is
    a file); an output whose folder cannot be created (a file in the way) or written. Reads no file.
    """
    folders = set(folders)
    ins = [(label, p, ident) for label, p in _labelled(inputs) if (ident := _identity(p)) is not None]
    outs = _labelled(outputs)
    for i, (label, out) in enumerate(outs):
        for other, other_path in outs[i + 1:]:
            if _same_path(out, other_path):
                raise PathError(f"{label} and {other} name the same path ({out}); give two different paths")
        chain = _chain(out)
        # the folder the run writes into: the output folder itself, or a file's nearest existing parent
        nearest = next(a for a in (chain if label in folders and out.is_dir() else chain[1:]) if os.path.lexists(a))
        if not nearest.is_dir():
            raise PathError(f"{label} {out} cannot be created: {nearest} is a file, not a folder")
        for ancestor in chain:
            ident = _identity(ancestor)
            if ident is None:
                continue
            for in_label, inp, in_ident in ins:
                if ident == in_ident:
                    if ancestor == chain[0]:
                        raise PathError(f"{label} {out} is the input {in_label} {inp}; it would be overwritten")
                    raise PathError(f"{label} {out} lies inside the input {in_label} {inp}; write it elsewhere")
        ident = _identity(out)
        if ident is not None:
            for in_label, inp, _ in ins:
                if any(_identity(a) == ident for a in _chain(inp)[1:]):
                    raise PathError(f"{label} {out} contains the input {in_label} {inp}; choose a separate path")
        if label in folders:
            if out.exists() and not out.is_dir():
                raise PathError(f"{label} {out} is a file; expected a folder")
        elif out.is_dir():
            raise PathError(f"{label} {out} is a folder; expected a file path")
        elif out.exists() and not out.is_file():
            raise PathError(f"{label} {out} exists and is not a regular file")
        if not os.access(nearest, os.W_OK | os.X_OK):
            raise PathError(f"{label} {out} cannot be written: no write permission in {nearest}")
