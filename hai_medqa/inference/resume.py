"""Resumable generation: every finished answer is appended to a journal beside the output (flushed
per answer), the final file is written atomically from it, and ``--resume`` skips what is done.

The journal ``<output>.partial`` is jsonl: a header with the settings that change answers, then
one line per answer::

    {"hai_medqa_journal": 1, "fingerprint": {"model": ..., "generation": {...}, "batch_size": 8, ...}}
    {"key": "line:3", "prompt_sha256": "9f2c...", "text": "두통이 ..."}

Generation runs batch by batch in a fixed plan (`generation.batch_plan`, a function of the prompts
alone); a resumed run skips the batches whose answers are all in the journal and generates any
other batch whole, so with greedy decoding (or seeded sampling) the resumed output is byte-identical
to an uninterrupted run's. A line cut short by a kill is dropped (with a warning) and regenerated.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loguru import logger

from hai_medqa.inference.generation import (
    GenerationSettings,
    InferenceError,
    LoadedModel,
    decode_answer,
    iter_generate_ids,
)
from hai_medqa.io_utils import fault_point, sha256_text

PARTIAL_SUFFIX = ".partial"
JOURNAL_VERSION = 1
_HEADER_KEY = "hai_medqa_journal"


def journal_path(output: str | Path) -> Path:
    """``answers.jsonl`` -> ``answers.jsonl.partial``: where a run keeps its answers until the end."""
    output = Path(output)
    return output.with_name(output.name + PARTIAL_SUFFIX)


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like dicts."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [prefix or "(value)"] if a != b else []
    out = []
    for key in sorted(set(a) | set(b)):
        out += _differences(a.get(key), b.get(key), f"{prefix}{key}.") if key in a and key in b else [f"{prefix}{key}"]
    return [k.rstrip(".") for k in out]


class GenerationJournal:
    """The answers of one run so far (``<output>.partial``), checked against this run's settings.

    Opening reads and checks everything (no model needed): an existing journal without `resume`, a
    missing one with `resume`, other settings, or a damaged line are each one InferenceError naming
    the file. Answers are appended with `add` (flushed at once, fsynced by `sync`).
    """

    def __init__(self, path: str | Path, fingerprint: dict[str, Any], *, resume: bool, require: bool = True):
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint, ensure_ascii=False))  # normalised like the file
        self._entries: dict[str, tuple[str, str]] = {}  # key -> (prompt sha256, text)
        self._file = None
        self.resumed = 0
        if self.path.exists():
            if not resume:
                raise InferenceError(
                    f"{self.path} holds the answers of an interrupted run: add --resume to continue it, "
                    "or delete it to start over")
            self._load()
            self.resumed = len(self._entries)
            logger.info(f"resuming from {self.path}: {self.resumed} answer(s) already done")
        elif resume and require:
            raise InferenceError(f"--resume: nothing to resume, {self.path} does not exist (a finished run leaves "
                                 "none; run without --resume to start)")
        # fault-injection tests stop start-up here: settings and journal checked, no model loaded yet
        fault_point(f"journal_opened:{self.path.name}")

    # ------------------------------------------------------------ reading
    def _load(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # tail: bytes after the last newline (a cut line)
        keep = len(data) - len(tail)
        if complete and complete[-1].strip():
            try:
                json.loads(complete[-1])
            except ValueError:  # the last full line is damaged: treat it as the cut one
                keep -= len(complete[-1]) + 1
                complete = complete[:-1]
        if keep < len(data):
            logger.warning(f"{self.path}: dropped an incomplete last entry ({len(data) - keep} bytes; the run was "
                           "killed while writing it); it is generated again")
            with open(self.path, "rb+") as f:
                f.truncate(keep)
        if not complete:  # killed while writing the header: nothing was done yet
            return
        for n, raw in enumerate(complete, 1):
            try:
                obj = json.loads(raw)
            except ValueError:
                raise InferenceError(f"{self.path}:{n}: damaged line; delete the file to start over") from None
            if n == 1:
                self._check_header(obj)
            elif isinstance(obj, dict) and isinstance(obj.get("key"), str) and isinstance(obj.get("text"), str):
                self._entries[obj["key"]] = (obj.get("prompt_sha256", ""), obj["text"])
            else:
                raise InferenceError(f"{self.path}:{n}: not a journal entry; delete the file to start over")

    def _check_header(self, obj: Any) -> None:
        if not isinstance(obj, dict) or obj.get(_HEADER_KEY) != JOURNAL_VERSION:
            raise InferenceError(f"{self.path} is not a journal of this version of hai_medqa; delete it to start over")
        diff = _differences(obj.get("fingerprint"), self.fingerprint)
        if diff:
            raise InferenceError(
                f"{self.path} was written with other settings ({', '.join(diff[:6])} differ); resume with the "
                "same settings, or delete it to start over")

    # ------------------------------------------------------------ lookup
    def __len__(self) -> int:
        return len(self._entries)

    def has(self, key: str, prompt: str) -> bool:
        """True when `key`'s answer is done for exactly this `prompt` (a changed prompt is an error)."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        if entry[0] != sha256_text(prompt):
            raise InferenceError(f"{self.path}: the prompt of {key} is not the one the interrupted run answered "
                                 "(input or system prompt changed); delete the file to start over")
        return True

    def text(self, key: str) -> str:
        return self._entries[key][1]

    # ------------------------------------------------------------ writing
    def add(self, key: str, prompt: str, text: str) -> None:
        """Append one answer and flush it (it survives the process being killed right after)."""
        if self._file is None:
            new = not self.path.exists() or self.path.stat().st_size == 0
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8", newline="\n")  # noqa: SIM115 (kept open across batches)
            if new:
                self._write({_HEADER_KEY: JOURNAL_VERSION, "fingerprint": self.fingerprint})
        self._write({"key": key, "prompt_sha256": sha256_text(prompt), "text": text})
        self._entries[key] = (sha256_text(prompt), text)

    def _write(self, obj: dict) -> None:
        self._file.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self._file.flush()

    def sync(self) -> None:
        """fsync what was appended (once per batch: survives a power loss, not only a kill)."""
        if self._file is not None:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        """Delete the journal once the final output is in place."""
        self.close()
        self.path.unlink(missing_ok=True)

    def kept_on_disk(self) -> int:
        """Finished answers in the file (complete lines after the header), counted from the file itself.

        An interrupt can land between an answer's flushed line and the in-memory bookkeeping, so the
        message reports what a resumed run will actually find, not `len(self)`.
        """
        self.close()  # flush anything buffered before counting
        try:
            return max(0, self.path.read_bytes().count(b"\n") - 1)
        except FileNotFoundError:
            return 0

    def interrupted_note(self) -> str:
        """What an interrupt leaves, for the one-line message."""
        if not self.path.exists():
            return "no answer was finished; nothing was written"
        return f"{self.kept_on_disk()} answer(s) kept in {self.path}; run the same command with --resume to continue"


def generate_journaled(
    lm: LoadedModel,
    prompts: Sequence[str],
    keys: Sequence[str],
    settings: GenerationSettings,
    journal: GenerationJournal,
    *,
    batch_size: int = 8,
    progress: bool = False,
    on_answer: Callable[[int, str], None] | None = None,
) -> list[str]:
    """Answers for `prompts` (in order), taken from `journal` where done and generated otherwise;
    every new answer is appended to the journal as soon as its batch is finished."""
    if len(keys) != len(prompts) or len(set(keys)) != len(keys):
        raise ValueError("one distinct key per prompt is required")
    for batch in iter_generate_ids(lm, prompts, settings, batch_size=batch_size, progress=progress,
                                   skip=lambda i: journal.has(keys[i], prompts[i])):
        for i, ids in batch:
            if not journal.has(keys[i], prompts[i]):  # a batch cut short last time: only the missing ones
                journal.add(keys[i], prompts[i], decode_answer(lm, ids))
                if on_answer is not None:
                    on_answer(i, journal.text(keys[i]))
        journal.sync()
        fault_point(f"journal_synced:{journal.path.name}")  # fault-injection tests stop mid-run here
    return [journal.text(k) for k in keys]
