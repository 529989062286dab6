"""Fixtures of the release tests: a base folder that carries a license file, and a run whose adapter
records its training data's provenance (as the trainer does through train.adapter_folder.finish_adapter_folder)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

LICENSE_TEXT = "EXAONE AI Model License Agreement 1.1 - NC\n\n(stand-in for the full agreement text)\n"
BASE_ID = "LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct"


@pytest.fixture(scope="session")
def licensed_base(tiny_exaone_dir, tmp_path_factory) -> Path:
    """The tiny EXAONE checkpoint with a LICENSE file, as LG's repositories ship one."""
    base = tmp_path_factory.mktemp("licensed_base") / "model"
    shutil.copytree(tiny_exaone_dir, base)
    (base / "LICENSE").write_text(LICENSE_TEXT, encoding="utf-8")
    return base


@pytest.fixture(scope="session")
def provenance_run(tiny_lora_run, sample_jsonl, tmp_path_factory) -> Path:
    """tiny_lora_run whose adapter records the bundled sample's provenance and a trained system prompt."""
    from hai_medqa.data.provenance import data_provenance
    from hai_medqa.run_folder import TrainingRecord, write_training_record

    run = tmp_path_factory.mktemp("provenance_run") / "run"
    shutil.copytree(tiny_lora_run, run)
    write_training_record(run / "adapter_best", TrainingRecord(
        base_model=BASE_ID, step=60, val_loss=4.25, system_prompt="당신은 의료 상담 챗봇입니다.",
        data={"train": data_provenance(sample_jsonl["train"]),
              "validation": data_provenance(sample_jsonl["validation"])}))
    return run
