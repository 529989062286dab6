"""Schema rules: text normalisation, question/answer validation, record layout."""

from __future__ import annotations

import unicodedata

import pytest

from hai_medqa.data.schema import (
    RECORD_FIELDS,
    InvalidItem,
    make_record,
    normalize_text,
    parse_answer,
    parse_question,
)
from hai_medqa.fixtures.aihub_sample_content import fill, josa_fields


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  숨이   차요\t ", "숨이 차요"),
        ("\u200b기흉\ufeff 증상", "기흉 증상"),
        ("첫 줄  \r\n\r\n\r\n\n  둘째   줄 \n", "첫 줄\n\n둘째 줄"),
        (unicodedata.normalize("NFD", "고혈압"), "고혈압"),
        (" \n\t \u3000", ""),
    ],
)
def test_normalize_text(raw, expected):
    out = normalize_text(raw)
    assert out == expected
    assert unicodedata.is_normalized("NFC", out)


def _question(**overrides):
    obj = {
        "fileName": "HC-Q-0000001",
        "disease_category": "호흡기질환",
        "disease_name": {"kor": "천식", "eng": "Asthma"},
        "intention": "증상",
        "question": "천식 증상은?",
    }
    obj.update(overrides)
    return obj


def test_parse_question_fields_and_fallbacks():
    q = parse_question(_question(question="  천식   증상은? "), fallback_id="stem")
    assert (q.id, q.text, q.category, q.disease, q.intention) == (
        "HC-Q-0000001",
        "천식 증상은?",
        "호흡기질환",
        "천식",
        "증상",
    )
    # no fileName / metadata: id from the file name, labels from the <category>/<disease>/<intention> folder
    bare = {"question": "무엇인가요?"}
    q = parse_question(bare, fallback_id="HC-Q-0000009", folder=("순환기질환", "고혈압", "식이, 생활"))
    assert (q.id, q.category, q.disease, q.intention) == (
        "HC-Q-0000009",
        "순환기질환",
        "고혈압",
        "식이, 생활",
    )


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ([1, 2], "not_object"),
        ({"fileName": "x"}, "missing_key"),
        ({"question": 3}, "wrong_type"),
        ({"question": None}, "wrong_type"),
        ({"question": " \n "}, "empty_text"),
    ],
)
def test_parse_question_rejects(obj, reason):
    with pytest.raises(InvalidItem) as info:
        parse_question(obj, fallback_id="f")
    assert info.value.reason == reason


def test_parse_answer_joins_parts_and_splits_departments():
    obj = {
        "fileName": "HC-A-00000001",
        "department": ["내분비내과\n가정의학과", "내분비내과", 7],
        "answer": {"intro": " 안녕하세요. ", "body": "본문  입니다.", "conclusion": ""},
    }
    a = parse_answer(obj, fallback_id="f")
    assert a.text == "안녕하세요.\n\n본문 입니다."
    assert a.department == ("내분비내과", "가정의학과")
    assert parse_answer(obj, fallback_id="f", drop_intro=True).text == "본문 입니다."
    assert parse_answer({"answer": {"body": "b", "conclusion": None}}, fallback_id="HC-A-9").id == "HC-A-9"


@pytest.mark.parametrize(
    ("obj", "reason", "drop_intro"),
    [
        ("text", "not_object", False),
        ({}, "missing_key", False),
        ({"answer": {}}, "missing_key", False),
        ({"answer": "plain text"}, "wrong_type", False),
        ({"answer": {"intro": 5, "body": "b"}}, "wrong_type", False),
        ({"answer": {"intro": " ", "body": "\n", "conclusion": ""}}, "empty_text", False),
        ({"answer": {"intro": "only the intro"}}, "empty_text", True),
    ],
)
def test_parse_answer_rejects(obj, reason, drop_intro):
    with pytest.raises(InvalidItem) as info:
        parse_answer(obj, fallback_id="f", drop_intro=drop_intro)
    assert info.value.reason == reason


def test_make_record_has_exactly_the_contract_fields_in_order():
    q = parse_question(_question(), fallback_id="f")
    a = parse_answer(
        {"fileName": "HC-A-00000002", "department": ["호흡기내과"], "answer": {"body": "답"}}, fallback_id="f"
    )
    record = make_record(q, a)
    assert (
        tuple(record)
        == RECORD_FIELDS
        == (
            "instruction",
            "output",
            "category",
            "disease",
            "intention",
            "department",
            "question_id",
            "answer_id",
        )
    )
    assert record["department"] == ["호흡기내과"] and record["answer_id"] == "HC-A-00000002"


def test_korean_particles_follow_the_last_syllable():
    assert josa_fields("공기가슴증(기흉)")["은"] == "은"  # 흉 has a final consonant
    assert josa_fields("편두통")["이"] == "이"
    assert josa_fields("파킨슨병")["으로"] == "으로"
    assert josa_fields("위식도 역류질환")["을"] == "을"
    assert fill("{d}{은} 무엇인가요?", "천식") == "천식은 무엇인가요?"
    assert fill("{d}{이} 있나요?", "폐렴") == "폐렴이 있나요?"
    assert fill("{d}{을} 막으려면", "HIV 감염") == "HIV 감염을 막으려면"
