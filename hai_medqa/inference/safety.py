"""Safety layer for chat: emergency (119) and self-harm (109 / 1577-0199) routing, plus a disclaimer.

The rules live in ONE data file, ``safety_keywords.json`` beside this module (its ``_about`` explains
the rule language). What the layer reads is the conversation: the last ``window_user_turns`` user
messages (assistant turns are never read), so "가슴이 조여요" followed by "그리고 숨 쉬기도 힘들어요"
fires like the two sentences in one message. Each message is matched in two views:

- the *text* view: NFKC, lower-case, all whitespace removed ("숨 쉬기" and "숨쉬기" match alike);
- the *lemma* view (patterns written ``lemma:...``): the kiwipiepy morphemes, predicates as their
  dictionary form, e.g. "숨도 안 쉬어져요" -> `` 숨 도 안 쉬다 어 지다 어요 `` (English words stay
  words), so one pattern covers every inflection of 쉬다 / 조이다 / 쓰러지다.

A rule fires at the latest turn when its patterns are found in the window AND the latest message
itself matches at least one of them (so a notice is shown when a message completes the picture). A rule marked ``suppress_answer`` (requests for self-harm methods) makes
the caller show only the guidance and no model answer.

Beside the rules runs a small trained classifier (``safety_classifier.py``, weights in
``safety_classifier.json``, trained by ``python -m hai_medqa.inference.safety_train``): a category
fires when the rules OR the classifier fire, so the rules are a floor and the classifier adds the
wording the rules never anticipated. Its hits carry the rule name ``classifier:<head>``; its
``self_harm_method`` head shows the self-harm notice and withholds the answer like a method rule.
``SafetyLayer(classifier=False)`` gives the rules alone.

Rule matches on *informational* messages (the rules file's ``informational`` patterns: questions
about causes, differences, statistics, prevention, hearsay, fiction or past events, and none of its
``situation`` patterns: no first person, no "지금 / 방금 / 우리 아이") are vetoed when the classifier
scores the window low for that category (below the weights file's ``rule_veto`` thresholds, chosen by
cross-validation so that no rule-caught positive of the training data is vetoed). A first-person
present statement ("숨이 안 쉬어져요", "죽고 싶어요") is never vetoed: the rules stay its floor.

**Continuation** (after round 8; the rules file's ``continuation`` block): a category that fired at the
previous user turn (by a rule, the classifier or this rule) fires again at the latest turn, as
``continuation:<category>``, when the latest turn carries the situation on - the answer to the
assistant's follow-up ("아니요 ㅠ 소리를 못 내요"), a duration ("벌써 6분째"), a worsening detail -
that matches nothing by itself. It does not when the latest turn resolves the situation (a
``resolved`` pattern such as "괜찮아졌어요", "멀쩡해요 지금 잘 놀고 있어요", "구급차 불렀어요", a denied red
flag "식은땀 그런 건 없어요", thanks or a closing "감사합니다 쉬어볼게요", and no ``worse`` pattern), changes
topic (``topic_change``, which after round 10 includes care logistics: insurance, cost, "상담 받으면
나아질까요"), or is informational (``is_informational``). Nor is a notice carried on from a turn that was
itself informational or told a past, resolved event (the block's ``past`` patterns; ``carries``).
The chain stays inside the window: at most ``window_user_turns - 1`` turns back, and a resolved turn
breaks it. Continuation never withholds an answer (a method request must be recognised as such).

**Exclusions after round 9** (words in the rules file's ``terms``, used in rules' ``none`` lists, so a
turn that matches them cannot contribute to that rule): degree and figurative breath words
(``breath_figurative``: "숨 막히게 더운", "숨이 안 쉬어질 정도로 웃었더니", a boss who is "suffocating")
and English nose-only complaints (``l_en_nose_only``) in the two breath rules; clearly past events now
in rehabilitation (``past_recovering``: "작년에 ... 지금 재활 중", and no "또 / 다시 / 오늘") in the
collapse, stroke, seizure, arrest and injury rules; near-death past experiences (``near_death_past``:
"죽을 뻔한 적") in the method-question rule. No code: the ``none`` mechanism above does it, and a
present emergency in the same conversation still fires from its own turn.

**Exclusions after round 10** (same mechanism): past events told with a present reassurance
(``past_over``: a past marker - "작년", "N년 전", "고등학교 때", past perfect -었었- - and "지금은 안 해요 /
잘 지내요 / 재활 중", or "안 한 지 N년"; ``l_en_past``: "as a kid", "years ago"; no "또 / 다시 / 오늘") in
the rules that took ``past_recovering``, the drowning and self-injury rules; a parent or teacher asking
about a child's self-harm (``third_person_self_injury``); degree breath with busy / laughing and
anxiety triggers told as a feeling (``breath_degree``, ``l_en_breath_figurative``); denied red flags
("식은땀 그런 건 없어요", "어지럽거나 그런 건 없어요"). A place or time request with a stated intent
("... 어디예요? 뛰어내리려고요") is a method request (help only).

**After round 11: negation scope and finished past** (the rules file's ``denial`` block and terms). Each
user message is split into clauses (``denial.boundary``: sentence ends, commas, "~요 ", "~는데 ", "~지만 ",
"~없고 ", " but "); a clause that denies a red flag with a topic marker ("숨찬 건 없어요", "식은땀 같은 건 안
나요", "숨이 차진 않아요", "죽고 싶다는 생각은 이제 전혀 안 들어요", "no shortness of breath", "not suicidal
anymore") is removed before the rules AND the classifier read the message (``mask_denials``; the training
applies the same masking), unless it is a negative that states the danger (``denial.exempt``: "살고 싶은
마음은 없어요", "살 이유는 없어요", "~밖에 없어요", "의식은 없어요", "기침도 안 나와요", "움직이지는 않아요",
"the bleeding doesn't stop"). The informational test and the continuation block read the message as
written. Terms in ``none`` lists: a finished past told as such (``past_pluperfect``: -었었- with no 지금 /
또 / ~는데; ``past_day_done``, ``l_en_past_day_done``: a one-clause report of an episode on an earlier day,
in the seizure and collapse rules only), hyperbole and degree (``breath_hyperbole``: "죽는 줄 알았어요",
laughter; ``breath_degree_clause``: "숨 넘어가게 뛰었더니"), a dream or sleep paralysis, a breath symptom
resolved in the same message, chest pain reproduced by pressing or moving, old self-harm scars
(``scar_past``), and a carer's question whether a medicine raises suicidal thoughts
(``side_effect_question``). "머리 깨질 것 같아요" alone is an everyday bad headache; with sudden onset,
vomiting, a first-ever headache or vision / neck signs it still fires.

What the layer adds is presentation: guidance before the model's text, a short disclaimer after it.
The model's own text is kept separately (chat history and evaluation use that), so the safety text
never leaks into the next turn's prompt or into metrics. kiwipiepy is loaded once per process, on
first use (a few seconds); every message's analysis is cached.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hai_medqa.errors import HaiMedQAError
from hai_medqa.inference.safety_classifier import DEFAULT_WEIGHTS_PATH, SafetyClassifier

DEFAULT_RULES_PATH = Path(__file__).with_name("safety_keywords.json")
DEFAULT_WINDOW_USER_TURNS = 3
LEMMA_PREFIX = "lemma:"
_TERM_REF = re.compile(r"@\{([A-Za-z_][A-Za-z0-9_]*)\}")
_WHITESPACE = re.compile(r"\s+")
_HANGUL = re.compile(r"[\uac00-\ud7a3]")
# kiwipiepy tags left out of the lemma view: punctuation and symbols (incl. emoticons such as ㅠㅠ).
_DROPPED_TAGS = frozenset({"SF", "SP", "SS", "SSO", "SSC", "SE", "SO", "SW", "SB", "UN", "W_EMOJI"})
# kiwipiepy writes some endings as final-consonant jamo (U+11xx, e.g. the ETM in "쉴 수"); the view
# uses the compatibility jamo a rule writer types (ㄴ ㄹ ㅁ ㅂ).
_JONGSEONG = str.maketrans({"\u11ab": "ㄴ", "\u11af": "ㄹ", "\u11b7": "ㅁ", "\u11b8": "ㅂ", "\u11bb": "ㅆ"})
_ROLE_USER = "user"
CLASSIFIER_RULE_PREFIX = "classifier:"  # SafetyHit.rule of a hit from the trained classifier
CONTINUATION_RULE_PREFIX = "continuation:"  # SafetyHit.rule of a notice carried on from the previous user turn


class SafetyConfigError(HaiMedQAError, ValueError):
    """The safety rules file is missing or malformed (names the file and the broken entry)."""


@dataclass(frozen=True)
class SafetyHit:
    """One rule that fired: category (``emergency`` / ``self_harm``), rule name, matched text, and
    whether the rule withholds the model's answer (requests for self-harm methods)."""

    category: str
    rule: str
    matched: str
    suppress_answer: bool = False


