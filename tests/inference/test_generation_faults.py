"""Fault injection for chat.py batch and evaluate.py (issue 15, item 7; docs/fault_injection.md).

Real runs of the scripts (subprocesses, the tiny stand-in with the LoRA run fixture on top) are
stopped with SIGINT, SIGTERM and SIGKILL at three points, where the $HAI_MEDQA_FAULT_POINT hook
pauses them: early = `journal_opened:<output>.partial` (settings and journal checked, no model
loaded, nothing written); middle = `journal_synced:<output>.partial` (the first batch of answers
journaled and synced); writing = `before_rename:<file>` (the journal complete, the final file
complete in its partial file, the atomic rename not done; for evaluate the first result file,
predictions.jsonl, so no result file is replaced yet). After each fault: every file that was there
before (the questions or validation data, an earlier output at the target path, a user's file beside
it, the model and the run folder) is byte-identical; nothing is left that a later run could take for
complete (the `.partial` journal stays on purpose: a run without --resume refuses it; after SIGKILL
while writing, a recognisable `.<name>.partial-<pid>-*.tmp`, which the next run removes and names);
the next run (--resume where a journal was started, a plain run where none was) writes the same
bytes as an uninterrupted run (evaluate: eval_results.json without its "created" time).
Counts: $HAI_MEDQA_FAULT_COUNTS=path writes them as JSON (tests/inference/generation_fault_counts.json).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_support import default_sigint, report_counts

from hai_medqa.cli import run_cli
from hai_medqa.evaluation.cli import main as eval_main
from hai_medqa.inference.chat_cli import main as chat_main
from hai_medqa.io_utils import FAULT_FILE_ENV, FAULT_POINT_ENV, sha256_file

REPO = Path(__file__).resolve().parents[2]
SIGNALS = ("SIGINT", "SIGTERM", "SIGKILL")
CHAT_POINTS = {"early": "journal_opened:a.jsonl.partial", "middle": "journal_synced:a.jsonl.partial",
               "writing": "before_rename:a.jsonl"}
EVAL_POINTS = {"early": "journal_opened:eval_results.json.partial",
               "middle": "journal_synced:eval_results.json.partial", "writing": "before_rename:predictions.jsonl"}
FAULTS = [(point, sig) for point in ("early", "middle", "writing") for sig in SIGNALS]
PREVIOUS = '{"line": 1, "answer": "an earlier run\'s answers"}\n'
NOTES = "the user's own file\n"


def _stage_counts() -> dict:
    return {"faults_injected": 0, "by_signal": {}, "by_point": {}, "pre_existing_files_checked": 0, "files_lost": 0,
            "partial_files_a_later_run_could_take_for_complete": 0, "journals_kept_for_resume": 0,
            "recognisable_partial_files_left_by_sigkill": 0, "partial_files_removed_by_the_next_run": 0,
            "next_runs_with_resume": 0, "next_runs_fresh": 0, "next_runs_differing_from_an_uninterrupted_run": 0}


COUNTS: dict = {"faults_injected": 0, "files_lost": 0, "chat_batch": _stage_counts(), "evaluate": _stage_counts()}


def _snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots` (a root that is a file: that file)."""
    paths = [p for root in map(Path, roots) for p in ([root] if root.is_file() else sorted(root.rglob("*")))]
    return {str(p): sha256_file(p) for p in paths if p.is_file()}


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _recognisable(name: str, final: str) -> bool:
    return re.fullmatch(rf"\.{re.escape(final)}\.partial-\d+-[a-z0-9_]+\.tmp", name) is not None


