"""The formats people bring: one file per format reads to the same messages; malformed records get one line
naming the file, the line and what was expected; one reader serves training, chat.py --input and evaluate.py
--data."""

from __future__ import annotations

import json

import pytest

from hai_medqa.chat_format import EOT, ChatFormatError
from hai_medqa.conversations import ALPACA_JOIN, conversation_for, read_conversations, record_messages

Q, A = "다음 증상에 대해 답해 주세요", "복통은 어떤 부위에 발생하나요?"
DETAIL = "배가 아파요"
SYS = "너는 의료 상담 챗봇이다"
SINGLE = [{"role": "user", "content": Q + "\n\n" + DETAIL}, {"role": "assistant", "content": A}]
MULTI = [{"role": "system", "content": SYS}, {"role": "user", "content": DETAIL}, {"role": "assistant", "content": A},
         {"role": "user", "content": "오른쪽 아랫배요"}, {"role": "assistant", "content": "외과 진료를 받아 보세요."}]
SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


def _sharegpt(messages):
    return {"conversations": [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in messages]}


# Each format, written out by hand: the single-turn record and (for chat formats) the multi-turn one.
FILES = {
    "project": [{"instruction": Q + "\n\n" + DETAIL, "output": A, "category": "소화기"}],
    "alpaca": [{"instruction": Q, "input": DETAIL, "output": A}],
    "messages": [{"messages": SINGLE}, {"messages": MULTI}],
    "sharegpt": [_sharegpt(SINGLE), _sharegpt(MULTI)],
    "prompt_completion": [{"prompt": Q + "\n\n" + DETAIL, "completion": A}],
    "prompt_completion_chat": [{"prompt": SINGLE[:1], "completion": SINGLE[1:]},
                               {"prompt": MULTI[:4], "completion": MULTI[4:]}],
}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", sorted(FILES))
def test_each_format_reads_to_the_same_messages(tmp_path, fmt):
    rows = FILES[fmt]
    conversations, report = read_conversations(write_jsonl(tmp_path / f"{fmt}.jsonl", rows))
    assert [c.messages for c in conversations] == [SINGLE, MULTI][:len(rows)]
    assert [c.format for c in conversations] == [fmt] * len(rows)
    assert [c.line for c in conversations] == list(range(1, len(rows) + 1))
    assert conversations[0].record == rows[0]  # the record itself is kept (chat.py --input copies its fields)
    assert report.records == len(rows) and report.unusable == 0 and report.formats == {fmt: len(rows)}
    assert report.describe() == f"{len(rows)} records: {fmt} {len(rows)}"


def test_alpaca_rule_and_empty_input():
    assert ALPACA_JOIN == "\n\n"
    fmt, messages = record_messages({"instruction": Q, "input": "", "output": A})
    assert fmt == "alpaca" and messages[0]["content"] == Q  # an empty input leaves the instruction alone
    assert record_messages({"instruction": Q, "input": None, "output": A})[1][0]["content"] == Q


