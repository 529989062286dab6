"""Bad inputs to S_F2.py: one clear line each, before any model is fetched or loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hai_medqa.config import load_config
from hai_medqa.train.config import TrainConfig
from hai_medqa.train.errors import TrainingDataError, TrainingError
from hai_medqa.train.trainer import run_training

GOOD = {"instruction": "두통 예방법은?", "output": "규칙적인 수면이 도움이 됩니다."}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if anything tries to fetch or load a model."""
    import hai_medqa.model.acquire as acquire
    import hai_medqa.model.load as load

    def refuse(*a, **k):
        raise AssertionError("a model was fetched/loaded before the input error was reported")

    monkeypatch.setattr(acquire, "resolve_model", refuse)
    monkeypatch.setattr(load, "load_causal_lm", refuse)


def cfg_for(repo_root, tmp_path, **overrides):
    base = {"model": "LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct", "output_dir": str(tmp_path / "run"),
            "train_file": str(write_jsonl(tmp_path / "train.jsonl", [GOOD] * 3)), "val_file": "null"}
    return load_config(TrainConfig, repo_root / "configs" / "tiny_cpu.yaml", {**base, **overrides})


@pytest.mark.parametrize(("setup", "message"), [
    (lambda d: {"train_file": str(d / "missing.jsonl")}, r"train_file not found: .*missing\.jsonl"),
    (lambda d: {"train_file": str(write_jsonl(d / "empty.jsonl", []))}, r"train_file is empty: .*empty\.jsonl"),
    (lambda d: {"train_file": str(write_jsonl(d / "q.jsonl", [{"question": "q", "answer": "a"}] * 2))},
     # issue 14's one reader names the file, the line and what was expected
     r"train_file has no usable records: .*q\.jsonl \(all 2 unusable; first: .*q\.jsonl:1: .*"
     r"expected \{\"instruction\", \"output\"\} \(project\)"),
    (lambda d: {"val_file": str(write_jsonl(d / "val.jsonl", [{"instruction": "q", "output": ""}]))},
     r"val_file has no usable records: .*val\.jsonl .*val\.jsonl:1: project record: 'output' is empty"),
])
def test_bad_data_fails_before_any_model(repo_root, tmp_path, no_model, setup, message):
    with pytest.raises(TrainingDataError, match=message) as e:
        run_training(*cfg_for(repo_root, tmp_path, **setup(tmp_path)))
    assert "\n" not in str(e.value)


def test_val_file_with_nothing_usable_after_tokenising_fails_before_the_model_loads(repo_root, tmp_path,
                                                                                     tiny_exaone_dir, monkeypatch):
    import hai_medqa.model.load as load

    monkeypatch.setattr(load, "load_causal_lm", lambda *a, **k: pytest.fail("model loaded before the data error"))
    long_answer = {"instruction": "당뇨병 식단?", "output": "채소와 통곡물을 드세요. " * 80}
    with pytest.raises(TrainingDataError, match=r"val_file has no usable records after applying max_length=64 \(drop\)"):
        run_training(*cfg_for(repo_root, tmp_path, model=str(tiny_exaone_dir), max_length="64", overlong="drop",
                              system_prompt="",
                              train_file=str(write_jsonl(tmp_path / "t.jsonl", [GOOD] * 2)),
                              val_file=str(write_jsonl(tmp_path / "v.jsonl", [long_answer]))))


def test_existing_run_is_not_overwritten_without_resume(repo_root, tmp_path, no_model):
    (tmp_path / "run" / "checkpoints" / "step_0000010").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_0000010" / "trainer_state.json").write_text("{}")
    with pytest.raises(TrainingError, match=r"already holds checkpoints \(step_0000010\); pass --resume"):
        run_training(*cfg_for(repo_root, tmp_path))


def run_cli(repo_root, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(repo_root / "S_F2.py"), *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=repo_root)


def test_cli_unknown_key_is_one_line_and_exit_1(repo_root):
    proc = run_cli(repo_root, "--config", "configs/tiny_cpu.yaml", "--lora-rank", "8")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: command line: unknown config key 'lora_rank' (did you mean 'lora_r'?)"


def test_cli_bad_data_is_one_line_and_exit_1(repo_root, tmp_path):
    proc = run_cli(repo_root, "--config", "configs/tiny_cpu.yaml", "--train-file", str(tmp_path / "nope.jsonl"),
                   "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"error: train_file not found: {tmp_path / 'nope.jsonl'}"
    assert "Traceback" not in proc.stderr
