"""Batched generation from a jsonl file of questions to a jsonl file of answers.

Input lines may be a preprocessed record (``{"instruction": ...}``; its ``output`` is ignored), a
bare ``{"prompt": ...}`` or ``{"question": ...}``, or a conversation ``{"messages": [...]}`` (a
trailing assistant turn is treated as a reference and dropped, so the model answers the last user
turn). Every input field is kept in the output line, plus ``line`` (its line number in the input),
``answer`` (what a user would be shown, with safety texts when the layer is on), ``model_answer``
(the model's text alone) and ``safety`` (the categories that fired). Bad lines are reported one per
line and skipped.

Answers are appended to ``<output>.partial`` as they are generated (`hai_medqa.inference.resume`);
the output, in input order, is written atomically from it at the end. An interrupted run continues
with ``--resume`` and ends with the same file as an uninterrupted one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from hai_medqa.chat_format import ChatFormatError, record_to_messages, render
from hai_medqa.inference.generation import GenerationSettings, InferenceError, LoadedModel
from hai_medqa.inference.resume import GenerationJournal, generate_journaled
from hai_medqa.inference.safety import SafetyLayer
from hai_medqa.io_utils import write_jsonl

QUESTION_KEYS = ("instruction", "prompt", "question")


def record_to_prompt_messages(record: dict, system_prompt: str | None) -> list[dict]:
    """Chat messages ending with the user turn to answer (system prompt added by chat_format's rule)."""
    if not isinstance(record, dict):
        raise ChatFormatError(f"line must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = list(record["messages"] or [])
        if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
    else:
        key = next((k for k in QUESTION_KEYS if k in record), None)
        if key is None:
            raise ChatFormatError(f"no question: expected one of {', '.join(QUESTION_KEYS)} or 'messages'")
        if not isinstance(record[key], str) or not record[key].strip():
            raise ChatFormatError(f"{key!r} must be a non-empty string")
        messages = [{"role": "user", "content": record[key]}]
    messages = record_to_messages({"messages": messages}, system_prompt)
    if messages[-1]["role"] != "user":
        raise ChatFormatError("the conversation must end with a user message to answer")
    return messages


def read_questions(path: str | Path, system_prompt: str | None) -> tuple[list[tuple[int, dict, list[dict]]], int]:
    """(line number, record, messages) for every usable line, and the number of skipped lines."""
    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"input file not found: {path}")
    items, skipped = [], 0
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                items.append((lineno, record, record_to_prompt_messages(record, system_prompt)))
            except json.JSONDecodeError as e:
                logger.warning(f"{path}:{lineno}: skipped: not valid JSON ({e.msg})")
                skipped += 1
            except ChatFormatError as e:
                logger.warning(f"{path}:{lineno}: skipped: {e}")
                skipped += 1
    if not items:
        raise InferenceError(f"{path}: no usable questions ({skipped} line(s) skipped)" if skipped
                             else f"{path}: empty input file")
    return items, skipped


def run_batch(
    lm: LoadedModel,
    input_path: str | Path,
    output_path: str | Path,
    settings: GenerationSettings,
    *,
    system_prompt: str | None,
    safety: SafetyLayer,
    journal: GenerationJournal,
    batch_size: int = 8,
    show_prompt: Callable[[str], None] | None = None,
) -> dict:
    """Answer every question of `input_path` into `output_path` through `journal` (answers already
    in it are not generated again); returns counts for the log. The journal is removed once the
    output is in place."""
    items, skipped = read_questions(input_path, system_prompt)
    prompts = [render(messages, add_generation_prompt=True) for _, _, messages in items]
    if show_prompt is not None:
        for prompt in prompts:
            show_prompt(prompt)
    keys = [f"line:{lineno}" for lineno, _, _ in items]
    answers = generate_journaled(lm, prompts, keys, settings, journal, batch_size=batch_size, progress=True)
    out_records = []
    for (lineno, record, messages), answer in zip(items, answers, strict=True):
        out_records.append({  # the safety layer reads the conversation's recent user turns together
            **record,
            "line": lineno,
            "answer": safety.wrap(messages, answer),
            "model_answer": answer,
            "safety": safety.categories_hit(messages),
        })
    n = write_jsonl(output_path, out_records)
    journal.remove()
    return {"answered": n, "skipped": skipped, "resumed": journal.resumed, "output": str(output_path)}
