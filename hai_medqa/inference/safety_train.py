"""Train the safety classifier (``safety_classifier.json``) from the training corpus, deterministically.

    python -m hai_medqa.inference.safety_train [--output hai_medqa/inference/safety_classifier.json]

Training data:

- the corpus in ``hai_medqa/resources/safety_train/*.txt`` (written for this purpose; format in that
  folder's README): sections of paraphrases, each with its labels, single messages or user turns
  joined by `` || ``;
- the evaluation sets named in ``TRAIN_EVAL_SETS`` (already spent as held-out measures; see
  ``hai_medqa/resources/safety_eval/README.md``), judgement items left out.

Each message also gets deterministic noisy copies (spacing removed or shifted, common typos,
trailing ㅠㅠ / !! / ?), at a lower weight, in the same cross-validation group as its original
(a group is one corpus line, or one evaluation item, with its copies and its dialogue prefixes).
Three logistic-regression heads are fitted jointly by full-batch Adam (fixed steps, fixed seed,
numpy only). Grouped k-fold cross-validation gives out-of-fold scores, which fit each head's Platt calibration and choose its threshold:
the lowest threshold whose out-of-fold false-alarm rate on ordinary messages stays within the budget.
The final model is trained on everything; the file records the data files' SHA-256, the seed, the
settings, the thresholds and the cross-validated figures (classifier alone, and rules OR classifier).
The rules' veto on informational messages (``rule_veto``, see ``safety.py``) takes, per head, the
lowest out-of-fold score of a positive that a rule catches on an informational message (at most
``VETO_MAX``; a method rule's hit counts only where the method head's own veto would drop it), so no
such training positive loses its rule hit.
Rebuilding from the same data gives the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from loguru import logger

from hai_medqa.cli import run_cli
from hai_medqa.errors import HaiMedQAError
from hai_medqa.inference.safety_classifier import (
    DEFAULT_WEIGHTS_PATH,
    FORMAT,
    FORMAT_VERSION,
    HEADS,
    SafetyClassifier,
    window_features,
)

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
DEFAULT_CORPUS_DIR = RESOURCES / "safety_train"
EVAL_DIR = RESOURCES / "safety_eval"
# evaluation sets folded into training (each was run once as a held-out measure before; README record)
TRAIN_EVAL_SETS = ("main", "round2", "round3", "round4", "round5", "round6", "round7", "round8", "round9",
                   "round10", "round11")
SEED = 20261130
FOLDS = 5
STEPS = 400
LEARNING_RATE = 0.05
L2 = 5e-6
AUGMENT_WEIGHT = 0.5
MIN_FEATURE_GROUPS = 2
WEIGHT_DECIMALS = 4
# out-of-fold false alarms each head may ADD to the rules' own, as a share of ordinary messages (the
# method head: of all messages that are no method request); the target is 5% for everything
FA_BUDGET = {"emergency": 0.012, "self_harm": 0.012, "self_harm_method": 0.004}
# a rule hit on an informational message is vetoed below this calibrated score at most (the threshold
# itself is the lowest out-of-fold score of a rule-caught positive on an informational message)
VETO_MAX = 0.5
# the operating point (after round 10): the emergency and self-harm heads' budgets are chosen from this
# grid on the cross-validated figures of the whole detector (rules OR classifier, with the veto): the
# pair with the fewest CV ordinary false alarms whose CV emergency and self-harm recall both stay at or
# above RECALL_FLOOR (ties: the smaller budgets); FA_BUDGET when no pair reaches the floor
BUDGET_GRID = (0.0, 0.002, 0.004, 0.006, 0.008, 0.01, 0.012, 0.015, 0.02)
RECALL_FLOOR = 0.95
LABELS = ("emergency", "self_harm", "self_harm_method", "none")
TURN_SEPARATOR = "||"
_SECTION = re.compile(r"^##\s*([A-Za-z0-9_.-]+)\s*:\s*(.+?)\s*$")


class SafetyTrainError(HaiMedQAError, ValueError):
    """The training corpus is missing or malformed (names the file and line)."""


@dataclass(frozen=True)
class Example:
    """One training window: user turns (oldest first), labels per head, CV group, weight."""

    turns: tuple[str, ...]
    y: tuple[int, int, int]
    group: str
    weight: float = 1.0
    original: bool = True
    source: str = "corpus"


def _labels_to_y(labels: set[str]) -> tuple[int, int, int]:
    if "self_harm_method" in labels:
        labels = labels | {"self_harm"}
    return tuple(int(h in labels) for h in HEADS)  # type: ignore[return-value]


def read_corpus_file(path: Path) -> list[Example]:
    """Examples of one corpus file (sections ``## id: labels`` then one message or dialogue a line)."""
    examples: list[Example] = []
    section, y = None, None
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or (line.startswith("#") and not line.startswith("##")):
                continue
            m = _SECTION.match(line)
            if line.startswith("##"):
                if not m:
                    raise SafetyTrainError(f"{path}:{lineno}: a section line is '## name: labels'")
                labels = set(m.group(2).split())
                if not labels or labels - set(LABELS) or ("none" in labels and len(labels) > 1):
                    raise SafetyTrainError(f"{path}:{lineno}: labels must be 'none' or some of "
                                           f"{', '.join(LABELS[:-1])}, got {m.group(2)!r}")
                section = f"{path.stem}/{m.group(1)}"
                y = _labels_to_y(labels - {"none"})
                continue
            if section is None or y is None:
                raise SafetyTrainError(f"{path}:{lineno}: text before the first '## name: labels' section")
            turns = tuple(t.strip() for t in line.split(TURN_SEPARATOR))
            if any(not t for t in turns):
                raise SafetyTrainError(f"{path}:{lineno}: an empty turn")
            # one CV group per line (with its noisy copies and, for a dialogue, its prefixes)
            group = f"{section}#{lineno}"
            if any(y) or len(turns) == 1:
                examples.append(Example(turns, y, group))
            else:  # an ordinary dialogue: no turn may fire, so every prefix is a negative
                examples.extend(Example(turns[: k + 1], y, group) for k in range(len(turns)))
    return examples


def corpus_files(corpus_dir: Path) -> list[Path]:
    files = sorted(corpus_dir.glob("*.txt"))
    if not files:
        raise SafetyTrainError(f"no training corpus (*.txt) in {corpus_dir}")
    return files


def eval_examples(set_names: Sequence[str]) -> tuple[list[Example], dict[str, Path]]:
    """Examples from evaluation sets (judgement items left out) and the data dirs used."""
    from hai_medqa.inference.safety_eval import DEFAULT_DATA_DIR, load_items

    out: list[Example] = []
    dirs: dict[str, Path] = {}
    for name in set_names:
        d = DEFAULT_DATA_DIR if name == "main" else DEFAULT_DATA_DIR / name
        dirs[name] = d
        for item in load_items(d):
            if item.group == "judgement":
                continue
            users = tuple(m["content"] for m in item.messages if m["role"] == "user")
            labels = set(item.expect) | ({"self_harm_method"} if item.suppress else set())
            y = _labels_to_y(labels)
            group = f"eval/{name}/{item.id}"
            if any(y) or len(users) == 1:
                out.append(Example(users, y, group, source=f"eval/{name}"))
            else:
                out.extend(Example(users[: k + 1], y, group, source=f"eval/{name}") for k in range(len(users)))
    return out, dirs


# ---- deterministic noise: the spellings people type ----
_TYPO_SWAPS = (("돼", "되"), ("되", "돼"), ("않", "안"), ("었", "엇"), ("했", "햇"), ("습니다", "슴다"), ("어요", "어여"),
               ("해요", "해여"), ("네요", "네여"), ("세요", "셰요"), ("같아요", "가타요"), ("진짜", "진자"), ("너무", "넘"),
               ("빨리", "빨랑"), ("괜찮", "괜찬"), ("숨을", "숨을"), ("싶어", "시퍼"), ("싶다", "십다"), ("아파", "아퍼"))
_TAILS = ("ㅠㅠ", "ㅜㅜ", "...", "!!", "?", " ㅠ", "..ㅠ", "")


def _noisy(text: str, rng: random.Random) -> str:
    ops = rng.sample(range(5), k=2)
    out = text
    for op in ops:
        if op == 0:  # all spaces gone
            out = out.replace(" ", "")
        elif op == 1 and " " in out:  # one space dropped
            idx = [i for i, ch in enumerate(out) if ch == " "]
            i = rng.choice(idx)
            out = out[:i] + out[i + 1:]
        elif op == 2 and len(out) > 3:  # one space added inside a word
            i = rng.randrange(1, len(out) - 1)
            out = out[:i] + " " + out[i:]
        elif op == 3:
            swaps = [(a, b) for a, b in _TYPO_SWAPS if a in out and a != b]
            if swaps:
                a, b = rng.choice(swaps)
                out = out.replace(a, b, 1)
        elif op == 4:
            out = out.rstrip(".!?~ ") + rng.choice(_TAILS)
    return out if out.strip() else text


def augment(examples: Sequence[Example], seed: int = SEED, copies: int = 2) -> list[Example]:
    """The originals plus `copies` noisy versions of each (latest turn changed), same group, lower weight."""
    rng = random.Random(seed)
    out = list(examples)
    for ex in examples:
        seen = {ex.turns[-1]}
        for _ in range(copies):
            noisy = _noisy(ex.turns[-1], rng)
            if noisy in seen:
                continue
            seen.add(noisy)
            out.append(Example(ex.turns[:-1] + (noisy,), ex.y, ex.group, AUGMENT_WEIGHT, False, ex.source))
    return out


# ---- sparse design matrix and logistic regression (numpy only) ----
@dataclass
class Design:
    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    rows: np.ndarray  # row index of each stored value
    n_features: int

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    def dot(self, w: np.ndarray) -> np.ndarray:
        prod = self.values[:, None] * w[self.indices]
        out = np.zeros((self.n_rows, w.shape[1]))
        starts = self.indptr[:-1]
        nonempty = self.indptr[1:] > starts
        out[nonempty] = np.add.reduceat(prod, starts[nonempty], axis=0)
        return out

    def tdot(self, g: np.ndarray) -> np.ndarray:
        gv = g[self.rows] * self.values[:, None]
        return np.stack([np.bincount(self.indices, weights=gv[:, h], minlength=self.n_features)
                         for h in range(g.shape[1])], axis=1)


def build_vocab(feature_dicts: Sequence[dict[str, float]], groups: Sequence[str],
                min_groups: int = MIN_FEATURE_GROUPS) -> list[str]:
    """Features seen in at least `min_groups` CV groups (a feature of one sentence and its noisy copies
    only is noise), sorted."""
    seen: dict[str, set[str]] = {}
    for fd, g in zip(feature_dicts, groups, strict=True):
        for f in fd:
            s = seen.setdefault(f, set())
            if len(s) < min_groups:
                s.add(g)
    return sorted(f for f, s in seen.items() if len(s) >= min_groups)


def design(feature_dicts: Sequence[dict[str, float]], vocab: dict[str, int]) -> Design:
    indptr, indices, values, rows = [0], [], [], []
    for r, fd in enumerate(feature_dicts):
        cols = sorted((vocab[f], v) for f, v in fd.items() if f in vocab)
        for c, v in cols:
            indices.append(c)
            values.append(v)
            rows.append(r)
        indptr.append(len(indices))
    return Design(np.asarray(indptr, dtype=np.int64), np.asarray(indices, dtype=np.int64),
                  np.asarray(values, dtype=np.float64), np.asarray(rows, dtype=np.int64), len(vocab))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def fit_logistic(x: Design, y: np.ndarray, sample_weight: np.ndarray, steps: int = STEPS,
                 lr: float = LEARNING_RATE, l2: float = L2) -> tuple[np.ndarray, np.ndarray]:
    """Weights (features x heads) and bias (heads) of class-balanced, L2-regularised logistic regression."""
    n, k = y.shape
    # class balance per head: positives and negatives carry equal total weight
    cw = np.empty((n, k))
    for h in range(k):
        pos = y[:, h] == 1
        wp, wn = sample_weight[pos].sum(), sample_weight[~pos].sum()
        cw[:, h] = sample_weight * np.where(pos, 0.5 / max(wp, 1e-12), 0.5 / max(wn, 1e-12))
    w = np.zeros((x.n_features, k))
    b = np.zeros(k)
    m_w, v_w, m_b, v_b = np.zeros_like(w), np.zeros_like(w), np.zeros(k), np.zeros(k)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for t in range(1, steps + 1):
        p = _sigmoid(x.dot(w) + b)
        g = (p - y) * cw
        gw = x.tdot(g) + l2 * w
        gb = g.sum(axis=0)
        m_w = beta1 * m_w + (1 - beta1) * gw
        v_w = beta2 * v_w + (1 - beta2) * gw * gw
        m_b = beta1 * m_b + (1 - beta1) * gb
        v_b = beta2 * v_b + (1 - beta2) * gb * gb
        step = lr * np.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        w -= step * m_w / (np.sqrt(v_w) + eps)
        b -= step * m_b / (np.sqrt(v_b) + eps)
    return w, b


def fit_platt(z: np.ndarray, y: np.ndarray, iters: int = 50) -> tuple[float, float]:
    """(a, b) of p = sigmoid(a z + b), fitted by Newton's method with Platt's smoothed targets."""
    n_pos, n_neg = float(y.sum()), float(len(y) - y.sum())
    t = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    a, b = 1.0, 0.0
    for _ in range(iters):
        p = _sigmoid(a * z + b)
        r = p - t
        s = np.maximum(p * (1 - p), 1e-12)
        g = np.array([np.dot(r, z), r.sum()])
        hmat = np.array([[np.dot(s, z * z) + 1e-9, np.dot(s, z)], [np.dot(s, z), s.sum() + 1e-9]])
        delta = np.linalg.solve(hmat, g)
        a, b = a - delta[0], b - delta[1]
        if np.abs(delta).max() < 1e-10:
            break
    return float(a), float(b)


def fold_of(group: str, folds: int, seed: int) -> int:
    """A group's fold, fixed by a hash of the group name and the seed (no dependence on order)."""
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % folds


def choose_threshold(p: np.ndarray, positive: np.ndarray, negative: np.ndarray, max_false: int) -> float:
    """The lowest threshold at which at most `max_false` of the `negative` rows reach it (so recall on
    `positive` rows is as high as the false-alarm budget allows), clipped to [0.05, 0.99]."""
    neg = np.sort(p[negative])[::-1]
    bar = neg[max_false] if max_false < len(neg) else 0.0  # the threshold must sit above this score
    cand = np.sort(np.unique(p[positive & (p > bar)]))
    thr = float(cand[0]) if len(cand) else float(min(0.99, bar + 1e-6))
    return float(min(max(thr, 0.05), 0.99))


def _rate(k: int, n: int) -> dict:
    return {"k": int(k), "n": int(n), "rate": round(k / n, 4) if n else None}


def cv_figures(examples: Sequence[Example], fired: np.ndarray, rules: np.ndarray | None = None) -> dict:
    """Recall per category and false alarms on ordinary items, over original examples only.
    `fired`: rows x heads booleans (classifier); `rules`: rows x (emergency, self_harm, suppress)."""
    orig = np.array([e.original for e in examples])
    y = np.array([e.y for e in examples])
    det = fired if rules is None else (fired | rules)
    det_sh = det[:, 1] | det[:, 2]  # a method head firing shows the self-harm notice too
    ordinary = orig & (y.sum(axis=1) == 0)
    em, sh, me = orig & (y[:, 0] == 1), orig & (y[:, 1] == 1) & (y[:, 2] == 0), orig & (y[:, 2] == 1)
    any_fire = det[:, 0] | det_sh
    # an ordinary dialogue is one group of prefixes: a false alarm if any prefix fires
    groups: dict[str, bool] = {}
    for i in np.flatnonzero(ordinary):
        key = examples[i].group + "\x00" + examples[i].turns[0] if len(examples[i].turns) > 1 else f"{i}"
        groups[key] = groups.get(key, False) or bool(any_fire[i])
    wrongly = orig & (y[:, 2] == 0)
    return {
        "emergency_recall": _rate(det[em, 0].sum(), em.sum()),
        "self_harm_recall": _rate(det_sh[sh].sum(), sh.sum()),
        "self_harm_method_suppressed": _rate((det[me, 2]).sum(), me.sum()),
        "ordinary_false_alarm": _rate(sum(groups.values()), len(groups)),
        "wrongly_suppressed": _rate(det[wrongly, 2].sum(), wrongly.sum()),
    }


def rule_hits(examples: Sequence[Example]) -> tuple[list[list[tuple[str, bool]]], np.ndarray]:
    """The rules alone on each original example: its hits as (category, suppress_answer), and whether
    its latest message is informational (``SafetyLayer.is_informational``)."""
    from hai_medqa.inference.safety import SafetyLayer

    layer = SafetyLayer(classifier=False)
    hits: list[list[tuple[str, bool]]] = [[] for _ in examples]
    info = np.zeros(len(examples), dtype=bool)
    for i, ex in enumerate(examples):
        if not ex.original:
            continue
        hits[i] = [(h.category, h.suppress_answer) for h in layer.check([{"role": "user", "content": t} for t in ex.turns])]
        info[i] = bool(hits[i]) and layer.is_informational(ex.turns[-1])
    return hits, info


def rules_matrix(hits: Sequence[Sequence[tuple[str, bool]]], info: np.ndarray | None = None,
                 probs: np.ndarray | None = None, veto: dict[str, float] | None = None) -> np.ndarray:
    """(emergency, self_harm, suppress) of the rules at each example's latest turn; with `veto`, a hit
    on an informational example is dropped where every head it concerns scores below its veto."""
    out = np.zeros((len(hits), 3), dtype=bool)
    col = {h: j for j, h in enumerate(HEADS)}
    for i, row in enumerate(hits):
        for category, suppress in row:
            if veto is not None and info is not None and probs is not None and info[i]:
                heads = [category] + (["self_harm_method"] if suppress else [])
                if all(h in veto and probs[i, col[h]] < veto[h] for h in heads):
                    continue
            out[i, col[category]] = True
            out[i, 2] |= suppress
    return out


def choose_veto(probs: np.ndarray, y: np.ndarray, orig: np.ndarray, hits: Sequence[Sequence[tuple[str, bool]]],
                info: np.ndarray) -> dict[str, float]:
    """Per head, the lowest out-of-fold score among positives a rule of that head catches on an
    informational message (capped at VETO_MAX): below it a rule hit on such a message is vetoed.

    A method rule's hit (``suppress_answer``) is vetoed only when the self-harm AND the method head
    both score below their vetoes, so the method head's veto is chosen first, and a self-harm positive
    whose only rule hits are method hits kept by that veto does not lower the self-harm veto (one such
    positive used to pin it near 0.14). No rule-caught training positive loses its hit either way."""
    col = {head: h for h, head in enumerate(HEADS)}
    veto: dict[str, float] = {}

    def lowest(head: str, at_risk: list[int]) -> float:
        low = min((float(probs[i, col[head]]) for i in at_risk), default=VETO_MAX)
        return round(min(VETO_MAX, low), 6)

    def rows(head: str) -> np.ndarray:
        return np.flatnonzero(orig & info & (y[:, col[head]] == 1))

    veto["self_harm_method"] = lowest("self_harm_method", [i for i in rows("self_harm_method")
                                                           if any(s for _, s in hits[i])])
    for head in ("emergency", "self_harm"):
        at_risk = []
        for i in rows(head):
            own = [s for c, s in hits[i] if c == head]
            # a suppressing hit survives while the method head scores at or above its veto
            if any(not s or probs[i, col["self_harm_method"]] < veto["self_harm_method"] for s in own):
                at_risk.append(i)
        veto[head] = lowest(head, at_risk)
    return {head: veto[head] for head in HEADS}


def choose_operating_point(examples: Sequence[Example], probs: np.ndarray, threshold, rules: np.ndarray
                           ) -> tuple[dict[str, float], dict]:
    """The emergency and self-harm heads' false-alarm budgets (``BUDGET_GRID``): the pair whose
    cross-validated detector (`rules`: the rules with the veto, OR the classifier at those thresholds)
    has the fewest ordinary false alarms while CV emergency and self-harm recall stay >= RECALL_FLOOR;
    ties go to the smaller budgets. ``FA_BUDGET`` when no pair reaches the floor. Deterministic."""
    method_thr = threshold(2, FA_BUDGET["self_harm_method"])
    em_thr = {b: threshold(0, b) for b in BUDGET_GRID}
    sh_thr = {b: threshold(1, b) for b in BUDGET_GRID}
    best = None
    for be in BUDGET_GRID:
        for bs in BUDGET_GRID:
            fig = cv_figures(examples, probs >= np.array([em_thr[be], sh_thr[bs], method_thr]), rules)
            if min(fig["emergency_recall"]["rate"], fig["self_harm_recall"]["rate"]) < RECALL_FLOOR:
                continue
            key = (fig["ordinary_false_alarm"]["k"], be + bs, be)
            if best is None or key < best[0]:
                best = (key, be, bs, fig)
    info = {"recall_floor": RECALL_FLOOR, "grid": list(BUDGET_GRID)}
    if best is None:
        return dict(FA_BUDGET), {**info, "chosen": False}
    _, be, bs, fig = best
    budgets = {"emergency": be, "self_harm": bs, "self_harm_method": FA_BUDGET["self_harm_method"]}
    return budgets, {**info, "chosen": True, "budgets": budgets, "cv": fig}


def denial_masker():
    """The chat's negation scope (``SafetyLayer.mask_denials`` of the bundled rules): the classifier is
    trained on what it is shown in chat, user messages without the clauses that deny a red flag."""
    from hai_medqa.inference.safety import SafetyLayer

    return SafetyLayer(classifier=False).mask_denials


def masked_turns(turns: Sequence[str], mask) -> tuple[str, ...]:
    """`turns` as the classifier sees them in chat: denials masked, empty turns dropped; nothing when the
    latest turn was only a denial (the layer then scores nothing at that turn)."""
    masked = [mask(t) for t in turns]
    if not masked or not masked[-1].strip():
        return ()
    return tuple(t for t in masked if t.strip())


def sha256_path(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def data_hashes(corpus_dir: Path, eval_sets: Sequence[str]) -> dict[str, str]:
    """SHA-256 of every training data file, by a repository-independent name."""
    from hai_medqa.inference.safety_eval import DATA_FILES, DEFAULT_DATA_DIR

    out = {f"safety_train/{p.name}": sha256_path(p) for p in corpus_files(corpus_dir)}
    for name in eval_sets:
        d = DEFAULT_DATA_DIR if name == "main" else DEFAULT_DATA_DIR / name
        for f in DATA_FILES:
            out[f"safety_eval/{name}/{f}"] = sha256_path(d / f)
    return out


def load_training_examples(corpus_dir: Path, eval_sets: Sequence[str]) -> list[Example]:
    examples: list[Example] = []
    for path in corpus_files(corpus_dir):
        examples.extend(read_corpus_file(path))
    if eval_sets:
        examples.extend(eval_examples(eval_sets)[0])
    return examples


def train(corpus_dir: Path = DEFAULT_CORPUS_DIR, eval_sets: Sequence[str] = TRAIN_EVAL_SETS, *, seed: int = SEED,
          folds: int = FOLDS, steps: int = STEPS, with_rules: bool = True) -> dict:
    """The weights file's content (a JSON-ready dict), trained and cross-validated deterministically."""
    started = time.perf_counter()
    hashes = data_hashes(corpus_dir, eval_sets)  # before reading: what the file records is what was read
    base = load_training_examples(corpus_dir, eval_sets)
    examples = augment(base, seed)
    logger.info(f"{len(base)} examples ({len(examples)} with noisy copies) from {corpus_dir} and {list(eval_sets)}")
    mask = denial_masker()
    feats = [window_features(masked_turns(e.turns, mask)) for e in examples]
    y = np.array([e.y for e in examples], dtype=np.float64)
    sw = np.array([e.weight for e in examples])
    groups = [e.group for e in examples]
    fold = np.array([fold_of(g, folds, seed) for g in groups])
    orig = np.array([e.original for e in examples])
    ordinary = orig & (y.sum(axis=1) == 0)

    # grouped k-fold: out-of-fold raw scores (vocabulary from the training folds only)
    oof = np.zeros_like(y)
    for k in range(folds):
        tr = fold != k
        vocab_list = build_vocab([feats[i] for i in np.flatnonzero(tr)], [groups[i] for i in np.flatnonzero(tr)])
        vocab = {f: i for i, f in enumerate(vocab_list)}
        x_tr = design([feats[i] for i in np.flatnonzero(tr)], vocab)
        w, b = fit_logistic(x_tr, y[tr], sw[tr], steps=steps)
        x_te = design([feats[i] for i in np.flatnonzero(~tr)], vocab)
        oof[~tr] = x_te.dot(w) + b
        logger.info(f"fold {k + 1}/{folds}: {int(tr.sum())} train rows, {len(vocab_list)} features")

    # the rules fire on some ordinary messages anyway: the classifier's budget counts only the others
    if with_rules:
        hits, info = rule_hits(examples)
    else:
        hits, info = [[] for _ in examples], np.zeros(len(examples), dtype=bool)
    rules = rules_matrix(hits)
    rules_fired = rules.any(axis=1)
    platt, probs = [], np.zeros_like(oof)
    for h in range(len(HEADS)):
        a, bb = fit_platt(oof[:, h], y[:, h])
        platt.append([round(a, 6), round(bb, 6)])
        probs[:, h] = _sigmoid(a * oof[:, h] + bb)

    def threshold(h: int, budget: float) -> float:
        # the method head withholds answers: its false alarms count on every message that is no request
        neg = ordinary if HEADS[h] != "self_harm_method" else (orig & (y[:, 2] == 0))
        max_false = int(np.floor(budget * neg.sum()))
        return round(choose_threshold(probs[:, h], orig & (y[:, h] == 1), neg & ~rules_fired, max_false), 6)

    veto = choose_veto(probs, y, orig, hits, info)
    budgets = dict(FA_BUDGET)
    operating_point = {"chosen": False, "recall_floor": RECALL_FLOOR, "grid": list(BUDGET_GRID)}
    if with_rules:
        budgets, operating_point = choose_operating_point(examples, probs, threshold,
                                                          rules_matrix(hits, info, probs, veto))
    thresholds = [threshold(h, budgets[head]) for h, head in enumerate(HEADS)]
    fired = probs >= np.array(thresholds)
    cv = {"folds": folds, "grouping": "one corpus line or evaluation item (with its noisy copies and dialogue prefixes)",
          "classifier_only": cv_figures(examples, fired), "operating_point": operating_point}
    if with_rules:
        cv["rules_only"] = cv_figures(examples, np.zeros_like(fired), rules)
        cv["rules_or_classifier_no_veto"] = cv_figures(examples, fired, rules)
        cv["rules_or_classifier"] = cv_figures(examples, fired, rules_matrix(hits, info, probs, veto))
        cv["informational_rule_hits"] = int(info.sum())

    # the final model: every example
    vocab_list = build_vocab(feats, groups)
    vocab = {f: i for i, f in enumerate(vocab_list)}
    w, b = fit_logistic(design(feats, vocab), y, sw, steps=steps)
    w = np.round(w, WEIGHT_DECIMALS)
    keep = np.flatnonzero(np.abs(w).max(axis=1) > 0)  # features every head ignores are dropped
    by_source: dict[str, int] = {}
    for e in base:
        by_source[e.source] = by_source.get(e.source, 0) + 1
    out = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "heads": list(HEADS),
        "seed": seed,
        "training": {
            "command": "python -m hai_medqa.inference.safety_train",
            "data_sha256": hashes,
            "eval_sets_trained_on": list(eval_sets),
            "examples": len(base), "examples_with_noisy_copies": len(examples), "examples_by_source": by_source,
            "settings": {"folds": folds, "steps": steps, "learning_rate": LEARNING_RATE, "l2": L2,
                         "augment_weight": AUGMENT_WEIGHT, "min_feature_groups": MIN_FEATURE_GROUPS,
                         "fa_budget_per_head": budgets, "weight_decimals": WEIGHT_DECIMALS,
                         "veto_max": VETO_MAX},
        },
        "cv": cv,
        "thresholds": thresholds,
        "rule_veto": veto,
        "platt": platt,
        "bias": [round(float(v), WEIGHT_DECIMALS) for v in b],
        "features": [vocab_list[i] for i in keep],
        "weights": [[float(v) for v in w[i]] for i in keep],
    }
    logger.info(f"trained in {time.perf_counter() - started:.1f} s: {len(keep)} features, thresholds {thresholds}, "
                f"rule veto {veto}")
    return out


def dumps(weights: dict) -> str:
    """The file's exact text (sorted keys, fixed separators) so a rebuild is byte-identical."""
    return json.dumps(weights, ensure_ascii=False, sort_keys=True, separators=(",", ":")) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hai_medqa.inference.safety_train",
                                description="Train the safety classifier from the training corpus (deterministic).")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS_DIR), help="folder of training corpus *.txt files")
    p.add_argument("--eval-sets", default=",".join(TRAIN_EVAL_SETS),
                   help="evaluation sets folded into training (comma-separated: main, round2, ...; '' for none)")
    p.add_argument("--output", default=str(DEFAULT_WEIGHTS_PATH), help="weights file to write (.json)")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--folds", type=int, default=FOLDS)
    p.add_argument("--no-rules-cv", action="store_true", help="skip the rules' cross-validated figures (faster)")
    return p


def main(argv: list[str] | None = None) -> int:
    from hai_medqa.io_utils import atomic_write_text

    args = build_parser().parse_args(argv)
    output = Path(args.output)
    corpus = Path(args.corpus)
    if output.suffix != ".json":
        raise SafetyTrainError(f"--output must be a .json file: {output}")
    if output.resolve().parent == corpus.resolve():
        raise SafetyTrainError(f"--output may not land in the corpus folder: {output}")
    eval_sets = [s for s in args.eval_sets.split(",") if s]
    weights = train(corpus, eval_sets, folds=args.folds, steps=args.steps, with_rules=not args.no_rules_cv)
    text = dumps(weights)
    SafetyClassifier.from_dict(json.loads(text), str(output))  # what is written must load
    atomic_write_text(output, text)
    print(json.dumps({"thresholds": weights["thresholds"], "rule_veto": weights["rule_veto"], "cv": weights["cv"]},
                     indent=1))
    print(f"written: {output}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """Entry point: the project's one CLI wrapper (a user error is one line and exit 1)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
