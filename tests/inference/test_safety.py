"""Safety routing: fires on emergency / self-harm signs, stays quiet on ordinary health questions."""

from __future__ import annotations

import json

import pytest

from hai_medqa.inference.safety import DEFAULT_RULES_PATH, SafetyConfigError, SafetyLayer


@pytest.fixture(scope="module")
def layer() -> SafetyLayer:
    return SafetyLayer()


EMERGENCY = [
    # chest pain together with breathing trouble (spacing variants on purpose)
    "가슴이 아프고 숨쉬기가 힘들어요",
    "가슴이아프고 숨 쉬기가 힘들어요",
    "가슴이 조이고 숨이 차요",
    "흉통이 있고 호흡곤란이 있어요",
    "가슴이 답답하고 식은땀이 나요",
    "갑자기 가슴이 쥐어짜듯이 아파요",
    # loss of consciousness
    "아버지가 갑자기 쓰러지셨어요",
    "엄마가 의식을 잃었어요",
    "의식이 없어요",
    "할머니가 실신했어요",
    "아이를 깨워도 반응이 없어요",
    # heavy bleeding
    "피가 멈추지 않아요",
    "손가락을 베었는데 피가 철철 나요",
    "피를 토했어요",
    # stroke signs
    "갑자기 얼굴 한쪽이 처지고 말이 어눌해요",
    "한쪽 팔다리에 힘이 없어요",
    "오른쪽 팔이 마비된 것 같아요",
    "뇌졸중이 온 것 같아요",
    "머리가 깨질 것 같은 두통이 갑자기 왔어요",
    # breathing / airway / allergy
    "숨을 못 쉬겠어요",
    "아기가 숨을 안 쉬어요",
    "땅콩이 목에 걸려서 숨을 못 쉬어요",
    "벌에 쏘였는데 목이 붓고 숨이 막혀요",
    # seizure, poisoning, cardiac arrest
    "경련이 5분 넘게 멈추지 않아요",
    "아이가 열이 나면서 경기를 해요",
    "농약을 마셨어요",
    "수면제를 한꺼번에 먹었어요",
    "심장이 멈춘 것 같아요",
]

SELF_HARM = [
    "죽고 싶어요",
    "요즘 자살 생각이 들어요",
    "살기 싫어요",
    "사라지고 싶어요",
    "사는 게 의미가 없어요",
    "삶을 끝내고 싶어요",
    "극단적인 선택을 하고 싶어요",
    "유서를 썼어요",
    "자해를 했어요",
    "손목을 그었어요",
]

ORDINARY = [
    "두통 예방법",
    "두통 예방을 위해 어떤 자세나 활동이 도움이 될까요?",
    "가슴 통증의 원인은 무엇인가요?",
    "가슴이 조금 아프지만 숨쉬기는 괜찮아요",
    "가슴이 아프지는 않은데 숨이 차요",
    "운동 후 숨이 차는 건 정상인가요?",
    "코가 막혀서 숨쉬기 불편해요",
    "뇌졸중 예방을 위한 식단을 알려주세요",
    "뇌출혈 후 재활 운동",
    "실신의 원인은 무엇인가요?",
    "의식하지 않고 과식하는 습관을 고치려면?",
    "정신이 없어서 약을 깜빡했어요",
    "숨겨진 질환을 찾는 검진",
    "생리 과다출혈의 원인",
    "피가 나는 상처 소독법",
    "치아 출혈이 조금 있어요",
    "호흡기 질환 예방법",
    "천식 환자에게 좋은 운동은?",
    "당뇨병은 어떤 질병인가요?",
    "고혈압 약은 언제 먹어야 하나요?",
    "감기약 먹고 졸려요",
    "죽 먹어도 되나요",
    "한쪽 눈이 충혈됐어요",
    "경기도에 있는 병원 추천",
    # the original project's consultation examples
    "배가 아파요",
    "오른쪽 하복부요",
    "열도 있어요",
    "손끝이 저려요",
    "왼손만이요",
    "계속 피곤하고 몸이 무거워요",
    "식욕은 줄고 체중은 빠졌어요",
    "44세 여성이 혈당의 상승 하강 폭이 불규칙하며 신체 말단에 감각이 소실되고 돌아오는 현상이 있습니다. 이는 어떤 질병입니까?",
]


