"""Sample answers at each evaluation: the table exists after a tiny run, and its last answers are the
greedy answers chat.py gives with the saved adapter (same questions, system prompt and token cap);
the adapter card's training section shows that last set."""

from __future__ import annotations

import json

import pytest
import torch

from hai_medqa.cli import run_cli
from hai_medqa.config import load_config
from hai_medqa.inference.chat_cli import main as chat_main
from hai_medqa.run_folder import SAMPLES
from hai_medqa.train.adapter_folder import (
    SAMPLE_CELL_CHARS,
    _cell,
    last_sample_answers,
    sample_answers_section,
)
from hai_medqa.train.config import TrainConfig
from hai_medqa.train.sample_answers import DEFAULT_ON_GPU, pick_questions, sample_count
from hai_medqa.train.trainer import run_training

N, MAX_NEW = 2, 12


def test_sample_count_defaults_off_on_cpu():
    assert sample_count(None, on_gpu=False) == 0
    assert sample_count(None, on_gpu=True) == DEFAULT_ON_GPU
    assert sample_count(3, on_gpu=False) == 3 and sample_count(0, on_gpu=True) == 0


def test_pick_questions_is_the_first_usable_records(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text("\n".join([
        json.dumps({"instruction": "q1", "output": "a1"}),
        "not json",
        json.dumps({"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
                                 {"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}]}),
        json.dumps({"instruction": "q4", "output": "a4"}),
    ]) + "\n", encoding="utf-8")
    qs = pick_questions(path, 2, "SYS")
    assert [(q.line, q.question, q.reference) for q in qs] == [(1, "q1", "a1"), (3, "q3", "a3")]
    assert qs[1].messages[0] == {"role": "system", "content": "SYS"}
    assert [m["content"] for m in qs[1].messages[1:]] == ["q2", "a2", "q3"]  # the conversation before the answer
    assert pick_questions(path, 0, None) == []


def test_samples_table_and_last_answers_equal_chat_py(repo_root, tiny_exaone_dir, sample_jsonl, tmp_path):
    out = tmp_path / "run"
    cfg, explicit = load_config(TrainConfig, repo_root / "configs" / "tiny_cpu.yaml", {
        "model": str(tiny_exaone_dir), "train_file": str(sample_jsonl["train"]),
        "val_file": str(sample_jsonl["validation"]), "max_eval_samples": "4", "output_dir": str(out),
        "cache_dir": str(tmp_path / "cache"), "max_steps": "4", "eval_steps": "2", "save_steps": "100",
        "tokens_per_micro_batch": "1024", "tensorboard": "true", "sample_questions": str(N),
        "sample_max_new_tokens": str(MAX_NEW)})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run_training(cfg, explicit)
    finally:
        torch.set_num_threads(threads)
    assert summary["status"] == "completed"

    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in rows] == [2, 2, 4, 4]
    assert all(set(r) >= {"step", "question", "answer", "reference"} for r in rows)
    last = [r for r in rows if r["step"] == 4]
    questions = pick_questions(sample_jsonl["validation"], N, None)
    assert [r["question"] for r in last] == [q.question for q in questions]
    assert [r["reference"] for r in last] == [q.reference for q in questions]

    # chat.py on the same validation records, with the adapter the run saved at its last step
    lines = sample_jsonl["validation"].read_text(encoding="utf-8").splitlines()
    inp = tmp_path / "questions.jsonl"
    inp.write_text("".join(lines[r["line"] - 1] + "\n" for r in last), encoding="utf-8")
    answers = tmp_path / "answers.jsonl"
    # chat.py's main in this process (the same code as the script, from the files the run saved)
    assert run_cli(chat_main, ["--model", str(tiny_exaone_dir), "--adapter", str(out / "adapter_last"),
                               "--load-4bit", "--dtype", "float32", "--input", str(inp), "--output", str(answers),
                               "--max-new-tokens", str(MAX_NEW), "--batch-size", "1"]) == 0
    chat = [json.loads(x) for x in answers.read_text(encoding="utf-8").splitlines()]
    assert [c["model_answer"] for c in chat] == [r["answer"] for r in last]
    assert all(r["answer"] for r in last), last  # real text to compare, not two empty answers

    # the adapter's card shows the last evaluation's questions and answers in its training section
    card = (out / "adapter_last" / "README.md").read_text(encoding="utf-8")
    training = card.split("## Training settings", 1)[1].split("## Use and license", 1)[0]
    assert "### Sample answers at step 4" in training
    for r in last:
        for field in ("question", "answer", "reference"):
            assert _cell(r[field]) in training, (field, r[field])
    samples = training.split("### Sample answers at step 4", 1)[1]
    assert "at step 2" not in card and samples.count("\n| ") == 1 + len(last)  # header + the last set's rows

    # shown in TensorBoard as a text table
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    texts = acc.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [2, 4]
    table = texts[-1].tensor_proto.string_val[0].decode()
    assert "| step | line | question | answer | reference |" in table


def test_card_sample_answers_are_the_last_step_one_row_each(tmp_path):
    rows = [{"step": 2, "line": 1, "question": "old q", "answer": "old a", "reference": "r"},
            {"step": 6, "line": 1, "question": "두통이 | 심해요\n어떡하죠?", "answer": "x" * 400, "reference": "ref"},
            {"step": 6, "line": 3, "question": "q2", "answer": "a2", "reference": None}]
    (tmp_path / SAMPLES).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                                    + '{"step": 8, "questi', encoding="utf-8")  # torn last line: skipped
    assert last_sample_answers(tmp_path) == (6, rows[1:])
    section = sample_answers_section(tmp_path)
    assert section.startswith("### Sample answers at step 6\n")
    table = [line for line in section.splitlines() if line.startswith("| ") and "question |" not in line]
    assert table == ["| 두통이 \\| 심해요 어떡하죠? | " + "x" * (SAMPLE_CELL_CHARS - 1) + "\u2026 | ref |",
                     "| q2 | a2 |  |"]
    assert "old q" not in section
    assert sample_answers_section(tmp_path / "none") == "" and last_sample_answers(None) == (None, [])


@pytest.mark.parametrize("bad", ["-1"])
def test_sample_questions_must_not_be_negative(bad):
    from hai_medqa.config import ConfigError

    with pytest.raises(ConfigError, match="sample_questions must be >= 0"):
        load_config(TrainConfig, None, {"sample_questions": bad})