@dataclass(frozen=True)
class SafetyVerdict:
    """What to show for the latest user turn.

    ``notice``: guidance to print BEFORE the answer ('' if nothing fired); ``suppress_answer``: show
    no model answer at all, only ``notice`` and ``withheld`` (the rules file's ``withheld_answer``).
    """

    hits: tuple[SafetyHit, ...]
    categories: tuple[str, ...]
    notice: str
    suppress_answer: bool
    withheld: str = ""


def normalize_for_matching(text: str) -> str:
    """NFKC, lower-case, and drop all whitespace, so spacing variants of Korean phrases match alike."""
    return _WHITESPACE.sub("", unicodedata.normalize("NFKC", text).lower())


def require_kiwipiepy() -> None:
    """One clear line at start-up, before any model is loaded, when kiwipiepy (a requirement: the
    lemma view and the classifier's features) is missing, instead of a traceback at the first message."""
    for name in ("kiwipiepy", "kiwipiepy_model"):
        try:  # find, not import: the ~100 MB analyser still loads lazily, at the first lemma pattern
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: a module blanked out in sys.modules
            found = False
        if not found:
            raise SafetyConfigError(
                f"the chat safety layer needs {name} (in requirements.txt), which is not installed in this "
                "Python: install the project's requirements, or pass --no-safety to chat without the "
                "119/109 notices") from None


