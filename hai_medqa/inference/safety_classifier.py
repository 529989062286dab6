"""A small trained classifier beside the safety rules ("rules as a floor").

The keyword/lemma rules in ``safety_keywords.json`` catch the phrasings their writers anticipated;
on fresh wording they level off near 75-80% recall. This module scores the same window the rules
read (the last ``window_user_turns`` user messages) with three logistic-regression heads -
``emergency``, ``self_harm`` and ``self_harm_method`` (a request for self-harm methods, whose
answer is withheld) - over sparse binary features of:

- the *text* view (NFKC, lower-case, no whitespace): character 2-4-grams, so spacing variants,
  typos and slang (ㅈㅅ, ㅠㅠ) share most of their features with the clean spelling;
- the kiwipiepy morphemes (predicates in dictionary form): unigrams, bigrams, and content-word
  bigrams with one word skipped, so inflections (쉬어져요 / 쉴 수 없어 -> 쉬다) share features;
- English words come through both views.

Each feature is written twice: ``L|`` for the latest message and ``W|`` for the whole window, so a
head can learn that a picture completed over several turns counts, while the latest message's own
words weigh most. Each block is L2-normalised. A head's raw score goes through a Platt calibration
fitted on out-of-fold scores of the training data, and the head fires when the calibrated score
reaches its threshold (chosen by grouped cross-validation on the training data only; see
``safety_train.py``). As with the rules, a head fires at the latest turn only when the latest
message matters: it fires alone, or the window fires and the window before it did not (so a notice
is not repeated on every later turn).

The weights are a plain JSON file (``safety_classifier.json`` beside this module), written by
``python -m hai_medqa.inference.safety_train`` and loaded once per process per path.
"""

from __future__ import annotations

import functools
import json
import math
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hai_medqa.errors import HaiMedQAError

DEFAULT_WEIGHTS_PATH = Path(__file__).with_name("safety_classifier.json")
HEADS = ("emergency", "self_harm", "self_harm_method")
FORMAT = "hai_medqa.safety_classifier"
FORMAT_VERSION = 1
CHAR_NGRAMS = (2, 3, 4)
# content morphemes: nouns, predicates, adverbs (안 / 못 negate), roots, foreign words, numbers
_CONTENT_PREFIXES = ("NN", "NP", "NR", "VV", "VA", "VX", "VCN", "MAG", "XR", "SL", "SN", "MM")


class SafetyClassifierError(HaiMedQAError, ValueError):
    """The classifier weights file is missing or malformed (names the file and the broken field)."""


def _text_view(text: str) -> str:
    return "".join(unicodedata.normalize("NFKC", text).lower().split())


def _morphemes(text: str) -> tuple[tuple[str, bool], ...]:
    """(lemma, is_content) per kept kiwipiepy morpheme of `text` (the analysis the rules use too)."""
    from hai_medqa.inference.safety import analyse  # safety imports this module: import on use

    return tuple((word, tag.startswith(_CONTENT_PREFIXES)) for word, tag in analyse(text))


@functools.lru_cache(maxsize=4096)
def message_features(text: str) -> frozenset[str]:
    """The features of one user message (without the ``L|`` / ``W|`` block prefix)."""
    feats: set[str] = set()
    t = _text_view(text)
    padded = f"^{t}$"
    for n in CHAR_NGRAMS:
        for i in range(len(padded) - n + 1):
            feats.add("c" + padded[i:i + n])
    morphs = _morphemes(text)
    words = [w for w, _ in morphs]
    content = [w for w, c in morphs if c]
    for i, w in enumerate(words):
        feats.add("u " + w)
        if i + 1 < len(words):
            feats.add(f"b {w} {words[i + 1]}")
    for i, w in enumerate(content):
        if i + 1 < len(content):
            feats.add(f"k {w} {content[i + 1]}")
        if i + 2 < len(content):
            feats.add(f"s {w} {content[i + 2]}")
    return frozenset(feats)


def window_features(turns: Sequence[str]) -> dict[str, float]:
    """Sparse feature vector of a window of user messages (the last one is the latest turn):
    ``L|`` features of the latest message, ``W|`` features of the whole window, each block
    L2-normalised (binary features, so each value is 1/sqrt(block size))."""
    if not turns:
        return {}
    last = message_features(turns[-1])
    window: set[str] = set()
    for t in turns:
        window |= message_features(t)
    vec: dict[str, float] = {}
    for prefix, block in (("L|", last), ("W|", window)):
        if block:
            v = 1.0 / math.sqrt(len(block))
            for f in block:
                vec[prefix + f] = v
    return vec


@dataclass(frozen=True)
class ClassifierVerdict:
    """Calibrated scores per head at the latest turn, and the heads that fire there."""

    scores: dict[str, float]
    fired: tuple[str, ...]


