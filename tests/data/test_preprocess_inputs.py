"""Preprocessing tells the truth about its inputs (issue 15, item 4): a partial download is called one,
files reached twice are used once (with a warning and a count), Training and Validation are not
mixed unless asked, and every folder without a partner is named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hai_medqa.data import run_preprocess
from hai_medqa.data.cli import main
from hai_medqa.fixtures.aihub_sample import SAMPLE_DIR, TRAIN_LABEL_ROOT, VALIDATION_LABEL_ROOT
from hai_medqa.fixtures.synthetic_trees import write_synthetic_tree

TL_ZIP, VL_ZIP = SAMPLE_DIR / "TL.zip", SAMPLE_DIR / "VL.zip"
TL, VL = SAMPLE_DIR / TRAIN_LABEL_ROOT, SAMPLE_DIR / VALIDATION_LABEL_ROOT
TL_FILES = 435  # 243 questions + 192 answers


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("keep", [0.5, 0.999], ids=["half", "all-but-the-end"])
def test_partial_download_is_called_truncated(tmp_path, capsys, keep):
    data = TL_ZIP.read_bytes()
    part = tmp_path / "TL.zip"
    part.write_bytes(data[: int(len(data) * keep)])
    assert main(["--input", str(part), "--output", str(tmp_path / "t.jsonl"), "--no-progress"]) == 1
    errors = _errors(capsys)
    assert len(errors) == 1 and "truncated or damaged zip" in errors[0] and str(part) in errors[0]
    assert "not a zip archive" not in errors[0]


def test_truncated_zip_found_by_a_search_is_named_too(tmp_path, capsys):
    holder = tmp_path / "02.라벨링데이터"
    holder.mkdir()
    (holder / "TL.zip").write_bytes(TL_ZIP.read_bytes()[:5000])
    assert main(["--input", str(holder), "--output", str(tmp_path / "t.jsonl"), "--no-progress"]) == 1
    assert "truncated or damaged zip" in _errors(capsys)[0]


def test_empty_and_non_zip_files(tmp_path, capsys):
    (tmp_path / "TL.zip").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    assert main(["--input", str(tmp_path / "TL.zip"), "--output", str(tmp_path / "a.jsonl")]) == 1
    assert "zip is empty" in _errors(capsys)[0]
    assert main(["--input", str(tmp_path / "notes.txt"), "--output", str(tmp_path / "a.jsonl")]) == 1
    assert "not a zip archive" in _errors(capsys)[0]


def test_zip_and_its_extracted_folder_are_read_once(tmp_path, capsys):
    """Old code doubled every question (and every record) without a word."""
    alone = run_preprocess([TL_ZIP], tmp_path / "alone.jsonl", progress=False)
    out = tmp_path / "both.jsonl"
    assert main(["--input", str(TL_ZIP), "--input", str(TL), "--output", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "435 files (243 questions, 192 answers) were reached through more than one input" in err
    assert out.read_bytes() == (tmp_path / "alone.jsonl").read_bytes()
    report = json.loads(Path(f"{out}.report.json").read_text(encoding="utf-8"))
    dup = report["skipped"]["duplicate_file"]
    assert (dup["count"], dup["questions"], dup["answers"]) == (TL_FILES, 243, 192)
    assert "same content" in dup["examples"][0] and str(TL_ZIP) in dup["examples"][0]
    assert report["questions"]["valid"] == alone["questions"]["valid"] == 243


def test_overlapping_copies_use_the_first_inputs_copy(tmp_path):
    a, b = tmp_path / "a" / "TL", tmp_path / "b" / "TL"
    write_synthetic_tree(a, n_leaves=1, questions_per_leaf=3, answers_per_leaf=2)  # 5 files: all listed
    shutil.copytree(a, b)
    changed = sorted((b / "1.질문").rglob("*.json"))[0]
    changed.write_text(changed.read_text(encoding="utf-8").replace("?", "??"), encoding="utf-8")
    run_preprocess([a], tmp_path / "a.jsonl", progress=False)
    report = run_preprocess([a, b], tmp_path / "ab.jsonl", progress=False)
    assert (tmp_path / "ab.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    dup = report["skipped"]["duplicate_file"]
    assert (dup["count"], dup["questions"], dup["answers"]) == (5, 3, 2)
    different = [e for e in dup["examples"] if "DIFFERENT content" in e]
    assert len(different) == 1 and different[0].startswith(f"{changed}: also reached as {a}")


def test_training_and_validation_inputs_are_not_mixed_silently(tmp_path, capsys):
    """Old code wrote TL and VL records into one file."""
    out = tmp_path / "mixed.jsonl"
    args = ["--input", str(TL_ZIP), "--input", str(VL_ZIP), "--output", str(out), "--no-progress"]
    assert main(args) == 1
    errors = _errors(capsys)
    assert len(errors) == 1 and "mix Training data" in errors[0] and "--allow-mixed-splits" in errors[0]
    assert not out.exists()
    assert main([*args, "--allow-mixed-splits"]) == 0
    report = json.loads(Path(f"{out}.report.json").read_text(encoding="utf-8"))
    assert report["records"]["written"] == 243 + 35 and report["options"]["allow_mixed_splits"] is True
    assert [s["split"] for s in report["sources"]] == ["train", "validation"]
    assert main([*args, "--split", "train"]) == 0  # --split picks one half of what was given
    report = json.loads(Path(f"{out}.report.json").read_text(encoding="utf-8"))
    assert report["records"]["written"] == 243
    assert report["not_used"] == [{"path": str(VL_ZIP), "reason": "not part of --split train"}]


def test_a_folder_holding_both_halves_can_be_used_whole_only_when_asked(tmp_path):
    out = tmp_path / "all.jsonl"
    report = run_preprocess([SAMPLE_DIR], out, allow_mixed_splits=True, progress=False)
    assert report["records"]["written"] == 243 + 35


def test_every_folder_without_a_partner_is_named(tmp_path, capsys):
    root = tmp_path / "TL"
    write_synthetic_tree(root, n_leaves=14, questions_per_leaf=2, answers_per_leaf=2)
    q_leaves = sorted({p.parent for p in (root / "1.질문").rglob("*.json")})
    questions_only = [q.relative_to(root / "1.질문") for q in q_leaves[:12]]  # more than the summary shows
    answers_only = [q.relative_to(root / "1.질문") for q in q_leaves[12:13]]
    for rel in questions_only:
        shutil.rmtree(root / "2.답변" / rel)
    for rel in answers_only:
        shutil.rmtree(root / "1.질문" / rel)
    out = tmp_path / "t.jsonl"
    assert main(["--input", str(root), "--output", str(out), "--no-progress"]) == 0
    report = json.loads(Path(f"{out}.report.json").read_text(encoding="utf-8"))
    assert report["unpaired_folders"]["questions_only"] == sorted(r.as_posix() for r in questions_only)
    assert report["unpaired_folders"]["answers_only"] == [r.as_posix() for r in answers_only]
    assert report["folders"]["questions_only"] == 12 and report["folders"]["answers_only"] == 1
    stdout = capsys.readouterr().out
    assert answers_only[0].as_posix() in stdout and "... and 2 more" in stdout
