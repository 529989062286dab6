"""merge_and_upload.py never loses a user's file (issue 15, items 1, 2 and 7).

Guards: an output that is, contains or lies inside an input (the base, the adapter folder, an
--eval-results file), that is or contains the run folder, or a path of the wrong kind is one line,
exit 1, before any work (no model read, nothing written, the log file gets the line too).

Fault injection: real runs of the script (subprocesses) replace an existing merged folder
(--overwrite) and are stopped with SIGINT, SIGTERM, SIGHUP and SIGKILL at three points (the
$HAI_MEDQA_FAULT_POINT hook pauses the run there): early = paths checked, nothing read; middle =
every shard written into the partial folder, the index not yet; writing = the partial folder complete,
the rename onto --output not done. After each fault: every file that was there before (base, adapter,
run folder, the previous output folder) is byte-identical; nothing is left that a later run could
take for complete (no partial folder after a catchable signal; after SIGKILL only a recognisable
`.merged.partial-<pid>-*.tmp` folder, which the next run removes and reports); the next run writes
exactly the weights of an uninterrupted merge. Counts: $HAI_MEDQA_FAULT_COUNTS=path writes them as
JSON (docs/fault_injection.md cites tests/merge/merge_fault_counts.json).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_support import count_fault, default_sigint, report_counts, signal_and_wait

import merge_and_upload
from hai_medqa.io_utils import FAULT_FILE_ENV, FAULT_POINT_ENV, sha256_file

REPO = Path(__file__).resolve().parents[2]
POINTS = {"early": "merge:start", "middle": "before_rename:model.safetensors.index.json",
          "writing": "before_rename:merged"}
FAULTS = [(point, sig) for point in POINTS for sig in ("SIGINT", "SIGTERM", "SIGKILL")] + [("middle", "SIGHUP")]
PARTIAL = re.compile(r"\.merged\.partial-\d+-[a-z0-9_]+\.tmp")
COUNTS: dict = {"faults_injected": 0, "by_signal": {}, "by_point": {}, "pre_existing_files_checked": 0,
                "files_lost": 0, "partial_files_a_later_run_could_take_for_complete": 0,
                "recognisable_partial_folders_left_by_sigkill": 0, "partial_folders_removed_by_the_next_run": 0,
                "next_runs_differing_from_an_uninterrupted_run": 0}


def _snapshot(*roots: Path) -> dict[str, str]:
    return {str(p): sha256_file(p) for root in roots for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _weights(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.glob("*.safetensors"))} | {
        "index": sha256_file(folder / "model.safetensors.index.json")}


@pytest.fixture(scope="module")
def inputs(tiny_exaone_dir, tiny_lora_run, tmp_path_factory) -> dict:
    """Private copies of the base and the run folder (nothing here may touch the session fixtures)."""
    root = tmp_path_factory.mktemp("merge_faults")
    base, run = root / "base", root / "run"
    shutil.copytree(tiny_exaone_dir, base, symlinks=True)
    shutil.copytree(tiny_lora_run, run)
    evals = root / "evals" / "base_model_eval.json"  # an evaluation file a user keeps (read, never written)
    evals.parent.mkdir()
    evals.write_text('{"note": "the base model"}\n', encoding="utf-8")
    return {"root": root, "base": base, "run": run, "adapter": run / "adapter_best", "evals": evals}


def _argv(inputs: dict, output: Path, *extra: str) -> list[str]:
    return ["--base", str(inputs["base"]), "--adapter", str(inputs["adapter"]), "--output", str(output),
            "--base-model-id", "LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct", "--max-shard-size", "300KB", *extra]


# ---------------------------------------------------------------- guards


@pytest.mark.parametrize("case", ["is the base", "inside the base", "contains the base", "is the adapter",
                                  "inside the adapter", "is the run folder", "is the --run-dir", "contains the --run-dir",
                                  "is an eval file", "output is a file", "base is a file", "adapter is a file",
                                  "eval is a folder", "log file is the adapter weights"])
def test_guards_refuse_before_any_work(case, inputs, tmp_path, capfd, monkeypatch):
    def no_work(*_a, **_k):
        raise AssertionError("make_release ran before the path checks")
    monkeypatch.setattr(merge_and_upload, "make_release", no_work)
    base, run, adapter = inputs["base"], inputs["run"], inputs["adapter"]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n", encoding="utf-8")
    log = tmp_path / "logs" / "merge.log"
    (tmp_path / "other_run").mkdir()
    (tmp_path / "other_run" / "summary.json").write_text("{}\n", encoding="utf-8")
    output, extra, expect = {
        "is the base": (base, [], "is the input --base"),
        "inside the base": (base / "merged", [], "lies inside the input --base"),
        "contains the base": (base.parent, [], "contains the input --base"),
        "is the adapter": (adapter, [], "is the input --adapter"),
        "inside the adapter": (adapter / "merged", [], "lies inside the input --adapter"),
        "is the run folder": (run, [], "contains the input --adapter"),
        "is the --run-dir": (tmp_path / "other_run", ["--run-dir", str(tmp_path / "other_run")],
                             "is the training run folder"),
        "contains the --run-dir": (tmp_path, ["--run-dir", str(tmp_path / "other_run")],
                                   "contains the training run folder"),
        "is an eval file": (inputs["evals"], ["--eval-results", str(inputs["evals"])], "is the input --eval-results"),
        "output is a file": (a_file, [], "is a file; expected a folder"),
        "base is a file": (tmp_path / "out", [], "--base"),
        "adapter is a file": (tmp_path / "out", [], "--adapter"),
        "eval is a folder": (tmp_path / "out", ["--eval-results", str(tmp_path)], "is a folder; expected a file"),
        "log file is the adapter weights": (tmp_path / "out", [], "--log-file"),
    }[case]
    argv = _argv(inputs, output, *extra)
    if case == "base is a file":
        argv[argv.index("--base") + 1] = str(a_file)
        expect = f"--base {a_file} is a file; expected a folder"
    if case == "adapter is a file":
        argv[argv.index("--adapter") + 1] = str(a_file)
        expect = f"--adapter {a_file} is a file; expected a folder"
    if case == "log file is the adapter weights":
        argv += ["--log-file", str(adapter / "adapter_model.safetensors")]
        expect = "--log-file"
    else:
        argv += ["--log-file", str(log)]
    before = _snapshot(base, run, tmp_path, inputs["evals"].parent)
    assert merge_and_upload.main(argv) == 1
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expect in err, err
    assert {k: v for k, v in _snapshot(base, run, tmp_path, inputs["evals"].parent).items() if k != str(log)} == before
    assert not (tmp_path / "out").exists()
    if case != "log file is the adapter weights":
        assert err.strip() in log.read_text(encoding="utf-8")  # the line reaches --log-file too


def test_output_inside_the_run_folder_is_allowed(inputs, tmp_path, monkeypatch):
    """RUN/merged is where releases usually go: only the adapter folder itself is off limits."""
    seen = {}
    monkeypatch.setattr(merge_and_upload, "make_release", lambda *a, **k: seen.setdefault("output", a[2]))
    assert merge_and_upload.main(_argv(inputs, inputs["run"] / "merged")) == 0
    assert seen["output"] == str(inputs["run"] / "merged")


# ---------------------------------------------------------------- fault injection


@pytest.fixture(scope="module")
def reference(inputs) -> dict:
    """An uninterrupted merge (its weights), and a previous, different output folder to replace."""
    ref = inputs["root"] / "reference" / "merged"
    assert merge_and_upload.main(_argv(inputs, ref)) == 0  # in-process: the same code, no second interpreter
    previous = inputs["root"] / "previous"
    shutil.copytree(ref, previous)
    (previous / "users_notes.txt").write_text("kept across every interrupted overwrite\n", encoding="utf-8")
    return {"weights": _weights(ref), "previous": previous}


def _start(inputs: dict, output: Path, point: str, announce: Path) -> subprocess.Popen:
    env = {**os.environ, FAULT_POINT_ENV: point, FAULT_FILE_ENV: str(announce)}
    return subprocess.Popen([sys.executable, "merge_and_upload.py", *_argv(inputs, output, "--overwrite")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)  # Ctrl-C as at a terminal, even from a background runner


@pytest.mark.parametrize(("point", "sig"), FAULTS)
def test_killed_merge_keeps_the_previous_output_and_the_next_run_matches(point, sig, inputs, reference, tmp_path,
                                                                         capfd):
    out = tmp_path / "merged"
    shutil.copytree(reference["previous"], out)
    before = _snapshot(inputs["base"], inputs["run"], out)
    announce = tmp_path / "paused"
    proc = _start(inputs, out, POINTS[point], announce)
    deadline = time.monotonic() + 120
    while not announce.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if not announce.exists():
        proc.kill()
        raise AssertionError(proc.communicate(timeout=5))
    err = signal_and_wait(proc, getattr(signal, sig), timeout=60)
    count_fault(COUNTS, sig, point)
    signum = getattr(signal, sig)
    assert proc.returncode == (-signum if sig == "SIGKILL" else 128 + signum), err

    after = _snapshot(inputs["base"], inputs["run"], out)
    COUNTS["pre_existing_files_checked"] += len(before)
    lost = sum(1 for k, v in before.items() if after.get(k) != v)
    COUNTS["files_lost"] += lost
    assert lost == 0 and after == before  # nothing changed, nothing added to the inputs or the old output
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name not in {"merged", "paused"})
    if sig == "SIGKILL":
        assert all(PARTIAL.fullmatch(n) for n in leftovers), leftovers
        COUNTS["recognisable_partial_folders_left_by_sigkill"] += len(leftovers)
    else:
        assert leftovers == [], leftovers
        assert err.strip().splitlines()[-1].startswith("interrupted by ")
        assert "no partial folder was left" in err
    COUNTS["partial_files_a_later_run_could_take_for_complete"] += sum(
        1 for n in leftovers if not PARTIAL.fullmatch(n))

    # the next run (same arguments; in-process to keep the suite fast): removes any leftover, replaces
    # the old folder, writes the same weights
    capfd.readouterr()
    assert merge_and_upload.main(_argv(inputs, out, "--overwrite")) == 0
    next_err = capfd.readouterr().err
    remaining = sorted(p.name for p in tmp_path.iterdir() if p.name not in {"merged", "paused"})
    assert remaining == []
    COUNTS["partial_folders_removed_by_the_next_run"] += len(leftovers)
    if leftovers:
        assert "removed" in next_err  # and it says so
    differs = _weights(out) != reference["weights"]
    COUNTS["next_runs_differing_from_an_uninterrupted_run"] += int(differs)
    assert not differs
    assert not (out / "users_notes.txt").exists()  # the completed run did replace the folder


def test_write_counts():
    """Runs last in this module: the counts, printed and (with $HAI_MEDQA_FAULT_COUNTS) written."""
    report_counts(COUNTS)
