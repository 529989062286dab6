"""A run folder's adapter as others may receive it, and the card text every adapter and release shares.

After PEFT saves an adapter (`checkpoint.save_adapter`), the trainer calls `finish_adapter_folder`:
the base is named by Hub id (or null) in ``adapter_config.json`` and the TrainingRecord, and the
project's card (what was trained, on what data, with which settings) replaces PEFT's empty README
template. Local paths stay in run_info.json. The publish stage writes its release card from the same
pieces (`describe_training_data`, `training_settings`), so a fact is worded in one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from hai_medqa.data.provenance import AIHUB_DATASET, AIHUB_DATASET_URL, CONSULTATION_SAMPLE, SYNTHETIC_SAMPLE
from hai_medqa.io_utils import atomic_write_text, read_json_object, write_json
from hai_medqa.model.identity import hub_reference
from hai_medqa.run_folder import (
    ADAPTER_CONFIG,
    MODEL_CARD,
    RESOLVED_CONFIG,
    RUN_INFO,
    SAMPLES,
    SUMMARY,
    TrainingRecord,
    write_training_record,
)


def describe_training_data(data: dict[str, Any] | None, *, run_data: dict[str, Any] | None = None) -> str:
    """Markdown for a card's training-data section, written only from `data` (TrainingRecord.data:
    {"train": data_provenance(...), "validation": ...}) or, failing that, the hashes and counts of
    run_info.json's ``data`` (`run_data`). Claims nothing no file supports."""
    parts: list[str] = []
    for split_name, prov in (data or {}).items():
        if not isinstance(prov, dict):
            continue
        head = f"**{split_name}**: `{prov.get('file')}`, {prov.get('records')} records (sha256 `{prov.get('sha256')}`)"
        if prov.get("source") == CONSULTATION_SAMPLE:
            parts.append(head + ", the **bundled consultation sample** of this project (Korean multi-turn "
                         "consultations written by hand for the project as a template and test fixture, in OpenAI "
                         "messages format; not AI Hub data, not reviewed by a clinician)"
                         + (f", split `{prov['split']}`" if prov.get("split") else "") + ".")
            continue
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
        base = ("base in FP8 e4m3, row-wise scales" if cfg.get("base_precision") == "fp8"
                else "base in 4-bit NF4 (QLoRA)" if quant else "base unquantised" if quant is not None else None)
        add("precision", ", ".join(x for x in (base,
                                                f"compute {dtype}" if dtype else None) if x))
    add("seed", cfg.get("seed"))
    best, best_step = summ.get("best_val_loss", record.val_loss if record else None), summ.get("best_step")
    if isinstance(best, (int, float)):
        add("validation loss", f"{best:.4f}" + (f" (best, step {best_step})" if best_step is not None else ""))
    return rows


SAMPLE_CELL_CHARS = 300
"""A sample answer or question longer than this is cut (with an ellipsis) in the card's table."""


def last_sample_answers(run_dir: Path | None) -> tuple[int | None, list[dict[str, Any]]]:
    """The last evaluation's sample answers in the run folder's samples.jsonl: (step, rows), or
    (None, []) when there are none (sample_questions 0, or no evaluation yet). A torn last line
    (an interrupted write) is skipped."""
    path = run_dir / SAMPLES if run_dir is not None else None
    if path is None or not path.is_file():
        return None, []
    rows = []
    with contextlib.suppress(OSError):
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                if isinstance(row, dict) and isinstance(row.get("step"), int):
                    rows.append(row)
    if not rows:
        return None, []
    step = max(r["step"] for r in rows)
    return step, [r for r in rows if r["step"] == step]


def _cell(value: Any) -> str:
    text = " ".join(str(value if value is not None else "").split())  # one table row: no line breaks
    if len(text) > SAMPLE_CELL_CHARS:
        text = text[:SAMPLE_CELL_CHARS - 1] + "\u2026"
    return text.replace("|", "\\|")


def sample_answers_section(run_dir: Path | None) -> str:
    """The card's sample answers: the last evaluation's questions, greedy answers and references as
    a table ("" when the run logged none)."""
    step, rows = last_sample_answers(run_dir)
    if not rows:
        return ""
    lines = [f"### Sample answers at step {step}\n",
             "Greedy answers to fixed validation questions at the run's last evaluation (`samples.jsonl` in the "
             "run folder holds every evaluation's).\n",
             "| question | answer | reference |", "|---|---|---|"]
    lines += [f"| {_cell(r.get('question'))} | {_cell(r.get('answer'))} | {_cell(r.get('reference'))} |" for r in rows]
    return "\n".join(lines) + "\n\n"


# ---------------------------------------------------------------- an adapter folder others may receive
def finish_adapter_folder(adapter_dir: str | Path, record: TrainingRecord, *, run_dir: str | Path | None = None,
                          requested_model: str | None = None,
                          summary: dict[str, Any] | None = None) -> TrainingRecord:
    """Make an adapter folder the trainer just saved shareable (call it after PEFT's
    ``save_pretrained``, instead of `write_training_record`):

    - ``adapter_config.json``: ``base_model_name_or_path`` = the base's Hub id and ``revision`` its
      commit (`hub_reference` of `requested_model`, default ``record.base_model``), or None when only a
      local folder is known (PEFT wrote the local conversion cache path there);
    - TRAINING_RECORD: the record with the base named the same way (local paths stay in run_info.json);
    - ``README.md``: the project's card for this adapter (what was trained, on what data, with which
      settings), replacing PEFT's empty template.

    Returns the record as written. `run_dir` (default: the folder's parent) supplies the settings;
    `summary` (summary.json's keys: global_step, total_steps, tokens_seen, ...) the progress when the
    run's summary.json is not written yet or is an earlier session's (the trainer passes its state).
    The adapter's weights are not touched."""
    adapter_dir = Path(adapter_dir)
    base_id, base_rev = hub_reference(requested_model or record.base_model, record.base_model_revision)
    shared = dataclasses.replace(record, base_model=base_id, base_model_revision=base_rev)
    config = read_json_object(adapter_dir / ADAPTER_CONFIG)
    if config:
        config.update(base_model_name_or_path=base_id, revision=base_rev)
        write_json(adapter_dir / ADAPTER_CONFIG, config)
    write_training_record(adapter_dir, shared)
    run = Path(run_dir) if run_dir is not None else adapter_dir.parent
    atomic_write_text(adapter_dir / MODEL_CARD, adapter_card(shared, adapter_config=config, run_dir=run,
                                                             summary=summary))
    return shared


def adapter_card(record: TrainingRecord, *, adapter_config: dict | None, run_dir: Path | None,
                 summary: dict[str, Any] | None = None) -> str:
    """The README.md of a run folder's adapter: base, data and settings from the records only
    (`summary`, when given, instead of the run's summary.json)."""
    cfg: Any = {}
    if run_dir is not None and (run_dir / RESOLVED_CONFIG).is_file():
        with contextlib.suppress(OSError, yaml.YAMLError):
            cfg = yaml.safe_load((run_dir / RESOLVED_CONFIG).read_text(encoding="utf-8")) or {}
    run_info = read_json_object(run_dir / RUN_INFO) if run_dir is not None else {}
    if summary is None:
        summary = read_json_object(run_dir / SUMMARY) if run_dir is not None else {}
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
        + sample_answers_section(run_dir) +
        "## Use and license\n\n"
        "Research only: not medical advice, diagnosis or treatment. Derived from EXAONE 3.5 under the EXAONE AI "
        "Model License Agreement 1.1 - NC (research and non-commercial use; the agreement must accompany every "
        "copy; modified models' names must start with \"EXAONE\").\n"
    )
