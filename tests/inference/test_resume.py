"""The generation journal: answers are appended and flushed one by one, a line cut by a kill is
dropped, other settings or changed prompts are refused, and a resumed run regenerates whole batches
so its answers equal an uninterrupted run's."""

from __future__ import annotations

import json

import pytest

from hai_medqa import chat_format
from hai_medqa.inference.generation import GenerationSettings, InferenceError, generate, load_for_inference
from hai_medqa.inference.resume import GenerationJournal, generate_journaled, journal_path

FP = {"model": "/m", "generation": {"max_new_tokens": 4, "temperature": 0.0}, "batch_size": 2}


def test_journal_path():
    assert journal_path("out/answers.jsonl").as_posix() == "out/answers.jsonl.partial"


def test_entries_survive_and_a_cut_last_line_is_dropped(tmp_path):
    path = tmp_path / "a.jsonl.partial"
    j = GenerationJournal(path, FP, resume=False)
    j.add("line:1", "p1", "답 1")
    j.add("line:2", "p2", "답 2")
    # no close(): as after a SIGKILL, what was flushed is on disk
    assert len(path.read_text(encoding="utf-8").splitlines()) == 3
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"key": "line:3", "prompt_sha256": "ab", "te')  # killed while writing
    j.close()
    again = GenerationJournal(path, FP, resume=True)
    assert len(again) == 2 and again.has("line:1", "p1") and not again.has("line:3", "p3")
    assert again.text("line:2") == "답 2"
    assert path.read_bytes().endswith(b"\n")  # the cut bytes are gone, so the next append starts a clean line
    again.add("line:3", "p3", "답 3")
    again.close()
    assert len(GenerationJournal(path, FP, resume=True)) == 3


def test_refusals_name_the_file(tmp_path):
    path = tmp_path / "a.jsonl.partial"
    j = GenerationJournal(path, FP, resume=False)
    j.add("line:1", "p1", "x")
    j.close()
    with pytest.raises(InferenceError, match="add --resume to continue it, or delete it"):
        GenerationJournal(path, FP, resume=False)
    with pytest.raises(InferenceError, match=r"generation\.max_new_tokens, model differ"):
        GenerationJournal(path, {**FP, "model": "/other", "generation": {"max_new_tokens": 8, "temperature": 0.0}},
                          resume=True)
    with pytest.raises(InferenceError, match="the prompt of line:1 is not the one"):
        GenerationJournal(path, FP, resume=True).has("line:1", "a changed question")
    with pytest.raises(InferenceError, match="nothing to resume"):
        GenerationJournal(tmp_path / "none.partial", FP, resume=True)
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([lines[0], "{damaged", lines[1]]) + "\n", encoding="utf-8")
    with pytest.raises(InferenceError, match=r"a.jsonl.partial:2: damaged line"):
        GenerationJournal(path, FP, resume=True)


def test_killed_while_writing_the_header(tmp_path):
    path = tmp_path / "a.jsonl.partial"
    path.write_text('{"hai_medqa_jour', encoding="utf-8")
    j = GenerationJournal(path, FP, resume=True)
    assert len(j) == 0
    j.add("k", "p", "t")
    j.close()
    header = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert header["fingerprint"] == FP


def test_an_interrupt_between_the_flushed_line_and_the_bookkeeping_is_counted_from_the_file(tmp_path, monkeypatch):
    # Ctrl-C can land right after an answer's line reached the file: the message must count it,
    # because the resumed run will find it there (CI caught "2 kept" with 3 lines on disk)
    path = tmp_path / "a.jsonl.partial"
    j = GenerationJournal(path, FP, resume=False)
    j.add("line:1", "p1", "답 1")
    j.add("line:2", "p2", "답 2")
    write = j._write

    def write_then_interrupt(obj):
        write(obj)
        raise KeyboardInterrupt

    monkeypatch.setattr(j, "_write", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        j.add("line:3", "p3", "답 3")
    assert j.interrupted_note().startswith(f"3 answer(s) kept in {path};")
    assert len(GenerationJournal(path, FP, resume=True)) == 3  # what the note promised
    assert GenerationJournal(tmp_path / "none.partial", FP, resume=False).interrupted_note() == (
        "no answer was finished; nothing was written")


def test_resumed_generation_equals_an_uninterrupted_one(tmp_path, tiny_exaone_dir):
    lm = load_for_inference(str(tiny_exaone_dir), dtype="float32", device="cpu")
    questions = ["두통", "감기에 항생제를 먹어야 하나요?", "열이 나요. 어제부터요.", "배가 아파요", "기침이 계속 나요 밤에 특히"]
    prompts = [chat_format.render([{"role": "user", "content": q}], add_generation_prompt=True) for q in questions]
    keys = [f"line:{i}" for i in range(len(prompts))]
    settings = GenerationSettings(max_new_tokens=5)
    expected = generate(lm, prompts, settings, batch_size=2)

    path = tmp_path / "a.partial"
    first = GenerationJournal(path, FP, resume=False)
    first.add(keys[1], prompts[1], expected[1])  # one answer of a batch: as if killed mid-batch
    first.close()
    resumed = GenerationJournal(path, FP, resume=True)
    generated = []
    answers = generate_journaled(lm, prompts, keys, settings, resumed, batch_size=2,
                                 on_answer=lambda i, text: generated.append(i))
    assert answers == expected
    assert sorted(generated) == [0, 2, 3, 4]  # everything but the journaled answer was written now
    resumed.close()
    assert len(GenerationJournal(path, FP, resume=True)) == len(prompts)
