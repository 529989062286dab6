"""Safety layer for chat: emergency (119) and self-harm (109 / 1577-0199) routing, plus a disclaimer.

The keyword rules live in ONE data file, ``safety_keywords.json`` beside this module (see its
``_about`` for the matching rules). The layer looks at the user's message only; what it adds is
presentation: guidance before the model's text, a short disclaimer after it. The model's own text is
kept separately (chat history and evaluation use that), so the safety text never leaks into the
next turn's prompt or into metrics.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hai_medqa.errors import HaiMedQAError

DEFAULT_RULES_PATH = Path(__file__).with_name("safety_keywords.json")
_TERM_REF = re.compile(r"@\{([A-Za-z_][A-Za-z0-9_]*)\}")
_WHITESPACE = re.compile(r"\s+")


class SafetyConfigError(HaiMedQAError, ValueError):
    """The safety rules file is missing or malformed (names the file and the broken entry)."""


@dataclass(frozen=True)
class SafetyHit:
    """One rule that fired: its category (``emergency`` / ``self_harm``), rule name and matched text."""

    category: str
    rule: str
    matched: str


@dataclass(frozen=True)
class _Rule:
    name: str
    all_of: tuple[re.Pattern, ...]
    any_of: tuple[re.Pattern, ...]

    def match(self, text: str) -> str | None:
        """Return the first matched snippet if the rule fires on normalised `text`, else None."""
        snippets = []
        for pat in self.all_of:
            m = pat.search(text)
            if m is None:
                return None
            snippets.append(m.group(0))
        if self.any_of:
            for pat in self.any_of:
                m = pat.search(text)
                if m is not None:
                    snippets.append(m.group(0))
                    break
            else:
                return None
        return " + ".join(snippets)


@dataclass(frozen=True)
class _Category:
    name: str
    message: str
    rules: tuple[_Rule, ...] = field(default_factory=tuple)


def normalize_for_matching(text: str) -> str:
    """NFKC, lower-case, and drop all whitespace, so spacing variants of Korean phrases match alike."""
    return _WHITESPACE.sub("", unicodedata.normalize("NFKC", text).lower())


def _expand_terms(terms: dict[str, str], where: Path) -> dict[str, str]:
    """Resolve ``@{name}`` references inside terms (a term may use terms defined before it)."""
    resolved: dict[str, str] = {}
    for name, pattern in terms.items():
        if not isinstance(pattern, str):
            raise SafetyConfigError(f"{where}: terms.{name} must be a string regex")
        resolved[name] = _substitute(pattern, resolved, where, f"terms.{name}")
    return resolved


def _substitute(pattern: str, terms: dict[str, str], where: Path, context: str) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1)
        if name not in terms:
            raise SafetyConfigError(f"{where}: {context} refers to unknown term @{{{name}}}")
        return f"(?:{terms[name]})"

    return _TERM_REF.sub(repl, pattern)


def _compile(pattern: Any, terms: dict[str, str], where: Path, context: str) -> re.Pattern:
    if not isinstance(pattern, str) or not pattern:
        raise SafetyConfigError(f"{where}: {context} must be a non-empty string regex")
    expanded = _substitute(pattern, terms, where, context)
    try:
        return re.compile(expanded)
    except re.error as e:
        raise SafetyConfigError(f"{where}: {context} is not a valid regex ({e})") from None


class SafetyLayer:
    """Route user messages to emergency / self-harm guidance and add the disclaimer to answers.

    ``enabled=False`` makes every method a pass-through (for evaluation), so callers need no
    branches of their own.
    """

    def __init__(self, rules_path: str | Path | None = None, *, enabled: bool = True):
        self.enabled = enabled
        self.rules_path = Path(rules_path) if rules_path is not None else DEFAULT_RULES_PATH
        self.categories, self.disclaimer = self._load(self.rules_path)

    @staticmethod
    def _load(path: Path) -> tuple[tuple[_Category, ...], str]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SafetyConfigError(f"safety rules file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise SafetyConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, dict):
            raise SafetyConfigError(f"{path}: top level must be a JSON object")
        terms = _expand_terms(data.get("terms", {}) or {}, path)
        disclaimer = data.get("disclaimer")
        if not isinstance(disclaimer, str) or not disclaimer.strip():
            raise SafetyConfigError(f"{path}: 'disclaimer' must be a non-empty string")
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
            rules = []
            for ri, rule in enumerate(cat.get("rules") or []):
                rname = rule.get("name", f"rule{ri}") if isinstance(rule, dict) else f"rule{ri}"
                ctx = f"{name}.{rname}"
                if not isinstance(rule, dict) or not (rule.get("all") or rule.get("any")):
                    raise SafetyConfigError(f"{path}: rule {ctx} needs an 'all' or 'any' list of regexes")
                unknown = set(rule) - {"name", "all", "any"}
                if unknown:
                    raise SafetyConfigError(f"{path}: rule {ctx} has unknown keys {sorted(unknown)}")
                all_of = tuple(_compile(p, terms, path, f"{ctx}.all[{i}]") for i, p in enumerate(rule.get("all") or []))
                any_of = tuple(_compile(p, terms, path, f"{ctx}.any[{i}]") for i, p in enumerate(rule.get("any") or []))
                rules.append(_Rule(rname, all_of, any_of))
            if not rules:
                raise SafetyConfigError(f"{path}: category {name!r} has no rules")
            categories.append(_Category(name, message.strip(), tuple(rules)))
        return tuple(categories), disclaimer.strip()

    @property
    def category_names(self) -> list[str]:
        """Category names in file order (e.g. ``['emergency', 'self_harm']``)."""
        return [c.name for c in self.categories]

    def check(self, text: str) -> list[SafetyHit]:
        """Every rule that fires on `text` (all categories, file order). Empty when disabled."""
        if not self.enabled or not text:
            return []
        norm = normalize_for_matching(text)
        hits = []
        for cat in self.categories:
            for rule in cat.rules:
                snippet = rule.match(norm)
                if snippet is not None:
                    hits.append(SafetyHit(cat.name, rule.name, snippet))
        return hits

    def categories_hit(self, text: str) -> list[str]:
        """Names of the categories that fire on `text`, in file order, each once."""
        seen: list[str] = []
        for hit in self.check(text):
            if hit.category not in seen:
                seen.append(hit.category)
        return seen

    def notices(self, text_or_hits: str | Iterable[SafetyHit]) -> str:
        """Guidance to show BEFORE the model's answer ('' if nothing fires or the layer is off)."""
        hits = self.check(text_or_hits) if isinstance(text_or_hits, str) else list(text_or_hits)
        fired = {h.category for h in hits}
        return "\n".join(c.message for c in self.categories if c.name in fired)

    def finalize(self, answer: str) -> str:
        """The answer with the disclaimer appended (unchanged when the layer is off)."""
        if not self.enabled:
            return answer
        return f"{answer.rstrip()}\n\n{self.disclaimer}"

    def wrap(self, user_text: str, answer: str) -> str:
        """Full text shown to a user: guidance (if any), the model's answer, the disclaimer."""
        if not self.enabled:
            return answer
        notice = self.notices(user_text)
        body = self.finalize(answer)
        return f"{notice}\n\n{body}" if notice else body