def test_a_file_may_mix_formats_and_is_reported_with_counts(tmp_path):
    rows = [FILES["project"][0], FILES["messages"][1], "{broken", FILES["sharegpt"][1], {"foo": 1},
            FILES["alpaca"][0], ""]
    conversations, report = read_conversations(write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert [c.line for c in conversations] == [1, 2, 4, 6]
    assert dict(report.formats) == {"project": 1, "messages": 1, "sharegpt": 1, "alpaca": 1}
    assert (report.records, report.unusable) == (6, 2)  # the blank line is no record
    assert report.first_problem == f"{tmp_path / 'mixed.jsonl'}:3: not valid JSON (Expecting property name " \
                                   "enclosed in double quotes)"
    assert report.describe() == "6 records: alpaca 1, messages 1, project 1, sharegpt 1; 2 unusable"


@pytest.mark.parametrize(("record", "message"), [
    ({"foo": 1, "answer": "a"}, r"unknown record format \(keys: answer, foo\); expected \{\"instruction\", "
                                r"\"output\"\} \(project\), .*\(Alpaca\), .*\(OpenAI\), .*\(ShareGPT\) or .*\(TRL\)"),
    ({"messages": SINGLE, "instruction": "q"}, r"record mixes the keys of two formats \(messages and instruction\)"),
    ({"prompt": "q", "completion": "a", "output": "b"}, r"mixes the keys of two formats \(prompt/completion and output\)"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, r"sharegpt record: conversations\[0\] has from='bot'; "
                                                         r"expected one of human, gpt, system"),
    ({"conversations": [{"from": "human", "text": "x"}]}, r"conversations\[0\] must be a dict with 'from' and 'value'"),
    ({"conversations": []}, r"sharegpt record: 'conversations' must be a non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, r"message 0 has role 'tool'; expected one of system, user"),
    ({"messages": [{"role": "user", "content": 3}]}, r"message 0 \(user\) content must be a string, got int"),
    ({"messages": [SINGLE[0], {"role": "system", "content": "s"}, SINGLE[1]]}, r"only the first message"),
    ({"messages": [SINGLE[0], {"role": "assistant", "content": "  "}]}, r"messages record: message 1 \(assistant\) is empty"),
    ({"messages": [SINGLE[0], {"role": "assistant", "content": "a" + EOT}]}, r"contains \[\|endofturn\|\]"),
    ({"messages": SINGLE[:1]}, r"messages record: the last message is a user message; training and evaluation need"),
    ({"prompt": "q"}, r"prompt_completion record: 'completion' must be a string, got missing"),
    ({"prompt": SINGLE[:1], "completion": "a"}, r"prompt_completion_chat record: 'completion' must be a non-empty list"),
    ({"instruction": "q", "input": 3, "output": "a"}, r"alpaca record: 'input' must be a string, got a int"),
    ({"instruction": "q"}, r"project record: 'output' must be a string, got missing"),
    ({"output": "a"}, r"project record: 'instruction' must be a string, got missing"),
    ({"instruction": " ", "output": "a"}, r"project record: 'instruction' is empty"),
    ({"question": "q"}, r"a \{\"question\"\} record has no answer to train on or score"),
    ([1, 2], r"record must be a JSON object, got list"),
])
def test_malformed_records_say_what_was_expected(tmp_path, record, message):
    with pytest.raises(ChatFormatError, match=message) as e:
        conversation_for(record, "train")
    assert "\n" not in str(e.value)
    # in a file: skipped, counted, and reported with the file and line
    path = write_jsonl(tmp_path / "bad.jsonl", [FILES["project"][0], record])
    conversations, report = read_conversations(path)
    assert len(conversations) == 1 and report.unusable == 1
    assert report.first_problem.startswith(f"{path}:2: ") and "\n" not in report.first_problem


def test_questions_to_answer():
    """chat.py --input: the answer may be absent, and a trailing assistant turn is a reference (dropped)."""
    assert conversation_for({"instruction": "q"}, "answer") == ("project", [{"role": "user", "content": "q"}])
    assert conversation_for({"prompt": "q", "id": 3}, "answer")[1] == [{"role": "user", "content": "q"}]
    assert conversation_for({"question": "q"}, "answer") == ("question", [{"role": "user", "content": "q"}])
    assert conversation_for({"prompt": MULTI[:4]}, "answer") == ("prompt_completion_chat", MULTI[:4])
    assert conversation_for(_sharegpt(MULTI), "answer") == ("sharegpt", MULTI[:4])
    assert conversation_for(FILES["project"][0], "answer")[1] == SINGLE[:1]  # the output is ignored
    with pytest.raises(ChatFormatError, match="must end with a user message to answer"):
        conversation_for({"messages": [{"role": "assistant", "content": "a"}]}, "answer")


def test_one_reader_for_training_chat_and_evaluation(tmp_path):
    from hai_medqa.evaluation.runner import EvalOptions, prepare_inputs
    from hai_medqa.inference.batch import read_questions
    from hai_medqa.train.sft_data import read_sft_records

    path = write_jsonl(tmp_path / "sharegpt.jsonl", [_sharegpt(MULTI), {"foo": 1}, _sharegpt(SINGLE)])
    records, stats = read_sft_records(path)
    assert [m for _, m in records] == [MULTI, SINGLE]
    assert stats == {"records": 3, "unusable_records": 1, "formats": {"sharegpt": 2}}

    questions, skipped = read_questions(path, "")
    assert skipped == 1 and [line for line, _, _ in questions] == [1, 3]
    assert [m for _, _, m in questions] == [MULTI[:4], SINGLE[:1]]
    assert questions[0][1] == _sharegpt(MULTI)  # the input record, for the output line

    inputs = prepare_inputs(EvalOptions(data=str(path), samples=None))
    assert inputs.conversations == [MULTI, SINGLE] and inputs.lines == [1, 3]
    assert inputs.data_info["records"] == 3 and inputs.data_info["unusable_records"] == 1
