"""KorMedMCQA (Korean healthcare licensing exams, ``sean0042/KorMedMCQA``) from local files.

Reads the dataset as a user downloaded it - the Hub snapshot (``<subset>/<split>-*.parquet``), the
older CSV release (``data/<subset>-<split>.csv``) or exported JSONL/JSON/CSV/parquet named
``<subset>[-_/]<split>.*`` - and scores a model given as a function from prompts to generations.

The prompt is lm-evaluation-harness's (``lm_eval/tasks/kormedmcqa/_template_yaml``)::

    {question.strip()}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nE. {E}\\n정답：

(note the full-width colon U+FF1A). Few-shot examples come from the ``fewshot`` split in file order
(the harness's ``first_n`` sampler), each rendered as the prompt plus `` {letter}\\n\\n``.
"""

from __future__ import annotations

import csv
import json
import random
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from hai_medqa.errors import HaiMedQAError
from hai_medqa.io_utils import iter_jsonl

SUBSETS = ("doctor", "nurse", "pharm", "dentist")
LETTERS = ("A", "B", "C", "D", "E")
REQUIRED_COLUMNS = ("question", *LETTERS, "answer")
ANSWER_CUE = "정답："  # full-width colon, exactly as in the harness template
_EXTENSIONS = (".parquet", ".jsonl", ".json", ".csv")


class KorMedMCQAError(HaiMedQAError, ValueError):
    """A KorMedMCQA file is missing, unreadable, or not in the dataset's column layout."""


@dataclass(frozen=True)
class MCQItem:
    """One exam question: stem, five options A-E, and the correct letter."""

    question: str
    options: tuple[str, str, str, str, str]
    answer: str  # "A".."E"
    source: str  # "file:row" for error messages and per-item results


def format_question(item: MCQItem) -> str:
    """The harness prompt for one item, ending with ``정답：``."""
    lines = [item.question.strip()] + [f"{letter}. {opt}" for letter, opt in zip(LETTERS, item.options, strict=True)]
    return "\n".join(lines) + "\n" + ANSWER_CUE


def format_prompt(item: MCQItem, fewshot: Sequence[MCQItem] = ()) -> str:
    """Few-shot examples (each ``<prompt> <letter>\\n\\n``) followed by the item's prompt."""
    shots = "".join(f"{format_question(s)} {s.answer}\n\n" for s in fewshot)
    return shots + format_question(item)


# Answer extraction: a cascade in the spirit of the KorMedMCQA paper (Appendix B) as the harness
# implements it in lm_eval/tasks/kormedmcqa/utils.py, adapted to Python's Unicode \b: in "B입니다"
# there is no word boundary between B and 입 (both are \w), so letters are delimited by "not a Latin
# letter or digit" instead. Text is NFKC-normalised first (full-width Ｂ and ： become B and :).
_NOT_LATIN_BEFORE = r"(?<![A-Za-z0-9])"
_NOT_LATIN_AFTER = r"(?![A-Za-z0-9])"
_CUE = r"(?:정답|답|answer)\s*(?:은|는|:|=|->|→)?\s*"
_EXTRACTION_CASCADE: tuple[tuple[re.Pattern, str], ...] = (
    # the whole reply is one letter, any case: "B", "b", "(B)", "B."
    (re.compile(r"^\s*[\(\[<]?\s*([A-Ea-e])\s*[\)\]>.]?\s*$"), "letter"),
    # "정답: B", "정답은 B입니다", "정답은 (B)", "답: b"
    (re.compile(_CUE + r"[\(\[<]?\s*([A-Ea-e])" + _NOT_LATIN_AFTER, re.IGNORECASE), "letter"),
    # "정답은 2번", "정답: 2"
    (re.compile(_CUE + r"[\(\[<]?\s*([1-5])\s*(?:번|\)|\]|$|\.|입니다)"), "number"),
    # a reply that starts with the letter: "B", "B.", "(B) 아스피린", "B입니다"
    (re.compile(r"^\s*[\(\[<]?\s*([A-E])" + _NOT_LATIN_AFTER), "letter"),
    # "B. 아스피린" anywhere
    (re.compile(_NOT_LATIN_BEFORE + r"([A-E])\." + r"(?!\d)"), "letter"),
    # "B입니다", "B가 정답", "B번"
    (re.compile(_NOT_LATIN_BEFORE + r"([A-E])\s*(?:입니다|이다|가\s*정답|이\s*정답|번)"), "letter"),
    # a lone capital letter
    (re.compile(_NOT_LATIN_BEFORE + r"([A-E])" + _NOT_LATIN_AFTER), "letter"),
)


