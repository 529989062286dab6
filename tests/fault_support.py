"""Shared by the fault-injection suites (tests/data, tests/merge, tests/pipeline): how a killed child
starts and how a suite's counts are reported (docs/fault_injection.md)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

COUNTS_ENV = "HAI_MEDQA_FAULT_COUNTS"


def default_sigint() -> None:
    """In the child: SIGINT as at a terminal (a runner started in the background ignores it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def report_counts(counts: dict) -> None:
    """Print a suite's counts and, with $HAI_MEDQA_FAULT_COUNTS=path, write them there as JSON."""
    print(json.dumps(counts, indent=2, sort_keys=True))
    target = os.environ.get(COUNTS_ENV)
    if target and counts.get("faults_injected"):
        Path(target).write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def count_fault(counts: dict, signal_name: str, point: str) -> None:
    """One injected fault in a suite's counts, by signal and by point."""
    counts["faults_injected"] += 1
    counts["by_signal"][signal_name] = counts["by_signal"].get(signal_name, 0) + 1
    counts["by_point"][point] = counts["by_point"].get(point, 0) + 1


def signal_and_wait(proc, signum: int, timeout: float) -> str:
    """Send `signum` to a running child and collect its stderr; a child still alive afterwards is killed."""
    try:
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=timeout)
        return err
    finally:
        if proc.poll() is None:
            proc.kill()
