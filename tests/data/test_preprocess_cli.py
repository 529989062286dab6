"""preprocess_medical.py: exit codes and one-line errors, summary, atomic output (also when the run is
interrupted by a real signal), and identical output for any number of workers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hai_medqa.data import run_preprocess
from hai_medqa.data.cli import main
from hai_medqa.data.schema import DataError
from hai_medqa.fixtures.aihub_sample import SAMPLE_DIR, VALIDATION_LABEL_ROOT
from hai_medqa.fixtures.synthetic_trees import write_synthetic_tree
from hai_medqa.io_utils import iter_jsonl

REPO = Path(__file__).resolve().parents[2]


def test_cli_writes_records_report_and_summary(tmp_path, capsys):
    out = tmp_path / "data" / "val.jsonl"
    assert main(["--input", str(SAMPLE_DIR / "VL.zip"), "--output", str(out), "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    report = json.loads(Path(f"{out}.report.json").read_text(encoding="utf-8"))
    n = sum(1 for _ in iter_jsonl(out))
    assert n == report["records"]["written"] > 0
    assert "[records]" in stdout and "written" in stdout and str(out) in stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input", "does/not/exist"], "error: input not found: does/not/exist"),
        (["--input", str(SAMPLE_DIR), "--pairing", "cross"], "error: pairing 'cross' needs a cap"),
        (["--input", str(SAMPLE_DIR)], "error: " + str(SAMPLE_DIR) + " holds both Training and Validation"),
    ],
)
def test_cli_errors_are_one_line_and_nonzero(tmp_path, capsys, args, message):
    out = tmp_path / "out.jsonl"
    assert main([*args, "--output", str(out), "--no-progress"]) == 1
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and err_lines[0].startswith(message)
    assert not out.exists()


def test_zero_records_is_an_error_and_keeps_the_old_output(tmp_path, capsys):
    root = tmp_path / "TL"
    write_synthetic_tree(root, n_leaves=2, questions_per_leaf=2, answers_per_leaf=1)
    for answer in (root / "2.답변").rglob("*.json"):
        answer.unlink()  # questions without answers: nothing to pair
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n", encoding="utf-8")
    assert main(["--input", str(root), "--output", str(out), "--no-progress"]) == 1
    assert "error: no records produced" in capsys.readouterr().err
    assert out.read_text(encoding="utf-8") == "previous\n"
    report = json.loads(Path(f"{out}.report.json").read_text(encoding="utf-8"))
    assert report["folders"]["questions_only"] == 2 and report["records"]["written"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "TL",
        "out.jsonl",
        "out.jsonl.report.json",
    ]  # no temp left
    with pytest.raises(DataError):
        run_preprocess([root], out, progress=False)


def test_thin_script_runs(tmp_path):
    out = tmp_path / "val.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            "preprocess_medical.py",
            "--input",
            str(SAMPLE_DIR / VALIDATION_LABEL_ROOT),
            "--output",
            str(out),
            "--no-progress",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert out.exists() and "[skipped]" in done.stdout


def test_workers_do_not_change_the_output(tmp_path):
    tl = SAMPLE_DIR / "TL.zip"
    one = run_preprocess([tl], tmp_path / "one.jsonl", workers=1, progress=False)
    two = run_preprocess([tl], tmp_path / "two.jsonl", workers=2, progress=False)
    assert two["options"]["workers"] == 2
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()
    assert {k: v for k, v in one.items() if k not in ("options", "seconds", "output", "report")} == {
        k: v for k, v in two.items() if k not in ("options", "seconds", "output", "report")
    }


@pytest.fixture(scope="module")
def mid_size_tree(tmp_path_factory) -> Path:
    """6,000 files: enough work that a signal lands while the output is being written."""
    root = tmp_path_factory.mktemp("mid") / "TL"
    write_synthetic_tree(root, n_leaves=300, questions_per_leaf=10, answers_per_leaf=10)
    return root


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_run_never_touches_the_output(tmp_path, mid_size_tree, sig):
    out = tmp_path / "train.jsonl"
    out.write_text("previous\n", encoding="utf-8")
    proc = subprocess.Popen(
        [
            sys.executable,
            "preprocess_medical.py",
            "--input",
            str(mid_size_tree),
            "--output",
            str(out),
            "--workers",
            "1",
            "--no-progress",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Records go to a temporary file beside the output; interrupt once it holds some of them.
    while not any(p.stat().st_size > 0 for p in tmp_path.glob(".train.jsonl.*.tmp")):
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before it could be interrupted")
        time.sleep(0.002)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert out.read_text(encoding="utf-8") == "previous\n"
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert f"interrupted by Ctrl-C (SIGINT): {out} was not changed" in stderr
        assert not list(tmp_path.glob(".train.jsonl.*"))  # the partial temporary file was removed
    else:
        assert proc.returncode == -signal.SIGKILL  # nothing can clean up; the output is still intact
