"""Fault injection for preprocess_medical.py (issue 15, items 2 and 7).

Real runs of the script (subprocesses, two worker processes) are stopped with SIGINT, SIGTERM, SIGHUP
and SIGKILL at fixed points (the $HAI_MEDQA_FAULT_POINT hook pauses the run there: early = inputs
indexed, nothing written yet; middle = half the folders in the partial file; writing = the partial
file complete and synced, the rename not done; after_output = output renamed, report not written)
and at fixed delays (wherever the run happens to be). After each fault:

- every file that was there before is byte-identical (a previous output and report at the target
  paths included), unless the run had completely finished writing it;
- nothing is left that a later run could take for complete: no file at all after a catchable
  signal, and after SIGKILL only recognisable `.train.jsonl.partial-<pid>-*.tmp` files;
- no worker process outlives its parent;
- the next run removes any leftover partial file (and says so) and writes exactly the bytes of an
  uninterrupted run.

Counts are recorded; with $HAI_MEDQA_FAULT_COUNTS=path they are written there as JSON (the copy
docs/data_structure.md cites is tests/data/preprocess_fault_counts.json).
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

import psutil
import pytest

from hai_medqa.data.cli import main
from hai_medqa.fixtures.synthetic_trees import write_synthetic_tree
from hai_medqa.io_utils import FAULT_FILE_ENV, FAULT_POINT_ENV, sha256_file

REPO = Path(__file__).resolve().parents[2]
POINTS = {
    "early": "preprocess:indexed",
    "middle": "preprocess:middle",
    "writing": "before_rename:train.jsonl",
    "after_output": "preprocess:before_report",
}
PREVIOUS_OUTPUT = b'{"instruction": "previous run", "output": "kept"}\n'
PREVIOUS_REPORT = b'{"previous": true}\n'
PARTIAL = re.compile(r"\.train\.jsonl\.partial-\d+-[a-z0-9_]+\.tmp")

COUNTS: dict = {
    "faults_injected": 0,
    "by_signal": {},
    "by_point": {},
    "pre_existing_files_checked": 0,
    "files_lost": 0,
    "partial_files_a_later_run_could_take_for_complete": 0,
    "recognisable_partial_files_left_by_sigkill": 0,
    "partial_files_removed_by_the_next_run": 0,
    "worker_processes_started": 0,
    "worker_processes_left_running": 0,
    "next_runs_differing_from_an_uninterrupted_run": 0,
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    """6,000 files in 300 leaf folders (388 folders), its snapshot, and an uninterrupted run's bytes."""
    base = tmp_path_factory.mktemp("faults")
    root = base / "TL"
    write_synthetic_tree(root, n_leaves=300, questions_per_leaf=10, answers_per_leaf=10)
    snapshot = _snapshot(root)
    ref = base / "reference" / "train.jsonl"
    done = subprocess.run(_command(root, ref), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    yield {
        "root": root,
        "reference": ref.read_bytes(),
        "report": json.loads(Path(f"{ref}.report.json").read_text()),
    }
    lost = sum(1 for k, v in _snapshot(root).items() if snapshot.get(k) != v) + len(
        set(snapshot) - set(_snapshot(root))
    )
    COUNTS["input_files_checked"] = len(snapshot)
    COUNTS["files_lost"] += lost
    COUNTS["seconds"] = round(time.monotonic() - _STARTED, 1)
    text = json.dumps(COUNTS, indent=2, sort_keys=True) + "\n"
    print("\npreprocess fault injection:", text)
    if os.environ.get("HAI_MEDQA_FAULT_COUNTS"):
        Path(os.environ["HAI_MEDQA_FAULT_COUNTS"]).write_text(text, encoding="utf-8")
    assert lost == 0, "input files changed"


_STARTED = time.monotonic()


def _command(root: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "preprocess_medical.py",
        "--input",
        str(root),
        "--output",
        str(out),
        "--workers",
        "2",
        "--no-progress",
    ]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _stopped(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE  # dead; a container's init may not reap it
    except psutil.NoSuchProcess:
        return True


def _inject(
    tree: dict,
    tmp_path: Path,
    sig: signal.Signals,
    *,
    point: str | None = None,
    delay: float | None = None,
    group: bool = False,
) -> dict:
    """One faulted run followed by one clean run; returns what was seen. Every check also counts."""
    out_dir = tmp_path / "out"
    out_dir.mkdir(parents=True)
    out, report = out_dir / "train.jsonl", out_dir / "train.jsonl.report.json"
    out.write_bytes(PREVIOUS_OUTPUT)
    report.write_bytes(PREVIOUS_REPORT)
    (out_dir / "notes.txt").write_text("a user's file beside the output", encoding="utf-8")
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    announce = tmp_path / "paused-at"
    env = {k: v for k, v in os.environ.items() if k not in (FAULT_POINT_ENV, FAULT_FILE_ENV)}
    if point:
        env.update({FAULT_POINT_ENV: POINTS[point], FAULT_FILE_ENV: str(announce)})
    proc = subprocess.Popen(
        _command(tree["root"], out),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=group,
    )
    try:
        if point:
            deadline = time.monotonic() + 60
            while not announce.exists():
                assert proc.poll() is None, (
                    f"run ended (rc {proc.returncode}) before {point}: {proc.stderr.read()}"
                )
                assert time.monotonic() < deadline
                time.sleep(0.005)
        else:
            time.sleep(delay)
        try:
            workers = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            workers = []
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 10
    while not all(_stopped(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.02)
    left_running = sum(not _stopped(w) for w in workers)
    for w in workers:
        if not _stopped(w):
            w.kill()

    name = ("group-" if group else "") + sig.name
    COUNTS["faults_injected"] += 1
    COUNTS["by_signal"][name] = COUNTS["by_signal"].get(name, 0) + 1
    where = point or f"after {delay:.2f} s"
    COUNTS["by_point"][where] = COUNTS["by_point"].get(where, 0) + 1
    COUNTS["worker_processes_started"] += len(workers)
    COUNTS["worker_processes_left_running"] += left_running

    after = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    finished = after.get("train.jsonl") == tree["reference"]
    allowed = {
        "train.jsonl": {PREVIOUS_OUTPUT, tree["reference"]},
        "train.jsonl.report.json": {PREVIOUS_REPORT}
        | ({after.get("train.jsonl.report.json")} if finished else set()),
        "notes.txt": {before["notes.txt"]},
    }
    lost = [n for n in before if after.get(n) not in allowed[n]]
    partials = [n for n in after if n not in before]
    mistakable = [n for n in partials if not PARTIAL.fullmatch(n)]
    COUNTS["pre_existing_files_checked"] += len(before)
    COUNTS["files_lost"] += len(lost)
    COUNTS["partial_files_a_later_run_could_take_for_complete"] += len(mistakable)
    if sig == signal.SIGKILL:
        COUNTS["recognisable_partial_files_left_by_sigkill"] += len(partials) - len(mistakable)
    return {
        "rc": proc.returncode,
        "stderr": stderr,
        "before": before,
        "after": after,
        "lost": lost,
        "partials": partials,
        "mistakable": mistakable,
        "workers": len(workers),
        "left_running": left_running,
        "out": out,
    }


def _next_run(tree: dict, seen: dict, capsys) -> None:
    """The run after the fault (in this process): leftovers removed and said so, reference bytes."""
    capsys.readouterr()
    out = seen["out"]
    assert main(["--input", str(tree["root"]), "--output", str(out), "--workers", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    removed = [n for n in seen["partials"] if f"removed {out.parent / n}" in err]
    COUNTS["partial_files_removed_by_the_next_run"] += len(removed)
    same = out.read_bytes() == tree["reference"]
    COUNTS["next_runs_differing_from_an_uninterrupted_run"] += not same
    assert removed == seen["partials"], err
    assert same
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "notes.txt",
        "train.jsonl",
        "train.jsonl.report.json",
    ]
    report = json.loads(Path(f"{out}.report.json").read_text(encoding="utf-8"))
    assert report["output_sha256"] == tree["report"]["output_sha256"]


CATCHABLE = [signal.SIGINT, signal.SIGTERM]


def _said(seen: dict, sig: signal.Signals) -> str:
    """What the stopped run said it kept: its one `interrupted by <signal>: <what>` line (hai_medqa.cli)."""
    lines = [line for line in seen["stderr"].splitlines() if line.startswith("interrupted by ")]
    assert len(lines) == 1, seen["stderr"]
    head, _, kept = lines[0].partition(": ")
    assert head.endswith(sig.name) or head.endswith(f"({sig.name})"), lines[0]
    return kept


@pytest.mark.parametrize("point", ["early", "middle", "writing"])
@pytest.mark.parametrize("sig", CATCHABLE, ids=lambda s: s.name)
def test_catchable_signal_leaves_nothing_and_changes_nothing(tree, tmp_path, capsys, sig, point):
    seen = _inject(tree, tmp_path, sig, point=point)
    assert seen["rc"] == 128 + sig, seen["stderr"]
    assert _said(seen, sig) == f"{seen['out']} was not changed"
    assert seen["after"] == seen["before"]  # byte-identical, and not one extra file
    assert seen["lost"] == [] and seen["partials"] == []
    if point != "early":  # the pool runs from the middle on
        assert seen["workers"] == 2
    assert seen["left_running"] == 0
    _next_run(tree, seen, capsys)


def test_sighup_from_a_closed_terminal(tree, tmp_path, capsys):
    seen = _inject(tree, tmp_path, signal.SIGHUP, point="middle")
    assert (
        seen["rc"] == 128 + signal.SIGHUP and _said(seen, signal.SIGHUP) == f"{seen['out']} was not changed"
    )
    assert seen["after"] == seen["before"] and seen["left_running"] == 0
    _next_run(tree, seen, capsys)


@pytest.mark.parametrize("sig", CATCHABLE, ids=lambda s: s.name)
def test_signal_to_the_whole_process_group(tree, tmp_path, capsys, sig):
    """Ctrl-C in a terminal and a job scheduler's SIGTERM reach every process of the job at once:
    the workers must not die half-way through a result, and the parent reports the signal."""
    seen = _inject(tree, tmp_path, sig, point="middle", group=True)
    assert seen["rc"] == 128 + sig, seen["stderr"]
    assert _said(seen, sig) == f"{seen['out']} was not changed"
    assert seen["after"] == seen["before"] and seen["workers"] == 2 and seen["left_running"] == 0
    _next_run(tree, seen, capsys)


@pytest.mark.parametrize("point", ["early", "middle", "writing"])
def test_sigkill_leaves_only_a_recognisable_partial_the_next_run_removes(tree, tmp_path, capsys, point):
    seen = _inject(tree, tmp_path, signal.SIGKILL, point=point)
    assert seen["rc"] == -signal.SIGKILL
    assert seen["lost"] == [] and seen["mistakable"] == []
    assert {n: seen["after"][n] for n in seen["before"]} == seen["before"]
    assert len(seen["partials"]) == (0 if point == "early" else 1)
    assert seen["left_running"] == 0  # the kernel stops the workers with their parent (Linux)
    _next_run(tree, seen, capsys)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_stop_after_the_output_was_renamed(tree, tmp_path, capsys, sig):
    """The output is complete; the report was not written (the old one stays whole, and its
    output_sha256 no longer matches: that is how to tell)."""
    seen = _inject(tree, tmp_path, sig, point="after_output")
    assert seen["after"]["train.jsonl"] == tree["reference"]
    assert seen["after"]["train.jsonl.report.json"] == PREVIOUS_REPORT
    assert seen["lost"] == [] and seen["partials"] == []
    if sig == signal.SIGTERM:
        assert seen["rc"] == 143
        assert _said(seen, sig) == f"{seen['out']} was completely written, {seen['out']}.report.json was not"
    _next_run(tree, seen, capsys)


@pytest.mark.parametrize("delay", [0.4, 0.6])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_stop_at_an_arbitrary_moment(tree, tmp_path, capsys, sig, delay):
    """No pause: the signal lands wherever the run is (start-up, indexing, pairing, writing, done)."""
    seen = _inject(tree, tmp_path, sig, delay=delay)
    assert seen["lost"] == [] and seen["mistakable"] == [] and seen["left_running"] == 0
    if sig != signal.SIGKILL:
        assert seen["partials"] == []
    _next_run(tree, seen, capsys)
