"""S_F2.py start-up (issue 15 item 5): paths and --resume that cannot work are one line naming the
path, before the run folder is created or any model loads; a Ctrl-C during start-up says so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import S_F2
from hai_medqa.cli import run_cli
from hai_medqa.io_utils import FAULT_FILE_ENV, FAULT_POINT_ENV

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_model_load(monkeypatch):
    """Every check here must fail before the model is fetched: fetching it fails the test."""
    def refuse(*_a, **_k):
        raise AssertionError("the model was fetched before the start-up checks")
    monkeypatch.setattr("hai_medqa.model.acquire.resolve_model", refuse)


def _argv(tiny_exaone_dir, train, out, *extra) -> list[str]:
    return ["--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--model", str(tiny_exaone_dir),
            "--train-file", str(train), "--val-file", "null", "--output-dir", str(out), "--max-steps", "2",
            "--tensorboard", "false", *extra]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_resume_without_checkpoint_is_an_error_naming_the_folder(tiny_exaone_dir, sample_jsonl, tmp_path, capsys,
                                                                 no_model_load):
    out = tmp_path / "runs" / "typo"
    assert run_cli(S_F2.main, _argv(tiny_exaone_dir, sample_jsonl["train"], out, "--resume")) == 1
    line = _one_error_line(capsys)
    assert "--resume: no checkpoint to resume in" in line and str(out / "checkpoints") in line
    assert not out.exists()  # the typo'd folder is not created


@pytest.mark.parametrize("how", ["same path", "symlink", "dot-dot"])
def test_same_file_as_train_and_validation_data_is_refused(how, tiny_exaone_dir, sample_jsonl, tmp_path, capsys,
                                                           no_model_load):
    train = tmp_path / "data" / "train.jsonl"
    train.parent.mkdir()
    train.write_bytes(sample_jsonl["train"].read_bytes())
    val = {"same path": train, "symlink": tmp_path / "val.jsonl",
           "dot-dot": tmp_path / "data" / ".." / "data" / "train.jsonl"}[how]
    if how == "symlink":
        val.symlink_to(train)
    argv = _argv(tiny_exaone_dir, train, tmp_path / "run")
    argv[argv.index("--val-file") + 1] = str(val)
    assert run_cli(S_F2.main, argv) == 1
    line = _one_error_line(capsys)
    assert f"val_file {val} is the train_file {train}" in line
    assert not (tmp_path / "run").exists()


def test_output_dir_that_is_a_file_is_one_line_and_left_alone(tiny_exaone_dir, sample_jsonl, tmp_path, capsys,
                                                              no_model_load):
    out = tmp_path / "notes.txt"
    out.write_bytes(b"a user's file\n")
    assert run_cli(S_F2.main, _argv(tiny_exaone_dir, sample_jsonl["train"], out)) == 1
    assert _one_error_line(capsys) == f"error: output_dir {out} is a file; expected a folder"
    assert out.read_bytes() == b"a user's file\n"
    below = out / "run"  # a file in the path
    assert run_cli(S_F2.main, _argv(tiny_exaone_dir, sample_jsonl["train"], below)) == 1
    assert f"output_dir {below} cannot be created: {out} is a file" in _one_error_line(capsys)


def test_train_file_that_is_a_folder_is_one_line(tiny_exaone_dir, tmp_path, capsys, no_model_load):
    assert run_cli(S_F2.main, _argv(tiny_exaone_dir, tmp_path, tmp_path / "run")) == 1
    assert _one_error_line(capsys) == f"error: train_file {tmp_path} is a folder; expected a file"


def test_a_single_ctrl_c_during_start_up_says_start_up_was_stopped(tiny_exaone_dir, sample_jsonl, tmp_path):
    """A real S_F2.py paused in start-up (tokenised, model not loaded) gets one SIGINT."""
    announce = tmp_path / "paused"
    env = {**os.environ, FAULT_POINT_ENV: "train:before_model", FAULT_FILE_ENV: str(announce)}
    proc = subprocess.Popen([sys.executable, "S_F2.py", *_argv(tiny_exaone_dir, sample_jsonl["train"],
                                                               tmp_path / "run")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)  # Ctrl-C as at a terminal, even from a background runner
    try:
        deadline = time.monotonic() + 120
        while not announce.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert announce.exists(), proc.communicate(timeout=5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last == ("interrupted by Ctrl-C (SIGINT): stopped during start-up, before the first training step "
                    "(no checkpoint was written)")
    assert "second Ctrl-C" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def _default_sigint() -> None:
    """In the child: SIGINT as at a terminal (a runner started in the background ignores it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