def _kill_all(script: str, cases: dict, points: dict) -> None:
    """Start one run of `script` per case at once (each pauses at its point: the interpreter and torch
    start-ups overlap, which keeps the suite short), send each its signal when it announces the pause,
    and record its exit status and stderr in the case."""
    procs = {}
    for (point, sig), case in cases.items():
        env = {**os.environ, FAULT_POINT_ENV: points[point], FAULT_FILE_ENV: str(case["announce"]),
               "PYTHONIOENCODING": "utf-8"}
        with open(case["stderr"], "w", encoding="utf-8") as err:
            procs[point, sig] = subprocess.Popen(
                [sys.executable, script, *case["argv"]], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err,
                preexec_fn=default_sigint)  # Ctrl-C as at a terminal, even from a background runner
    try:
        waiting = set(procs)
        deadline = time.monotonic() + 300
        while waiting and time.monotonic() < deadline:
            for key in sorted(waiting):
                if cases[key]["announce"].exists():
                    procs[key].send_signal(getattr(signal, key[1]))
                    waiting.discard(key)
                elif procs[key].poll() is not None:  # ended without pausing: recorded, the test fails
                    waiting.discard(key)
            time.sleep(0.02)
        for key, proc in procs.items():
            proc.wait(timeout=120)
            cases[key]["returncode"] = proc.returncode
            cases[key]["paused"] = cases[key]["announce"].exists()
            cases[key]["err"] = Path(cases[key]["stderr"]).read_text(encoding="utf-8")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()


def _check_exit(case: dict, sig: str) -> str:
    err = case["err"]
    assert case["paused"], err[-2000:]
    signum = getattr(signal, sig)
    assert case["returncode"] == (-signum if sig == "SIGKILL" else 128 + signum), err[-2000:]
    if sig != "SIGKILL":  # a truthful last line, no traceback
        assert err.rstrip().splitlines()[-1].startswith("interrupted by "), err[-2000:]
        assert "Traceback" not in err
    return err


def _count_fault(stage: str, point: str, sig: str, before: dict, after: dict) -> None:
    c = COUNTS[stage]
    c["faults_injected"] += 1
    COUNTS["faults_injected"] += 1
    c["by_signal"][sig] = c["by_signal"].get(sig, 0) + 1
    c["by_point"][point] = c["by_point"].get(point, 0) + 1
    c["pre_existing_files_checked"] += len(before)
    lost = sum(1 for k, v in before.items() if after.get(k) != v)
    c["files_lost"] += lost
    COUNTS["files_lost"] += lost
    assert lost == 0


def _check_leftovers(stage: str, point: str, sig: str, new: list[str], journal: str, final: str) -> list[str]:
    """What the killed run added: the journal (kept on purpose, except when killed before the first
    answer) and, after SIGKILL while writing, the recognisable partial of `final`; nothing else."""
    c = COUNTS[stage]
    partials = [n for n in new if _recognisable(Path(n).name, final)]
    others = [n for n in new if n not in partials and Path(n).name != journal]
    c["partial_files_a_later_run_could_take_for_complete"] += len(others)
    assert others == [], new
    has_journal = any(Path(n).name == journal for n in new)
    assert has_journal == (point != "early"), new  # no journal before the first answer is done
    c["journals_kept_for_resume"] += int(has_journal)
    if sig == "SIGKILL" and point == "writing":
        assert len(partials) == 1, new
    else:
        assert partials == [], new
    c["recognisable_partial_files_left_by_sigkill"] += len(partials)
    return partials


# ---------------------------------------------------------------- chat.py batch


def _questions(path: Path) -> Path:
    rows = [{"prompt": f"두통이 자주 생기는데 어떤 검사를 받아야 하나요? {i}", "question_id": f"q{i}"} for i in range(4)]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines.insert(2, "{not json")  # a skipped line: output line numbers stay the input's
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _chat_args(model: Path, run: Path, src: Path, dst: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--adapter", str(run), "--dtype", "float32", "--device", "cpu",
            "--max-new-tokens", "6", "--batch-size", "2", "--no-safety",  # the safety layer's Kiwi start-up: seconds per run
            "--input", str(src), "--output", str(dst), *extra]


