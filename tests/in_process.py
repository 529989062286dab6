"""Run a script's ``main`` in the test process, the way its subprocess would run it (shared by the
multi-process training suites: tests/train/test_distributed.py, tests/train/test_fsdp_save.py)."""

from __future__ import annotations

import contextlib
import io
import subprocess
from collections.abc import Callable


def run_main(main: Callable[[list[str] | None], int], argv: list[str], *, name: str = "S_F2.py",
             expect_ok: bool = True) -> subprocess.CompletedProcess:
    """``main(argv)`` through run_cli (the scripts' own exit codes and messages) with stderr captured,
    as a CompletedProcess: the same code as ``python <name> argv`` without a second interpreter start
    (~6 s of torch/transformers/peft imports on the 2-core machine)."""
    from hai_medqa.cli import run_cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        returncode = run_cli(main, argv)
    proc = subprocess.CompletedProcess([name, *argv], returncode, "", err.getvalue())
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
