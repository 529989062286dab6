"""Output paths checked against the run's inputs before any work (issue 15, item 1).

One function, `check_output_paths`, so it can move to a project-wide guard module unchanged.
Identity is judged by (device, inode) of what exists, which sees through symlinks, `..`, hard links
and case-insensitive file systems (TL.zip vs tl.zip on macOS); a path that does not exist yet is
judged by its nearest existing folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from .schema import DataError, nfc


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _existing_chain(path: Path) -> list[Path]:
    """`path` and its ancestors, nearest first. Absolute but not normalised: `link/..` must stay for
    stat to follow the link the way the system will."""
    path = path.absolute()
    return [path, *path.parents]


def _same_name(a: Path, b: Path) -> bool:
    """Same file for two paths of which neither need exist: the same folder and a name equal up to
    case and Unicode normalisation (conservative: on a case-sensitive system such names are refused
    too, which costs a user nothing)."""
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    pa, pb = _identity(a.absolute().parent), _identity(b.absolute().parent)
    return pa is not None and pa == pb and nfc(a.name).casefold() == nfc(b.name).casefold()


def check_output_paths(
    inputs: Iterable[str | os.PathLike], outputs: Mapping[str, str | os.PathLike | None]
) -> None:
    """Refuse, in one line naming the path, every output file that cannot be written safely.

    outputs maps an option name (``--output``) to the file it names (None: not given). Refused:
    an output that is an input, lies inside an input folder or contains an input; two outputs that
    are the same file; an output that is a folder or not a regular file; an output whose folder
    cannot be created (a file in the way) or written. Raises DataError; reads no file.
    """
    given = {label: Path(p) for label, p in outputs.items() if p is not None and str(p) != ""}
    ins = [(Path(p), _identity(Path(p))) for p in inputs]
    ins = [(p, ident) for p, ident in ins if ident is not None]  # a missing input is reported later
    labels = list(given)
    for i, label in enumerate(labels):
        out = given[label]
        for other in labels[i + 1 :]:
            if _same_name(out, given[other]) or (
                _identity(out) is not None and _identity(out) == _identity(given[other])
            ):
                raise DataError(f"{label} and {other} name the same file ({out}); give two different paths")
        chain = _existing_chain(out)
        for ancestor in chain:
            ident = _identity(ancestor)
            if ident is None:
                continue
            for inp, inp_ident in ins:
                if ident == inp_ident:
                    if ancestor == chain[0]:
                        raise DataError(f"{label} {out} is the input {inp}; it would be overwritten")
                    raise DataError(
                        f"{label} {out} lies inside the input {inp}; write it outside the data you read"
                    )
        ident = _identity(out)
        if ident is not None:
            for inp, _ in ins:
                if any(_identity(a) == ident for a in _existing_chain(inp)[1:]):
                    raise DataError(f"{label} {out} is a folder holding the input {inp}")
        if out.is_dir():
            raise DataError(f"{label} {out} is a folder; give a file path (e.g. {out / 'train.jsonl'})")
        if os.path.lexists(out) and out.exists() and not out.is_file():
            raise DataError(f"{label} {out} exists and is not a regular file")
        nearest = next(a for a in chain[1:] if os.path.lexists(a))  # "/" always exists
        if not nearest.is_dir():
            raise DataError(f"{label} {out} cannot be created: {nearest} is a file, not a folder")
        if not os.access(nearest, os.W_OK | os.X_OK):
            raise DataError(f"{label} {out} cannot be written: no write permission in {nearest}")
