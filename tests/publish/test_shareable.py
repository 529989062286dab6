"""What may leave the machine: records rewritten without local paths, models named by Hub id, data by
provenance, and the run's adapter folder made shareable (train.adapter_folder.finish_adapter_folder, which the
trainer calls after saving an adapter)."""

from __future__ import annotations

import json
import shutil

import pytest

from hai_medqa.data.provenance import AIHUB_DATASET, SYNTHETIC_SAMPLE, data_provenance
from hai_medqa.model.identity import hub_reference
from hai_medqa.publish.shareable import (
    LOCAL_PATH,
    LocalPathError,
    check_no_local_paths,
    scrub,
    shareable_run_info,
)
from hai_medqa.run_folder import TrainingRecord, preprocess_report_path
from hai_medqa.train.adapter_folder import finish_adapter_folder

MARKER = "MARKER-a81k-private"
BASE_ID = "LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_hub_reference_names_models_by_hub_id(tmp_path):
    from hai_medqa.model.convert import RECORD_FILE

    assert hub_reference(BASE_ID, "main") == (BASE_ID, "main")
    snapshot = tmp_path / "hub" / "models--LGAI-EXAONE--EXAONE-3.5-7.8B-Instruct" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    assert hub_reference(snapshot) == (BASE_ID, COMMIT)
    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / RECORD_FILE).write_text(json.dumps({"source": str(snapshot), "source_id": f"hub:{BASE_ID}@{COMMIT}"}))
    assert hub_reference(converted) == (BASE_ID, COMMIT)
    local = tmp_path / "my_model"
    local.mkdir()
    assert hub_reference(local) == (None, None) and hub_reference(None) == (None, None)


def test_data_provenance_reads_the_matching_report(sample_jsonl, tmp_path):
    train = data_provenance(sample_jsonl["train"])
    assert train["source"] == SYNTHETIC_SAMPLE and train["split"] == "train" and train["report"] is True
    assert train["file"] == "train.jsonl" and train["records"] == 243 and train["pairing"] == "round_robin"
    assert train["seed"] == 0 and train["skipped"] == {} and train["counts"]["records"]["written"] == 243
    assert str(sample_jsonl["train"].parent) not in json.dumps(train)  # no path in what travels

    # A report whose source is not the bundled sample: the AI Hub dataset as detected from the tree.
    copy = tmp_path / "train.jsonl"
    shutil.copy(sample_jsonl["train"], copy)
    report = json.loads(preprocess_report_path(sample_jsonl["train"]).read_text())
    report["sources"] = [{"kind": "folder", "path": str(tmp_path / "aihub" / "Training" / "TL")}]
    report["options"]["split"] = None
    report["skipped"] = {"empty_answer": {"count": 3, "questions": 0, "answers": 3, "examples": []}}
    preprocess_report_path(copy).write_text(json.dumps(report))
    other = data_provenance(copy)
    assert other["source"] == AIHUB_DATASET and other["split"] == "train" and other["skipped"] == {"empty_answer": 3}

    # A report of another file (the jsonl changed since): nothing is claimed from it.
    copy.write_text(copy.read_text() + '{"instruction": "q", "output": "a"}\n')
    changed = data_provenance(copy)
    assert changed["report"] is False and changed["source"] is None and changed["records"] == 244


def test_scrub_replaces_local_paths_only():
    obj = {"output_dir": "runs/medqa", "model": BASE_ID, "url": "https://huggingface.co/LGAI-EXAONE/x",
           "note": "loaded /home/alice/models/x in 3~5 s", "ratio": "1/2", "train_file": "/data/train.jsonl",
           "list": ["~/cache/a", "정의/원인"], "n": 3}
    out = scrub(obj)
    assert out["output_dir"] == LOCAL_PATH and out["train_file"] == LOCAL_PATH and out["list"] == [LOCAL_PATH, "정의/원인"]
    assert out["model"] == BASE_ID and out["url"] == obj["url"] and out["ratio"] == "1/2" and out["n"] == 3
    assert out["note"] == f"loaded {LOCAL_PATH} in 3~5 s"
    info = shareable_run_info({"command": ["S_F2.py", "--model", "/home/alice/m"],
                               "model": {"requested": BASE_ID, "revision": COMMIT, "local_path": "/home/alice/c"},
                               "data": {"train_file": {"path": "/home/alice/d/train.jsonl", "sha256": "ab", "records": 3}}})
    assert info == {"model": {"base_model": BASE_ID, "base_model_revision": COMMIT},
                    "data": {"train_file": {"file": "train.jsonl", "sha256": "ab", "records": 3}}}


def test_guard_refuses_a_folder_with_a_local_path(tmp_path):
    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "notes.json").write_text(json.dumps({"x": str(tmp_path / MARKER)}))
    with pytest.raises(LocalPathError, match="notes.json .* holds the local path"):
        check_no_local_paths(folder, [str(tmp_path / MARKER)])
    check_no_local_paths(folder, [str(tmp_path / "elsewhere")])


def test_finish_adapter_folder_makes_the_run_adapter_shareable(tiny_lora_run, sample_jsonl, tmp_path):
    """What the trainer calls after PEFT's save_pretrained: the adapter folder then names the base by
    Hub id (None for a local base), carries the project's card instead of PEFT's template, and holds
    no local path; local paths stay in run_info.json."""
    run = tmp_path / MARKER / "run"
    shutil.copytree(tiny_lora_run, run)
    adapter = run / "adapter_best"
    (adapter / "README.md").write_text("---\nbase_model: /private/x\n---\n# Model Card for Model ID\n"
                                       "[More Information Needed]\n")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / MARKER / "cache" / "converted")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    data = {"train": data_provenance(sample_jsonl["train"])}

    local = finish_adapter_folder(adapter, TrainingRecord(base_model=str(tmp_path / MARKER / "tiny"), step=60,
                                                          system_prompt="", data=data))
    assert local.base_model is None
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    card = (adapter / "README.md").read_text(encoding="utf-8")
    assert "[More Information Needed]" not in card and "# HAI MedQA LoRA adapter at step 60" in card
    assert "bundled synthetic sample" in card and "| LoRA rank r | 4 |" in card and "| learning rate | 0.003 |" in card
    assert not [p.name for p in adapter.iterdir() if MARKER.encode() in p.read_bytes()]

    hub = finish_adapter_folder(adapter, TrainingRecord(base_model=BASE_ID, base_model_revision=COMMIT, step=60))
    assert hub.base_model == BASE_ID
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert (cfg["base_model_name_or_path"], cfg["revision"]) == (BASE_ID, COMMIT)
    assert f"base_model: {BASE_ID}" in (adapter / "README.md").read_text(encoding="utf-8")
