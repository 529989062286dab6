"""The copies of a run's records that may leave the machine: models named by Hub id and revision,
data by file name, hash and counts, and no local path anywhere.

The training run writes its records for the machine it ran on (run_info.json names the model
folder, the data files, the output folder); those stay in the run folder. What a release carries
under ``training/`` (and its eval_results.json) is rewritten here on the way out:

    run_info.json   {"model": {"requested": "/home/me/tiny", "local_path": "..."}, "command": [...], ...}
                 -> {"model": {"base_model": null, "base_model_revision": null}, ...}   (no "command")
    resolved_config.yaml   train_file: /home/me/data/train.jsonl  ->  train_file: train.jsonl (local file, sha256 2fdcb4195c20…)

and `check_no_local_paths` is the last guard before a folder is published: it refuses a folder in
which any file still holds one of the local folders the release was built from.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from hai_medqa.data.provenance import data_provenance
from hai_medqa.errors import HaiMedQAError
from hai_medqa.io_utils import atomic_write_text, write_json
from hai_medqa.model.identity import hub_reference
from hai_medqa.run_folder import (
    ADAPTER_BEST,
    ADAPTER_LAST,
    EVAL_MODEL_KEY,
    METRICS,
    RESOLVED_CONFIG,
    RUN_INFO,
    SUMMARY,
    TRAINING_RECORD,
    TrainingRecord,
)

LOCAL_PATH = "<local path, not published>"
_PATH_KEY_SUFFIXES = ("_dir", "_path", "_file", "_folder")
_PATH_KEYS = {"path", "output", "report", "found_from", "local_path", "resolved_model_dir", "adapter", "inputs"}
# An absolute path (POSIX, home-relative or a Windows drive) inside a longer text; not the "//" of a
# URL and not the "/" of a Hub id or a fraction.
_ABS_PATH_RE = re.compile(r"(?<![\w:/.\-~])(?:~/|[A-Za-z]:\\|/(?=[^/\s]))[^\s'\"`,;|()<>]*")


class LocalPathError(HaiMedQAError, ValueError):
    """A file about to be published still holds a local path."""


def is_local_path(text: str) -> bool:
    """True for a string that is a filesystem path on this machine rather than a name: absolute,
    home-relative, ./ or ../ relative, or an existing relative path."""
    if not text or "\n" in text or "://" in text:
        return False
    if text.startswith(("/", "~", "./", "../", ".\\", "..\\")) or re.match(r"^[A-Za-z]:[\\/]", text):
        return True
    return ("/" in text or "\\" in text) and Path(text).exists()


def scrub(obj: Any, key: str | None = None) -> Any:
    """`obj` with every local path replaced by LOCAL_PATH: whole values under path-like keys
    (``*_dir``, ``*_file``, ``path``, ...) or that are paths themselves, and absolute paths inside
    longer texts. Hub ids, URLs and numbers are left alone."""
    if isinstance(obj, dict):
        return {k: scrub(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(v, key) for v in obj]
    if isinstance(obj, str):
        if is_local_path(obj) or (key is not None and (key in _PATH_KEYS or key.endswith(_PATH_KEY_SUFFIXES))
                                  and obj not in ("", "auto")):
            return LOCAL_PATH
        return _ABS_PATH_RE.sub(LOCAL_PATH, obj)
    return obj


def _model_ref(model: Any, revision: Any = None) -> dict[str, Any]:
    base_id, base_rev = hub_reference(model if isinstance(model, str) else None,
                                      revision if isinstance(revision, str) else None)
    return {"base_model": base_id, "base_model_revision": base_rev}


def _data_file(entry: Any) -> Any:
    """A run_info data entry without its path: the file's name, hash, counts (and the preprocess
    report's provenance when the file is still there and unchanged)."""
    if not isinstance(entry, dict):
        return scrub(entry)
    out = {k: v for k, v in entry.items() if k != "path"}
    path = entry.get("path")
    if isinstance(path, str):
        out = {"file": Path(path).name, **out}
        if Path(path).is_file():
            prov = data_provenance(path)
            if prov.get("sha256") == entry.get("sha256", prov.get("sha256")) and prov.get("report"):
                out["provenance"] = {k: v for k, v in prov.items() if k not in ("file", "sha256")}
    return scrub(out)


def shareable_run_info(info: dict[str, Any]) -> dict[str, Any]:
    """run_info.json as a release carries it: the model by Hub id, data by name/hash/counts, no
    command line (it holds the local paths), every other value scrubbed."""
    out: dict[str, Any] = {}
    for key, value in info.items():
        if key == "command":
            continue
        if key == "model" and isinstance(value, dict):
            out[key] = _model_ref(value.get("requested"), value.get("revision"))
            if out[key]["base_model"] is None:  # a local folder: its conversion record may know the Hub id
                out[key] = _model_ref(value.get("local_path")) if value.get("local_path") else out[key]
        elif key == "data" and isinstance(value, dict):
            out[key] = {k: _data_file(v) for k, v in value.items()}
        else:
            out[key] = scrub(value, key)
    return out


