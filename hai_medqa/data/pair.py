"""Pairing questions with answers of the same folder.

The data has no question->answer link: any answer of a (category, disease, intention) folder is a
plausible answer to any question of it. The modes decide which (question, answer) pairs become
records. Randomness is drawn from a generator seeded by (seed, folder key) alone, so a folder pairs
the same way whatever else is in the run, in whichever order or process it is handled.
"""

from __future__ import annotations

import hashlib
import random

from .schema import DataError

# round_robin: each question exactly once; answers handed out in a shuffled cycle (used evenly).
# cover:       max(Q, A) pairs so that every question and every answer appears at least once.
# cross:       the Q x A product, a seeded sample of at most max_pairs_per_folder pairs.
PAIRING_MODES = ("round_robin", "cover", "cross")


def folder_rng(seed: int, key: tuple[str, ...]) -> random.Random:
    """A generator that depends only on the seed and the folder's (NFC) relative path."""
    digest = hashlib.sha256(f"{seed}\x00{'/'.join(key)}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def check_pairing(mode: str, max_pairs_per_folder: int | None) -> None:
    """Raise DataError for an unknown mode or an unusable cap."""
    if mode not in PAIRING_MODES:
        raise DataError(f"unknown pairing '{mode}' (choose one of: {', '.join(PAIRING_MODES)})")
    if max_pairs_per_folder is not None and max_pairs_per_folder < 1:
        raise DataError(f"max pairs per folder must be at least 1, got {max_pairs_per_folder}")
    if mode == "cross" and max_pairs_per_folder is None:
        raise DataError(
            "pairing 'cross' needs a cap (--max-pairs-per-folder N): one folder of 200 questions and "
            "200 answers alone would give 40,000 records"
        )


def pair_indices(
    n_questions: int,
    n_answers: int,
    *,
    mode: str,
    rng: random.Random,
    max_pairs: int | None = None,
) -> list[tuple[int, int]]:
    """(question index, answer index) pairs for one folder, sorted by question then answer index.

    Indices refer to the folder's valid questions/answers in their sorted order. A folder with no
    questions or no answers gives no pairs. `max_pairs` keeps a seeded sample of that many.
    """
    if n_questions == 0 or n_answers == 0:
        return []
    if mode == "round_robin":
        order = list(range(n_answers))
        rng.shuffle(order)
        pairs = [(q, order[q % n_answers]) for q in range(n_questions)]
    elif mode == "cover":
        q_order = list(range(n_questions))
        a_order = list(range(n_answers))
        rng.shuffle(q_order)
        rng.shuffle(a_order)
        n = max(n_questions, n_answers)
        pairs = sorted({(q_order[i % n_questions], a_order[i % n_answers]) for i in range(n)})
    elif mode == "cross":
        total = n_questions * n_answers
        if max_pairs is None or total <= max_pairs:
            return [(q, a) for q in range(n_questions) for a in range(n_answers)]
        # Sample flat indices of the product instead of building it (Q x A can be large).
        return [divmod(i, n_answers) for i in sorted(rng.sample(range(total), max_pairs))]
    else:
        raise DataError(f"unknown pairing '{mode}'")
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = sorted(rng.sample(pairs, max_pairs))
    return pairs
