"""AI Hub healthcare QA label trees -> instruction jsonl (+ a JSON report beside it).

Flow: discover sources -> index folder keys -> for each folder, in sorted key order: read its
question and answer files, validate them, pair them, render the records -> drop exact duplicate
(instruction, output) pairs -> stream lines into a temporary file that is renamed onto the output
at the end. Folders can be handled by a process pool; results are consumed in key order, so the
output is byte-identical for any number of workers and for folder or zip input.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger
from tqdm import tqdm

from ..guards import check_output_paths
from ..io_utils import atomic_path, fault_point, remove_stale_partials, sha256_file, write_json
from ..run_folder import preprocess_report_path
from .pair import check_pairing, folder_rng, pair_indices
from .read import (
    ANSWER,
    QUESTION,
    DatasetIndex,
    discover_sources,
    file_stem,
    list_folder_files,
    read_file_bytes,
    read_zip_entry,
    skip_reason_for_name,
)
from .schema import SKIP_REASONS, DataError, InvalidItem, make_record, parse_answer, parse_question

EXAMPLES_PER_REASON = 5  # offending paths kept per skip reason in the report
WARNINGS_PER_REASON = 10  # skipped files logged at WARNING per reason; the rest at DEBUG
AUTO_WORKERS_MIN_FOLDERS = 256  # below this a process pool costs more than it saves
FOLDERS_PER_TASK = 16  # folders per pool task
UNPAIRED_SHOWN = 10  # unpaired folders named in the printed summary (the report names all)


@dataclass(frozen=True)
class PairingOptions:
    pairing: str = "round_robin"
    seed: int = 0
    drop_intro: bool = False
    max_pairs_per_folder: int | None = None


@dataclass
class FolderTask:
    """One folder key: folders to list (read by the worker) and zip entries (read by the parent,
    which holds the open archives)."""

    key: tuple[str, ...]
    dirs: list[tuple[str, int, str]]  # (role, source index, folder path)
    blobs: list[tuple[str, int, str, str, bytes | None, str | None, str]] = field(default_factory=list)
    # (role, source index, nfc name, display path, bytes or None, skip reason or None, detail)


@dataclass
class FolderResult:
    key: tuple[str, ...]
    lines: list[str]
    fingerprints: list[int]
    files_seen: int = 0
    files_read: int = 0
    questions_valid: int = 0
    answers_valid: int = 0
    answers_used: int = 0
    skips: list[tuple[str, str, str, str]] = field(default_factory=list)  # (reason, role, path, detail)


def pair_fingerprint(instruction: str, output: str) -> int:
    """64-bit fingerprint of an (instruction, output) pair, for exact-duplicate removal."""
    digest = hashlib.blake2b(f"{instruction}\x00{output}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def process_folder(task: FolderTask, options: PairingOptions) -> FolderResult:
    """Read, validate and pair one folder; return its rendered jsonl lines. Runs in a worker."""
    result = FolderResult(task.key, [], [])
    raw: list[tuple[str, str, int, str, bytes]] = []  # (role, nfc name, source, display, bytes)

    def skip(reason: str, role: str, path: str, detail: str) -> None:
        result.skips.append((reason, role, path, detail))

    for role, source, folder in task.dirs:
        try:
            listing = list(list_folder_files(folder))
        except OSError as e:
            skip("read_error", role, folder, f"cannot list folder ({e.strerror})")
            continue
        for name, path, reason in listing:
            result.files_seen += 1
            if reason:
                skip(reason, role, path, SKIP_REASONS[reason])
                continue
            try:
                data = read_file_bytes(path)
            except OSError as e:
                skip("read_error", role, path, e.strerror or str(e))
                continue
            result.files_read += 1
            raw.append((role, name, source, path, data))
    for role, source, name, display, data, reason, detail in task.blobs:
        result.files_seen += 1
        if data is None:
            skip(reason or "read_error", role, display, detail)
            continue
        result.files_read += 1
        raw.append((role, name, source, display, data))

    raw.sort(key=lambda item: (item[1], item[2], item[3]))  # NFC name, then source: same for folder and zip
    questions, answers = [], []
    first_copy: dict[tuple[str, str], tuple[str, bytes]] = {}
    for role, name, _source, display, data in raw:
        # The same folder and file name twice (TL.zip and its extracted TL/, overlapping inputs):
        # ids are unique in the dataset, so it is one file reached twice; the first input's copy is used.
        seen = first_copy.get((role, name))
        if seen is not None:
            same = "same content" if seen[1] == data else "DIFFERENT content; the first copy is used"
            skip("duplicate_file", role, display, f"also reached as {seen[0]} ({same})")
            continue
        first_copy[(role, name)] = (display, data)
        try:
            obj = _loads(data)
            if role == QUESTION:
                questions.append(parse_question(obj, fallback_id=file_stem(name), folder=task.key))
            else:
                answers.append(parse_answer(obj, fallback_id=file_stem(name), drop_intro=options.drop_intro))
        except InvalidItem as e:
            skip(e.reason, role, display, e.detail)

    result.questions_valid, result.answers_valid = len(questions), len(answers)
    pairs = pair_indices(
        len(questions),
        len(answers),
        mode=options.pairing,
        rng=folder_rng(options.seed, task.key),
        max_pairs=options.max_pairs_per_folder,
    )
    result.answers_used = len({a for _, a in pairs})
    for q, a in pairs:
        record = make_record(questions[q], answers[a])
        result.lines.append(json.dumps(record, ensure_ascii=False))
        result.fingerprints.append(pair_fingerprint(record["instruction"], record["output"]))
    return result


def _loads(data: bytes):
    """JSON from bytes; a UTF-8 BOM is tolerated (json detects it), anything else is InvalidItem."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidItem("not_utf8", f"invalid UTF-8 at byte {e.start}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidItem("malformed_json", f"{e.msg} at line {e.lineno} column {e.colno}") from None