def extract_choice(text: str, options: Sequence[str] | None = None) -> str | None:
    """The option letter (A-E) a generation chose, or None if it names none.

    Tries the cascade above in order and returns the LAST match of the first pattern that matches
    (as the harness does: a model that reasons first states its answer last). If no pattern matches
    and `options` are given, a reply that is exactly one option's text counts as that option.
    """
    norm = unicodedata.normalize("NFKC", text or "").strip()
    if not norm:
        return None
    for pattern, kind in _EXTRACTION_CASCADE:
        found = pattern.findall(norm)
        if found:
            last = found[-1]
            return LETTERS[int(last) - 1] if kind == "number" else last.upper()
    if options:
        bare = re.sub(r"(?:\s*입니다)?[\s.。!]*$", "", norm)
        matches = [LETTERS[i] for i, opt in enumerate(options) if unicodedata.normalize("NFKC", str(opt)).strip() == bare]
        if len(matches) == 1:
            return matches[0]
    return None


# ---------------------------------------------------------------- loading


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq  # installed with `datasets`

            return pq.read_table(path).to_pylist()
        if suffix == ".csv":
            with open(path, encoding="utf-8-sig", newline="") as f:
                return list(csv.DictReader(f))
        if suffix == ".jsonl":
            return [row for _, row in iter_jsonl(path)]
        if suffix == ".json":
            text = path.read_text(encoding="utf-8-sig")
            stripped = text.lstrip()
            if stripped.startswith("["):
                return json.loads(text)
            return [row for _, row in iter_jsonl(path)]  # JSON Lines saved as .json
    except (OSError, ValueError) as e:
        raise KorMedMCQAError(f"{path}: cannot read ({e})") from None
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise KorMedMCQAError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    raise KorMedMCQAError(f"{path}: unsupported file type {suffix!r} (use parquet, csv, jsonl or json)")


def _parse_answer(value, where: str) -> str:
    """The ``answer`` column is 1-5 (1 = A); accept ints, "3", "3.0" and letters defensively."""
    if isinstance(value, str):
        v = value.strip()
        if v.upper() in LETTERS:
            return v.upper()
        try:
            value = float(v)
        except ValueError:
            raise KorMedMCQAError(f"{where}: answer {value!r} is not 1-5") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or not 1 <= value <= 5:
        raise KorMedMCQAError(f"{where}: answer {value!r} is not 1-5")
    return LETTERS[int(value) - 1]


def read_items(path: str | Path) -> list[MCQItem]:
    """Read one KorMedMCQA file (parquet/csv/jsonl/json) into items.

    Missing columns make the whole file an error (it is not KorMedMCQA); a row with an empty
    question/option or a bad answer is skipped with one warning naming file and row.
    """
    path = Path(path)
    if not path.is_file():
        raise KorMedMCQAError(f"KorMedMCQA file not found: {path}")
    rows = _read_rows(path)
    if not rows:
        raise KorMedMCQAError(f"{path}: no rows")
    if not isinstance(rows[0], dict):
        raise KorMedMCQAError(f"{path}: rows must be objects with columns {', '.join(REQUIRED_COLUMNS)}")
    missing = [c for c in REQUIRED_COLUMNS if c not in rows[0]]
    if missing:
        raise KorMedMCQAError(
            f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(REQUIRED_COLUMNS)} "
            f"(answer 1-5), found {', '.join(map(str, rows[0].keys()))}"
        )
    items, skipped = [], 0
    for i, row in enumerate(rows):
        where = f"{path}:{i + 1}"
        try:
            texts = [row.get(c) for c in ("question", *LETTERS)]
            if any(t is None or not str(t).strip() for t in texts):
                empty = [c for c, t in zip(("question", *LETTERS), texts, strict=True) if t is None or not str(t).strip()]
                raise KorMedMCQAError(f"{where}: empty {', '.join(empty)}")
            answer = _parse_answer(row.get("answer"), where)
        except KorMedMCQAError as e:
            logger.warning(f"skipping row: {e}")
            skipped += 1
            continue
        question, *opts = (str(t) for t in texts)
        items.append(MCQItem(question, tuple(opts), answer, where))
    if not items:
        raise KorMedMCQAError(f"{path}: none of its {len(rows)} rows is a valid question")
    if skipped:
        logger.warning(f"{path}: skipped {skipped} of {len(rows)} rows")
    return items


