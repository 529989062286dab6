"""The AI Hub healthcare QA schema and the output record: the one place that knows both.

Input (one JSON object per file, see docs/data_structure.md):
  question: {"fileName": "HC-Q-0639597", "disease_category", "disease_name": {"kor", "eng"},
             "intention", "question", ...}
  answer:   {"fileName": "HC-A-02306903", "disease_category", "disease_name", "intention",
             "department": [...], "answer": {"intro", "body", "conclusion"}, ...}
Output (one jsonl line per pair): the keys of `RECORD_FIELDS`, in that order.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hai_medqa.errors import HaiMedQAError

BUNDLED_AIHUB_SAMPLE = Path(__file__).resolve().parents[1] / "resources" / "aihub_sample"
"""The bundled synthetic sample in AI Hub's layout (tree + TL.zip/VL.zip; built by
hai_medqa.fixtures.aihub_sample). The data stage recognises it as a source (data/provenance.py)."""
BUNDLED_CONSULTATION_SAMPLE = Path(__file__).resolve().parents[1] / "resources" / "consultation_sample"
"""The bundled hand-written multi-turn consultations (train.jsonl, val.jsonl; what the demo trains on)."""

QUESTION_DIR = "1.질문"
ANSWER_DIR = "2.답변"
ANSWER_PARTS = ("intro", "body", "conclusion")
# Parts are paragraphs of one answer; a blank line keeps that structure visible to the model.
ANSWER_PART_SEPARATOR = "\n\n"

RECORD_FIELDS = (
    "instruction",  # question text
    "output",  # answer text: intro + body + conclusion
    "category",  # disease_category, e.g. 호흡기질환
    "disease",  # disease_name.kor, e.g. 공기가슴증(기흉)
    "intention",  # e.g. 증상, "식이, 생활"
    "department",  # list[str] from the answer; multi-line entries split into one name each
    "question_id",  # question fileName, e.g. HC-Q-0639597
    "answer_id",  # answer fileName, e.g. HC-A-02306903
)

# Why a file or an item was left out. Keys are stable: tests and reports use them.
SKIP_REASONS = {
    "hidden_file": "hidden or macOS metadata file (name starts with '.')",
    "not_json_file": "file name does not end in .json",
    "not_regular_file": "not a regular file (broken symlink, device, FIFO)",
    "read_error": "file could not be read",
    "not_utf8": "bytes are not valid UTF-8",
    "malformed_json": "not valid JSON (truncated or malformed)",
    "not_object": "JSON value is not an object",
    "missing_key": "required key is missing",
    "wrong_type": "value has the wrong type",
    "empty_text": "text is empty after whitespace normalisation",
    "outside_qa_tree": f"zip entry outside {QUESTION_DIR}/ and {ANSWER_DIR}/",
    "duplicate_file": "the same file (folder and name) reached through another input; used once",
}


class DataError(HaiMedQAError, ValueError):
    """A user-facing problem with the data stage's inputs or options; CLIs print it as one line."""


