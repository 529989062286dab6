"""preprocess_medical.py refuses, in one line and before reading anything, every output that would
overwrite or land in its inputs (issue 15, item 1). Every input stays byte-identical."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from hai_medqa.data import run_preprocess
from hai_medqa.data.cli import main
from hai_medqa.fixtures.aihub_sample import SAMPLE_DIR, VALIDATION_LABEL_ROOT
from hai_medqa.guards import PathError
from hai_medqa.io_utils import sha256_file


@pytest.fixture
def work(tmp_path) -> Path:
    """A copy of VL.zip and of the extracted VL folder, with a snapshot of every byte."""
    shutil.copy(SAMPLE_DIR / "VL.zip", tmp_path / "VL.zip")
    shutil.copytree(SAMPLE_DIR / VALIDATION_LABEL_ROOT, tmp_path / "VL")
    return tmp_path


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(capsys, *args: str) -> tuple[int, list[str]]:
    rc = main([*args, "--no-progress"])
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.startswith("error:")]


def _refused(capsys, work: Path, args: list[str], message: str) -> None:
    before = _snapshot(work)
    rc, errors = _run(capsys, *args)
    assert rc == 1 and len(errors) == 1, errors
    assert message in errors[0], errors[0]
    assert _snapshot(work) == before  # nothing read was changed, nothing new was written


def test_output_that_is_the_input_zip_is_refused(work, capsys):
    z = str(work / "VL.zip")
    _refused(capsys, work, ["--input", z, "--output", z], f"--output {z} is the input --input {z}")


def test_report_that_is_the_output_is_refused(work, capsys):
    out = str(work / "val.jsonl")
    args = ["--input", str(work / "VL.zip"), "--output", out, "--report", out]
    _refused(capsys, work, args, "--output and --report name the same path")


def test_report_or_log_file_that_is_an_input_is_refused(work, capsys):
    z = str(work / "VL.zip")
    out = str(work / "val.jsonl")
    _refused(capsys, work, ["--input", z, "--output", out, "--report", z], f"--report {z} is the input")
    # loguru appends to its file: the zip would have been damaged before any check ran
    _refused(capsys, work, ["--input", z, "--output", out, "--log-file", z], f"--log-file {z} is the input")


def test_output_inside_an_input_folder_is_refused(work, capsys):
    folder = work / "VL"
    out = folder / "train.jsonl"
    _refused(capsys, work, ["--input", str(folder), "--output", str(out)], "lies inside the input")


def test_output_reached_through_a_symlink_or_dotdot_is_refused(work, capsys):
    (work / "link").symlink_to(work / "VL" / "1.질문", target_is_directory=True)
    out = work / "link" / "val.jsonl"  # really VL/1.질문/val.jsonl
    _refused(capsys, work, ["--input", str(work / "VL"), "--output", str(out)], "lies inside the input")
    (work / "zip-link.jsonl").symlink_to(work / "VL.zip")
    args = ["--input", str(work / "VL.zip"), "--output", str(work / "zip-link.jsonl")]
    _refused(capsys, work, args, "is the input")
    (work / "sub").mkdir()
    dotdot = work / "sub" / ".." / "VL.zip"
    _refused(capsys, work, ["--input", str(work / "VL.zip"), "--output", str(dotdot)], "is the input")


def test_same_file_under_two_cases_is_one_file(tmp_path, capsys):
    """On a case-insensitive system (macOS, Windows) Out.jsonl and out.jsonl are one file; refuse
    them as output and report everywhere rather than guess the file system."""
    args = ["--input", str(SAMPLE_DIR / "VL.zip"), "--output", str(tmp_path / "Out.jsonl")]
    rc, errors = _run(capsys, *args, "--report", str(tmp_path / "out.JSONL"))
    assert rc == 1 and "--output and --report name the same path" in errors[0]
    assert list(tmp_path.iterdir()) == []


def test_output_that_is_a_folder_is_refused_before_reading(work, capsys):
    """Old code did all the work and then failed in a traceback. The check comes before the inputs
    are even opened: a broken input does not get the chance to be reported first."""
    (work / "broken.zip").write_bytes((work / "VL.zip").read_bytes()[:1000])
    args = ["--input", str(work / "broken.zip"), "--output", str(work / "VL")]
    _refused(capsys, work, args, f"--output {work / 'VL'} is a folder")
    (work / "reports").mkdir()
    args = [
        "--input",
        str(work / "VL.zip"),
        "--output",
        str(work / "val.jsonl"),
        "--report",
        str(work / "reports"),
    ]
    _refused(capsys, work, args, f"--report {work / 'reports'} is a folder")
    args = ["--input", str(work / "VL.zip"), "--output", str(work / "val.jsonl"), "--report", str(work)]
    _refused(capsys, work, args, f"--report {work} contains the input --input {work / 'VL.zip'}")


def test_output_below_a_file_is_refused(work, capsys):
    out = work / "VL.zip" / "val.jsonl"
    args = ["--input", str(work / "VL" / ".." / "VL"), "--output", str(out)]
    _refused(capsys, work, args, f"{work / 'VL.zip'} is a file, not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_output_in_a_read_only_folder_is_refused(work, capsys):
    ro = work / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        args = ["--input", str(work / "VL.zip"), "--output", str(ro / "val.jsonl")]
        _refused(capsys, work, args, "no write permission")
    finally:
        ro.chmod(0o755)


def test_the_python_entry_point_is_guarded_too(work):
    z = work / "VL.zip"
    before = sha256_file(z)
    with pytest.raises(PathError, match="is the input"):
        run_preprocess([z], z, progress=False)
    assert sha256_file(z) == before


def test_a_sibling_output_is_fine(work, capsys):
    rc, errors = _run(capsys, "--input", str(work / "VL"), "--output", str(work / "VL.jsonl"))
    assert rc == 0 and errors == []