@functools.lru_cache(maxsize=1)
def _kiwi():
    # A few seconds and ~100 MB: once per process, and only when a lemma pattern is first used.
    # The model ships in the kiwipiepy_model wheel, so this never touches the network.
    from kiwipiepy import Kiwi

    return Kiwi()


@functools.lru_cache(maxsize=4096)
def analyse(text: str) -> tuple[tuple[str, str], ...]:
    """kiwipiepy's morphemes of `text` as (word, tag): predicates in dictionary form (쉬다, and the
    verb/adjective suffixes 하/되 as 하다/되다), punctuation and symbols dropped, lower-case. Shared
    by the rules' lemma view and the classifier's features (one analysis per message)."""
    text = unicodedata.normalize("NFKC", text or "")
    if not text.strip():
        return ()
    out = []
    for tok in _kiwi().tokenize(text):
        if tok.tag in _DROPPED_TAGS:
            continue
        if tok.tag.startswith("V"):
            word = tok.lemma
        elif tok.tag.startswith(("XSV", "XSA")):  # 하/되 of 자살하다, 곤란하다: kiwipiepy gives no lemma
            word = tok.form + "다"
        else:
            word = tok.form
        out.append((word.translate(_JONGSEONG).lower(), tok.tag))
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def lemma_view(text: str) -> str:
    """The lemma view of `text`: space-separated morphemes, predicates in dictionary form (쉬다, and
    the verb/adjective suffixes 하/되 as 하다/되다),
    punctuation dropped, lower-case, padded with one space on each side (patterns match whole tokens
    by writing `` 숨 `` with spaces)."""
    tokens = [word for word, _ in analyse(text)]
    return " " + " ".join(tokens) + " " if tokens else " "


@dataclass(frozen=True)
class _Pattern:
    lemma: bool
    regex: re.Pattern

    def search(self, turn: _Turn) -> str | None:
        m = self.regex.search(turn.lemma if self.lemma else turn.text)
        return None if m is None else m.group(0).strip()


class _Turn:
    """One user message, its text view now and its lemma view on first use."""

    def __init__(self, content: str):
        self.content = content
        self.text = normalize_for_matching(content)

    @functools.cached_property
    def lemma(self) -> str:
        return lemma_view(self.content)


