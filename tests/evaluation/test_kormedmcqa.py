"""KorMedMCQA: loading the real column layout (parquet / CSV / JSONL), harness prompt, answer
extraction, and accuracy for a model replaced by a fixed answer function."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from loguru import logger

from hai_medqa.evaluation.kormedmcqa import (
    SUBSETS,
    KorMedMCQAError,
    extract_choice,
    find_split_file,
    format_prompt,
    format_question,
    load_kormedmcqa,
    read_items,
    sample_items,
    score_kormedmcqa,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "kormedmcqa"


@pytest.fixture
def caplog_loguru():
    """Messages logged through loguru during the test (loguru does not feed pytest's caplog)."""
    messages: list[str] = []
    sink_id = logger.add(lambda m: messages.append(str(m)), level="WARNING", format="{message}")
    yield messages
    logger.remove(sink_id)


@pytest.fixture(scope="module")
def test_items():
    return load_kormedmcqa(FIXTURE, SUBSETS, "test")


def test_fixture_loads_in_hub_layout(test_items):
    assert {s: len(v) for s, v in test_items.items()} == {"doctor": 5, "nurse": 4, "pharm": 3, "dentist": 2}
    first = test_items["doctor"][0]
    assert first.question.startswith("급성 심근경색")
    assert first.options[1] == "미오글로빈" and first.answer == "B"  # answer column 2 -> B
    assert first.source.endswith("doctor/test-00000-of-00001.parquet:1")


def test_prompt_matches_lm_evaluation_harness(test_items):
    item = test_items["pharm"][0]
    assert format_question(item) == (
        "와파린의 효과를 감시하는 검사는?\nA. aPTT\nB. INR\nC. 혈소판 수\nD. HbA1c\nE. 크레아티닌\n정답："
    )
    assert format_question(item).endswith("\uff1a")  # full-width colon, as in the harness yaml
    shots = load_kormedmcqa(FIXTURE, ["pharm"], "fewshot")["pharm"]
    prompt = format_prompt(item, shots)
    assert prompt == (
        format_question(shots[0]) + " A\n\n" + format_question(shots[1]) + " B\n\n" + format_question(item)
    )


@pytest.mark.parametrize(
    "reply, letter",
    [
        ("B", "B"),
        (" b", "B"),
        ("(C)", "C"),
        ("D.", "D"),
        ("B입니다", "B"),
        ("정답은 B입니다", "B"),
        ("정답은 B입니다.", "B"),
        ("정답: C", "C"),
        ("정답：Ｄ", "D"),  # full-width forms
        ("정답은 (E)", "E"),
        ("정답은 2번입니다", "B"),
        ("E. 크레아티닌", "E"),
        ("저는 처음에 A라고 생각했지만 정답은 D입니다.", "D"),
        ("INR", "B"),  # the option's own text
        ("모르겠습니다", None),
        ("BMI가 높음", None),  # a letter inside a Latin word is not an answer
        ("", None),
    ],
)
def test_answer_extraction(test_items, reply, letter):
    assert extract_choice(reply, test_items["pharm"][0].options) == letter


def test_accuracy_with_a_fixed_answer_function(test_items):
    # Replies per subset, in file order. Gold: doctor B B C D C, nurse C B A E, pharm B C A, dentist B C.
    replies = {
        "doctor": ["B", "정답은 B입니다", "정답: C", "A", "모르겠습니다"],  # 3 right, 1 wrong, 1 unparsed
        "nurse": ["C", "정답은 2번", "(A)", "E. 보호자 없이 혼자 걷게 한다"],  # 4 right
        "pharm": ["B", "A", "B"],  # 1 right
        "dentist": ["C", "A"],  # 0 right
    }
    by_question = {
        format_question(it): reply
        for subset, items in test_items.items()
        for it, reply in zip(items, replies[subset], strict=True)
    }
    seen_prompts = []

    def answer_fn(prompts):
        seen_prompts.extend(prompts)
        return [by_question[p] for p in prompts]

    result = score_kormedmcqa(answer_fn, test_items)
    acc = result["accuracy"]
    assert acc["doctor"] == pytest.approx(3 / 5)
    assert acc["nurse"] == pytest.approx(1.0)
    assert acc["pharm"] == pytest.approx(1 / 3)
    assert acc["dentist"] == 0.0
    assert acc["micro"] == pytest.approx(8 / 14)
    assert acc["macro"] == pytest.approx((3 / 5 + 1 + 1 / 3 + 0) / 4)
    assert result["detail"]["doctor"] == {"n": 5, "correct": 3, "unparsed": 1}
    assert len(seen_prompts) == 14 and len(result["items"]) == 14


def test_fewshot_prompts_reach_the_model(test_items):
    shots = load_kormedmcqa(FIXTURE, ["doctor"], "fewshot")
    prompts = []
    score_kormedmcqa(lambda ps: prompts.extend(ps) or ["A"] * len(ps), {"doctor": test_items["doctor"]}, shots)
    assert all(p.startswith(format_question(shots["doctor"][0]) + " C\n\n") for p in prompts)


def _export(items_root: Path, out: Path, fmt: str) -> None:
    """Write the fixture's test split the way other downloads look: old CSV release / JSONL export."""
    import pyarrow.parquet as pq

    for subset in SUBSETS:
        rows = pq.read_table(find_split_file(items_root, subset, "test")).to_pylist()
        if fmt == "csv":
            path = out / "data" / f"{subset}-test.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
        else:
            path = out / subset / "test.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_csv_and_jsonl_layouts_give_the_same_items(tmp_path, test_items, fmt):
    _export(FIXTURE, tmp_path, fmt)
    other = load_kormedmcqa(tmp_path, SUBSETS, "test")
    for subset in SUBSETS:
        assert [(i.question, i.options, i.answer) for i in other[subset]] == [
            (i.question, i.options, i.answer) for i in test_items[subset]
        ]


def test_sample_items_is_seeded_and_keeps_order(test_items):
    items = test_items["doctor"]
    a, b = sample_items(items, 3, seed=1), sample_items(items, 3, seed=1)
    assert a == b and len(a) == 3
    assert [items.index(x) for x in a] == sorted(items.index(x) for x in a)
    assert sample_items(items, None, seed=1) == items


# ------------------------------------------------------------ clear errors


def test_missing_folder_and_missing_subset(tmp_path):
    with pytest.raises(KorMedMCQAError, match="folder not found"):
        load_kormedmcqa(tmp_path / "nope")
    shutil.copytree(FIXTURE / "doctor", tmp_path / "doctor")
    with pytest.raises(KorMedMCQAError, match="no nurse/test file"):
        load_kormedmcqa(tmp_path, ["doctor", "nurse"])
    with pytest.raises(KorMedMCQAError, match="unknown KorMedMCQA subset"):
        load_kormedmcqa(tmp_path, ["surgeon"])


def test_wrong_columns(tmp_path):
    path = tmp_path / "doctor-test.csv"
    path.write_text("question,A,B,C,D,answer\n질문,a,b,c,d,1\n", encoding="utf-8")
    with pytest.raises(KorMedMCQAError, match=r"missing column\(s\) E"):
        read_items(path)


def test_empty_inputs(tmp_path):
    header_only = tmp_path / "doctor-test.csv"
    header_only.write_text("question,A,B,C,D,E,answer\n", encoding="utf-8")
    with pytest.raises(KorMedMCQAError, match="no rows"):
        read_items(header_only)
    empty_jsonl = tmp_path / "x.jsonl"
    empty_jsonl.write_text("\n", encoding="utf-8")
    with pytest.raises(KorMedMCQAError, match="no rows"):
        read_items(empty_jsonl)
    with pytest.raises(KorMedMCQAError, match="no KorMedMCQA items"):
        score_kormedmcqa(lambda ps: ps, {"doctor": []})


def test_bad_rows_are_skipped_with_a_warning(tmp_path, caplog_loguru):
    path = tmp_path / "doctor-test.jsonl"
    good = {"question": "q", "A": "a", "B": "b", "C": "c", "D": "d", "E": "e", "answer": 3}
    rows = [good, {**good, "answer": 7}, {**good, "C": ""}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    items = read_items(path)
    assert [i.answer for i in items] == ["C"]
    assert any(f"{path}:2: answer 7 is not 1-5" in m for m in caplog_loguru)
    assert any(f"{path}:3: empty C" in m for m in caplog_loguru)


def test_ambiguous_layout_is_an_error(tmp_path):
    shutil.copytree(FIXTURE / "doctor", tmp_path / "doctor")
    _export(FIXTURE, tmp_path / "again", "jsonl")
    with pytest.raises(KorMedMCQAError, match="several files for doctor/test"):
        find_split_file(tmp_path, "doctor", "test")
