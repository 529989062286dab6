"""The hand-over contract between stages: every file one stage writes and another reads.

A training run folder (`S_F2.py --output-dir RUN`)::

    RUN/resolved_config.yaml          the settled TrainConfig (RESOLVED_CONFIG)
    RUN/run_info.json                 versions, device, data hashes, schedule (RUN_INFO; local paths: stays local)
    RUN/metrics.jsonl, loss_curve.png, tensorboard/, summary.json
    RUN/checkpoints/step_0000040/     resumable state (CHECKPOINTS_DIR, CHECKPOINT_PREFIX)
    RUN/adapter_best/, adapter_last/  PEFT adapters, each with tokenizer + TRAINING_RECORD
    RUN/eval_results.json             written by evaluate.py when pointed at RUN (EVAL_RESULTS)

A release folder (`merge_and_upload.py --output OUT`)::

    OUT/config.json, model*.safetensors, tokenizer*, generation_config.json, LICENSE, README.md
    OUT/merge_info.json               how the weights were made (MERGE_INFO, written by the merge)
    OUT/release_info.json             what the publish stage added (RELEASE_INFO)
    OUT/training/                     the run files that travel (RELEASE_TRAINING_DIR, RUN_FILES)
    OUT/training/hai_medqa_training.json   the adapter's TRAINING_RECORD (base model, system prompt)
    OUT/eval_results.json             the released model's own evaluation (EVAL_MODEL_KEY says whose)
    OUT/comparison/*.json             other models' evaluations, shown only as such (COMPARISON_DIR)

No stage spells another stage's file names: they import them from here.
"""

from __future__ import annotations

import contextlib
import json
import platform
import subprocess
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- training run folder
RESOLVED_CONFIG = "resolved_config.yaml"
RUN_INFO = "run_info.json"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
LOSS_CURVE = "loss_curve.png"
TENSORBOARD_DIR = "tensorboard"
SAMPLES = "samples.jsonl"
"""Sample answers at each evaluation: one JSON line per (step, question, answer, reference)."""
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"
ADAPTER_BEST = "adapter_best"
ADAPTER_LAST = "adapter_last"
ADAPTER_DIRS = (ADAPTER_BEST, ADAPTER_LAST)
"""A run folder's adapters, in the order a reader prefers them."""

# ---------------------------------------------------------------- inside an adapter folder (PEFT's names)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINING_RECORD = "hai_medqa_training.json"
"""The trainer's note beside each adapter: base model, revision, layout, step, system prompt."""

# ---------------------------------------------------------------- evaluation, release
EVAL_RESULTS = "eval_results.json"
MERGE_INFO = "merge_info.json"
RELEASE_INFO = "release_info.json"
"""The publish stage's record in a release folder (license copied, run files carried, evaluation bound)."""
MODEL_CARD = "README.md"
LICENSE_FILE = "LICENSE"
RELEASE_TRAINING_DIR = "training"
COMPARISON_DIR = "comparison"
ADAPTER_LLAMA_SUBFOLDER = "llama"
"""An adapter release keeps the adapter under EXAONE's module names at its top and the Llama-named
original (for a Llama-layout copy of the base) here."""
"""Evaluation results of other models a release shows for comparison (``--include-foreign-eval``)."""
RUN_FILES = (RESOLVED_CONFIG, RUN_INFO, SUMMARY, METRICS, LOSS_CURVE)
"""The run files a release carries in RELEASE_TRAINING_DIR."""

# ---------------------------------------------------------------- preprocessing
REPORT_SUFFIX = ".report.json"


def preprocess_report_path(output: str | Path) -> Path:
    """Where preprocessing writes its report by default: ``data/train.jsonl`` -> ``data/train.jsonl.report.json``."""
    return Path(f"{output}{REPORT_SUFFIX}")


def checkpoint_dir(run: str | Path, step: int) -> Path:
    """``checkpoint_dir("RUN", 40)`` -> ``RUN/checkpoints/step_0000040``."""
    return Path(run) / CHECKPOINTS_DIR / f"{CHECKPOINT_PREFIX}{step:07d}"


