"""Conversation records in the formats people bring -> chat messages: the one reader of jsonl records
for training (`S_F2.py`), batch answering (`chat.py --input`) and evaluation (`evaluate.py --data`).

Each line's format is told by its keys; a file may hold several, and every read reports how many
records of each format it found (``train_file: data/train.jsonl: 40 records: messages 40``):

- ``project``: ``{"instruction": Q, "output": A, ...}`` (what preprocess_medical.py writes) -> user Q,
  assistant A;
- ``alpaca``: ``{"instruction": I, "input": X, "output": A}`` -> user ``I + "\\n\\n" + X``, assistant A;
- ``messages`` (OpenAI): ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``;
- ``sharegpt``: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}`` -> system,
  user, assistant;
- ``prompt_completion`` (TRL, plain): ``{"prompt": P, "completion": C}`` -> user P, assistant C;
- ``prompt_completion_chat`` (TRL, conversational): ``{"prompt": [messages], "completion": [messages]}``
  -> the prompt's messages, then the completion's;
- ``question`` (chat.py --input only): ``{"question": Q}`` -> user Q.

Alpaca's one rule: the user turn is the instruction, then a blank line, then the input
(``instruction + "\\n\\n" + input``); an empty input leaves the instruction alone. Roles are
``system`` (first message only), ``user`` and ``assistant``; user and assistant texts must not be
empty or contain ``[|endofturn|]``. Keys other than the format's are kept in the record and ignored
(``category``, ``question_id``, ...). A record of none of these shapes, or one mixing two of them,
is skipped with one line naming the file, the line and what was expected.

What a record must hold depends on its use (`Purpose`): training and evaluation need a conversation
ending in an assistant answer (evaluation scores the last one); answering needs one ending in a user
turn (a trailing assistant turn is a reference and is dropped, so the model answers the turn before).
The system prompt is added later, by `chat_format.with_system_prompt`, unless the record has its own.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loguru import logger

from hai_medqa.chat_format import EOT, ChatFormatError, validate_messages

Purpose = Literal["train", "answer"]
"""``train``: the record must end in an assistant answer (training, evaluation); ``answer``: the
conversation to answer, ending in a user turn (chat.py --input)."""

ALPACA_JOIN = "\n\n"
"""Alpaca's rule: user turn = instruction + ALPACA_JOIN + input (the instruction alone if input is empty)."""

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}

# The keys that tell each format family apart, and how each family is described in messages.
_FAMILY_KEYS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "instruction": ("instruction", "input", "output"),
    "question": ("question",),
}
EXPECTED = ('{"instruction", "output"} (project), {"instruction", "input", "output"} (Alpaca), '
            '{"messages": [{"role", "content"}]} (OpenAI), {"conversations": [{"from", "value"}]} (ShareGPT) '
            'or {"prompt", "completion"} (TRL)')
_MAX_WARNINGS = 5


@dataclass(frozen=True)
class Conversation:
    """One usable record: its line in the file, its format, its messages and the record itself."""

    line: int
    format: str
    messages: list[dict]
    record: dict


@dataclass
class ReadReport:
    """What reading one file found: records (non-blank lines), usable ones per format, unusable ones."""

    path: str
    records: int = 0
    unusable: int = 0
    formats: Counter = field(default_factory=Counter)
    first_problem: str | None = None

    def describe(self) -> str:
        """``40 records: messages 38, sharegpt 2; 1 unusable``."""
        kinds = ", ".join(f"{name} {n}" for name, n in sorted(self.formats.items())) or "none usable"
        return f"{self.records} records: {kinds}" + (f"; {self.unusable} unusable" if self.unusable else "")


def _text(record: Mapping, key: str, fmt: str, *, required: bool = True) -> str | None:
    value = record.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        got = "missing" if key not in record else f"a {type(value).__name__}"
        raise ChatFormatError(f"{fmt} record: {key!r} must be a string, got {got}")
    if required and not value.strip():
        raise ChatFormatError(f"{fmt} record: {key!r} is empty")
    return value


def _chat_list(value: Any, key: str, fmt: str, *, role_key: str, text_key: str) -> list[dict]:
    """Messages from a list of {role_key, text_key} dicts (ShareGPT's from/value mapped to roles)."""
    if not isinstance(value, list) or not value:
        raise ChatFormatError(f"{fmt} record: {key!r} must be a non-empty list of {{{role_key!r}, {text_key!r}}} dicts")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or role_key not in m or text_key not in m:
            raise ChatFormatError(f"{fmt} record: {key}[{i}] must be a dict with {role_key!r} and {text_key!r}, "
                                  f"got {m!r:.80}")
        role = m[role_key]
        if fmt == "sharegpt":
            if role not in SHAREGPT_ROLES:
                raise ChatFormatError(f"sharegpt record: {key}[{i}] has from={role!r}; expected one of "
                                      f"{', '.join(SHAREGPT_ROLES)}")
            role = SHAREGPT_ROLES[role]
        out.append({"role": role, "content": m[text_key]})
    return out


def _family(record: Mapping) -> str:
    found = [fam for fam, keys in _FAMILY_KEYS.items() if any(k in record for k in keys)]
    if not found:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise ChatFormatError(f"unknown record format (keys: {keys}); expected {EXPECTED}")
    if len(found) > 1:
        a, b = found[:2]
        raise ChatFormatError(f"record mixes the keys of two formats ({'/'.join(k for k in _FAMILY_KEYS[a] if k in record)} "
                              f"and {'/'.join(k for k in _FAMILY_KEYS[b] if k in record)}); expected one of {EXPECTED}")
    return found[0]


