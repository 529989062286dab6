"""Generated AI Hub-format label trees of any size, for tests and benchmarks.

Text comes from sample_content (sensible Korean, repetitive like the real data). Leaf folders are
`<category>/<disease> <n>/<intention>` so any number of distinct folders can be made.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .sample_builder import answer_json, make_answers, question_json, question_texts
from .sample_content import DISEASES, QUESTION_OPENERS
from .schema import ANSWER_DIR, QUESTION_DIR


def _dump(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def write_synthetic_tree(
    root: str | Path,
    *,
    n_leaves: int,
    questions_per_leaf: int,
    answers_per_leaf: int,
    seed: int = 0,
    first_leaf: int = 0,
) -> dict:
    """Write a label root (`root/1.질문`, `root/2.답변`) with n_leaves folders of the given sizes.

    Folders and ids are numbered from `first_leaf`, so trees written with disjoint ranges never share
    a folder key or an id. Returns {"leaves", "questions", "answers", "files"} counts.
    """
    root = Path(root)
    rng = random.Random(seed)
    leaves = [(d, i) for d in DISEASES for i in d.facts]
    next_q, next_a = first_leaf * questions_per_leaf + 1, first_leaf * answers_per_leaf + 1
    for n in range(first_leaf, first_leaf + n_leaves):
        disease, intention = leaves[n % len(leaves)]
        folder = Path(disease.category, f"{disease.kor} {n // len(leaves):04d}", intention)
        q_dir, a_dir = root / QUESTION_DIR / folder, root / ANSWER_DIR / folder
        q_dir.mkdir(parents=True, exist_ok=True)
        a_dir.mkdir(parents=True, exist_ok=True)
        texts = question_texts(rng, disease, intention)
        for k in range(questions_per_leaf):
            qid = f"HC-Q-{next_q:07d}"
            next_q += 1
            text = rng.choice(QUESTION_OPENERS) + texts[k % len(texts)]
            (q_dir / f"{qid}.json").write_bytes(_dump(question_json(qid, disease, intention, text, rng)))
        for parts in make_answers(rng, disease, intention, answers_per_leaf, set()):
            aid = f"HC-A-{next_a:08d}"
            next_a += 1
            (a_dir / f"{aid}.json").write_bytes(_dump(answer_json(aid, disease, intention, parts)))
    n_q, n_a = n_leaves * questions_per_leaf, n_leaves * answers_per_leaf
    return {"leaves": n_leaves, "questions": n_q, "answers": n_a, "files": n_q + n_a}
