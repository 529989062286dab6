"""Sample answers at each evaluation: a fixed set of validation questions answered greedily.

Loss curves cannot show whether the model learned to ask a follow-up question or to stop; a few
answers next to their references can. At every evaluation the first `sample_questions` usable
records of val_file (the same ones each time) are answered greedily by the model being trained,
exactly as ``chat.py`` would answer them with the saved adapter: the same rendering (chat_format with
the trained system prompt), the same generation code (hai_medqa.inference.generation, temperature 0),
the same token cap (`sample_max_new_tokens` = chat.py's ``--max-new-tokens``). The rows (step,
question, answer, reference) go to RUN/samples.jsonl and the trackers (run_record.log_samples).

Cost: sample_questions x sample_max_new_tokens decoding steps per evaluation; off by default on a
CPU (`sample_count`), where it would dominate the demo's time.

A stop signal (SIGTERM, Ctrl-C) ends the generation at the next token (``stop`` in
hai_medqa.model.generate): at 7.8B the four answers take about a minute, longer than the 30 s a
scheduler waits before SIGKILL. An evaluation's answers cut short are not written at all (no rows
for that step, one log line), so the table only ever holds complete answers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hai_medqa.chat_format import render, with_system_prompt
from hai_medqa.conversations import ReadReport, iter_conversations

DEFAULT_ON_GPU = 4
"""sample_questions when the config leaves it null and the run is on a GPU (0 on a CPU)."""


@dataclass(frozen=True)
class SampleQuestion:
    """One fixed validation question: the messages to answer (system prompt first, ending with the
    user turn), the user turn's text and the record's own answer."""

    line: int
    messages: list[dict]
    question: str
    reference: str


def sample_count(requested: int | None, *, on_gpu: bool) -> int:
    """How many questions to sample: the config's value, or DEFAULT_ON_GPU on a GPU and 0 on a CPU."""
    if requested is not None:
        return requested
    return DEFAULT_ON_GPU if on_gpu else 0


def pick_questions(val_file: str | Path, n: int, system_prompt: str | None) -> list[SampleQuestion]:
    """The first `n` usable records of `val_file` (file order, so every evaluation and every resumed
    run sees the same ones), each as the conversation before its last answer plus that answer.

    `system_prompt` is the resolved prompt training used (chat_format.resolve_system_prompt)."""
    if n <= 0:
        return []
    out: list[SampleQuestion] = []
    report = ReadReport(str(val_file))
    for conv in iter_conversations(val_file, report, purpose="train", what="val_file", log=False):
        messages = with_system_prompt(conv.messages[:-1], system_prompt)
        out.append(SampleQuestion(line=conv.line, messages=messages, question=messages[-1]["content"],
                                  reference=conv.messages[-1]["content"]))
        if len(out) == n:
            break
    return out


def answer_questions(model: Any, tokenizer: Any, token_ids: Any, questions: list[SampleQuestion], *,
                     max_new_tokens: int, stop: Callable[[], bool] | None = None) -> list[str] | None:
    """Greedy answers of `model` (a PEFT model, put in eval mode for the call and restored) to
    `questions`, through chat.py's own generation path (one prompt per call: no padding).

    `stop` (this process's "a signal arrived"): generation ends at the next token once it is true,
    and the result is None (not every answer is complete)."""
    from hai_medqa.model.generate import GenerationSettings, LoadedModel, generate

    if not questions:
        return []
    was_training = model.training
    padding_side = tokenizer.padding_side
    model.eval()
    try:
        lm = LoadedModel(model, tokenizer, {}, token_ids)
        prompts = [render(q.messages, add_generation_prompt=True) for q in questions]
        answers = generate(lm, prompts, GenerationSettings(max_new_tokens=max_new_tokens), batch_size=1, stop=stop)
        return None if stop is not None and stop() else answers
    finally:
        tokenizer.padding_side = padding_side
        if was_training:
            model.train()


def sample_rows(step: int, questions: list[SampleQuestion], answers: list[str]) -> list[dict[str, Any]]:
    """The table's rows: step, question, answer, reference (and the validation line, to find it)."""
    return [{"step": step, "line": q.line, "question": q.question, "answer": a, "reference": q.reference}
            for q, a in zip(questions, answers, strict=True)]


def at_evaluation(trainer: Any, stop: Any = None) -> None:
    """The trainer's evaluation hook: answer the fixed questions with the model as it is now and log
    the rows (rank 0 only; skipped under FSDP, where every process would have to join each forward).

    `stop`: the trainer's StopSignals. Rank 0 generates alone, so it reads its own flag (`seen`, no
    collective) after every token; when a signal cuts the answers short nothing is written for this
    step and one line says so (the trainer then saves its checkpoint at once)."""
    from loguru import logger

    from hai_medqa.chat_format import resolve_system_prompt
    from hai_medqa.io_utils import fault_point
    from hai_medqa.run_folder import SAMPLES

    cfg, rt = trainer.cfg, trainer.runtime
    n = sample_count(cfg.sample_questions, on_gpu=rt.on_gpu)
    if n == 0 or not cfg.val_file or not rt.is_main:
        return
    if rt.fsdp_version is not None:
        if not getattr(trainer, "_samples_skipped_noted", False):
            logger.info("sample answers are not generated under FSDP (every process would have to join each step)")
            trainer._samples_skipped_noted = True
        return
    questions = getattr(trainer, "_sample_questions", None)
    if questions is None:  # read once: the same questions at every evaluation
        questions = trainer._sample_questions = pick_questions(cfg.val_file, n, resolve_system_prompt(cfg.system_prompt))
    step = trainer.state.global_step
    fault_point("train:sample_answers")  # fault-injection tests signal the run here (tests/train/test_signal_phases.py)
    answers = answer_questions(trainer.peft_model, trainer.tokenizer, trainer.chat_ids, questions,
                               max_new_tokens=cfg.sample_max_new_tokens, stop=stop.seen if stop is not None else None)
    if answers is None:
        logger.warning(f"sample answers at step {step} cut short by {stop.describe()}: none written for this step")
        return
    trainer.record.log_samples(step, sample_rows(step, questions, answers))
    logger.info(f"{len(answers)} sample answers at step {step} -> {trainer.out / SAMPLES}")