def record_messages(record: Any, *, require_answer: bool = True) -> tuple[str, list[dict]]:
    """(format name, chat messages) of one record, checked (see the module docstring).

    `require_answer` = False lets the single-turn formats come without their answer (``output``,
    ``completion``), as questions to answer. Raises ChatFormatError saying what is wrong and what
    was expected.

    >>> record_messages({"instruction": "다음 증상을 설명하세요", "input": "두통", "output": "..."})
    ('alpaca', [{'role': 'user', 'content': '다음 증상을 설명하세요\\n\\n두통'}, {'role': 'assistant', 'content': '...'}])
    """
    if not isinstance(record, Mapping):
        raise ChatFormatError(f"record must be a JSON object, got {type(record).__name__}")
    family = _family(record)
    if family == "messages":
        fmt, messages = "messages", _chat_list(record["messages"], "messages", "messages", role_key="role",
                                               text_key="content")
    elif family == "sharegpt":
        fmt, messages = "sharegpt", _chat_list(record["conversations"], "conversations", "sharegpt",
                                               role_key="from", text_key="value")
    elif family == "prompt_completion":
        prompt = record.get("prompt")
        if isinstance(prompt, list):  # TRL conversational: two message lists
            fmt = "prompt_completion_chat"
            messages = _chat_list(prompt, "prompt", fmt, role_key="role", text_key="content")
            if "completion" in record or require_answer:
                messages += _chat_list(record.get("completion"), "completion", fmt, role_key="role", text_key="content")
        else:
            fmt = "prompt_completion"
            messages = [{"role": "user", "content": _text(record, "prompt", fmt)}]
            completion = _text(record, "completion", fmt, required=require_answer)
            if completion is not None:
                messages.append({"role": "assistant", "content": completion})
    elif family == "instruction":
        fmt = "alpaca" if "input" in record else "project"
        user = _text(record, "instruction", fmt)
        extra = _text(record, "input", fmt, required=False) if fmt == "alpaca" else None
        if extra and extra.strip():
            user = user + ALPACA_JOIN + extra
        messages = [{"role": "user", "content": user}]
        output = _text(record, "output", fmt, required=require_answer)
        if output is not None:
            messages.append({"role": "assistant", "content": output})
    else:
        if require_answer:
            raise ChatFormatError(f"a {{\"question\"}} record has no answer to train on or score; expected {EXPECTED}")
        fmt, messages = "question", [{"role": "user", "content": _text(record, "question", "question")}]
    _check_messages(messages, fmt)
    return fmt, messages


def _check_messages(messages: list[dict], fmt: str) -> None:
    if not messages:
        raise ChatFormatError(f"{fmt} record has an empty conversation")
    validate_messages(messages)
    for i, m in enumerate(messages):
        if m["role"] != "system" and not m["content"].strip():
            raise ChatFormatError(f"{fmt} record: message {i} ({m['role']}) is empty")
        if EOT in m["content"]:
            raise ChatFormatError(f"{fmt} record: message {i} ({m['role']}) contains {EOT}, the end-of-turn marker")


def conversation_for(record: Any, purpose: Purpose) -> tuple[str, list[dict]]:
    """(format, messages) of a record for a use: ``train`` needs a final assistant answer; ``answer``
    drops a final assistant turn (a reference) and needs a user turn to answer."""
    fmt, messages = record_messages(record, require_answer=purpose == "train")
    if purpose == "train":
        if messages[-1]["role"] != "assistant":
            raise ChatFormatError(f"{fmt} record: the last message is a {messages[-1]['role']} message; "
                                  "training and evaluation need a conversation ending in an assistant answer")
    else:
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise ChatFormatError(f"{fmt} record: the conversation must end with a user message to answer")
    return fmt, messages


def iter_conversations(path: str | Path, report: ReadReport, *, purpose: Purpose = "train",
                       what: str = "input", log: bool = True) -> Iterator[Conversation]:
    """Stream the usable records of a jsonl file as `Conversation`s, filling `report` as it goes.

    Unusable lines (bad JSON, unknown or mixed-up formats, incomplete records) are counted and
    reported one line each (``what: path:line: problem``; after five, only counted; nothing is
    logged with ``log=False``). Streaming keeps memory flat for millions of records. The caller
    checks that the file exists.
    """
    path = Path(path)
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            report.records += 1
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ChatFormatError(f"not valid JSON ({e.msg})") from None
                fmt, messages = conversation_for(record, purpose)
            except ChatFormatError as e:
                report.unusable += 1
                problem = f"{path}:{lineno}: {e}"
                report.first_problem = report.first_problem or problem
                if log and report.unusable <= _MAX_WARNINGS:
                    logger.warning(f"{what}: skipping record: {problem}")
                elif log and report.unusable == _MAX_WARNINGS + 1:
                    logger.warning(f"{what}: further unusable records in {path} are counted, not listed")
                continue
            report.formats[fmt] += 1
            yield Conversation(lineno, fmt, messages, record)
    if log:
        logger.info(f"{what}: {path}: {report.describe()}")


def read_conversations(path: str | Path, *, purpose: Purpose = "train",
                       what: str = "input") -> tuple[list[Conversation], ReadReport]:
    """All usable records of a jsonl file and the report (see `iter_conversations`)."""
    report = ReadReport(str(path))
    return list(iter_conversations(path, report, purpose=purpose, what=what)), report
