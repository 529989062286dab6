"""Typed YAML configs with ``--key value`` command-line overrides.

A config is a dataclass: its fields are the only keys that exist, their annotations are the types
values are checked against, and their defaults are the defaults. A YAML file fills some keys, the
command line overrides any of them, and a key that does not exist is an error that names the closest
real key - a typo must never be silently ignored (``lora_rank: 8`` would otherwise train with r=16).

    cfg, explicit = load_config(TrainConfig, "configs/x.yaml", parse_cli_overrides(["--lora-r", "8"]))

`explicit` is the set of keys the user set (in the file or on the command line), so later stages can
tell "the user asked for this" from "this is the default" (used by training profiles).

A config class may declare two tables (class variables), read here so YAML and the command line
behave the same:
  ``KEY_ALIASES``  {other name: project key}: names users know from other tools (Hugging Face/TRL)
                   that mean exactly the project key; the value lands on the project key.
  ``PEER_KEYS``    {other name: (tool, what to use here)}: names that mean something else in this
                   project; using one is a ConfigError saying what to use instead.
`describe_keys` lists every key with its one-line description (the field's docstring), default,
allowed values and aliases: the source of ``--help``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from hai_medqa.errors import HaiMedQAError
from hai_medqa.io_utils import atomic_write_text

C = TypeVar("C")


class ConfigError(HaiMedQAError, ValueError):
    """A config file or override that cannot be used; the message is one line naming key and source."""


def parse_cli_overrides(argv: Sequence[str]) -> dict[str, str]:
    """Turn ``["--lora-r", "8", "--resume", "--lr=1e-4"]`` into ``{"lora_r": "8", "resume": "true", "lr": "1e-4"}``.

    Dashes in key names become underscores. A flag followed by another flag (or by nothing) means
    ``true``. Values stay strings here; `load_config` converts them to the field's type.
    """
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"unexpected command-line argument {tok!r}: overrides are written --key value")
        body = tok[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = body, argv[i + 1]
            i += 2
        else:
            key, value = body, "true"
            i += 1
        key = key.replace("-", "_")
        if not key:
            raise ConfigError(f"empty option name in {tok!r}")
        out[key] = value
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(value: Any, tp: Any) -> Any:
    """Return `value` converted to type `tp`, or raise TypeError/ValueError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        for a in allowed:  # compare as strings too, so "true" from the CLI matches a literal True
            if value == a or (isinstance(value, str) and isinstance(a, bool) and value.lower() in (_TRUE if a else _FALSE)):
                return a
        raise ValueError(f"must be one of {', '.join(repr(a) for a in allowed)}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        is_null = value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~"))
        if is_null and type(None) in args:
            return None
        # Literals and bools first, so "auto" is not swallowed by a str member and "true" stays a bool
        for a in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):
            try:
                return _coerce(value, a)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"must be {_type_name(tp)}")
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.strip().startswith("[") else [v.strip() for v in value.split(",") if v.strip()]
            value = parsed
        if not isinstance(value, (list, tuple)):
            raise ValueError("must be a list")
        return [_coerce(v, inner) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError("must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError("must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                raise ValueError("must be an integer") from None
            if f.is_integer():
                return int(f)
        raise ValueError("must be an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError("must be a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise ValueError("must be a number") from None
        raise ValueError("must be a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError("must be a string")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ValueError(f"must be {_type_name(tp)}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key_error(key: str, known: Sequence[str], source: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{source}: unknown config key {key!r}{hint}")


def _parse_cli_value(raw: str, tp: Any) -> Any:
    # Strings stay verbatim (a system prompt "yes" must not become True); everything else goes
    # through YAML so "null", "8", "[q_proj, v_proj]" and "true" mean what they look like.
    members = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    if all(m in (str, type(None)) for m in members):
        return raw  # _coerce still turns "null" into None for optional strings
    try:
        return yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; raise ConfigError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of key: value, got {type(data).__name__}")
    return data


def load_config(
    cls: type[C],
    config_path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[C, set[str]]:
    """Build a `cls` dataclass from defaults <- YAML file <- overrides; return it with the explicit keys.

    String override values (from the command line) are parsed by the field's type; YAML values are
    checked against it. Unknown keys and wrong types raise ConfigError naming the key and its source.
    After construction, ``cfg.validate()`` is called if the class defines it.
    """
    types_by_name = _field_types(cls)
    known = sorted(types_by_name)
    aliases: Mapping[str, str] = getattr(cls, "KEY_ALIASES", {})
    peers: Mapping[str, tuple[str, str]] = getattr(cls, "PEER_KEYS", {})
    values: dict[str, Any] = {}
    explicit: set[str] = set()

    sources: list[tuple[str, Mapping[str, Any], bool]] = []
    if config_path is not None:
        sources.append((str(config_path), read_yaml_mapping(config_path), False))
    if overrides:
        sources.append(("command line", overrides, True))

    for source, mapping, from_cli in sources:
        seen_here: dict[str, str] = {}  # project key -> the name this source used for it
        for key, raw in mapping.items():
            key = str(key).replace("-", "_") if from_cli else str(key)
            given = key
            if key not in types_by_name and key in aliases:
                key = aliases[key]
            if key not in types_by_name:
                if key in peers:
                    tool, instead = peers[key]
                    raise ConfigError(f"{source}: {key!r} is a {tool} setting that means something else here: {instead}")
                raise _unknown_key_error(key, known, source)
            if key in seen_here:
                raise ConfigError(f"{source}: {seen_here[key]!r} and {given!r} set the same key {key!r}; keep one")
            seen_here[key] = given
            tp = types_by_name[key]
            value = _parse_cli_value(raw, tp) if (from_cli and isinstance(raw, str)) else raw
            try:
                values[key] = _coerce(value, tp)
            except (TypeError, ValueError) as e:
                shown = f"--{given.replace('_', '-')} {raw}" if from_cli else f"{given}: {raw!r}"
                raise ConfigError(f"{source}: {shown}: {e}") from None
            explicit.add(key)

    cfg = cls(**values)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg, explicit


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a plain dict in field order (YAML/JSON friendly)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def dump_config_yaml(cfg: Any) -> str:
    """YAML text of a config, fields in declaration order, unicode kept readable."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the config as YAML, atomically; the file loads back with `load_config`."""
    atomic_write_text(path, dump_config_yaml(cfg))


@dataclasses.dataclass(frozen=True)
class KeyHelp:
    """One config key as ``--help`` shows it."""

    name: str
    default: Any
    allowed: str
    """The values it takes, from the field's type (``'cosine' | 'linear'``, ``int | null``, ...)."""
    description: str
    """The first line of the field's docstring (the string literal under the field)."""
    aliases: tuple[str, ...] = ()


def field_docstrings(cls: type) -> dict[str, str]:
    """{field: its docstring} for a dataclass written with a string literal under each field.

    Read from the class's source, so the description lives once, next to the field it describes."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (frozen app): descriptions stay empty
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                out[node.target.id] = inspect.cleandoc(nxt.value.value)
    return out


def describe_keys(cls: type) -> list[KeyHelp]:
    """Every key of config class `cls` in declaration order: default, allowed values, description, aliases."""
    docs = field_docstrings(cls)
    hints = _field_types(cls)
    by_target: dict[str, list[str]] = {}
    for alias, target in sorted(getattr(cls, "KEY_ALIASES", {}).items()):
        by_target.setdefault(target, []).append(alias)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        first = " ".join(docs.get(f.name, "").split("\n\n")[0].split())
        out.append(KeyHelp(f.name, default, _type_name(hints[f.name]), first, tuple(by_target.get(f.name, ()))))
    return out


def format_keys_help(cls: type, *, width: int = 100) -> str:
    """The ``--help`` text of every key: ``--key`` (aliases), description, default and allowed values."""
    lines = []
    for k in describe_keys(cls):
        also = f"  (also --{', --'.join(a for a in k.aliases)})" if k.aliases else ""
        lines.append(f"  --{k.name}{also}")
        desc = k.description or "(no description)"
        lines.extend(textwrap.wrap(desc, width=width, initial_indent="      ", subsequent_indent="      "))
        lines.append(f"      default: {k.default!r}; allowed: {k.allowed}")
    return "\n".join(lines)