class _Report:
    """Counters and skip examples gathered while the run goes; `as_dict()` is the JSON report."""

    def __init__(self) -> None:
        self.skips: dict[str, dict] = {}
        self.folders = {"total": 0, "paired": 0, "questions_only": 0, "answers_only": 0, "no_valid_files": 0}
        self.files = {"seen": 0, "read": 0}
        self.questions = {"valid": 0, "in_folders_without_answers": 0}
        self.answers = {"valid": 0, "used": 0, "unused": 0}
        self.records = {"paired": 0, "duplicates_removed": 0, "written": 0}
        self.unpaired: dict[str, list[str]] = {"questions_only": [], "answers_only": [], "no_valid_files": []}

    def skip(self, reason: str, role: str, path: str, detail: str) -> None:
        entry = self.skips.setdefault(reason, {"count": 0, "questions": 0, "answers": 0, "examples": []})
        entry["count"] += 1
        if role == QUESTION:
            entry["questions"] += 1
        elif role == ANSWER:
            entry["answers"] += 1
        if len(entry["examples"]) < EXAMPLES_PER_REASON:
            entry["examples"].append(f"{path}: {detail}")
        level = "WARNING" if entry["count"] <= WARNINGS_PER_REASON else "DEBUG"
        logger.log(level, "skipped {}: {} ({})", path, detail, reason)

    def add_folder(self, r: FolderResult) -> None:
        for skip in r.skips:
            self.skip(*skip)
        if r.files_seen == 0:  # an intermediate folder (category/disease level) holds no files
            return
        self.folders["total"] += 1
        if r.questions_valid and r.answers_valid:
            self.folders["paired"] += 1
        else:
            if r.questions_valid:
                kind = "questions_only"
                self.questions["in_folders_without_answers"] += r.questions_valid
            else:
                kind = "answers_only" if r.answers_valid else "no_valid_files"
            self.folders[kind] += 1
            self.unpaired[kind].append("/".join(r.key))
        self.files["seen"] += r.files_seen
        self.files["read"] += r.files_read
        self.questions["valid"] += r.questions_valid
        self.answers["valid"] += r.answers_valid
        self.answers["used"] += r.answers_used
        self.answers["unused"] += r.answers_valid - r.answers_used
        self.records["paired"] += len(r.lines)

    def as_dict(self) -> dict:
        return {
            "folders": self.folders,
            "files": self.files,
            "questions": self.questions,
            "answers": self.answers,
            "records": self.records,
            "skipped": {k: self.skips[k] for k in sorted(self.skips)},
            "unpaired_folders": self.unpaired,
        }


