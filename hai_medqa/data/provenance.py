"""Where a training/validation jsonl came from, for records that travel (no path).

The preprocess report beside a jsonl (`run_folder.preprocess_report_path`) knows its sources; this
module turns it into what a model card may claim: the dataset as detected from the input tree (the
bundled synthetic sample or AI Hub's dataset), the split, the pairing mode and seed, counts and skip
counts by reason, and the file's own hash and record count. The bundled consultation sample (no
preprocess report: it is written in chat format) is recognised by its bytes. The trainer records it in the adapter's
TrainingRecord (``data``); the card's training-data section is written from it
(`hai_medqa.train.adapter_folder.describe_training_data`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from hai_medqa.io_utils import read_json_object, sha256_file
from hai_medqa.run_folder import preprocess_report_path

from .read import SPLIT_MARKERS
from .schema import BUNDLED_AIHUB_SAMPLE, BUNDLED_CONSULTATION_SAMPLE

SYNTHETIC_SAMPLE = "synthetic sample"
AIHUB_DATASET = "AI Hub 초거대AI 헬스케어 질의응답 데이터 (dataSetSn 71762)"
AIHUB_DATASET_URL = "https://www.aihub.or.kr/aihubdata/data/view.do?dataSetSn=71762"
CONSULTATION_SAMPLE = "consultation sample"
_CONSULTATION_SPLITS = {"train.jsonl": "train", "val.jsonl": "validation"}


def data_provenance(jsonl_path: str | Path) -> dict[str, Any]:
    """What a training/validation jsonl is, for records that travel (no path): its file name,
    sha256 and record count, and from its preprocess report (`preprocess_report_path`, used only
    when the report describes this very file) the source dataset as detected from the input tree
    (``SYNTHETIC_SAMPLE`` for the bundled sample), the split, the pairing mode and seed, counts and
    skip counts by reason. A byte-identical copy of the bundled consultation sample's train.jsonl or
    val.jsonl is ``CONSULTATION_SAMPLE`` with its split (and no report). Example::

        data_provenance("data/train.jsonl") -> {"file": "train.jsonl", "sha256": "2fdc…", "records": 243,
            "source": "synthetic sample", "split": "train", "pairing": "round_robin", "seed": 0, …}
    """
    path = Path(jsonl_path)
    digest = hashlib.sha256()
    records = 0
    with open(path, "rb") as f:
        for line in f:
            digest.update(line)
            records += bool(line.strip())
    out: dict[str, Any] = {"file": path.name, "sha256": digest.hexdigest(), "records": records,
                           "source": None, "split": None, "report": False}
    bundled = _consultation_split(out["sha256"])
    if bundled is not None:
        out.update(source=CONSULTATION_SAMPLE, split=bundled)
        return out
    report = read_json_object(preprocess_report_path(path))
    if not report or report.get("output_sha256") != out["sha256"]:
        return out  # no report, or one that describes another file: claim nothing from it
    sources = [s for s in report.get("sources") or [] if isinstance(s, dict)]
    options = report.get("options") if isinstance(report.get("options"), dict) else {}
    skipped = report.get("skipped") if isinstance(report.get("skipped"), dict) else {}
    out.update(
        report=True,
        source=SYNTHETIC_SAMPLE if sources and all(_is_bundled_sample(s) for s in sources) else AIHUB_DATASET,
        split=options.get("split") or _split_from_paths(s.get("path") for s in sources),
        pairing=options.get("pairing"), seed=options.get("seed"), drop_intro=options.get("drop_intro"),
        max_pairs_per_folder=options.get("max_pairs_per_folder"),
        source_kinds=sorted({str(s.get("kind")) for s in sources}),
        counts={k: report[k] for k in ("folders", "files", "questions", "answers", "records")
                if isinstance(report.get(k), dict)},
        skipped={reason: (entry.get("count") if isinstance(entry, dict) else entry)
                 for reason, entry in sorted(skipped.items())},
    )
    return out


def _consultation_split(sha256: str) -> str | None:
    """The split of the bundled consultation sample file with these bytes, else None."""
    for name, split in _CONSULTATION_SPLITS.items():
        bundled = BUNDLED_CONSULTATION_SAMPLE / name
        if bundled.is_file() and sha256_file(bundled) == sha256:
            return split
    return None


def _is_bundled_sample(source: dict[str, Any]) -> bool:
    """A preprocess source that is the bundled synthetic sample (its folder, or a byte-identical copy
    of its TL.zip/VL.zip)."""
    path = Path(str(source.get("path") or ""))
    if not path.exists():
        return False
    sample = BUNDLED_AIHUB_SAMPLE.resolve()
    if path.resolve() == sample or sample in path.resolve().parents:
        return True
    if path.is_file():
        size = path.stat().st_size
        return any(z.stat().st_size == size and sha256_file(z) == sha256_file(path) for z in sorted(sample.glob("*.zip")))
    return False


def _split_from_paths(paths) -> str | None:
    """The one split (train/validation) the sources' paths name (TL/VL, Training/Validation), else None."""
    splits = set()
    for p in paths:
        for part in reversed(Path(str(p or "")).parts):
            stem = part[:-4] if part.lower().endswith(".zip") else part
            hit = next((split for split, markers in SPLIT_MARKERS.items() if stem in markers), None)
            if hit:
                splits.add(hit)
                break
    return splits.pop() if len(splits) == 1 else None
