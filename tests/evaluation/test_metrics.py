"""Korean-aware ROUGE: morpheme ROUGE-1/2/L and character ROUGE-L, checked against hand computations."""

from __future__ import annotations

import random

import pytest

from hai_medqa.evaluation.metrics import (
    char_tokens,
    lcs_length,
    morpheme_tokens,
    rouge_l,
    rouge_n,
    rouge_scores,
)

REF = "두통에는 충분한 휴식이 필요합니다."
PRED = "두통이 있을 때는 휴식이 필요합니다."


def _lcs_table(a, b) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def test_identical_korean_texts_score_one():
    text = "감기에 걸렸을 때는 물을 충분히 마시고 푹 쉬는 것이 좋습니다. 열이 38도 이상이면 병원에 가세요."
    assert rouge_scores([text], [text]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "char_rougeL": 1.0}


def test_disjoint_korean_texts_score_zero():
    # no shared morpheme and no shared character
    assert rouge_scores(["감기약"], ["두통"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "char_rougeL": 0.0}


def test_hangul_is_not_dropped():
    # the failure of plain rouge_score: Hangul vanishes and everything scores ~0
    assert morpheme_tokens("두통이 심해요") == ["두통", "이", "심하", "어요"]
    assert morpheme_tokens("  \n") == []


def test_known_pair_by_hand():
    # Pin Kiwi's segmentation first, so the hand computation below is about these exact tokens.
    ref_t = morpheme_tokens(REF)
    pred_t = morpheme_tokens(PRED)
    assert ref_t == ["두통", "에", "는", "충분", "하", "ᆫ", "휴식", "이", "필요", "하", "ᆸ니다"]
    assert pred_t == ["두통", "이", "있", "을", "때", "는", "휴식", "이", "필요", "하", "ᆸ니다"]
    # unigrams: shared (clipped) = 두통 는 휴식 이 필요 하 ᆸ니다 = 7 of 11 on each side
    assert rouge_n(pred_t, ref_t, 1).f1 == pytest.approx(7 / 11)
    # bigrams: shared = (휴식,이) (이,필요) (필요,하) (하,ᆸ니다) = 4 of 10 on each side
    assert rouge_n(pred_t, ref_t, 2).f1 == pytest.approx(4 / 10)
    # LCS = 두통 는 휴식 이 필요 하 ᆸ니다 = 7
    assert rouge_l(pred_t, ref_t).f1 == pytest.approx(7 / 11)
    # characters (16 each, '.' kept): LCS = 두통 + 는 + 휴식이필요합니다. = 12
    assert len(char_tokens(REF)) == len(char_tokens(PRED)) == 16
    assert rouge_l(char_tokens(PRED), char_tokens(REF)).f1 == pytest.approx(12 / 16)
    scores = rouge_scores([PRED], [REF])
    assert scores == pytest.approx({"rouge1": 7 / 11, "rouge2": 0.4, "rougeL": 7 / 11, "char_rougeL": 0.75})


def test_precision_recall_asymmetry_and_corpus_mean():
    # pred has 2 tokens, ref 4, overlap 2: P = 1, R = 0.5, F = 2/3
    s = rouge_n(["a", "b"], ["a", "b", "c", "d"], 1)
    assert (s.precision, s.recall) == (1.0, 0.5) and s.f1 == pytest.approx(2 / 3)
    # clipping: a repeated token counts at most as often as in the reference
    assert rouge_n(["a", "a", "a"], ["a", "b"], 1).precision == pytest.approx(1 / 3)
    # corpus score is the mean of per-sample F1
    assert rouge_scores(["두통", "감기"], ["두통", "두통"])["rouge1"] == pytest.approx(0.5)


def test_bit_parallel_lcs_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("가나다라") for _ in range(rng.randint(0, 40))]
        b = [rng.choice("가나다라") for _ in range(rng.randint(0, 40))]
        assert lcs_length(a, b) == _lcs_table(a, b)
    assert lcs_length("ABCBDAB", "BDCABA") == 4


def test_empty_and_mismatched_inputs_are_errors():
    with pytest.raises(ValueError, match="no prediction"):
        rouge_scores([], [])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_scores(["a", "b"], ["a"])
    # an empty prediction is a valid sample scoring 0
    assert rouge_scores([""], ["두통"])["rouge1"] == 0.0