def _tasks(index: DatasetIndex, keys: Sequence[tuple[str, ...]]) -> Iterator[FolderTask]:
    """FolderTasks in key order; zip entries are read here, one folder at a time."""
    for key in keys:
        group = index.groups[key]
        task = FolderTask(key, list(group.dirs))
        for role, source, name, info in group.entries:
            display = f"{index.sources[source].path}:{info.filename}"
            reason = skip_reason_for_name(name)
            if reason:  # judged by name, as for files in folders; never read
                task.blobs.append((role, source, name, display, None, reason, SKIP_REASONS[reason]))
                continue
            try:
                task.blobs.append(
                    (role, source, name, display, read_zip_entry(index.zips[source], info), None, "")
                )
            except OSError as e:
                task.blobs.append((role, source, name, display, None, "read_error", str(e)))
        yield task


def _start_method() -> str:
    """fork starts workers at once; it is safe here because workers only read files and return
    lists (no logging, no torch) and the pool is started before any thread (tqdm's monitor) exists.
    A caller that already runs threads gets spawn."""
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        return "fork"
    return "spawn"


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _worker_init(parent_pid: int) -> None:
    """Runs first in every worker. Stop signals are the parent's to act on (Ctrl-C and a scheduler's
    SIGTERM reach the whole process group): a worker killed while sending a result would leave half
    a message in the pool's result pipe, on which the pool's own thread then waits forever. On Linux
    the kernel kills the worker when its parent dies, however it dies (SIGKILL included)."""
    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


@contextlib.contextmanager
def _worker_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """A process pool with its workers already started, or None for one worker. Every worker has
    exited when this returns, also on an exception (KeyboardInterrupt and the CLI's SIGTERM/SIGHUP
    interrupts included): queued batches are cancelled and the running ones (a second's work at
    most) finish first."""
    if workers <= 1:
        yield None
        return
    ctx = multiprocessing.get_context(_start_method())
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),)
    )
    try:
        pool.submit(int).result()  # launches every worker now, before the progress bar starts a thread
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def process_folders(tasks: list[FolderTask], options: PairingOptions) -> list[FolderResult]:
    """process_folder over a batch; one pool task per batch keeps the per-task cost (pickling,
    futures) small next to the work when folders are small."""
    return [process_folder(task, options) for task in tasks]


def _results(
    tasks: Iterator[FolderTask], options: PairingOptions, pool: ProcessPoolExecutor | None, workers: int
) -> Iterator[FolderResult]:
    """process_folder over tasks, in task order. With a pool, batches of FOLDERS_PER_TASK folders are
    handed out and at most 3 batches per worker are in flight, so memory stays at a few dozen
    folders' worth whatever the dataset size."""
    if pool is None:
        for task in tasks:
            yield process_folder(task, options)
        return
    window: deque[Future] = deque()
    batch: list[FolderTask] = []

    def next_results() -> list[FolderResult]:
        try:
            return window.popleft().result()
        except BrokenProcessPool:
            raise DataError(
                "a worker process stopped unexpectedly (killed by a signal or out of memory?); "
                "try fewer --workers"
            ) from None

    for task in tasks:
        batch.append(task)
        if len(batch) == FOLDERS_PER_TASK:
            window.append(pool.submit(process_folders, batch, options))
            batch = []
            if len(window) >= 3 * workers:
                yield from next_results()
    if batch:
        window.append(pool.submit(process_folders, batch, options))
    while window:
        yield from next_results()