@dataclass(frozen=True)
class _Rule:
    name: str
    all_of: tuple[tuple[_Pattern, ...], ...]  # every group must match (each group: alternatives)
    any_of: tuple[_Pattern, ...]
    none_of: tuple[_Pattern, ...]  # a turn matching one of these cannot contribute to this rule
    suppress_answer: bool
    same_message: bool = False  # every pattern must match the latest message itself

    def match(self, turns: Sequence[_Turn]) -> str | None:
        """Matched snippets if the rule fires at the last of `turns` (the window), else None."""
        if self.same_message:
            turns = turns[-1:]
        usable = [t for t in turns if not any(p.search(t) is not None for p in self.none_of)]
        if not usable:
            return None
        groups = list(self.all_of) + ([self.any_of] if self.any_of else [])
        snippets: list[str] = []
        latest_contributes = False
        for group in groups:
            found = None
            for turn in reversed(usable):  # prefer the latest turn's match
                for pat in group:
                    snippet = pat.search(turn)
                    if snippet is not None:
                        found = snippet
                        if turn is turns[-1]:
                            latest_contributes = True
                        break
                if found is not None:
                    break
            if found is None:
                return None
            snippets.append(found)
        return " + ".join(snippets) if latest_contributes else None


@dataclass(frozen=True)
class _Continuation:
    categories: tuple[str, ...]
    resolved: tuple[_Pattern, ...]
    worse: tuple[_Pattern, ...]
    topic_change: tuple[_Pattern, ...]
    past: tuple[_Pattern, ...] = ()  # a notice fired on such a turn (a past, resolved event) is not carried on


@dataclass(frozen=True)
class _Denial:
    boundary: re.Pattern  # splits a raw message into clauses (the separators are kept)
    clause: tuple[_Pattern, ...]
    exempt: tuple[_Pattern, ...]
    max_syllables: int = 0  # a longer clause (Hangul syllables) is never masked: the split did not isolate the denial


@functools.lru_cache(maxsize=8192)
def _mask_denials(denial: _Denial, message: str) -> str:
    pieces: list[str] = []
    pos = 0
    for m in denial.boundary.finditer(message):
        if m.end() > pos:
            pieces.append(message[pos:m.end()])  # a clause with the separator that ends it
            pos = m.end()
    pieces.append(message[pos:])
    kept = []
    for piece in pieces:
        turn = _Turn(piece)
        too_long = denial.max_syllables and len(_HANGUL.findall(piece)) > denial.max_syllables
        if piece.strip() and not too_long and _any_match(denial.clause, turn) and not _any_match(denial.exempt, turn):
            continue
        kept.append(piece)
    return "".join(kept)


@dataclass(frozen=True)
class _Category:
    name: str
    message: str
    rules: tuple[_Rule, ...] = field(default_factory=tuple)


def _expand_terms(terms: dict[str, str], where: Path) -> dict[str, str]:
    """Resolve ``@{name}`` references inside terms (a term may use terms defined before it)."""
    resolved: dict[str, str] = {}
    for name, pattern in terms.items():
        if not isinstance(pattern, str):
            raise SafetyConfigError(f"{where}: terms.{name} must be a string regex")
        if pattern.startswith(LEMMA_PREFIX):  # the view is chosen by the pattern that uses the term
            raise SafetyConfigError(f"{where}: terms.{name} starts with {LEMMA_PREFIX!r}; put the prefix on the "
                                    f"pattern that uses it ('{LEMMA_PREFIX}@{{{name}}}')")
        resolved[name] = _substitute(pattern, resolved, where, f"terms.{name}")
    return resolved


def _substitute(pattern: str, terms: dict[str, str], where: Path, context: str) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1)
        if name not in terms:
            raise SafetyConfigError(f"{where}: {context} refers to unknown term @{{{name}}}")
        return f"(?:{terms[name]})"

    return _TERM_REF.sub(repl, pattern)


def _compile(pattern: Any, terms: dict[str, str], where: Path, context: str) -> _Pattern:
    if not isinstance(pattern, str) or not pattern:
        raise SafetyConfigError(f"{where}: {context} must be a non-empty string regex")
    lemma = pattern.startswith(LEMMA_PREFIX)
    body = pattern[len(LEMMA_PREFIX):] if lemma else pattern
    if not body:
        raise SafetyConfigError(f"{where}: {context} has an empty regex after {LEMMA_PREFIX!r}")
    if not lemma and LEMMA_PREFIX in body:  # "a|lemma: b" would look for the literal text "lemma:"
        raise SafetyConfigError(f"{where}: {context} has {LEMMA_PREFIX!r} inside a text pattern; give the lemma "
                                "pattern its own entry (an 'all' entry may be a list of alternatives)")
    expanded = _substitute(body, terms, where, context)
    try:
        return _Pattern(lemma, re.compile(expanded))
    except re.error as e:
        raise SafetyConfigError(f"{where}: {context} is not a valid regex ({e})") from None


