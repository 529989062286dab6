"""How models are named in anything that leaves the machine, and how evaluations say which model
they measured.

- `hub_reference`: a model by Hub id and revision (a Hub id, a Hugging Face cache snapshot, or a
  folder this stage converted from a download), never by local path;
- `model_fingerprint`: the identity of a model's weights (sha256 of an adapter's weights, or of a
  folder's safetensors in name order);
- `eval_model_identity`: the ``evaluated_model`` record (`run_folder.EVAL_MODEL_KEY`, format there)
  that evaluate.py writes and the release checks against what it publishes.

Anything published or shared (release folder, the files beside an adapter) names models by Hub id
and revision and data by description, hash and counts; local paths stay in files that stay local
(run_info.json, the conversion record, the preprocess report).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from hai_medqa.io_utils import read_json_object
from hai_medqa.model.acquire import download_model, is_hub_id
from hai_medqa.model.convert import RECORD_FILE
from hai_medqa.run_folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MERGE_INFO,
    find_adapter_dir,
    read_training_record,
)

_HUB_SNAPSHOT_RE = re.compile(r"models--(?P<owner>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\](?P<commit>[0-9a-f]{40})")
_RECORDED_HUB_RE = re.compile(r"^hub:(?P<id>[^@\s]+/[^@\s]+)(?:@(?P<commit>[0-9a-f]{40}))?")


def hub_reference(name_or_path: str | Path | None, revision: str | None = None) -> tuple[str | None, str | None]:
    """``(Hub id, revision)`` naming a model in anything shared, ``(None, None)`` when only a local
    folder is known. Recognised, in order:

    - a Hub id that is not a local folder: ``"LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct"`` -> (it, `revision`);
    - a Hugging Face cache snapshot ``…/models--OWNER--NAME/snapshots/<commit>`` -> (OWNER/NAME, commit);
    - a folder the model stage converted from a download (its record says ``hub:<id>@<commit>``, or
      names such a snapshot as its source).
    """
    if not name_or_path:
        return None, None
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not path.exists():
        return (text, revision) if is_hub_id(text) else (None, None)
    m = _HUB_SNAPSHOT_RE.search(path.resolve().as_posix())
    if m:
        return f"{m['owner']}/{m['name']}", m["commit"]
    record = read_json_object(path / RECORD_FILE)
    if not record:
        return None, None
    m = _RECORDED_HUB_RE.match(str(record.get("source_id") or ""))
    if m:
        return m["id"], m["commit"]
    src = _HUB_SNAPSHOT_RE.search(str(record.get("source") or "").replace("\\", "/"))
    return (f"{src['owner']}/{src['name']}", src["commit"]) if src else (None, None)


def model_fingerprint(folder: str | Path) -> str:
    """The identity of a model's weights: hex SHA-256 over an adapter folder's
    adapter_model.safetensors, or else over every ``*.safetensors`` of the folder in name order
    (one stream). Evaluation records it; the release compares it with what it publishes. For an
    adapter it equals ``sha256sum adapter_model.safetensors``."""
    folder = Path(folder)
    files = [folder / ADAPTER_WEIGHTS] if (folder / ADAPTER_WEIGHTS).is_file() else sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no safetensors weights to fingerprint")
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def eval_model_identity(model: str | Path | None, adapter: str | Path | None = None, *,
                        revision: str | None = None, quantize_4bit: bool = False) -> dict[str, Any]:
    """The EVAL_MODEL_KEY record for a model as evaluate.py was given it: `model` (Hub id or local
    folder; None with an adapter = the adapter's recorded base) and optionally `adapter` (adapter or
    run folder). Fingerprints the weights as given (a Hub id: its downloaded snapshot)."""
    adapter_dir = find_adapter_dir(adapter) if adapter is not None else None
    if adapter is not None and adapter_dir is None:
        raise FileNotFoundError(f"{adapter}: no {ADAPTER_CONFIG} (and no adapter_best/ or adapter_last/ beneath it)")
    base_id, base_rev = hub_reference(model, revision)
    out: dict[str, Any] = {"weights": "base", "fingerprint": None, "base_model": base_id,
                           "base_model_revision": base_rev, "adapter_fingerprint": None, "merge_into": None,
                           "quantize_4bit": bool(quantize_4bit)}
    if adapter_dir is not None:
        record = read_training_record(adapter_dir)
        if base_id is None and record is not None and record.base_model:
            out["base_model"], out["base_model_revision"] = hub_reference(record.base_model, record.base_model_revision)
        out.update(weights="adapter", fingerprint=model_fingerprint(adapter_dir))
        return out
    if model is None:
        raise ValueError("eval_model_identity needs a model or an adapter")
    folder = Path(model).expanduser()
    if not folder.exists():  # a Hub id: the snapshot evaluate.py loaded (only the base's weights are fingerprinted)
        folder = Path(download_model(str(model), revision))
    merge_info = read_json_object(folder / MERGE_INFO)
    if merge_info:
        out.update(weights="merged", adapter_fingerprint=merge_info.get("adapter_sha256"),
                   merge_into=merge_info.get("merge_into"),
                   base_model=merge_info.get("base_model"), base_model_revision=merge_info.get("base_model_revision"))
    out["fingerprint"] = model_fingerprint(folder)
    return out