def shareable_config(cfg: dict[str, Any], run_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """resolved_config.yaml as a release carries it: ``model`` as its Hub id (or LOCAL_PATH), data
    files as ``name (local file, sha256 …)``, output and cache folders as LOCAL_PATH."""
    data = (run_info or {}).get("data") if isinstance((run_info or {}).get("data"), dict) else {}
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if key == "model" and isinstance(value, str):
            out[key] = _model_ref(value, cfg.get("model_revision"))["base_model"] or (
                _model_ref(((run_info or {}).get("model") or {}).get("local_path"))["base_model"] or LOCAL_PATH)
        elif key in ("train_file", "val_file") and isinstance(value, str):
            sha = (data.get(key) or {}).get("sha256") if isinstance(data.get(key), dict) else None
            out[key] = f"{Path(value).name} (local file" + (f", sha256 {sha[:12]}…)" if sha else ")")
        else:
            out[key] = scrub(value, key)
    return out


def shareable_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """summary.json without the adapters' local paths (named by folder: adapter_best, adapter_last)."""
    out = dict(summary)
    for name in (ADAPTER_BEST, ADAPTER_LAST):
        if isinstance(out.get(name), str):
            out[name] = name
    return scrub(out)


def shareable_record(record: TrainingRecord) -> dict[str, Any]:
    """The trainer's record with the base named by Hub id (None when only a local folder is known)."""
    ref = _model_ref(record.base_model, record.base_model_revision)
    base = ref["base_model"]
    rev = ref["base_model_revision"] if base else None
    return scrub(TrainingRecord(**{**record.to_json(), "base_model": base, "base_model_revision": rev,
                                   "data": record.data}).to_json())


def shareable_eval(results: dict[str, Any]) -> dict[str, Any]:
    """eval_results.json as a release carries it: the model by its identity (EVAL_MODEL_KEY) and Hub
    id, data by name/hash/counts, KorMedMCQA by name, no local folder."""
    out: dict[str, Any] = {}
    for key, value in results.items():
        if key == "model_info" and isinstance(value, dict):
            ref = _model_ref(value.get("model"), value.get("revision"))
            out[key] = scrub({**{k: v for k, v in value.items()
                                 if k not in ("model", "revision", "adapter", "resolved_model_dir")},
                              "model": ref["base_model"] or LOCAL_PATH,
                              "adapter": Path(value["adapter"]).name if isinstance(value.get("adapter"), str) else None})
        elif key == "data" and isinstance(value, dict):
            out[key] = _data_file(value)
        elif key == EVAL_MODEL_KEY and isinstance(value, dict):
            base = value.get("base_model")
            out[key] = scrub({**value, "base_model": _model_ref(base)["base_model"] if base else None})
        else:
            out[key] = scrub(value, key)
    return out


# ---------------------------------------------------------------- writing the copies
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LocalPathError(f"{path}: not valid JSON ({e}); cannot publish a sanitised copy") from None


def copy_run_file(src: Path, dest: Path, run_info: dict[str, Any] | None = None) -> None:
    """Copy one run file into a release folder as its shareable version (JSON/YAML/JSONL rewritten,
    other files, such as the loss curve, copied as they are)."""
    name = src.name
    if name == RUN_INFO:
        write_json(dest, shareable_run_info(_read_json(src)))
    elif name == RESOLVED_CONFIG:
        cfg = yaml.safe_load(src.read_text(encoding="utf-8"))
        cfg = shareable_config(cfg, run_info) if isinstance(cfg, dict) else scrub(cfg)
        atomic_write_text(dest, yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False))
    elif name == SUMMARY:
        write_json(dest, shareable_summary(_read_json(src)))
    elif name == TRAINING_RECORD:
        record = TrainingRecord.from_json(_read_json(src))
        write_json(dest, shareable_record(record) if record is not None else {})
    elif name == METRICS:
        lines = [json.dumps(scrub(json.loads(line)), ensure_ascii=False)
                 for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
        atomic_write_text(dest, "".join(line + "\n" for line in lines))
    elif src.suffix == ".json":
        write_json(dest, scrub(_read_json(src)))
    else:
        dest.write_bytes(src.read_bytes())


# ---------------------------------------------------------------- the last guard
_UNSCANNED_SUFFIXES = (".safetensors",)


def local_path_needles(*folders: str | Path | None) -> list[str]:
    """The local paths a release must not contain: each folder as given and resolved, and the user's
    home folder when it names a user (``/home/alice``; not ``/`` or ``/root``)."""
    needles: set[str] = set()
    for folder in folders:
        if folder is None:
            continue
        for p in (Path(folder).expanduser(), Path(folder).expanduser().resolve()):
            if p.is_absolute() and len(p.parts) > 2:
                needles.add(p.as_posix())
    home = Path.home()
    if len(home.parts) > 2:
        needles.add(home.as_posix())
    return sorted(needles, key=len, reverse=True)


def check_no_local_paths(folder: str | Path, needles: Iterable[str]) -> None:
    """Refuse (LocalPathError, one line) a release folder in which a file other than the weights
    holds one of `needles`: nothing is published with a private path in it."""
    folder = Path(folder)
    encoded = [(n, n.encode("utf-8")) for n in needles if n]
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts) or path.suffix in _UNSCANNED_SUFFIXES:
            continue
        data = path.read_bytes()
        for text, raw in encoded:
            if raw in data:
                raise LocalPathError(f"{rel.as_posix()} in {folder.name} holds the local path {text}; "
                                     "it would be published (a record this project does not know how to clean)")