@pytest.fixture(scope="module")
def chat_reference(tmp_path_factory, tiny_exaone_dir, tiny_lora_run) -> bytes:
    """The bytes of an uninterrupted batch run (in-process: the same code, no second interpreter)."""
    root = tmp_path_factory.mktemp("chat_reference")
    src, dst = _questions(root / "q.jsonl"), root / "a.jsonl"
    assert run_cli(chat_main, _chat_args(tiny_exaone_dir, tiny_lora_run, src, dst)) == 0
    assert _files(root) == ["a.jsonl", "q.jsonl"]
    return dst.read_bytes()


@pytest.fixture(scope="module")
def chat_killed(tmp_path_factory, tiny_exaone_dir, tiny_lora_run, chat_reference) -> dict:
    """Every fault's folder (the questions, an earlier output at the target, a user's file), its
    snapshot before, and how its killed run ended. After the reference run: the killed runs find the
    tiny model's converted copy in the cache instead of each converting it."""
    cases = {}
    for point, sig in FAULTS:
        root = tmp_path_factory.mktemp(f"chat_{point}_{sig}")
        work = root / "work"
        work.mkdir()
        src, dst = _questions(work / "q.jsonl"), work / "a.jsonl"
        dst.write_text(PREVIOUS, encoding="utf-8")  # an earlier output at the target path
        (work / "notes.txt").write_text(NOTES, encoding="utf-8")
        cases[point, sig] = {"work": work, "dst": dst, "announce": root / "paused", "stderr": root / "stderr.txt",
                             "argv": _chat_args(tiny_exaone_dir, tiny_lora_run, src, dst),
                             "before": _snapshot(work, tiny_exaone_dir, tiny_lora_run)}
    _kill_all("chat.py", cases, CHAT_POINTS)
    return cases


@pytest.mark.parametrize(("point", "sig"), FAULTS)
def test_killed_chat_batch_keeps_every_file_and_the_next_run_matches(point, sig, chat_killed, tiny_exaone_dir,
                                                                     tiny_lora_run, chat_reference, capfd):
    case = chat_killed[point, sig]
    work, dst, argv, before = case["work"], case["dst"], case["argv"], case["before"]
    err = _check_exit(case, sig)
    after = _snapshot(work, tiny_exaone_dir, tiny_lora_run)
    _count_fault("chat_batch", point, sig, before, after)
    new = sorted(set(_files(work)) - {Path(k).relative_to(work).as_posix() for k in before if k.startswith(str(work))})
    partials = _check_leftovers("chat_batch", point, sig, new, "a.jsonl.partial", "a.jsonl")
    if sig != "SIGKILL" and point != "early":
        assert "run the same command with --resume to continue" in err.rstrip().splitlines()[-1]

    # the next run: --resume where a journal was started, else a plain run
    resume = (work / "a.jsonl.partial").exists()
    capfd.readouterr()
    assert run_cli(chat_main, [*argv, *(["--resume"] if resume else [])]) == 0
    next_err = capfd.readouterr().err
    c = COUNTS["chat_batch"]
    c["next_runs_with_resume" if resume else "next_runs_fresh"] += 1
    assert _files(work) == ["a.jsonl", "notes.txt", "q.jsonl"]  # journal and partials gone
    c["partial_files_removed_by_the_next_run"] += len(partials)
    if partials:
        assert "removed" in next_err  # and it says so
    differs = dst.read_bytes() != chat_reference
    c["next_runs_differing_from_an_uninterrupted_run"] += int(differs)
    assert not differs
    assert (work / "notes.txt").read_text(encoding="utf-8") == NOTES


# ---------------------------------------------------------------- evaluate.py


@pytest.fixture(scope="module")
def val_jsonl(tmp_path_factory, repo_root) -> Path:
    from hai_medqa.data.preprocess import run_preprocess

    out = tmp_path_factory.mktemp("val") / "val.jsonl"
    run_preprocess([repo_root / "hai_medqa" / "resources" / "aihub_sample" / "VL.zip"], out, progress=False)
    return out


def _eval_args(model: Path, run: Path, val: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--adapter", str(run), "--data", str(val), "--samples", "4", "--no-perplexity",
            "--dtype", "float32", "--device", "cpu", "--batch-size", "2", "--max-new-tokens", "6",
            "--output-dir", str(out), *extra]


