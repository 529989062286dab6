"""Find AI Hub label trees (extracted folders or TL/VL zips) and list their files folder by folder.

A *label root* is a folder (or a zip) holding `1.질문/` and/or `2.답변/`. Below those two the tree is
`<category>/<disease>/<intention>/<id>.json` in the real data; any depth is accepted and the join key
of a file is its folder path relative to `1.질문/` or `2.답변/`, every component NFC-normalised
(macOS extracts names as NFD; zip entries are NFC).

Memory: for folders only the folder paths are indexed (thousands), files are listed when their
folder is processed. For zips the central directory (entry names) is indexed, which `zipfile` holds
anyway; file contents are read folder by folder.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .schema import ANSWER_DIR, QUESTION_DIR, DataError, nfc

QUESTION, ANSWER = "question", "answer"
ROLE_OF_DIR = {QUESTION_DIR: QUESTION, ANSWER_DIR: ANSWER}
# Names that tell the Training and Validation halves of the distribution apart.
SPLIT_MARKERS = {"train": ("Training", "TL"), "validation": ("Validation", "VL")}
# 01.원천데이터 (raw source data) sits beside 02.라벨링데이터; only the labelled half is read.
RAW_DATA_MARKER = "원천데이터"
MAX_SEARCH_DEPTH = 8
_MACOS_JUNK = "__MACOSX"

SkipFn = Callable[[str, str, str, str], None]  # (reason, role, display path, detail)


@dataclass(frozen=True)
class Source:
    """One label root: an extracted folder or a zip file, and the --input that led to it."""

    kind: str  # "folder" | "zip"
    path: Path
    found_from: Path

    @property
    def split(self) -> str | None:
        """'train' / 'validation' when the path names one half of the distribution, else None."""
        return _split_of(self.path.absolute().parts)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "path": str(self.path),
            "found_from": str(self.found_from),
            "split": self.split,
        }


def skip_reason_for_name(name: str) -> str | None:
    """Why a file name is not a candidate question/answer file, or None if it is."""
    if name.startswith("."):
        return "hidden_file"
    if not name.lower().endswith(".json"):
        return "not_json_file"
    return None


def file_stem(name: str) -> str:
    """File name without .json: the id fallback when a file has no fileName."""
    return name[:-5] if name.lower().endswith(".json") else name


def _qa_children(folder: Path) -> list[tuple[str, Path]]:
    """(role, path) of the 1.질문/2.답변 folders directly inside `folder` (names compared as NFC)."""
    found = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                role = ROLE_OF_DIR.get(nfc(entry.name))
                if role and entry.is_dir():
                    found.append((role, Path(entry.path)))
    except OSError:
        return []
    return sorted(found, key=lambda rp: (rp[0], nfc(rp[1].name), rp[1].name))


def is_label_root(folder: Path) -> bool:
    return bool(_qa_children(folder))


def _split_of(parts: Iterable[str]) -> str | None:
    """'train' / 'validation' if the path names one of the halves (Training, TL, TL.zip, ...); the
    name nearest the end wins (`/data/TL/VL.zip` is validation)."""
    for part in reversed(list(parts)):
        stem = nfc(part)
        stem = stem[:-4] if stem.lower().endswith(".zip") else stem
        for split, markers in SPLIT_MARKERS.items():
            if stem in markers:
                return split
    return None


def _search(root: Path, ignored: list[dict]) -> tuple[list[Path], list[Path]]:
    """Label-root folders and zip files under `root`, in sorted order; a label root is not searched
    further (its own subfolders are data)."""
    folders: list[Path] = []
    zips: list[Path] = []

    def visit(folder: Path, depth: int) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: (nfc(e.name), e.name))
        except OSError as e:
            ignored.append({"path": str(folder), "reason": f"cannot list folder ({e.strerror})"})
            return
        for entry in entries:
            name = nfc(entry.name)
            if name.startswith(".") or name == _MACOS_JUNK:
                continue
            path = Path(entry.path)
            if entry.is_dir():
                if RAW_DATA_MARKER in name:
                    ignored.append(
                        {
                            "path": str(path),
                            "reason": "raw source data (원천데이터); labels are read from 02.라벨링데이터",
                        }
                    )
                elif is_label_root(path):
                    folders.append(path)
                elif depth < MAX_SEARCH_DEPTH:
                    visit(path, depth + 1)
            elif name.lower().endswith(".zip") and entry.is_file():
                zips.append(path)

    visit(root, 1)
    return folders, zips


ZIP_LOCAL_HEADER = b"PK\x03\x04"  # how every zip begins (a partial download begins the same way)


def check_zip(path: Path) -> None:
    """Raise DataError, in one line, unless `path` is a zip that can be opened: a file cut short (a
    partial download: no end-of-archive record) is told apart from a file that is no zip at all."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if size == 0:
        raise DataError(f"zip is empty (0 bytes; a download that never started?): {path}")
    damaged = (
        f"truncated or damaged zip (a partial download? {size:,} bytes, no readable end-of-archive "
        f"record): {path}; download it again or check its size"
    )
    if not zipfile.is_zipfile(path):
        if head == ZIP_LOCAL_HEADER or path.suffix.lower() == ".zip":
            raise DataError(damaged)
        raise DataError(f"input is a file but not a zip archive: {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        raise DataError(damaged) from None


def discover_sources(
    inputs: Iterable[str | os.PathLike], split: str | None = None, allow_mixed_splits: bool = False
) -> tuple[list[Source], list[dict]]:
    """Resolve every --input to label roots: a label-root folder itself, a zip, or a folder searched
    for them (TL/VL, 02.라벨링데이터, the dataset root). Returns (sources, ignored) where ignored lists
    what the search saw and did not use, with the reason.

    Raises DataError for a missing input, an input with no label tree, a truncated or damaged zip,
    or sources of both the Training and the Validation half (whether found by one search or given
    as several inputs) unless `split` chooses one or `allow_mixed_splits` is set. `split` also drops
    given inputs of the other half (listed in ignored).
    """
    if split is not None and split not in SPLIT_MARKERS:
        raise DataError(f"unknown split '{split}' (choose one of: {', '.join(SPLIT_MARKERS)})")
    sources: list[Source] = []
    ignored: list[dict] = []
    seen: set[Path] = set()
    for raw in inputs:
        given = Path(raw)
        if not given.exists():
            raise DataError(f"input not found: {given}")
        if given.is_file():
            check_zip(given)
            found = [Source("zip", given, given)]
        elif is_label_root(given):
            found = [Source("folder", given, given)]
        else:
            folders, zips = _search(given, ignored)
            found = _choose(given, folders, zips, split, ignored, allow_mixed_splits)
            for source in found:
                if source.kind == "zip":
                    check_zip(source.path)
            if not found:
                hint = (
                    f" (give its parent {given.parent}, which holds both trees)"
                    if nfc(given.name) in ROLE_OF_DIR
                    else ""
                )
                raise DataError(
                    f"no AI Hub label data under {given}: expected a folder holding {QUESTION_DIR}/ and "
                    f"{ANSWER_DIR}/, a TL/VL folder above one, or TL.zip/VL.zip{hint}"
                )
        for source in found:
            resolved = source.path.resolve()
            if resolved in seen:
                ignored.append({"path": str(source.path), "reason": "already given by another --input"})
                continue
            seen.add(resolved)
            sources.append(source)
    if split is not None:
        for source in [s for s in sources if s.split not in (split, None)]:
            ignored.append({"path": str(source.path), "reason": f"not part of --split {split}"})
            sources.remove(source)
        if not sources:
            raise DataError(f"no input is part of --split {split}: {', '.join(map(str, inputs))}")
    halves = {s.split for s in sources} - {None}
    if len(halves) > 1 and not allow_mixed_splits:
        train = ", ".join(str(s.path) for s in sources if s.split == "train")
        val = ", ".join(str(s.path) for s in sources if s.split == "validation")
        raise DataError(
            f"the inputs mix Training data ({train}) and Validation data ({val}) in one output; give "
            "one half per run (or --split train / --split validation), or pass --allow-mixed-splits"
        )
    return sources, ignored


def _choose(
    root: Path,
    folders: list[Path],
    zips: list[Path],
    split: str | None,
    ignored: list[dict],
    allow_mixed_splits: bool = False,
) -> list[Source]:
    """Pick among what a search found: extracted folders win over a zip of the same name (TL/ vs
    TL.zip), and Training/Validation must not be mixed silently."""
    folder_names = {nfc(part) for f in folders for part in f.relative_to(root).parts}
    candidates = [Source("folder", f, root) for f in folders]
    for z in zips:
        if nfc(z.stem) in folder_names:
            ignored.append(
                {"path": str(z), "reason": f"extracted folder '{z.stem}' found as well; using the folder"}
            )
        else:
            candidates.append(Source("zip", z, root))
    splits = {c: _split_of(c.path.relative_to(root).parts) for c in candidates}
    if split is None:
        if {"train", "validation"} <= set(splits.values()) and not allow_mixed_splits:
            listing = ", ".join(str(c.path) for c in candidates)
            raise DataError(
                f"{root} holds both Training and Validation data ({listing}); pass --split train or "
                "--split validation, or give the TL/VL path itself (--allow-mixed-splits: use both)"
            )
        return candidates
    chosen = []
    for c in candidates:
        if splits[c] in (split, None):
            chosen.append(c)
        else:
            ignored.append({"path": str(c.path), "reason": f"not part of --split {split}"})
    return chosen


# ---------------------------------------------------------------------------------------------
# Index: folder key -> where its question and answer files are


@dataclass
class FolderGroup:
    """Everything stored under one relative folder (join key), across all sources."""

    dirs: list[tuple[str, int, str]] = field(default_factory=list)  # (role, source index, folder path)
    entries: list[tuple[str, int, str, zipfile.ZipInfo]] = field(
        default_factory=list
    )  # (role, src, nfc name, info)


class DatasetIndex:
    """Folder keys of every source, built from folder paths (folders) and entry names (zips).

    Use as a context manager: zip files stay open while folders are read.
    """

    def __init__(self, sources: list[Source], on_skip: SkipFn):
        self.sources = sources
        self.groups: dict[tuple[str, ...], FolderGroup] = {}
        self.zips: dict[int, zipfile.ZipFile] = {}
        self._on_skip = on_skip
        for index, source in enumerate(sources):
            if source.kind == "folder":
                self._add_folder_source(index, source.path)
            else:
                self._add_zip_source(index, source.path)

    def __enter__(self) -> DatasetIndex:
        return self

    def __exit__(self, *exc) -> None:
        for zf in self.zips.values():
            zf.close()

    def group(self, key: tuple[str, ...]) -> FolderGroup:
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = FolderGroup()
        return group

    def sorted_keys(self) -> list[tuple[str, ...]]:
        return sorted(self.groups)

    def _add_folder_source(self, index: int, root: Path) -> None:
        for role, top in _qa_children(root):
            for rel, folder in _walk_dirs(top, role, self._on_skip):
                self.group(rel).dirs.append((role, index, folder))

    def _add_zip_source(self, index: int, path: Path) -> None:
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise DataError(f"truncated or damaged zip {path}: cannot open it ({e})") from None
        self.zips[index] = zf
        for info in zf.infolist():
            if info.is_dir():
                continue
            name = zip_entry_name(info)
            parts = [nfc(p) for p in name.split("/") if p]
            display = f"{path}:{name}"
            role_at = next((i for i, p in enumerate(parts) if p in ROLE_OF_DIR), None)
            if any(p.startswith(".") or p == _MACOS_JUNK for p in parts[:-1]):
                self._on_skip("hidden_file", "", display, "inside a hidden or __MACOSX folder")
                continue
            if role_at is None or role_at == len(parts) - 1:
                self._on_skip("outside_qa_tree", "", display, f"not under {QUESTION_DIR}/ or {ANSWER_DIR}/")
                continue
            role = ROLE_OF_DIR[parts[role_at]]
            self.group(tuple(parts[role_at + 1 : -1])).entries.append((role, index, parts[-1], info))


def _walk_dirs(top: Path, role: str, on_skip: SkipFn) -> Iterator[tuple[tuple[str, ...], str]]:
    """(NFC relative parts, path) of `top` and every folder below it. Symlinked folders are followed
    once (a link cycle is not walked twice); hidden folders are skipped."""
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[tuple[str, ...], str]] = [((), str(top))]
    while stack:
        rel, folder = stack.pop()
        try:
            st = os.stat(folder)
            with os.scandir(folder) as it:
                subdirs = [(nfc(e.name), e.path) for e in it if e.is_dir()]
        except OSError as e:
            on_skip("read_error", role, folder, f"cannot list folder ({e.strerror})")
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        yield rel, folder
        for name, path in sorted(subdirs, reverse=True):
            if name.startswith(".") or name == _MACOS_JUNK:
                on_skip("hidden_file", role, path, "hidden folder")
            else:
                stack.append((rel + (name,), path))


