"""The EXAONE chat rules, written out by hand here and compared byte for byte."""

from __future__ import annotations

import jinja2
import pytest

from hai_medqa.chat_format import (
    DEFAULT_SYSTEM_PROMPT,
    EOT,
    EXAONE_CHAT_TEMPLATE,
    ChatFormatError,
    check_tokenizer_template,
    record_to_messages,
    render,
    split_prompt_answer,
)

SYS = {"role": "system", "content": "SYS"}
U1 = {"role": "user", "content": "질문"}
A1 = {"role": "assistant", "content": "답변"}
U2 = {"role": "user", "content": "추가 질문\n둘째 줄"}

# (messages, add_generation_prompt, expected text) - expected strings spelled out literally.
CASES = [
    ([U1], False, "[|system|][|endofturn|]\n[|user|]질문\n"),
    ([U1], True, "[|system|][|endofturn|]\n[|user|]질문\n[|assistant|]"),
    ([SYS, U1], True, "[|system|]SYS[|endofturn|]\n[|user|]질문\n[|assistant|]"),
    ([SYS, U1, A1], False, "[|system|]SYS[|endofturn|]\n[|user|]질문\n[|assistant|]답변[|endofturn|]\n"),
    ([U1, A1, U2], True,
     "[|system|][|endofturn|]\n[|user|]질문\n[|assistant|]답변[|endofturn|]\n[|user|]추가 질문\n둘째 줄\n[|assistant|]"),
    ([SYS, U1, A1, U2, A1], False,
     "[|system|]SYS[|endofturn|]\n[|user|]질문\n[|assistant|]답변[|endofturn|]\n"
     "[|user|]추가 질문\n둘째 줄\n[|assistant|]답변[|endofturn|]\n"),
]


@pytest.mark.parametrize(("messages", "gen", "expected"), CASES)
def test_render_follows_exaone_rules(messages, gen, expected):
    assert render(messages, add_generation_prompt=gen) == expected


@pytest.mark.parametrize(("messages", "gen", "expected"), CASES)
def test_jinja_template_renders_like_render(messages, gen, expected):
    template = jinja2.Environment().from_string(EXAONE_CHAT_TEMPLATE)
    assert template.render(messages=messages, add_generation_prompt=gen) == expected


def test_default_system_prompt_is_the_projects_korean_prompt():
    assert DEFAULT_SYSTEM_PROMPT == ("당신은 친절하고 신뢰할 수 있는 한국어 의료 상담 챗봇입니다. "
                                     "질문이 모호할 경우 추가 질문을 하여 진단과 처방을 구체화하세요.")


def test_record_to_messages_single_turn_with_and_without_system():
    rec = {"instruction": "두통이 있어요", "output": "휴식하세요", "category": "응급질환"}
    assert record_to_messages(rec) == [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": "두통이 있어요"},
        {"role": "assistant", "content": "휴식하세요"},
    ]
    # One meaning of "none" everywhere (issue 12): None = not given = the default; "" = no system prompt.
    assert record_to_messages(rec, system_prompt=None) == record_to_messages(rec)
    no_sys = record_to_messages(rec, system_prompt="")
    assert [m["role"] for m in no_sys] == ["user", "assistant"]
    assert render(no_sys).startswith("[|system|][|endofturn|]\n[|user|]두통이 있어요\n")


def test_record_to_messages_multi_turn_keeps_own_system():
    rec = {"messages": [SYS, U1, A1]}
    assert record_to_messages(rec) == [SYS, U1, A1]
    rec = {"messages": [U1, A1]}
    assert record_to_messages(rec, system_prompt="S")[0] == {"role": "system", "content": "S"}


def test_split_prompt_answer_concatenates_back_to_render():
    messages = [SYS, U1, A1, U2, {"role": "assistant", "content": "마지막 답"}]
    prompt, answer = split_prompt_answer(messages)
    assert prompt.endswith("[|assistant|]")
    assert answer == "마지막 답" + EOT
    assert prompt + answer + "\n" == render(messages)
    assert prompt == render(messages[:-1], add_generation_prompt=True)


@pytest.mark.parametrize(("bad", "match"), [
    ({"output": "a"}, "'instruction'"),
    ({"instruction": "  ", "output": "a"}, "instruction"),
    ({"instruction": "q", "output": 3}, "output"),
    ({"messages": []}, "empty"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "role 'bot'"),
    ({"messages": [U1, SYS]}, "only the first"),
    ("not a dict", "JSON object"),
])
def test_bad_records_give_one_clear_error(bad, match):
    with pytest.raises(ChatFormatError, match=match) as e:
        record_to_messages(bad)
    assert "\n" not in str(e.value)


def test_split_needs_final_assistant():
    with pytest.raises(ChatFormatError, match="last message"):
        split_prompt_answer([SYS, U1])


def test_check_tokenizer_template_flags_each_problem(tiny_exaone_dir):
    from hai_medqa.model.load import load_tokenizer

    tok = load_tokenizer(tiny_exaone_dir)
    assert check_tokenizer_template(tok) == []
    # LLaMA-Factory style template without the empty system turn: a train/serve mismatch
    tok.chat_template = EXAONE_CHAT_TEMPLATE.replace("{{ '[|system|][|endofturn|]\\n' }}", "")
    problems = check_tokenizer_template(tok)
    assert len(problems) == 1 and "renders differently" in problems[0]
    tok.chat_template = None
    assert any("no chat_template" in p for p in check_tokenizer_template(tok))

    tok = load_tokenizer(tiny_exaone_dir)
    tok.pad_token = EOT
    assert any("pad_token equals eos_token" in p for p in check_tokenizer_template(tok))
    tok = load_tokenizer(tiny_exaone_dir)
    tok.eos_token = "[EOS]"
    assert any("eos_token is '[EOS]'" in p for p in check_tokenizer_template(tok))
