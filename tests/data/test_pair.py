"""Pairing modes: exact counts, even use of answers, coverage, caps, seeding."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from hai_medqa.data.pair import check_pairing, folder_rng, pair_indices
from hai_medqa.data.schema import DataError

SIZES = [(7, 3), (3, 7), (5, 5), (1, 4), (4, 1), (250, 180)]


@pytest.mark.parametrize(("nq", "na"), SIZES)
def test_round_robin_one_record_per_question_answers_used_evenly(nq, na):
    pairs = pair_indices(nq, na, mode="round_robin", rng=random.Random(0))
    assert [q for q, _ in pairs] == list(range(nq))  # every question exactly once, in order
    uses = Counter(a for _, a in pairs)
    counts = [uses.get(a, 0) for a in range(na)]
    assert max(counts) - min(counts) <= 1
    assert len(uses) == min(nq, na)


@pytest.mark.parametrize(("nq", "na"), SIZES)
def test_cover_uses_every_question_and_every_answer(nq, na):
    pairs = pair_indices(nq, na, mode="cover", rng=random.Random(0))
    assert len(pairs) == len(set(pairs)) == max(nq, na)
    assert {q for q, _ in pairs} == set(range(nq))
    assert {a for _, a in pairs} == set(range(na))


def test_cross_is_full_product_under_the_cap_and_a_sample_above_it():
    full = pair_indices(3, 4, mode="cross", rng=random.Random(0), max_pairs=12)
    assert full == [(q, a) for q in range(3) for a in range(4)]
    capped = pair_indices(200, 200, mode="cross", rng=random.Random(0), max_pairs=50)
    assert len(capped) == len(set(capped)) == 50
    assert capped == sorted(capped)
    assert all(0 <= q < 200 and 0 <= a < 200 for q, a in capped)


def test_cap_applies_to_other_modes():
    pairs = pair_indices(10, 3, mode="round_robin", rng=random.Random(0), max_pairs=4)
    assert len(pairs) == 4 and len({q for q, _ in pairs}) == 4


def test_empty_sides_give_no_pairs():
    for mode in ("round_robin", "cover", "cross"):
        assert pair_indices(0, 5, mode=mode, rng=random.Random(0), max_pairs=3) == []
        assert pair_indices(5, 0, mode=mode, rng=random.Random(0), max_pairs=3) == []


def test_folder_rng_depends_only_on_seed_and_key():
    key = ("호흡기질환", "천식", "증상")
    a = [folder_rng(0, key).random() for _ in range(2)]
    assert a[0] == a[1]
    assert folder_rng(0, key).random() != folder_rng(1, key).random()
    assert folder_rng(0, key).random() != folder_rng(0, ("호흡기질환", "천식", "약물")).random()
    # a different seed changes which answer each question gets
    p0 = pair_indices(20, 5, mode="round_robin", rng=folder_rng(0, key))
    p1 = pair_indices(20, 5, mode="round_robin", rng=folder_rng(1, key))
    assert p0 != p1


@pytest.mark.parametrize(
    ("mode", "cap", "message"),
    [("zip", None, "unknown pairing"), ("cross", None, "needs a cap"), ("round_robin", 0, "at least 1")],
)
def test_check_pairing_errors(mode, cap, message):
    with pytest.raises(DataError, match=message):
        check_pairing(mode, cap)