def resolve_workers(workers: int | None, n_folders: int) -> int:
    """None = automatic: one process for small inputs, otherwise one per CPU core (at most 8)."""
    if workers is not None:
        if workers < 1:
            raise DataError(f"workers must be at least 1, got {workers}")
        return workers
    if n_folders < AUTO_WORKERS_MIN_FOLDERS:
        return 1
    return max(
        1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    )


def input_labels(inputs: Sequence[str | os.PathLike]) -> dict[str, str | os.PathLike]:
    """--input paths keyed by how an error should name them (`--input`, or `--input #2` when several)."""
    if len(inputs) == 1:
        return {"--input": inputs[0]}
    return {f"--input #{i}": p for i, p in enumerate(inputs, 1)}


def default_report_path(output: str | os.PathLike) -> Path:
    """`<output>.report.json`: the name lives in hai_medqa.run_folder (training reads it too)."""
    return preprocess_report_path(output)


def run_preprocess(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    pairing: str = "round_robin",
    seed: int = 0,
    drop_intro: bool = False,
    max_pairs_per_folder: int | None = None,
    split: str | None = None,
    allow_mixed_splits: bool = False,
    workers: int | None = None,
    report_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Turn AI Hub label trees into an instruction jsonl at `output`; return the report dict.

    inputs: label-root folders, TL/VL or 02.라벨링데이터 folders or the dataset root (searched), or
    TL.zip/VL.zip files. The report is also written to `report_path` (default `<output>.report.json`).
    Raises DataError (one line, user-facing) for unusable inputs or when no record is produced, and
    hai_medqa.guards.PathError for an output or report that would overwrite an input or cannot be
    written (checked before anything is read); the
    output file is only replaced after a complete, successful run. Unfinished files of an earlier,
    killed run at the output or report path are removed first (and listed in the report).
    """
    started = time.monotonic()
    if isinstance(inputs, (str, os.PathLike)):  # one path given bare, not as a list
        inputs = [inputs]
    if not inputs:
        raise DataError("no input given")
    check_pairing(pairing, max_pairs_per_folder)
    options = PairingOptions(pairing, seed, drop_intro, max_pairs_per_folder)
    output = Path(output)
    report_path = Path(report_path) if report_path is not None else default_report_path(output)
    check_output_paths(input_labels(inputs), {"--output": output, "--report": report_path})
    removed_partials = remove_stale_partials(output) + remove_stale_partials(report_path)
    sources, ignored = discover_sources(inputs, split=split, allow_mixed_splits=allow_mixed_splits)
    for source in sources:
        logger.info("reading {} {}", source.kind, source.path)
    for item in ignored:
        logger.info("not used: {} ({})", item["path"], item["reason"])

    report = _Report()
    seen_pairs: set[int] = set()  # 8 bytes of fingerprint per distinct record: the only per-record state
    logger.info("indexing folders of {} source{}", len(sources), "s" if len(sources) > 1 else "")
    with DatasetIndex(sources, report.skip) as index:
        keys = index.sorted_keys()
        n_workers = resolve_workers(workers, len(keys))
        logger.info("{} folders indexed ({} worker{})", len(keys), n_workers, "s" if n_workers > 1 else "")
        fault_point("preprocess:indexed")
        with (
            _worker_pool(n_workers) as pool,  # started first: workers never hold the partial output open
            atomic_path(output) as tmp,
            open(tmp, "w", encoding="utf-8", newline="\n") as out,
        ):
            bar = tqdm(
                total=len(keys), unit="folder", desc="preprocess", disable=not progress, dynamic_ncols=True
            )
            middle = len(keys) // 2
            for done, result in enumerate(_results(_tasks(index, keys), options, pool, n_workers)):
                if done == middle:
                    fault_point("preprocess:middle")
                report.add_folder(result)
                for line, fp in zip(result.lines, result.fingerprints, strict=True):
                    if fp in seen_pairs:
                        report.records["duplicates_removed"] += 1
                        continue
                    seen_pairs.add(fp)
                    out.write(line)
                    out.write("\n")
                    report.records["written"] += 1
                bar.update(1)
                bar.set_postfix(records=report.records["written"], refresh=False)
            bar.close()
            summary = {
                "inputs": [str(p) for p in inputs],
                "sources": [s.describe() for s in sources],
                "not_used": ignored,
                "options": {
                    "pairing": pairing,
                    "seed": seed,
                    "drop_intro": drop_intro,
                    "max_pairs_per_folder": max_pairs_per_folder,
                    "split": split,
                    "allow_mixed_splits": allow_mixed_splits,
                    "workers": n_workers,
                },
                "removed_partial_files": removed_partials,
                **report.as_dict(),
                "output": str(output),
                "report": str(report_path),
            }
            if report.records["written"] == 0:
                summary["seconds"] = round(time.monotonic() - started, 3)
                write_json(report_path, summary)
                raise DataError(
                    f"no records produced from {', '.join(map(str, inputs))} "
                    f"({report.files['read']} files read, {report.folders['paired']} folders with both "
                    f"questions and answers); see {report_path}"
                )
    dup = report.skips.get("duplicate_file")
    if dup:
        logger.warning(
            "{:,} files ({:,} questions, {:,} answers) were reached through more than one input "
            "(a zip and its extracted folder, or overlapping folders); each was used once (skipped."
            "duplicate_file in {})",
            dup["count"],
            dup["questions"],
            dup["answers"],
            report_path,
        )
    fault_point("preprocess:before_report")
    summary["output_sha256"] = sha256_file(output)
    summary["seconds"] = round(time.monotonic() - started, 3)
    write_json(report_path, summary)
    return summary


def format_summary(report: dict) -> str:
    """A plain-text table of a report, for the end of a run."""
    rows: list[tuple[str, str]] = []

    def section(title: str) -> None:
        rows.append((f"[{title}]", ""))

    def row(label: str, value) -> None:
        rows.append(
            (
                f"  {label}",
                f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value),
            )
        )

    section("sources")
    for source in report["sources"]:
        row(source["kind"], source["path"])
    for item in report.get("not_used", []):
        row("not used", f"{item['path']} ({item['reason']})")
    section("folders")
    for k, v in report["folders"].items():
        row(k, v)
    section("files")
    row("seen", report["files"]["seen"])
    row("read", report["files"]["read"])
    row("valid questions", report["questions"]["valid"])
    row("valid answers", report["answers"]["valid"])
    row("questions in folders without answers", report["questions"]["in_folders_without_answers"])
    row("answers never used", report["answers"]["unused"])
    section("records")
    for k, v in report["records"].items():
        row(k, v)
    unpaired = report.get("unpaired_folders", {})
    if any(unpaired.values()):
        section("folders without a partner (all listed in the report)")
        for kind, names in unpaired.items():
            for name in names[:UNPAIRED_SHOWN]:
                row(kind, name)
            if len(names) > UNPAIRED_SHOWN:
                row(kind, f"... and {len(names) - UNPAIRED_SHOWN:,} more")
    if report.get("removed_partial_files"):
        section("unfinished files of an earlier run")
        for line in report["removed_partial_files"]:
            row("", line)
    section("skipped")
    if not report["skipped"]:
        row("(nothing)", "")
    for reason, entry in report["skipped"].items():
        row(reason, f"{entry['count']:,}  ({SKIP_REASONS.get(reason, reason)})")
    opts = report["options"]
    section("options")
    row("pairing", opts["pairing"])
    row("seed", opts["seed"])
    row("drop_intro", opts["drop_intro"])
    row("max_pairs_per_folder", opts["max_pairs_per_folder"])
    section("output")
    row("jsonl", report["output"])
    row("report", report["report"])
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}".rstrip() for label, value in rows)