def zip_entry_name(info: zipfile.ZipInfo) -> str:
    """The entry name as text. Without the UTF-8 flag zipfile decodes names as cp437; Korean tools
    often wrote UTF-8 or cp949 bytes without setting the flag, so undo that."""
    name = info.filename
    if not info.flag_bits & 0x800 and not name.isascii():
        try:
            raw = name.encode("cp437")
        except UnicodeEncodeError:
            raw = None
        if raw is not None:
            for encoding in ("utf-8", "cp949"):
                try:
                    name = raw.decode(encoding)
                    break
                except UnicodeDecodeError:
                    pass
    return name.replace("\\", "/")


def list_folder_files(folder: str) -> Iterator[tuple[str, str, str | None]]:
    """(NFC file name, path, skip reason or None) for the files directly in `folder`.

    Only regular files are candidates; a FIFO or a broken symlink is reported, never opened."""
    with os.scandir(folder) as it:
        entries = [(nfc(e.name), e) for e in it]
    for name, entry in entries:
        try:
            if entry.is_dir():
                continue  # a subfolder is its own join key
            reason = skip_reason_for_name(name) or (None if entry.is_file() else "not_regular_file")
        except OSError:
            reason = "not_regular_file"
        yield name, entry.path, reason


def read_file_bytes(path: str) -> bytes:
    """Whole file as bytes. os.open/os.read: the files are small (~1 KB) and millions, and this
    skips the buffered-IO object that open() builds for each one."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunk = os.read(fd, 1 << 16)
        if len(chunk) < 1 << 16:  # a short read of a regular file is its end: one syscall for a small file
            return chunk
        chunks = [chunk]
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_zip_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """Bytes of one entry; any archive-level failure becomes OSError (reported as read_error)."""
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, EOFError) as e:
        raise OSError(f"{type(e).__name__}: {e}") from None
