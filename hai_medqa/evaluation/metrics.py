"""Korean-aware overlap metrics: ROUGE-1/2/L on morphemes (kiwipiepy) and character-level ROUGE-L.

Why not ``rouge_score``: its default tokenizer keeps only ``[a-z0-9]`` and drops every Hangul
syllable, so two Korean texts score ~0 whatever they say. Whitespace tokens (어절) are no better:
Korean glues particles and endings to words (``두통이``, ``두통을``, ``두통은``), so the same word
rarely matches. Morphemes (``두통`` + ``이``) do.

Choices (documented in docs/evaluation.md):
- a token is a morpheme's surface form (Kiwi lemmatises verb/adjective stems: 아파요 -> 아프 + 어요);
  punctuation and symbols (Kiwi tags SF SP SS SSO SSC SE SO SW and W_*) are dropped, Latin is
  lower-cased; foreign words (SL), numbers (SN) and Hanja (SH) are kept;
- character ROUGE-L runs on the characters of the NFKC text without whitespace (no tokenizer at
  all, so it cannot be fooled by a tokenizer choice);
- each score is the F1 (beta = 1) of one prediction against one reference; corpus scores are the
  mean over samples, as ``rouge_score``'s aggregator reports them.
"""

from __future__ import annotations

import functools
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

# Kiwi tags that are punctuation / symbols / special tokens (kept: SL foreign, SH hanja, SN number).
_DROPPED_TAG_PREFIXES = ("SF", "SP", "SS", "SE", "SO", "SW", "W_")


@dataclass(frozen=True)
class Score:
    """Precision, recall and F1 of one prediction against one reference."""

    precision: float
    recall: float
    f1: float


@functools.lru_cache(maxsize=1)
def _kiwi():
    # Loading the model takes ~1-2 s and ~100 MB; do it once per process. kiwipiepy ships its model
    # in the kiwipiepy_model wheel, so this never touches the network.
    from kiwipiepy import Kiwi

    return Kiwi()


def morpheme_tokens(text: str) -> list[str]:
    """Morpheme surface forms of `text` without punctuation/symbols (see module docstring)."""
    text = unicodedata.normalize("NFKC", text or "")
    if not text.strip():
        return []
    return [tok.form.lower() for tok in _kiwi().tokenize(text) if not tok.tag.startswith(_DROPPED_TAG_PREFIXES)]


def char_tokens(text: str) -> list[str]:
    """Characters of the NFKC text with whitespace removed."""
    return [c for c in unicodedata.normalize("NFKC", text or "") if not c.isspace()]


def _prf(overlap: int, n_pred: int, n_ref: int) -> Score:
    if overlap == 0 or n_pred == 0 or n_ref == 0:
        return Score(0.0, 0.0, 0.0)
    p, r = overlap / n_pred, overlap / n_ref
    return Score(p, r, 2 * p * r / (p + r))


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def rouge_n(pred: Sequence[str], ref: Sequence[str], n: int) -> Score:
    """ROUGE-N of token lists: clipped n-gram overlap (multiset intersection)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    p, r = _ngrams(pred, n), _ngrams(ref, n)
    return _prf(sum((p & r).values()), sum(p.values()), sum(r.values()))


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two sequences.

    Bit-parallel (Hyyro 2004): one big-int operation per element of `b`, so character-level LCS of
    two 1,000-character answers costs ~1,000 Python steps instead of a 10^6-cell table.
    """
    if not a or not b:
        return 0
    masks: dict = {}
    for i, x in enumerate(a):
        masks[x] = masks.get(x, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for y in b:
        u = v & masks.get(y, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(pred: Sequence[str], ref: Sequence[str]) -> Score:
    """ROUGE-L (sentence-level, no summary splitting) of token lists."""
    return _prf(lcs_length(pred, ref), len(pred), len(ref))


def sample_scores(prediction: str, reference: str) -> dict[str, float]:
    """F1 of one prediction against one reference: ``rouge1``, ``rouge2``, ``rougeL`` (morphemes) and
    ``char_rougeL`` (characters)."""
    pt, rt = morpheme_tokens(prediction), morpheme_tokens(reference)
    return {
        "rouge1": rouge_n(pt, rt, 1).f1,
        "rouge2": rouge_n(pt, rt, 2).f1,
        "rougeL": rouge_l(pt, rt).f1,
        "char_rougeL": rouge_l(char_tokens(prediction), char_tokens(reference)).f1,
    }


def rouge_report(predictions: Sequence[str], references: Sequence[str]) -> tuple[dict[str, float], list[dict]]:
    """(mean over pairs of `sample_scores`, the per-pair scores). An empty input is a ValueError (a
    mean over nothing is not a score)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no prediction/reference pairs to score")
    per_sample = [sample_scores(p, r) for p, r in zip(predictions, references, strict=True)]
    return {k: sum(s[k] for s in per_sample) / len(per_sample) for k in per_sample[0]}, per_sample


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE F1s over prediction/reference pairs (see `rouge_report`)."""
    return rouge_report(predictions, references)[0]


def stderr_of_mean(values: Sequence[float]) -> float | None:
    """Standard error of the mean (sample standard deviation / sqrt(n)); None for fewer than two values.

    >>> stderr_of_mean([1.0, 3.0])
    1.0
    """
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5