def find_split_file(root: str | Path, subset: str, split: str) -> Path:
    """Locate ``subset``/``split`` under `root` in any of the layouts users end up with.

    Recognised (any depth, any of .parquet/.jsonl/.json/.csv): ``<subset>/<split>-*.ext`` (Hub
    snapshot), ``<subset>/<split>.ext``, ``<subset>-<split>.ext`` / ``<subset>_<split>.ext`` (CSV
    release, exports). Several matches for one subset/split are an error, never a silent choice.
    """
    root = Path(root)
    if not root.exists():
        raise KorMedMCQAError(f"KorMedMCQA folder not found: {root}")
    found = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in _EXTENSIONS or p.name.startswith("."):
            continue
        stem, parent = p.stem.lower(), p.parent.name.lower()
        if parent == subset and (stem == split or stem.startswith(f"{split}-")) or stem in (f"{subset}-{split}", f"{subset}_{split}"):
            found.append(p)
    if not found:
        raise KorMedMCQAError(
            f"no {subset}/{split} file under {root} (looked for {subset}/{split}-*.parquet, "
            f"{subset}/{split}.jsonl|csv|json, {subset}-{split}.csv|jsonl|parquet)"
        )
    if len(found) > 1:
        raise KorMedMCQAError(f"several files for {subset}/{split} under {root}: {', '.join(map(str, found))}")
    return found[0]


def load_kormedmcqa(
    root: str | Path, subsets: Sequence[str] = SUBSETS, split: str = "test"
) -> dict[str, list[MCQItem]]:
    """Items per subset from a downloaded KorMedMCQA folder (see `find_split_file`)."""
    unknown = [s for s in subsets if s not in SUBSETS]
    if unknown:
        raise KorMedMCQAError(f"unknown KorMedMCQA subset(s) {', '.join(unknown)}; choose from {', '.join(SUBSETS)}")
    if not subsets:
        raise KorMedMCQAError("no KorMedMCQA subsets selected")
    return {s: read_items(find_split_file(root, s, split)) for s in subsets}


def sample_items(items: Sequence[MCQItem], limit: int | None, seed: int) -> list[MCQItem]:
    """At most `limit` items, chosen with a seeded RNG and kept in file order (all if limit is None)."""
    if limit is None or limit >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


# ---------------------------------------------------------------- scoring


def score_kormedmcqa(
    answer_fn: Callable[[list[str]], list[str]],
    data: dict[str, Sequence[MCQItem]],
    fewshot: dict[str, Sequence[MCQItem]] | None = None,
) -> dict:
    """Accuracy per subset plus micro (pooled) and macro (mean of subsets) averages.

    `answer_fn` maps a list of prompts to a list of generations (a model, or a fixed function in
    tests). Returns ``{"accuracy": {subset: acc, ..., "micro": .., "macro": ..}, "detail": {subset:
    {"n", "correct", "unparsed"}}, "items": [...]}``. A generation without an extractable letter
    counts as wrong and is reported under ``unparsed``.
    """
    if not data or all(len(v) == 0 for v in data.values()):
        raise KorMedMCQAError("no KorMedMCQA items to score")
    fewshot = fewshot or {}
    accuracy: dict[str, float] = {}
    detail: dict[str, dict] = {}
    per_item: list[dict] = []
    total_n = total_correct = 0
    for subset, items in data.items():
        if not items:
            continue
        prompts = [format_prompt(it, fewshot.get(subset, ())) for it in items]
        outputs = answer_fn(prompts)
        if len(outputs) != len(prompts):
            raise ValueError(f"answer function returned {len(outputs)} outputs for {len(prompts)} prompts")
        correct = unparsed = 0
        for it, out in zip(items, outputs, strict=True):
            choice = extract_choice(out, it.options)
            unparsed += choice is None
            correct += choice == it.answer
            per_item.append({"subset": subset, "source": it.source, "gold": it.answer, "pred": choice, "output": out})
        accuracy[subset] = correct / len(items)
        detail[subset] = {"n": len(items), "correct": correct, "unparsed": unparsed}
        total_n += len(items)
        total_correct += correct
    subset_accs = list(accuracy.values())
    accuracy["micro"] = total_correct / total_n
    accuracy["macro"] = sum(subset_accs) / len(subset_accs)
    return {"accuracy": accuracy, "detail": detail, "items": per_item}