def _compile_lists(block: dict, keys: Sequence[str], data: dict, path: Path, where: str) -> list[tuple[_Pattern, ...]]:
    """The pattern lists `keys` of a rules-file block, compiled with the file's terms, in order
    (a missing key: an empty list; a non-list: SafetyConfigError naming `where.key`)."""
    terms = _expand_terms(data.get("terms", {}) or {}, path)
    out = []
    for key in keys:
        patterns = block.get(key) or []
        if not isinstance(patterns, list):
            raise SafetyConfigError(f"{path}: {where}.{key} must be a list")
        out.append(tuple(_compile(p, terms, path, f"{where}.{key}[{i}]") for i, p in enumerate(patterns)))
    return out


def _compile_rule(rule: Any, ri: int, category: str, terms: dict[str, str], path: Path) -> _Rule:
    rname = rule.get("name", f"rule{ri}") if isinstance(rule, dict) else f"rule{ri}"
    ctx = f"{category}.{rname}"
    if not isinstance(rule, dict) or not (rule.get("all") or rule.get("any")):
        raise SafetyConfigError(f"{path}: rule {ctx} needs an 'all' or 'any' list of regexes")
    unknown = set(rule) - {"name", "all", "any", "none", "suppress_answer", "same_message", "note"}
    if unknown:
        raise SafetyConfigError(f"{path}: rule {ctx} has unknown keys {sorted(unknown)}")
    for key in ("all", "any", "none"):
        if not isinstance(rule.get(key) or [], list):
            raise SafetyConfigError(f"{path}: rule {ctx}.{key} must be a list")
    all_of = []
    for i, entry in enumerate(rule.get("all") or []):
        # an 'all' entry is one regex or a list of alternatives (e.g. a text and a lemma pattern)
        alternatives = entry if isinstance(entry, list) else [entry]
        if not alternatives:
            raise SafetyConfigError(f"{path}: {ctx}.all[{i}] is an empty list")
        all_of.append(tuple(_compile(p, terms, path, f"{ctx}.all[{i}]") for p in alternatives))
    any_of = tuple(_compile(p, terms, path, f"{ctx}.any[{i}]") for i, p in enumerate(rule.get("any") or []))
    none_of = tuple(_compile(p, terms, path, f"{ctx}.none[{i}]") for i, p in enumerate(rule.get("none") or []))
    flags = {key: rule.get(key, False) for key in ("suppress_answer", "same_message")}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise SafetyConfigError(f"{path}: rule {ctx}.{key} must be true or false")
    return _Rule(rname, tuple(all_of), any_of, none_of, flags["suppress_answer"], flags["same_message"])


def _user_turns(conversation: str | Sequence[Mapping[str, Any]]) -> list[str]:
    """The user messages of `conversation` (a plain string is one user message)."""
    if isinstance(conversation, str):
        return [conversation]
    turns = []
    for message in conversation:
        if not isinstance(message, Mapping):
            raise TypeError(f"a conversation is a list of {{'role', 'content'}} messages, got {type(message).__name__}")
        if message.get("role") == _ROLE_USER and isinstance(message.get("content"), str):
            turns.append(message["content"])
    return turns



def _any_match(patterns: tuple, turn: _Turn) -> bool:
    """True when any compiled pattern of the rules file matches `turn`."""
    return any(p.search(turn) is not None for p in patterns)