def list_checkpoints(run: str | Path) -> list[Path]:
    """Complete checkpoints of a run folder (those with a trainer state), oldest first."""
    folder = Path(run) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    ckpts = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / TRAINER_STATE).is_file()]
    return sorted(ckpts, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def find_adapter_dir(path: str | Path) -> Path | None:
    """An adapter folder itself, or a run folder's adapter_best/ (else adapter_last/); None if neither.

    ``RUN`` -> ``RUN/adapter_best``; ``RUN/adapter_last`` -> itself; a merged model folder -> None.
    """
    path = Path(path)
    if is_adapter_dir(path):
        return path
    for sub in ADAPTER_DIRS:
        if is_adapter_dir(path / sub):
            return path / sub
    return None


def find_run_dir(adapter_dir: str | Path) -> Path | None:
    """The training run folder an adapter came from (``RUN/adapter_best`` -> ``RUN``), if recognisable."""
    parent = Path(adapter_dir).parent
    return parent if (parent / RESOLVED_CONFIG).is_file() or (parent / RUN_INFO).is_file() else None


def run_base_model(adapter_dir: str | Path) -> dict[str, Any] | None:
    """The ``model`` entry of the run_info.json (RUN_INFO) of the run an adapter came from:
    ``{"requested": "--model as given", "revision": ..., "local_path": "the Llama copy trained on"}``,
    or None (no run folder, no record). Local paths: for this machine only, never published."""
    run = find_run_dir(adapter_dir)
    if run is None:
        return None
    try:
        info = json.loads((run / RUN_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model = info.get("model") if isinstance(info, dict) else None
    return model if isinstance(model, dict) else None


# ---------------------------------------------------------------- the training record
@dataclass(frozen=True)
class TrainingRecord:
    """What the trainer writes beside every adapter (TRAINING_RECORD) and a release carries in
    ``training/``. ``system_prompt`` is the prompt the model was trained with, "" for none.
    ``data``: ``{"train": data_provenance(train_file), "validation": data_provenance(val_file)}``
    (`hai_medqa.data.provenance`; what the card's training-data section is written from). In an
    adapter folder (shared) the base is named by Hub id or None (`train.adapter_folder.finish_adapter_folder`);
    its local path stays in run_info.json."""

    base_model: str | None
    base_model_revision: str | None = None
    base_layout: str = "llama"
    step: int | None = None
    val_loss: float | None = None
    system_prompt: str | None = None
    data: dict[str, Any] | None = None
    base_precision: str | None = None
    """What the frozen base was during training: "nf4" (QLoRA), "fp8" (float8 e4m3 projections,
    hai_medqa/train/fp8_base.py) or "none" (unquantised); None in records written before it was kept
    (those runs used NF4 unless their config says quantize_4bit: false). A merge always adds the deltas
    to the original bf16 weights either way."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("data", "base_precision"):  # records written before these existed stay as they were
            if out[key] is None:
                del out[key]
        return out

    @classmethod
    def from_json(cls, obj: Any) -> TrainingRecord | None:
        if not isinstance(obj, dict):
            return None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in known})


def write_training_record(folder: str | Path, record: TrainingRecord) -> Path:
    from hai_medqa.io_utils import write_json

    path = Path(folder) / TRAINING_RECORD
    write_json(path, record.to_json())
    return path


def read_training_record(folder: str | Path) -> TrainingRecord | None:
    """The training record of an adapter folder, a run folder (its preferred adapter) or a release
    folder (``training/``); None when there is none or it cannot be read."""
    folder = Path(folder)
    adapter = find_adapter_dir(folder)
    candidates = ([adapter / TRAINING_RECORD] if adapter else []) + [
        folder / TRAINING_RECORD, folder / RELEASE_TRAINING_DIR / TRAINING_RECORD]
    for path in candidates:
        if path.is_file():
            try:
                return TrainingRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError, TypeError):
                return None
    return None


def trained_system_prompt(*folders: str | Path | None) -> str | None:
    """The system prompt recorded by training for the first of `folders` that has a record (adapter,
    run or release folder); None when none records one. "" means trained without a system prompt."""
    for folder in folders:
        if folder is None or not Path(folder).exists():
            continue
        record = read_training_record(folder)
        if record is not None and isinstance(record.system_prompt, str):
            return record.system_prompt
    return None


# ---------------------------------------------------------------- provenance shared by every record
_VERSIONED_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "tokenizers",
                       "liger-kernel", "flash-attn", "kiwipiepy", "huggingface_hub")


def package_versions() -> dict[str, str]:
    """The versions every record (training, merge, evaluation) carries: python, hai_medqa and the
    installed ones of the packages that change results."""
    from importlib.metadata import PackageNotFoundError, version

    from hai_medqa import __version__

    out = {"python": platform.python_version(), "hai_medqa": __version__}
    for name in _VERSIONED_PACKAGES:
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def git_commit() -> str:
    """The project's git commit (``-dirty`` when tracked files changed), or "unknown" outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


# ---------------------------------------------------------------- evaluation identity
EVAL_MODEL_KEY = "evaluated_model"
"""The key of eval_results.json that says which model the numbers belong to. Format::

    "evaluated_model": {
        "weights": "adapter" | "merged" | "base",   # what was loaded (base + adapter, a merged folder, the base alone)
        "fingerprint": "<hex>",                      # model.identity.model_fingerprint() of the adapter / merged / base folder
        "base_model": "LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct" | null,   # Hub id, null when only a local folder
        "base_model_revision": "<commit>" | null,
        "adapter_fingerprint": "<hex>" | null,       # merged: the adapter merged in (its merge_info.json)
        "merge_into": "original" | "nf4" | null,     # merged: how it was merged
        "quantize_4bit": true | false                # the base was loaded in 4-bit NF4 for the evaluation
    }

Beside it the file keeps ``data`` (``sha256``, ``records``, ``evaluated``; no path), ``samples``,
``seed``, ``system_prompt``, ``generation``, ``metrics`` with ``metrics_stderr``, and
``kormedmcqa`` with ``kormedmcqa_detail.stderr`` (docs/evaluation.md). A release shows results
only when this identity is the released model's (docs/model_merge.md). Written by
`hai_medqa.model.identity.eval_model_identity`; checked by `hai_medqa.publish.eval_binding`."""