class InvalidItem(ValueError):
    """A question/answer file that cannot be used; `reason` is a key of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str):
        assert reason in SKIP_REASONS, reason
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Question:
    id: str
    text: str
    category: str
    disease: str
    intention: str


@dataclass(frozen=True, slots=True)
class Answer:
    id: str
    text: str
    department: tuple[str, ...]


_ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
_BLANK_RUN = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFC, no zero-width characters, runs of spaces/tabs -> one space, lines stripped,
    at most one blank line in a row, no leading/trailing blank lines."""
    text = unicodedata.normalize("NFC", text)  # returns the same object at once when already NFC
    if _ZERO_WIDTH.search(text):
        text = _ZERO_WIDTH.sub("", text)
    if "\n" not in text and "\r" not in text:  # the common case: one line
        return " ".join(text.split())
    lines = [" ".join(line.split()) for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return _BLANK_RUN.sub("\n\n", "\n".join(lines)).strip("\n")


def nfc(text: str) -> str:
    """Unicode NFC; macOS writes file names in NFD, zip entries and JSON use NFC."""
    return unicodedata.normalize("NFC", text)


@functools.lru_cache(maxsize=4096)
def _normalize_label(value: str) -> str:
    return normalize_text(value)  # labels repeat in every file of a folder: normalise each once


def _label(obj: dict, key: str) -> str:
    """A metadata string such as disease_category, or '' when absent or not a string."""
    value = obj.get(key)
    if isinstance(value, dict):  # disease_name is {"kor": ..., "eng": ...}
        value = value.get("kor")
    return _normalize_label(value) if isinstance(value, str) else ""


def _file_id(obj: dict, fallback_id: str) -> str:
    value = obj.get("fileName")
    return normalize_text(value) if isinstance(value, str) and value.strip() else fallback_id


def _required(obj: dict, key: str, kind: type, type_name: str) -> Any:
    if key not in obj:
        raise InvalidItem("missing_key", f"missing key '{key}'")
    value = obj[key]
    if not isinstance(value, kind):
        raise InvalidItem("wrong_type", f"'{key}' is {type(value).__name__}, expected {type_name}")
    return value


def parse_question(obj: Any, *, fallback_id: str, folder: tuple[str, ...] = ()) -> Question:
    """Validate one question object. Metadata missing from the file falls back to the folder path
    (category/disease/intention); raises InvalidItem when the question text is unusable."""
    if not isinstance(obj, dict):
        raise InvalidItem("not_object", f"top-level JSON is {type(obj).__name__}, expected object")
    text = normalize_text(_required(obj, "question", str, "string"))
    if not text:
        raise InvalidItem("empty_text", "'question' is empty")
    category, disease, intention = (_label(obj, k) for k in ("disease_category", "disease_name", "intention"))
    if len(folder) >= 3:  # the real layout: <category>/<disease>/<intention>
        category = category or folder[0]
        disease = disease or folder[1]
        intention = intention or folder[-1]
    return Question(_file_id(obj, fallback_id), text, category, disease, intention)


def _departments(value: Any) -> tuple[str, ...]:
    """department is a list of names; one entry may hold several names separated by newlines."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return ()
    names: list[str] = []
    for entry in value:
        if isinstance(entry, str):
            for name in entry.splitlines():
                name = _normalize_label(name)
                if name and name not in names:
                    names.append(name)
    return tuple(names)


def parse_answer(obj: Any, *, fallback_id: str, drop_intro: bool = False) -> Answer:
    """Validate one answer object and join its parts (empty parts skipped, intro optionally
    dropped); raises InvalidItem when no text is left."""
    if not isinstance(obj, dict):
        raise InvalidItem("not_object", f"top-level JSON is {type(obj).__name__}, expected object")
    parts_obj = _required(obj, "answer", dict, "object")
    if not any(k in parts_obj for k in ANSWER_PARTS):
        raise InvalidItem("missing_key", "'answer' has none of intro/body/conclusion")
    parts = []
    for key in ANSWER_PARTS:
        value = parts_obj.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise InvalidItem("wrong_type", f"'answer.{key}' is {type(value).__name__}, expected string")
        if key == "intro" and drop_intro:
            continue
        value = normalize_text(value)
        if value:
            parts.append(value)
    if not parts:
        raise InvalidItem("empty_text", "answer parts are empty" + (" (intro dropped)" if drop_intro else ""))
    return Answer(
        _file_id(obj, fallback_id), ANSWER_PART_SEPARATOR.join(parts), _departments(obj.get("department"))
    )


def make_record(question: Question, answer: Answer) -> dict:
    """The output record for one (question, answer) pair; keys in RECORD_FIELDS order."""
    return {
        "instruction": question.text,
        "output": answer.text,
        "category": question.category,
        "disease": question.disease,
        "intention": question.intention,
        "department": list(answer.department),
        "question_id": question.id,
        "answer_id": answer.id,
    }
