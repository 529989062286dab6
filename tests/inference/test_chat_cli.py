"""chat.py guards and resumable batches on the tiny stand-in.

Guards: an output on top of an input (the same file, through a symlink, inside the model folder), or
a path of the wrong kind, is one line naming it, before any model loads, and nothing is written.
Resume: a batch run killed with SIGINT, SIGTERM or SIGKILL (a real subprocess) keeps its finished
answers in <output>.partial, leaves every existing file as it was, and ``--resume`` ends with the
byte-identical file of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hai_medqa.cli import run_cli
from hai_medqa.inference import chat_cli
from hai_medqa.inference.chat_cli import main as chat_main

N_QUESTIONS = 12
MAX_NEW = 8
BATCH = 2
PREVIOUS = '{"line": 1, "answer": "an earlier run\'s answers"}\n'


def _questions(path: Path) -> Path:
    rows = [{"prompt": "두통이 자주 생기는데 어떤 검사를 받아야 하나요? " * (1 + i % 3) + str(i), "question_id": f"q{i}"}
            for i in range(N_QUESTIONS)]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines.insert(5, "{not json")  # a skipped line: output line numbers must still be the input's
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _args(model: Path, src: Path, dst: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--dtype", "float32", "--device", "cpu", "--max-new-tokens", str(MAX_NEW),
            "--batch-size", str(BATCH), "--input", str(src), "--output", str(dst), *extra]


@pytest.fixture
def no_model_load(monkeypatch):
    def tripwire(*a, **k):
        raise AssertionError("a model was loaded before the paths were checked")

    monkeypatch.setattr(chat_cli, "load_for_inference", tripwire)


# ---------------------------------------------------------------- guards


@pytest.mark.parametrize("case", ["same", "symlink", "in_model", "output_dir", "input_dir", "model_file", "parent_file"])
def test_paths_are_checked_before_any_work(tmp_path, tiny_exaone_dir, capsys, no_model_load, case):
    src = _questions(tmp_path / "q.jsonl")
    before = src.read_bytes()
    model, dst = tiny_exaone_dir, tmp_path / "answers.jsonl"
    expected = {
        "same": "is the input --input",
        "symlink": "is the input --input",
        "in_model": "lies inside the input --model",
        "output_dir": "is a folder; expected a file path",
        "input_dir": "is a folder; expected a file",
        "model_file": "is a file; expected a folder",
        "parent_file": "is a file, not a folder",
    }[case]
    if case == "same":
        dst = src
    elif case == "symlink":
        dst = tmp_path / "link.jsonl"
        dst.symlink_to(src)
    elif case == "in_model":
        dst = tiny_exaone_dir / "answers.jsonl"
    elif case == "output_dir":
        dst = tmp_path / "out"
        dst.mkdir()
    elif case == "input_dir":
        src = tmp_path
    elif case == "model_file":
        model = src
    elif case == "parent_file":
        dst = src / "answers.jsonl"
    assert run_cli(chat_main, _args(model, src, dst)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert str(dst if case not in ("input_dir", "model_file") else src) in err  # the line names the path
    assert (tmp_path / "q.jsonl").read_bytes() == before
    assert not (tiny_exaone_dir / "answers.jsonl").exists()
    assert not list(tmp_path.glob("*.partial"))


def test_resume_needs_a_journal_and_a_journal_needs_resume(tmp_path, tiny_exaone_dir, capsys, no_model_load):
    src, dst = _questions(tmp_path / "q.jsonl"), tmp_path / "a.jsonl"
    assert run_cli(chat_main, _args(tiny_exaone_dir, src, dst, "--resume")) == 1
    assert "nothing to resume" in capsys.readouterr().err
    assert run_cli(chat_main, ["--model", str(tiny_exaone_dir), "--prompt", "두통", "--resume"]) == 1
    assert "--resume continues a batch run" in capsys.readouterr().err


# ---------------------------------------------------------------- interrupt and resume


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_exaone_dir) -> bytes:
    folder = tmp_path_factory.mktemp("uninterrupted")
    src, dst = _questions(folder / "q.jsonl"), folder / "a.jsonl"
    assert run_cli(chat_main, _args(tiny_exaone_dir, src, dst)) == 0
    out = [json.loads(x) for x in dst.read_text(encoding="utf-8").splitlines()]
    assert len(out) == N_QUESTIONS
    assert [o["line"] for o in out] == [i + 1 if i < 5 else i + 2 for i in range(N_QUESTIONS)]  # input line numbers
    assert [o["question_id"] for o in out] == [f"q{i}" for i in range(N_QUESTIONS)]
    assert sorted(p.name for p in folder.iterdir()) == ["a.jsonl", "q.jsonl"]  # the journal is gone
    return dst.read_bytes()


def _journal_entries(path: Path) -> int:
    try:
        return max(0, path.read_bytes().count(b"\n") - 1)  # minus the header
    except FileNotFoundError:
        return 0


def kill_when(proc: subprocess.Popen, journal: Path, answers: int, sig: int, timeout: float = 240) -> None:
    """Send `sig` once the journal holds `answers` finished answers (polling; the run is far from done)."""
    deadline = time.monotonic() + timeout
    while _journal_entries(journal) < answers:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before it could be interrupted: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no answers were journaled in time")
        time.sleep(0.02)
    proc.send_signal(sig)


def start(repo_root: Path, script: str, args: list[str]) -> subprocess.Popen:
    # SIGINT as at a terminal, even when the test runner was started in the background (SIG_IGN)
    return subprocess.Popen([sys.executable, str(repo_root / script), *args], cwd=repo_root, text=True,
                            encoding="utf-8", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_killed_batch_resumes_to_the_same_file(tmp_path, repo_root, tiny_exaone_dir, uninterrupted, capsys, sig):
    src, dst = _questions(tmp_path / "q.jsonl"), tmp_path / "a.jsonl"
    journal = tmp_path / "a.jsonl.partial"
    dst.write_text(PREVIOUS, encoding="utf-8")  # an earlier run's output: kept until the new one is complete
    questions = src.read_bytes()
    proc = start(repo_root, "chat.py", _args(tiny_exaone_dir, src, dst))
    kill_when(proc, journal, 2, sig)
    _, err = proc.communicate(timeout=120)

    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -9}[sig], err[-2000:]
    kept = _journal_entries(journal)
    assert 2 <= kept < N_QUESTIONS
    if sig != signal.SIGKILL:  # a truthful last line: what was kept and how to continue
        assert err.rstrip().splitlines()[-1] == (
            f"interrupted by {'Ctrl-C (SIGINT)' if sig == signal.SIGINT else 'SIGTERM'}: {kept} answer(s) kept in "
            f"{journal}; run the same command with --resume to continue")
        assert "Traceback" not in err
    assert dst.read_text(encoding="utf-8") == PREVIOUS and src.read_bytes() == questions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "a.jsonl.partial", "q.jsonl"]  # no stray file

    # without --resume the journal is never overwritten
    assert run_cli(chat_main, _args(tiny_exaone_dir, src, dst)) == 1
    assert "add --resume to continue it" in capsys.readouterr().err
    # other settings cannot continue it
    assert run_cli(chat_main, _args(tiny_exaone_dir, src, dst, "--resume", "--temperature", "0.7")) == 1
    assert "generation.temperature" in capsys.readouterr().err and _journal_entries(journal) == kept

    assert run_cli(chat_main, _args(tiny_exaone_dir, src, dst, "--resume")) == 0
    assert dst.read_bytes() == uninterrupted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "q.jsonl"]


# ---------------------------------------------------------------- an adapter trained on a local base


def test_adapter_of_a_local_base_uses_its_runs_model(tmp_path, tiny_lora_run, tiny_exaone_dir, capsys, monkeypatch):
    """Training writes base_model_name_or_path = null for a local base (no path is shared); chat.py
    --adapter RUN without --model then loads the model the run recorded (run_info.json model.requested),
    saying so, and without such a record stops with one line asking for --model before loading anything."""
    import shutil

    from hai_medqa.model import load as model_load

    run = tmp_path / "run"
    shutil.copytree(tiny_lora_run, run)
    config = run / "adapter_best" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": None}))
    args = ["--adapter", str(run), "--prompt", "두통", "--dtype", "float32", "--device", "cpu",
            "--max-new-tokens", "4", "--no-safety"]
    loads = []
    real_load = model_load.load_causal_lm  # load_for_inference imports it when called: a spy sees every load
    monkeypatch.setattr(model_load, "load_causal_lm", lambda folder, **k: loads.append(folder) or real_load(folder, **k))

    def errors() -> list[str]:
        return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]

    info_path = run / "run_info.json"
    assert run_cli(chat_main, args) == 1  # the fixture's run_info.json has no model entry
    (err,) = errors()
    assert "records no base model" in err and "pass --model" in err and loads == []

    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "model": {"requested": str(tmp_path / "moved"), "revision": None}}))
    assert run_cli(chat_main, args) == 1
    (err,) = errors()
    assert f"the run recorded {str(tmp_path / 'moved')!r}, which is not here" in err and loads == []

    info_path.write_text(json.dumps({**info, "model": {"requested": str(tiny_exaone_dir), "revision": None,
                                                       "local_path": str(tmp_path / "moved")}}))
    assert run_cli(chat_main, args) == 0
    err = capsys.readouterr().err
    assert f"base model from the training run's {info_path} (model.requested): {tiny_exaone_dir}" in err
    assert len(loads) == 1
