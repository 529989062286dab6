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
import dataclasses
import hashlib
import json
import platform
import re
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


# ---------------------------------------------------------------- the training record
@dataclass(frozen=True)
class TrainingRecord:
    """What the trainer writes beside every adapter (TRAINING_RECORD) and a release carries in
    ``training/``. ``system_prompt`` is the prompt the model was trained with, "" for none.
    ``data``: ``{"train": data_provenance(train_file), "validation": data_provenance(val_file)}``
    (what the card's training-data section is written from). In an adapter folder (shared) the base
    is named by Hub id or None (`finish_adapter_folder`); its local path stays in run_info.json."""

    base_model: str | None
    base_model_revision: str | None = None
    base_layout: str = "llama"
    step: int | None = None
    val_loss: float | None = None
    system_prompt: str | None = None
    data: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if out["data"] is None:  # records written before data provenance existed stay as they were
            del out["data"]
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


# ---------------------------------------------------------------- names that may leave the machine
# Anything published or shared (release folder, the files beside an adapter) names models by Hub id
# and revision and data by description, hash and counts; local paths stay in files that stay local
# (run_info.json, the conversion record, the preprocess report).
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
        from hai_medqa.model.acquire import is_hub_id

        return (text, revision) if is_hub_id(text) else (None, None)
    m = _HUB_SNAPSHOT_RE.search(path.resolve().as_posix())
    if m:
        return f"{m['owner']}/{m['name']}", m["commit"]
    from hai_medqa.model.convert import RECORD_FILE

    try:
        record = json.loads((path / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None, None
    if not isinstance(record, dict):
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


# ---------------------------------------------------------------- evaluation identity
EVAL_MODEL_KEY = "evaluated_model"
"""The key of eval_results.json that says which model the numbers belong to. Format::

    "evaluated_model": {
        "weights": "adapter" | "merged" | "base",   # what was loaded (base + adapter, a merged folder, the base alone)
        "fingerprint": "<hex>",                      # model_fingerprint() of the adapter / merged / base folder
        "base_model": "LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct" | null,   # Hub id, null when only a local folder
        "base_model_revision": "<commit>" | null,
        "adapter_fingerprint": "<hex>" | null,       # merged: the adapter merged in (its merge_info.json)
        "merge_into": "original" | "nf4" | null,     # merged: how it was merged
        "quantize_4bit": true | false                # the base was loaded in 4-bit NF4 for the evaluation
    }

Beside it the file keeps ``data`` (``sha256``, ``records``, ``evaluated``; no path), ``samples``,
``seed``, ``system_prompt``, ``generation``, ``metrics`` with ``metrics_stderr``, and
``kormedmcqa`` with ``kormedmcqa_detail.stderr`` (docs/evaluation.md). A release shows results
only when this identity is the released model's (docs/model_merge.md)."""


def eval_model_identity(model: str | Path | None, adapter: str | Path | None = None, *,
                        revision: str | None = None, quantize_4bit: bool = False) -> dict[str, Any]:
    """The EVAL_MODEL_KEY record for a model as evaluate.py was given it: `model` (Hub id or local
    folder; None with an adapter = the adapter's recorded base) and optionally `adapter` (adapter or
    run folder). Fingerprints the weights as given (a Hub id: its downloaded snapshot)."""
    adapter_dir = find_adapter_dir(adapter) if adapter is not None else None
    if adapter is not None and adapter_dir is None:
        raise FileNotFoundError(f"{adapter}: no {ADAPTER_CONFIG} (and no adapter_best/ or adapter_last/ beneath it)")
    folder = None
    if model is not None:
        folder = Path(model).expanduser()
        if not folder.exists():
            from hai_medqa.model.acquire import download_model

            folder = Path(download_model(str(model), revision))
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
    if folder is None:
        raise ValueError("eval_model_identity needs a model or an adapter")
    merge_info = _read_json_dict(folder / MERGE_INFO)
    if merge_info:
        out.update(weights="merged", adapter_fingerprint=merge_info.get("adapter_sha256"),
                   merge_into=merge_info.get("merge_into"),
                   base_model=merge_info.get("base_model"), base_model_revision=merge_info.get("base_model_revision"))
    out["fingerprint"] = model_fingerprint(folder)
    return out


def _read_json_dict(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------- training data provenance
SYNTHETIC_SAMPLE = "synthetic sample"
AIHUB_DATASET = "AI Hub 초거대AI 헬스케어 질의응답 데이터 (dataSetSn 71762)"
AIHUB_DATASET_URL = "https://www.aihub.or.kr/aihubdata/data/view.do?dataSetSn=71762"


def data_provenance(jsonl_path: str | Path) -> dict[str, Any]:
    """What a training/validation jsonl is, for records that travel (no path): its file name,
    sha256 and record count, and from its preprocess report (`preprocess_report_path`, used only
    when the report describes this very file) the source dataset as detected from the input tree
    (``SYNTHETIC_SAMPLE`` for the bundled sample), the split, the pairing mode and seed, counts and
    skip counts by reason. Example::

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
    report = _read_json_dict(preprocess_report_path(path))
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


def _is_bundled_sample(source: dict[str, Any]) -> bool:
    """A preprocess source that is the bundled synthetic sample (its folder, or a byte-identical copy
    of its TL.zip/VL.zip)."""
    from hai_medqa.fixtures.aihub_sample import SAMPLE_DIR

    path = Path(str(source.get("path") or ""))
    if not path.exists():
        return False
    sample = SAMPLE_DIR.resolve()
    if path.resolve() == sample or sample in path.resolve().parents:
        return True
    if path.is_file():
        size = path.stat().st_size
        from hai_medqa.io_utils import sha256_file

        return any(z.stat().st_size == size and sha256_file(z) == sha256_file(path) for z in sorted(sample.glob("*.zip")))
    return False


def _split_from_paths(paths) -> str | None:
    from hai_medqa.data.read import SPLIT_MARKERS

    splits = set()
    for p in paths:
        for part in reversed(Path(str(p or "")).parts):
            stem = part[:-4] if part.lower().endswith(".zip") else part
            hit = next((split for split, markers in SPLIT_MARKERS.items() if stem in markers), None)
            if hit:
                splits.add(hit)
                break
    return splits.pop() if len(splits) == 1 else None


def describe_training_data(data: dict[str, Any] | None, *, run_data: dict[str, Any] | None = None) -> str:
    """Markdown for a card's training-data section, written only from `data` (TrainingRecord.data:
    {"train": data_provenance(...), "validation": ...}) or, failing that, the hashes and counts of
    run_info.json's ``data`` (`run_data`). Claims nothing no file supports."""
    parts: list[str] = []
    for split_name, prov in (data or {}).items():
        if not isinstance(prov, dict):
            continue
        head = f"**{split_name}**: `{prov.get('file')}`, {prov.get('records')} records (sha256 `{prov.get('sha256')}`)"
        if not prov.get("report"):
            parts.append(head + ". No preprocess report describing this file was found, so its source is not stated.")
            continue
        source = prov.get("source")
        if source == SYNTHETIC_SAMPLE:
            what = ("the **bundled synthetic sample** of this project (general health text written for the "
                    "project in AI Hub's layout; not AI Hub data, not medical data)")
        else:
            what = f"[{AIHUB_DATASET}]({AIHUB_DATASET_URL}), as detected from the input tree"
        lines = [head + f", built from {what}" + (f", split `{prov['split']}`" if prov.get("split") else "") + "."]
        pairing = f"pairing `{prov.get('pairing')}`, seed {prov.get('seed')}"
        if prov.get("max_pairs_per_folder") is not None:
            pairing += f", at most {prov['max_pairs_per_folder']} pairs per folder"
        if prov.get("drop_intro"):
            pairing += ", answer introductions dropped"
        lines.append(f"- questions and answers paired within each disease/intention folder: {pairing}")
        counts = prov.get("counts") or {}
        for key in ("files", "folders", "questions", "answers", "records"):
            if isinstance(counts.get(key), dict):
                lines.append(f"- {key}: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts[key].items()
                                                      if not isinstance(v, (dict, list))))
        skipped = prov.get("skipped") or {}
        lines.append("- skipped: " + (", ".join(f"{reason} {n}" for reason, n in skipped.items()) if skipped
                                      else "nothing"))
        parts.append("\n".join(lines))
    if not parts and isinstance(run_data, dict):
        for split_name, entry in run_data.items():
            if isinstance(entry, dict) and entry.get("sha256"):
                parts.append(f"**{split_name}**: a jsonl file with sha256 `{entry['sha256']}`"
                             + (f", {entry['records']} records" if entry.get("records") is not None else "")
                             + ". Its preprocess report was not recorded, so its source is not stated.")
    return "\n\n".join(parts) if parts else "The training data was not recorded with this model."


# ---------------------------------------------------------------- the settings a card shows
def training_settings(*, adapter_config: dict | None = None, config: dict | None = None,
                      run_info: dict | None = None, summary: dict | None = None,
                      record: TrainingRecord | None = None) -> list[tuple[str, Any]]:
    """The settings a reader needs, once each and without local bookkeeping: LoRA r/alpha/targets,
    learning rate, schedule, steps, tokens seen, profile, precision, ... From the adapter's config
    (what was saved), the run's resolved config, run_info.json and summary.json; rows whose source
    is missing are left out."""
    ac, cfg, info, summ = adapter_config or {}, config or {}, run_info or {}, summary or {}
    resolved = info.get("resolved") if isinstance(info.get("resolved"), dict) else {}
    schedule = info.get("schedule") if isinstance(info.get("schedule"), dict) else {}
    rows: list[tuple[str, Any]] = []

    def add(label: str, value: Any) -> None:
        if value is not None and value != "":
            rows.append((label, value))

    add("LoRA rank r", ac.get("r", cfg.get("lora_r")))
    add("LoRA alpha", ac.get("lora_alpha", cfg.get("lora_alpha")))
    if ac.get("use_rslora"):
        add("LoRA scaling", "rank-stabilised (alpha / sqrt(r))")
    add("LoRA dropout", ac.get("lora_dropout", cfg.get("lora_dropout")))
    targets = ac.get("target_modules", cfg.get("lora_target_modules"))
    add("LoRA targets", sorted(targets) if isinstance(targets, (list, tuple, set)) else targets)
    add("learning rate", cfg.get("learning_rate"))
    warmup = (f"{schedule['warmup_steps']} warmup steps" if schedule.get("warmup_steps") is not None
              else f"warmup ratio {cfg['warmup_ratio']}" if cfg.get("warmup_ratio") is not None else None)
    add("schedule", ", ".join(str(x) for x in (cfg.get("lr_scheduler"), warmup) if x is not None) or None)
    optimizer = resolved.get("optimizer", cfg.get("optimizer"))
    if optimizer is not None and cfg.get("weight_decay") is not None:
        optimizer = f"{optimizer}, weight decay {cfg['weight_decay']}"
    add("optimizer", optimizer)
    step, total = summ.get("global_step", record.step if record else None), summ.get("total_steps",
                                                                                     schedule.get("total_steps"))
    add("steps", f"{step} of {total}" if step is not None and total is not None and step != total else step)
    add("epochs", summ.get("epoch"))
    if summ.get("tokens_seen") is not None:
        add("tokens seen", f"{summ['tokens_seen']:,}" + (f" ({summ['loss_tokens_seen']:,} answer tokens in the loss)"
                                                        if summ.get("loss_tokens_seen") is not None else ""))
    batch = cfg.get("batching")
    if batch is not None:
        size = (f"{cfg['tokens_per_micro_batch']} tokens per micro-batch" if batch == "packed"
                and cfg.get("tokens_per_micro_batch") else f"{cfg['micro_batch_size']} samples per micro-batch"
                if cfg.get("micro_batch_size") else None)
        accum = cfg.get("gradient_accumulation_steps")
        add("batching", ", ".join(str(x) for x in (batch, size, f"{accum} accumulation step(s)" if accum else None) if x))
    add("max length", cfg.get("max_length", cfg.get("max_seq_len")))
    add("profile", cfg.get("profile", info.get("profile")))
    dtype = resolved.get("compute_dtype", cfg.get("compute_dtype"))
    quant = cfg.get("quantize_4bit")
    if quant is not None or dtype is not None:
        add("precision", ", ".join(x for x in ("base in 4-bit NF4 (QLoRA)" if quant else "base unquantised"
                                                if quant is not None else None,
                                                f"compute {dtype}" if dtype else None) if x))
    add("seed", cfg.get("seed"))
    best, best_step = summ.get("best_val_loss", record.val_loss if record else None), summ.get("best_step")
    if isinstance(best, (int, float)):
        add("validation loss", f"{best:.4f}" + (f" (best, step {best_step})" if best_step is not None else ""))
    return rows


# ---------------------------------------------------------------- an adapter folder others may receive
def finish_adapter_folder(adapter_dir: str | Path, record: TrainingRecord, *, run_dir: str | Path | None = None,
                          requested_model: str | None = None) -> TrainingRecord:
    """Make an adapter folder the trainer just saved shareable (call it after PEFT's
    ``save_pretrained``, instead of `write_training_record`):

    - ``adapter_config.json``: ``base_model_name_or_path`` = the base's Hub id and ``revision`` its
      commit (`hub_reference` of `requested_model`, default ``record.base_model``), or None when only a
      local folder is known (PEFT wrote the local conversion cache path there);
    - TRAINING_RECORD: the record with the base named the same way (local paths stay in run_info.json);
    - ``README.md``: the project's card for this adapter (what was trained, on what data, with which
      settings), replacing PEFT's empty template.

    Returns the record as written. `run_dir` (default: the folder's parent) supplies the settings."""
    from hai_medqa.io_utils import write_json

    adapter_dir = Path(adapter_dir)
    base_id, base_rev = hub_reference(requested_model or record.base_model, record.base_model_revision)
    shared = dataclasses.replace(record, base_model=base_id, base_model_revision=base_rev)
    config = _read_json_dict(adapter_dir / ADAPTER_CONFIG)
    if config:
        config.update(base_model_name_or_path=base_id, revision=base_rev)
        write_json(adapter_dir / ADAPTER_CONFIG, config)
    write_training_record(adapter_dir, shared)
    run = Path(run_dir) if run_dir is not None else adapter_dir.parent
    from hai_medqa.io_utils import atomic_write_text

    atomic_write_text(adapter_dir / MODEL_CARD, adapter_card(shared, adapter_config=config, run_dir=run))
    return shared


def adapter_card(record: TrainingRecord, *, adapter_config: dict | None, run_dir: Path | None) -> str:
    """The README.md of a run folder's adapter: base, data and settings from the records only."""
    import yaml

    cfg, summary = {}, {}
    if run_dir is not None and (run_dir / RESOLVED_CONFIG).is_file():
        with contextlib.suppress(OSError, yaml.YAMLError):
            cfg = yaml.safe_load((run_dir / RESOLVED_CONFIG).read_text(encoding="utf-8")) or {}
    run_info = _read_json_dict(run_dir / RUN_INFO) if run_dir is not None else {}
    summary = _read_json_dict(run_dir / SUMMARY) if run_dir is not None else {}
    meta = {"library_name": "peft", "license": "other", "license_name": "exaone",
            "license_link": "https://huggingface.co/LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct/blob/main/LICENSE",
            "language": ["ko"], "tags": ["hai-medqa", "lora", "qlora", "exaone", "korean", "medical"]}
    if record.base_model:
        meta = {"base_model": record.base_model, **meta}
    base = (f"[{record.base_model}](https://huggingface.co/{record.base_model})"
            + (f" (revision `{record.base_model_revision}`)" if record.base_model_revision else "")
            if record.base_model else "a local EXAONE-3.5 model folder (no Hub id was recorded)")
    at = f" at step {record.step}" if record.step is not None else ""
    rows = training_settings(adapter_config=adapter_config, config=cfg if isinstance(cfg, dict) else {},
                             run_info=run_info, summary=summary, record=record)
    table = "\n".join(["| setting | value |", "|---|---|"]
                      + [f"| {k} | {', '.join(map(str, v)) if isinstance(v, list) else v} |" for k, v in rows])
    return (
        "---\n" + yaml.safe_dump(meta, allow_unicode=True, sort_keys=False) + "---\n\n"
        f"# HAI MedQA LoRA adapter{at}\n\n"
        f"A LoRA adapter for {base}, trained with QLoRA by the HAI MedQA pipeline on Korean healthcare question "
        "answering. Its module names are those of the Llama-layout copy of EXAONE-3.5 this project trains on "
        "(`model.layers.N.self_attn.q_proj`, ...): load it onto that copy (`chat.py --adapter`, "
        "`evaluate.py --adapter`). `merge_and_upload.py --adapter-only` publishes it under EXAONE's own module "
        "names for the official model.\n\n"
        "## Training data\n\n" + describe_training_data(record.data, run_data=run_info.get("data")) + "\n\n"
        "## Training settings\n\n" + table + "\n\n"
        "## Use and license\n\n"
        "Research only: not medical advice, diagnosis or treatment. Derived from EXAONE 3.5 under the EXAONE AI "
        "Model License Agreement 1.1 - NC (research and non-commercial use; the agreement must accompany every "
        "copy; modified models' names must start with \"EXAONE\").\n"
    )