def _results(out: Path) -> dict:
    """The result files of one evaluation; eval_results.json without "created" (the one field two runs
    never share), every other file as bytes."""
    files = {}
    for name in ("eval_results.json", "predictions.jsonl"):
        data = (out / name).read_bytes()
        if name.endswith(".json"):
            obj = json.loads(data)
            obj.pop("created")
            data = obj
        files[name] = data
    return files


@pytest.fixture(scope="module")
def eval_reference(tmp_path_factory, tiny_exaone_dir, tiny_lora_run, val_jsonl) -> dict:
    out = tmp_path_factory.mktemp("eval_reference") / "eval"
    assert run_cli(eval_main, _eval_args(tiny_exaone_dir, tiny_lora_run, val_jsonl, out)) == 0
    assert _files(out) == ["eval_results.json", "predictions.jsonl"]
    return _results(out)


@pytest.fixture(scope="module")
def eval_killed(tmp_path_factory, tiny_exaone_dir, tiny_lora_run, val_jsonl, eval_reference) -> dict:
    """Every fault's output folder (an earlier evaluation's result files and a user's file), its
    snapshot before, and how its killed run ended."""
    cases = {}
    for point, sig in FAULTS:
        root = tmp_path_factory.mktemp(f"eval_{point}_{sig}")
        out = root / "eval"
        out.mkdir()
        (out / "eval_results.json").write_text('{"model": "an earlier evaluation"}\n', encoding="utf-8")
        (out / "predictions.jsonl").write_text(PREVIOUS, encoding="utf-8")
        (out / "notes.txt").write_text(NOTES, encoding="utf-8")
        cases[point, sig] = {"out": out, "announce": root / "paused", "stderr": root / "stderr.txt",
                             "argv": _eval_args(tiny_exaone_dir, tiny_lora_run, val_jsonl, out),
                             "before": _snapshot(out, val_jsonl, tiny_exaone_dir, tiny_lora_run)}
    _kill_all("evaluate.py", cases, EVAL_POINTS)
    return cases


@pytest.mark.parametrize(("point", "sig"), FAULTS)
def test_killed_evaluation_keeps_every_file_and_the_next_run_matches(point, sig, eval_killed, tiny_exaone_dir,
                                                                     tiny_lora_run, val_jsonl, eval_reference, capfd):
    case = eval_killed[point, sig]
    out, argv, before = case["out"], case["argv"], case["before"]
    err = _check_exit(case, sig)
    after = _snapshot(out, val_jsonl, tiny_exaone_dir, tiny_lora_run)
    _count_fault("evaluate", point, sig, before, after)
    new = sorted(set(_files(out)) - {Path(k).relative_to(out).as_posix() for k in before if k.startswith(str(out))})
    partials = _check_leftovers("evaluate", point, sig, new, "eval_results.json.partial", "predictions.jsonl")
    if sig != "SIGKILL" and point != "early":
        assert "run the same command with --resume to continue" in err.rstrip().splitlines()[-1]

    resume = (out / "eval_results.json.partial").exists()
    capfd.readouterr()
    assert run_cli(eval_main, [*argv, *(["--resume"] if resume else [])]) == 0
    next_err = capfd.readouterr().err
    c = COUNTS["evaluate"]
    c["next_runs_with_resume" if resume else "next_runs_fresh"] += 1
    assert _files(out) == ["eval_results.json", "notes.txt", "predictions.jsonl"]
    c["partial_files_removed_by_the_next_run"] += len(partials)
    if partials:
        assert "removed" in next_err
    differs = _results(out) != eval_reference
    c["next_runs_differing_from_an_uninterrupted_run"] += int(differs)
    assert not differs
    assert (out / "notes.txt").read_text(encoding="utf-8") == NOTES


def test_write_counts():
    """Runs last in this module: the counts, printed and (with $HAI_MEDQA_FAULT_COUNTS) written."""
    report_counts(COUNTS)