class SafetyClassifier:
    """Logistic-regression heads over the window's features, loaded from a JSON weights file."""

    def __init__(self, vocab: dict[str, int], weights: list[list[float]], bias: list[float],
                 platt: list[list[float]], thresholds: list[float], meta: dict,
                 rule_veto: dict[str, float] | None = None):
        self.vocab = vocab
        self.weights = np.asarray(weights, dtype=np.float64).reshape(len(vocab), len(HEADS))  # a row per feature
        self.bias = bias
        self.platt = platt  # (a, b) per head: p = sigmoid(a * z + b)
        self.thresholds = thresholds
        self.meta = meta
        # per head: a rule hit on an informational message is dropped when this head scores below it
        self.rule_veto = dict(rule_veto or {})

    # ---- loading ----
    @classmethod
    def load(cls, path: str | Path = DEFAULT_WEIGHTS_PATH) -> SafetyClassifier:
        """Read a weights file; one clear line (file and field) if it is missing or malformed."""
        return _load_cached(str(Path(path).resolve()))

    @classmethod
    def from_dict(cls, data: object, where: str = "<weights>") -> SafetyClassifier:
        """Build from the parsed JSON object of a weights file, checking every field."""
        def bad(what: str) -> SafetyClassifierError:
            return SafetyClassifierError(f"{where}: {what}")

        if not isinstance(data, dict):
            raise bad("top level must be a JSON object")
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise bad(f"not a safety classifier weights file (expected format {FORMAT!r} version {FORMAT_VERSION})")
        if data.get("heads") != list(HEADS):
            raise bad(f"'heads' must be {list(HEADS)}")
        features, weights = data.get("features"), data.get("weights")
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise bad("'features' must be a list of strings")
        if not isinstance(weights, list) or len(weights) != len(features):
            raise bad(f"'weights' must be a list with one row per feature ({len(features)})")
        k = len(HEADS)
        for i, row in enumerate(weights):
            if not (isinstance(row, list) and len(row) == k and all(_is_number(x) for x in row)):
                raise bad(f"weights[{i}] must be a list of {k} numbers")
        vocab = {f: i for i, f in enumerate(features)}
        if len(vocab) != len(features):
            raise bad("'features' has duplicates")
        bias, thresholds, platt = data.get("bias"), data.get("thresholds"), data.get("platt")
        for name, value in (("bias", bias), ("thresholds", thresholds)):
            if not (isinstance(value, list) and len(value) == k and all(_is_number(x) for x in value)):
                raise bad(f"{name!r} must be a list of {k} numbers")
        if not all(0.0 < t < 1.0 for t in thresholds):
            raise bad("'thresholds' must lie strictly between 0 and 1")
        if not (isinstance(platt, list) and len(platt) == k and all(
                isinstance(p, list) and len(p) == 2 and all(_is_number(x) for x in p) for p in platt)):
            raise bad(f"'platt' must be a list of {k} [a, b] pairs")
        veto = data.get("rule_veto")
        if veto is not None and not (isinstance(veto, dict) and set(veto) <= set(HEADS) and all(
                _is_number(v) and 0.0 <= v < 1.0 for v in veto.values())):
            raise bad(f"'rule_veto' must map heads of {list(HEADS)} to numbers in [0, 1)")
        return cls(vocab, weights, bias, platt, thresholds, {key: data.get(key) for key in ("training", "cv", "seed")},
                   veto)

    # ---- scoring ----
    def raw_scores(self, turns: Sequence[str]) -> list[float]:
        """The linear score of each head for a window of user messages."""
        idx, values = [], []
        for feat, value in window_features(turns).items():
            i = self.vocab.get(feat)
            if i is not None:
                idx.append(i)
                values.append(value)
        z = np.asarray(self.bias, dtype=np.float64)
        if idx:
            z = z + np.asarray(values) @ self.weights[idx]
        return [float(v) for v in z]

    def scores(self, turns: Sequence[str]) -> dict[str, float]:
        """Calibrated probability per head for a window of user messages."""
        return {head: _sigmoid(a * z + b) for head, z, (a, b) in zip(HEADS, self.raw_scores(turns), self.platt, strict=True)}

    def fires(self, turns: Sequence[str]) -> set[str]:
        """Heads whose calibrated score reaches the threshold on this window."""
        s = self.scores(turns)
        return {h for h, t in zip(HEADS, self.thresholds, strict=True) if s[h] >= t}

    def vetoes(self, category: str, suppress_answer: bool, scores: dict[str, float]) -> bool:
        """Whether a rule hit of `category` (a method rule when `suppress_answer`) on an informational
        message is dropped: every head it concerns scores below its ``rule_veto`` threshold."""
        heads = [category] + (["self_harm_method"] if suppress_answer else [])
        return all(h in self.rule_veto and scores.get(h, 1.0) < self.rule_veto[h] for h in heads)

    def assess(self, turns: Sequence[str]) -> ClassifierVerdict:
        """What fires at the latest of `turns` (the window, oldest first): a head fires when the latest
        message alone fires it, or the window does and the window ending one turn earlier did not."""
        turns = [t for t in turns if t.strip()]
        if not turns:
            return ClassifierVerdict({h: 0.0 for h in HEADS}, ())
        scores = self.scores(turns)
        window = {h for h, t in zip(HEADS, self.thresholds, strict=True) if scores[h] >= t}
        if window and len(turns) > 1:
            alone = self.fires(turns[-1:])
            before = self.fires(turns[:-1])
            window = {h for h in window if h in alone or h not in before}
        return ClassifierVerdict(scores, tuple(h for h in HEADS if h in window))


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@functools.lru_cache(maxsize=4)
def _load_cached(path: str) -> SafetyClassifier:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SafetyClassifierError(f"safety classifier weights file not found: {p}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetyClassifierError(f"{p}: not valid JSON ({e})") from None
    return SafetyClassifier.from_dict(data, str(p))


def iter_feature_names(turns_list: Iterable[Sequence[str]]) -> Iterable[str]:
    """Every feature name of every window (for building a vocabulary)."""
    for turns in turns_list:
        yield from window_features(turns)
