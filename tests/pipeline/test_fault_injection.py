"""Fault injection for training, S_F2.py (issue 15, item 7).

Real runs of the script (subprocesses, the tiny model on CPU, 8 steps, a checkpoint every 3) are
stopped with SIGINT, SIGTERM, SIGHUP and SIGKILL at three kinds of points: early = start-up (data
tokenised, model not loaded: the $HAI_MEDQA_FAULT_POINT hook ``train:before_model``); middle =
mid-training (once metrics.jsonl shows step 4, between two checkpoints); writing = while a
checkpoint or the final adapter is written (the partial folder complete, its rename not done:
``before_rename:step_0000006`` / ``before_rename:adapter_last``; a caught signal there is recorded,
the write finishes after the pause and the run checkpoints and exits 75). After each fault:

- every file that was there before (the model, the data files, and the checkpoints already written)
  is byte-identical;
- nothing is left that a later run could take for complete: every ``checkpoints/step_*`` folder is
  whole, no adapter_last unless the run finished, and any leftover is a recognisable partial
  (``.<name>.partial-<pid>-*.tmp`` or the ``.rng_<step>`` staging folder);
- the next run (``--resume`` when a checkpoint exists; a fresh start otherwise, after ``--resume``
  is refused with the folder named) finishes with adapter_last's weights byte-identical to an
  uninterrupted run's.

Counts: printed, and written as JSON to $HAI_MEDQA_FAULT_COUNTS when set (docs/fault_injection.md
cites tests/pipeline/train_fault_counts.json).
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
from fault_support import count_fault, default_sigint, report_counts

import S_F2
from hai_medqa.cli import run_cli
from hai_medqa.io_utils import FAULT_FILE_ENV, FAULT_PAUSE_ENV, FAULT_POINT_ENV, sha256_file

REPO = Path(__file__).resolve().parents[2]
STEPS = 8
WEIGHTS = "adapter_model.safetensors"
POINTS = {"early": "train:before_model", "middle": None, "writing": "before_rename:step_0000006",
          "writing-adapter": "before_rename:adapter_last"}
FAULTS = [("early", "SIGINT"), ("early", "SIGKILL"), ("middle", "SIGTERM"), ("middle", "SIGKILL"),
          ("middle", "SIGHUP"), ("writing", "SIGTERM"), ("writing", "SIGKILL"), ("writing-adapter", "SIGKILL")]
PARTIAL = re.compile(r"\.(step_\d+|adapter_last|adapter_best|[\w.-]+)\.partial-\d+-[a-z0-9_]+\.tmp(\.old)?|\.rng_\d+")
COUNTS: dict = {"faults_injected": 0, "by_signal": {}, "by_point": {}, "pre_existing_files_checked": 0,
                "files_lost": 0, "partial_files_a_later_run_could_take_for_complete": 0,
                "recognisable_partials_left_by_sigkill": 0, "partials_removed_by_the_next_run": 0, "resumed_runs": 0, "fresh_restarts": 0,
                "next_runs_differing_from_an_uninterrupted_run": 0}


def _argv(tiny_exaone_dir, sample_jsonl, out: Path, cache: Path) -> list[str]:
    return ["--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--model", str(tiny_exaone_dir),
            "--train-file", str(sample_jsonl["train"]), "--val-file", "null", "--output-dir", str(out),
            "--cache-dir", str(cache), "--max-steps", str(STEPS), "--save-steps", "3", "--save-total-limit", "10",
            "--logging-steps", "1", "--tensorboard", "false", "--lora-dropout", "0.1"]


def _snapshot(*roots: Path) -> dict[str, str]:
    return {str(p): sha256_file(p) for root in roots if Path(root).exists()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tiny_exaone_dir, sample_jsonl, tmp_path_factory) -> dict:
    """An uninterrupted run (in-process: the same code without a second interpreter start)."""
    cache = tmp_path_factory.mktemp("fault_token_cache")
    out = tmp_path_factory.mktemp("fault_reference") / "run"
    assert run_cli(S_F2.main, _argv(tiny_exaone_dir, sample_jsonl, out, cache)) == 0
    return {"cache": cache, "weights": sha256_file(out / "adapter_last" / WEIGHTS)}


def _reached_step(out: Path, step: int):
    def ready() -> bool:
        try:
            lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        except OSError:
            return False
        return any(json.loads(line).get("step", 0) >= step for line in lines if line.strip().endswith("}"))
    return ready


@pytest.fixture(scope="module")
def killed(reference, tiny_exaone_dir, sample_jsonl, tmp_path_factory) -> dict:
    """Every fault's run, started together and each signalled once it reaches its point (the
    interpreters' and torch's start-ups overlap on the 2-core machine, as in
    tests/inference/test_generation_faults.py). Per fault: its argv and folder, every file that existed
    when its signal was sent (the inputs, and the checkpoints written by then), its exit status and stderr."""
    inputs = [Path(tiny_exaone_dir), sample_jsonl["train"].parent]
    before = _snapshot(*inputs)
    cases, procs = {}, {}
    try:
        for point, sig in FAULTS:
            tmp = tmp_path_factory.mktemp(f"fault_{point}_{sig}")
            out, announce = tmp / "run", tmp / "paused"
            case = cases[point, sig] = {"out": out, "inputs": inputs, "stderr": tmp / "stderr.txt",
                                        "argv": _argv(tiny_exaone_dir, sample_jsonl, out, reference["cache"]),
                                        "ready": announce.exists if POINTS[point] else _reached_step(out, 4)}
            env = {**os.environ, FAULT_FILE_ENV: str(announce), FAULT_PAUSE_ENV: "3"}
            if POINTS[point]:
                env[FAULT_POINT_ENV] = POINTS[point]
            with open(case["stderr"], "w", encoding="utf-8") as err:
                procs[point, sig] = subprocess.Popen(
                    [sys.executable, "S_F2.py", *case["argv"]], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                    stderr=err, preexec_fn=default_sigint)  # Ctrl-C as at a terminal, even from a background runner
        waiting = set(procs)
        deadline = time.monotonic() + 300
        while waiting and time.monotonic() < deadline:
            for key in sorted(waiting):
                case = cases[key]
                if case["ready"]():
                    # what exists when the signal is sent must survive it byte for byte
                    case["before"] = before | {k: v for k, v in _snapshot(case["out"] / "checkpoints").items()
                                               if "/step_" in k and ".partial" not in k}
                    procs[key].send_signal(getattr(signal, key[1]))
                    waiting.discard(key)
                elif procs[key].poll() is not None:  # ended without reaching its point: its test fails
                    waiting.discard(key)
            time.sleep(0.02)
        for key in waiting:  # never reached its point in time: stopped, its test fails
            procs[key].kill()
        for key, proc in procs.items():
            proc.wait(timeout=120)
            cases[key]["returncode"] = proc.returncode
            cases[key]["err"] = cases[key]["stderr"].read_text(encoding="utf-8")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return cases


@pytest.mark.parametrize(("point", "sig"), FAULTS)
def test_killed_training_keeps_files_and_resumes_to_the_same_adapter(point, sig, killed, reference, capfd):
    case = killed[point, sig]
    out, argv, inputs, err = case["out"], case["argv"], case["inputs"], case["err"]
    assert "before" in case, f"{point} never reached (rc {case['returncode']}):\n{err[-3000:]}"
    before = case["before"]
    count_fault(COUNTS, sig, point)
    signum = getattr(signal, sig)
    expected_rc = {"SIGKILL": -signum}.get(sig, 128 + signum if point == "early" else 75)
    assert case["returncode"] == expected_rc, err
    if sig != "SIGKILL":
        assert err.strip().splitlines()[-1].startswith("interrupted by ") or case["returncode"] == 75, err
        assert "second Ctrl-C" not in err

    after = _snapshot(*inputs, out / "checkpoints")
    COUNTS["pre_existing_files_checked"] += len(before)
    lost = sum(1 for k, v in before.items() if after.get(k) != v)
    COUNTS["files_lost"] += lost
    assert lost == 0
    ckpt_root = out / "checkpoints"
    names = sorted(p.name for p in ckpt_root.iterdir()) if ckpt_root.is_dir() else []
    names += sorted(p.name for p in out.iterdir() if p.name.startswith(".")) if out.is_dir() else []
    complete = [n for n in names if re.fullmatch(r"step_\d{7}", n)]
    for n in complete:  # a checkpoint folder is whole or absent
        assert {"trainer_state.json", "optimizer.pt", "scheduler.pt", WEIGHTS} <= {
            p.name for p in (ckpt_root / n).iterdir()}, n
    leftovers = [n for n in names if n not in complete]
    unrecognisable = [n for n in leftovers if not PARTIAL.fullmatch(n)]
    COUNTS["partial_files_a_later_run_could_take_for_complete"] += len(unrecognisable)
    assert unrecognisable == []
    if sig == "SIGKILL":
        COUNTS["recognisable_partials_left_by_sigkill"] += len(leftovers)
    else:
        assert leftovers == []
    assert not (out / "adapter_last").exists()  # no run finished: no final adapter

    capfd.readouterr()
    if complete:
        COUNTS["resumed_runs"] += 1
        assert run_cli(S_F2.main, [*argv, "--resume"]) == 0
    else:  # killed in start-up: --resume is refused, naming the folder; a fresh start is the next run
        assert run_cli(S_F2.main, [*argv, "--resume"]) == 1
        assert f"no checkpoint to resume in {out / 'checkpoints'}" in capfd.readouterr().err
        COUNTS["fresh_restarts"] += 1
        assert run_cli(S_F2.main, argv) == 0
    remaining = [p.name for p in [*ckpt_root.iterdir(), *out.iterdir()] if PARTIAL.fullmatch(p.name)]
    assert remaining == []  # the next run removed every leftover
    COUNTS["partials_removed_by_the_next_run"] += len(leftovers)
    differs = sha256_file(out / "adapter_last" / WEIGHTS) != reference["weights"]
    COUNTS["next_runs_differing_from_an_uninterrupted_run"] += int(differs)
    assert not differs
    assert _snapshot(*inputs) == {k: v for k, v in before.items() if not k.startswith(str(out))}


def test_write_counts():
    """Runs last in this module: the counts, printed and (with $HAI_MEDQA_FAULT_COUNTS) written."""
    report_counts(COUNTS)