class SafetyLayer:
    """Route conversations to emergency / self-harm guidance and add the disclaimer to answers.

    Every method takes either one user message (a string) or a conversation (a list of
    ``{"role", "content"}`` messages; only the last ``window_user_turns`` user messages are read,
    and the verdict is about the latest one). ``enabled=False`` makes every method a pass-through
    (for evaluation), so callers need no branches of their own.
    """

    def __init__(self, rules_path: str | Path | None = None, *, enabled: bool = True,
                 classifier: bool | str | Path = True):
        self.enabled = enabled
        if enabled:
            require_kiwipiepy()
        self.rules_path = Path(rules_path) if rules_path is not None else DEFAULT_RULES_PATH
        data = self._read(self.rules_path)  # read and parsed once; both loaders validate their parts
        self.categories, self.disclaimer, self.withheld_answer, self.window_user_turns = self._load(data, self.rules_path)
        self._informational, self._situation = self._load_informational(data, self.rules_path)
        self._continuation = self._load_continuation(data, self.rules_path, self.category_names)
        self._denial = self._load_denial(data, self.rules_path)
        # the trained classifier beside the rules (rules are the floor: a category fires if either does);
        # True = the bundled weights, False = rules only, a path = that weights file
        self.classifier: SafetyClassifier | None = None
        if classifier is not False and enabled:
            path = DEFAULT_WEIGHTS_PATH if classifier is True else Path(classifier)
            self.classifier = SafetyClassifier.load(path)
            missing = {"emergency", "self_harm"} - set(self.category_names)
            if missing:
                raise SafetyConfigError(f"{self.rules_path}: the classifier needs the categories {sorted(missing)} "
                                        "(or pass classifier=False)")

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SafetyConfigError(f"safety rules file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise SafetyConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, dict):
            raise SafetyConfigError(f"{path}: top level must be a JSON object")
        return data

    @staticmethod
    def _load(data: dict, path: Path) -> tuple[tuple[_Category, ...], str, str, int]:
        terms = _expand_terms(data.get("terms", {}) or {}, path)
        texts = {}
        for key in ("disclaimer", "withheld_answer"):
            value = data.get(key)
            if not isinstance(value, str) or not value.strip():
                raise SafetyConfigError(f"{path}: {key!r} must be a non-empty string")
            texts[key] = value.strip()
        window = data.get("window_user_turns", DEFAULT_WINDOW_USER_TURNS)
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise SafetyConfigError(f"{path}: 'window_user_turns' must be a positive integer, got {window!r}")
        raw_categories = data.get("categories")
        if not isinstance(raw_categories, list) or not raw_categories:
            raise SafetyConfigError(f"{path}: 'categories' must be a non-empty list")
        categories = []
        for ci, cat in enumerate(raw_categories):
            name = cat.get("name") if isinstance(cat, dict) else None
            if not isinstance(name, str) or not name:
                raise SafetyConfigError(f"{path}: categories[{ci}] needs a 'name'")
            message = cat.get("message")
            if not isinstance(message, str) or not message.strip():
                raise SafetyConfigError(f"{path}: category {name!r} needs a non-empty 'message'")
            rules = tuple(_compile_rule(rule, ri, name, terms, path) for ri, rule in enumerate(cat.get("rules") or []))
            if not rules:
                raise SafetyConfigError(f"{path}: category {name!r} has no rules")
            categories.append(_Category(name, message.strip(), rules))
        return tuple(categories), texts["disclaimer"], texts["withheld_answer"], window

    @staticmethod
    def _load_informational(data: dict, path: Path) -> tuple[tuple[_Pattern, ...], tuple[_Pattern, ...]]:
        """The optional ``informational`` block: ``cue`` patterns (a question about a topic, hearsay,
        fiction, a past event) and ``situation`` patterns (first person, now: never vetoed)."""
        block = data.get("informational")
        if block is None:
            return (), ()
        if not isinstance(block, dict) or set(block) - {"cue", "situation", "note"}:
            raise SafetyConfigError(f"{path}: 'informational' must be an object with 'cue' and 'situation' lists")
        cue, situation = _compile_lists(block, ("cue", "situation"), data, path, "informational")
        return cue, situation

    @staticmethod
    def _load_continuation(data: dict, path: Path, category_names: Sequence[str]) -> _Continuation | None:
        """The optional ``continuation`` block: the categories whose notice carries on to the next user
        turn, and the ``resolved`` / ``worse`` / ``topic_change`` patterns that stop (or keep) it."""
        block = data.get("continuation")
        if block is None:
            return None
        keys = {"categories", "resolved", "worse", "topic_change", "past", "note"}
        if not isinstance(block, dict) or set(block) - keys:
            raise SafetyConfigError(f"{path}: 'continuation' must be an object with keys among {sorted(keys - {'note'})}")
        cats = block.get("categories") or []
        if not isinstance(cats, list) or any(c not in category_names for c in cats):
            raise SafetyConfigError(f"{path}: continuation.categories must list category names among {list(category_names)}")
        lists = _compile_lists(block, ("resolved", "worse", "topic_change", "past"), data, path, "continuation")
        return _Continuation(tuple(cats), *lists)

    @staticmethod
    def _load_denial(data: dict, path: Path) -> _Denial | None:
        """The optional ``denial`` block: ``boundary`` (a regex on the raw message that splits it into
        clauses; a clause of more than ``max_clause_syllables`` Hangul syllables is kept whole), ``clause`` patterns (a clause that denies a red flag: "숨찬 건 없어요", "죽고 싶다는 생각은
        이제 안 들어요") and ``exempt`` patterns (a clause that only looks like a denial and states the
        danger: "살고 싶은 마음은 없어요", "의식은 없어요", "움직이지는 않아요")."""
        block = data.get("denial")
        if block is None:
            return None
        keys = {"boundary", "clause", "exempt", "max_clause_syllables", "note"}
        if not isinstance(block, dict) or set(block) - keys:
            raise SafetyConfigError(f"{path}: 'denial' must be an object with keys among {sorted(keys - {'note'})}")
        boundary = block.get("boundary")
        if not isinstance(boundary, str) or not boundary:
            raise SafetyConfigError(f"{path}: denial.boundary must be a non-empty regex")
        try:
            boundary_re = re.compile(boundary)
        except re.error as e:
            raise SafetyConfigError(f"{path}: denial.boundary is not a valid regex ({e})") from None
        lists = _compile_lists(block, ("clause", "exempt"), data, path, "denial")
        longest = block.get("max_clause_syllables", 0)
        if not isinstance(longest, int) or isinstance(longest, bool) or longest < 0:
            raise SafetyConfigError(f"{path}: denial.max_clause_syllables must be a non-negative integer (0: no limit)")
        return _Denial(boundary_re, *lists, longest)

    def mask_denials(self, message: str) -> str:
        """`message` without the clauses that deny a red flag (negation scope: "가슴이 아파요. 숨찬 건
        없어요" -> "가슴이 아파요."), so a denied sign is no evidence for the rules or the classifier.
        A clause is dropped only when it matches a ``denial.clause`` pattern and no ``exempt`` one;
        everything else is kept as written. Unchanged when the rules file has no ``denial`` block."""
        return _mask_denials(self._denial, message) if self._denial is not None else message

    def continues(self, message: str) -> bool:
        """True when `message` may carry on the previous turn's notice: it neither resolves the situation
        (a ``resolved`` pattern without a ``worse`` one), nor changes topic, nor is informational."""
        cont = self._continuation
        if cont is None:
            return False
        turn = _Turn(message)
        if _any_match(cont.topic_change, turn) or (_any_match(cont.resolved, turn) and not _any_match(cont.worse, turn)):
            return False
        return not self.is_informational(message)

    def carries(self, message: str) -> bool:
        """True when a notice shown at `message` may be carried on to the next user turn: the message is
        not informational and tells no past, resolved event (the continuation block's ``past`` patterns:
        "고등학교 때 ... 지금은 안 해요", "as a kid") - a notice that fired there anyway is not repeated."""
        cont = self._continuation
        return cont is not None and not _any_match(cont.past, _Turn(message)) and not self.is_informational(message)

    def is_informational(self, message: str) -> bool:
        """True when `message` reads as a question about a topic (a cue of the rules file's
        ``informational`` block) and not as a present situation (none of its ``situation`` patterns)."""
        turn = _Turn(message)
        return (any(p.search(turn) is not None for p in self._informational)
                and not any(p.search(turn) is not None for p in self._situation))

    @property
    def category_names(self) -> list[str]:
        """Category names in file order (e.g. ``['emergency', 'self_harm']``)."""
        return [c.name for c in self.categories]

    def check(self, conversation: str | Sequence[Mapping[str, Any]]) -> list[SafetyHit]:
        """Every rule that fires at the latest user turn (all categories, file order), including a notice
        carried on from the previous user turn (module docstring, "Continuation"). Empty when disabled."""
        if not self.enabled:
            return []
        return self._check(conversation, self.window_user_turns - 1)

    def _check(self, conversation: str | Sequence[Mapping[str, Any]], depth: int) -> list[SafetyHit]:
        hits = self._check_latest(conversation)
        cont = self._continuation
        if cont is None or depth <= 0 or isinstance(conversation, str):
            return hits
        missing = [c for c in cont.categories if not any(h.category == c for h in hits)]
        user_at = [i for i, m in enumerate(conversation)
                   if isinstance(m, Mapping) and m.get("role") == _ROLE_USER and isinstance(m.get("content"), str)]
        if (not missing or len(user_at) < 2 or not self.continues(conversation[user_at[-1]]["content"])
                or not self.carries(conversation[user_at[-2]]["content"])):
            return hits
        before = self._check(conversation[:user_at[-1]], depth - 1)  # the verdict at the previous user turn
        carried = [SafetyHit(c, f"{CONTINUATION_RULE_PREFIX}{c}", "previous turn", False)
                   for c in missing if any(h.category == c for h in before)]
        if not carried:
            return hits
        order = {name: i for i, name in enumerate(self.category_names)}
        return sorted(hits + carried, key=lambda h: order[h.category])

    def _check_latest(self, conversation: str | Sequence[Mapping[str, Any]]) -> list[SafetyHit]:
        """What fires at the latest user turn from the window itself (rules, classifier, veto)."""
        turns = [_Turn(t) for t in _user_turns(conversation)[-self.window_user_turns:] if t.strip()]
        if not turns or not _user_turns(conversation)[-1].strip():
            return []
        # negation scope: a denied red flag ("숨찬 건 없어요") is evidence for neither detector; the
        # informational test below still reads the message as written
        masked = [self.mask_denials(t.content) for t in turns]
        raw = turns
        turns = [_Turn(m) if m != t.content else t for m, t in zip(masked, turns, strict=True)]
        if not turns[-1].content.strip():  # the latest message was nothing but a denial
            return []
        hits = []
        for cat in self.categories:
            for rule in cat.rules:
                snippet = rule.match(turns)
                if snippet is not None:
                    hits.append(SafetyHit(cat.name, rule.name, snippet, rule.suppress_answer))
        if self.classifier is not None:
            verdict = self.classifier.assess([t.content for t in turns])
            if hits and self.classifier.rule_veto and self.is_informational(raw[-1].content):
                hits = [h for h in hits if not self.classifier.vetoes(h.category, h.suppress_answer, verdict.scores)]
            for head in verdict.fired:  # a method request shows the self-harm notice and withholds the answer
                category = "self_harm" if head == "self_harm_method" else head
                hits.append(SafetyHit(category, f"{CLASSIFIER_RULE_PREFIX}{head}", f"p={verdict.scores[head]:.2f}",
                                      head == "self_harm_method"))
        order = {name: i for i, name in enumerate(self.category_names)}
        return sorted(hits, key=lambda h: order[h.category])  # file order, rules before the classifier

    def assess(self, conversation: str | Sequence[Mapping[str, Any]]) -> SafetyVerdict:
        """The one call a chat front end needs: what to show for the latest user turn of `conversation`."""
        hits = tuple(self.check(conversation))
        categories = tuple(c.name for c in self.categories if any(h.category == c.name for h in hits))
        suppress = any(h.suppress_answer for h in hits)
        return SafetyVerdict(hits, categories, self.notices(hits), suppress, self.withheld_answer if suppress else "")

    def categories_hit(self, conversation: str | Sequence[Mapping[str, Any]]) -> list[str]:
        """Names of the categories that fire, in file order, each once."""
        return list(self.assess(conversation).categories)

    def notices(self, conversation_or_hits: str | Sequence[Mapping[str, Any]] | Iterable[SafetyHit]) -> str:
        """Guidance to show BEFORE the model's answer ('' if nothing fires or the layer is off)."""
        if isinstance(conversation_or_hits, str):
            hits = self.check(conversation_or_hits)
        else:
            items = list(conversation_or_hits)
            hits = items if all(isinstance(h, SafetyHit) for h in items) else self.check(items)
        fired = {h.category for h in hits}
        return "\n".join(c.message for c in self.categories if c.name in fired)

    def finalize(self, answer: str) -> str:
        """The answer with the disclaimer appended (unchanged when the layer is off)."""
        if not self.enabled:
            return answer
        return f"{answer.rstrip()}\n\n{self.disclaimer}"

    def wrap(self, conversation: str | Sequence[Mapping[str, Any]], answer: str) -> str:
        """Full text shown to a user: guidance (if any), the model's answer, the disclaimer - or, for a
        request the rules withhold, the guidance and the withheld-answer line only."""
        if not self.enabled:
            return answer
        verdict = self.assess(conversation)
        if verdict.suppress_answer:
            return f"{verdict.notice}\n\n{verdict.withheld}"
        body = self.finalize(answer)
        return f"{verdict.notice}\n\n{body}" if verdict.notice else body