@pytest.mark.parametrize("text", EMERGENCY)
def test_emergency_signs_route_to_119(layer, text):
    assert layer.categories_hit(text) == ["emergency"]
    assert "119" in layer.notices(text)


@pytest.mark.parametrize("text", SELF_HARM)
def test_self_harm_signs_route_to_109(layer, text):
    assert layer.categories_hit(text) == ["self_harm"]
    notice = layer.notices(text)
    assert "109" in notice and "1577-0199" in notice


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_questions_do_not_trigger(layer, text):
    assert layer.check(text) == []
    assert layer.notices(text) == ""


def test_both_categories_in_file_order(layer):
    text = "수면제를 한꺼번에 먹었어요. 죽고 싶어요"
    assert layer.categories_hit(text) == ["emergency", "self_harm"]
    notice = layer.notices(text)
    assert notice.index("119") < notice.index("109")


def test_wrap_puts_guidance_first_and_disclaimer_last(layer):
    shown = layer.wrap("가슴이 아프고 숨쉬기가 힘들어요", "심근경색일 수 있습니다.")
    assert shown.startswith(layer.notices("가슴이 아프고 숨쉬기가 힘들어요"))
    assert shown.index("119") < shown.index("심근경색")
    assert shown.endswith(layer.disclaimer)
    assert "진단" in layer.disclaimer  # "does not replace a doctor's diagnosis"
    # an ordinary question: answer + disclaimer only
    assert layer.wrap("두통 예방법", "규칙적인 수면이 도움이 됩니다.") == "규칙적인 수면이 도움이 됩니다.\n\n" + layer.disclaimer


def test_disabled_layer_is_a_pass_through():
    off = SafetyLayer(enabled=False)
    assert off.check("죽고 싶어요") == []
    assert off.wrap("가슴이 아프고 숨쉬기가 힘들어요", "답변") == "답변"


def test_keyword_file_is_the_single_source(layer):
    data = json.loads(DEFAULT_RULES_PATH.read_text(encoding="utf-8"))
    assert [c["name"] for c in data["categories"]] == layer.category_names == ["emergency", "self_harm"]
    assert data["disclaimer"].strip() == layer.disclaimer


def _write_rules(tmp_path, mutate):
    data = json.loads(DEFAULT_RULES_PATH.read_text(encoding="utf-8"))
    mutate(data)
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def test_custom_rules_file_is_used(tmp_path):
    def add_rule(d):
        d["categories"][0]["rules"].append({"name": "custom", "any": ["테스트응급"]})

    assert SafetyLayer(_write_rules(tmp_path, add_rule)).categories_hit("테스트 응급 상황") == ["emergency"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["categories"][0]["rules"].append({"name": "bad", "any": ["(unclosed"]}), "emergency.bad.any[0]"),
        (lambda d: d["categories"][0]["rules"].append({"name": "ref", "all": ["@{nope}"]}), "unknown term @{nope}"),
        (lambda d: d.pop("disclaimer"), "'disclaimer'"),
        (lambda d: d["categories"][1]["rules"].append({"name": "empty"}), "self_harm.empty"),
    ],
)
def test_malformed_rules_give_one_clear_error(tmp_path, mutate, message):
    with pytest.raises(SafetyConfigError, match=message.replace("[", r"\[").replace("{", r"\{")):
        SafetyLayer(_write_rules(tmp_path, mutate))


def test_missing_rules_file(tmp_path):
    with pytest.raises(SafetyConfigError, match="not found"):
        SafetyLayer(tmp_path / "missing.json")
