"""Batched generation from a jsonl file of questions to a jsonl file of answers.

Input lines are read by `hai_medqa.conversations` (purpose ``answer``): any format it knows - a
preprocessed record (``{"instruction": ...}``; its ``output`` is ignored), Alpaca, a bare
``{"prompt": ...}`` or ``{"question": ...}``, a conversation ``{"messages": [...]}``, ShareGPT or TRL
prompt/completion (a trailing assistant turn is treated as a reference and dropped, so the model
answers the last user turn). Every input field is kept in the output line, plus ``line`` (its line
number in the input), ``answer`` (what a user would be shown, with safety texts when the layer is
on), ``model_answer`` (the model's text alone) and ``safety`` (the categories that fired). Bad lines
are reported one per line and skipped.

Answers are appended to ``<output>.partial`` as they are generated (`hai_medqa.inference.resume`);
the output, in input order, is written atomically from it at the end. An interrupted run continues
with ``--resume`` and ends with the same file as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hai_medqa.chat_format import render, with_system_prompt
from hai_medqa.conversations import read_conversations
from hai_medqa.inference.generation import GenerationSettings, InferenceError, LoadedModel
from hai_medqa.inference.resume import GenerationJournal, generate_journaled
from hai_medqa.inference.safety import SafetyLayer
from hai_medqa.io_utils import write_jsonl


def read_questions(path: str | Path, system_prompt: str | None) -> tuple[list[tuple[int, dict, list[dict]]], int]:
    """(line number, record, messages) for every usable line, and the number of skipped lines.

    The messages end with the user turn to answer and start with the system prompt (chat_format's
    rule); unusable lines are reported one line each by the reader and skipped."""
    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"input file not found: {path}")
    conversations, report = read_conversations(path, purpose="answer", what="--input")
    items = [(c.line, c.record, with_system_prompt(c.messages, system_prompt)) for c in conversations]
    skipped = report.unusable
    if not items:
        raise InferenceError(f"{path}: no usable questions ({skipped} line(s) skipped; first: {report.first_problem})"
                             if skipped else f"{path}: empty input file")
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
