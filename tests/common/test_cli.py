"""run_cli: one line for user errors, a truthful message and 128+signal for interrupts (SIGTERM and
SIGHUP behave like Ctrl-C, so clean-up code runs), tracebacks for bugs, and the log file keeps the
detail."""

from __future__ import annotations

import os
import signal

import pytest

from hai_medqa.cli import Interrupted, run_cli
from hai_medqa.errors import HaiMedQAError
from hai_medqa.logging_setup import setup_logging


class StageError(HaiMedQAError, ValueError):
    pass


def _raiser(exc: BaseException):
    def main(argv):
        raise exc
    return main


def test_user_errors_are_one_line_and_the_log_file_keeps_the_traceback(tmp_path, capsys):
    log = tmp_path / "run.log"
    setup_logging(log)

    def main(argv):
        raise StageError(f"{argv[0]}: bad value\nsecond line with detail")

    assert run_cli(main, ["data.jsonl"]) == 1
    err = capsys.readouterr().err
    assert err == "error: data.jsonl: bad value\n"  # the console: one line, nothing else
    text = log.read_text(encoding="utf-8")
    assert "Traceback" in text and "StageError" in text and "second line with detail" in text
    setup_logging()


@pytest.mark.parametrize("exc", [FileNotFoundError(2, "No such file or directory", "x.jsonl"),
                                 IsADirectoryError(21, "Is a directory", "out"), PermissionError("denied")])
def test_os_errors_are_user_errors(capsys, exc):
    assert run_cli(_raiser(exc)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_error_exit_code_can_be_chosen(capsys):
    assert run_cli(_raiser(StageError("no")), error_exit=2) == 2  # model.verify: 1 means "mismatch"


def test_bugs_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        run_cli(_raiser(ZeroDivisionError("bug")))


def test_ctrl_c_says_what_was_kept(capsys):
    def main(argv):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            e.add_note("3 answer(s) kept in out.jsonl.partial")
            raise

    assert run_cli(main) == 130
    assert capsys.readouterr().err == "interrupted by Ctrl-C (SIGINT): 3 answer(s) kept in out.jsonl.partial\n"
    assert run_cli(_raiser(KeyboardInterrupt()), interrupt_exit=75) == 75


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_like_ctrl_c(capsys, sig):
    cleaned = []
    before = signal.getsignal(sig)

    def main(argv):
        try:
            os.kill(os.getpid(), sig)
            for _ in range(1000):  # the handler runs between bytecodes: we never get far
                pass
            raise AssertionError("the signal did not stop main")
        finally:
            cleaned.append(True)

    assert run_cli(main) == 128 + sig
    assert cleaned == [True]  # finally blocks (atomic writers, journals) ran
    assert capsys.readouterr().err == f"interrupted by {signal.Signals(sig).name}\n"
    assert signal.getsignal(sig) is before  # the handler is restored after the run


def test_interrupted_is_a_keyboard_interrupt_with_its_signal():
    e = Interrupted(signal.SIGTERM)
    assert isinstance(e, KeyboardInterrupt) and e.signum == signal.SIGTERM and str(e) == "SIGTERM"


def test_argparse_exit_passes_through():
    def main(argv):
        raise SystemExit(2)

    with pytest.raises(SystemExit):
        run_cli(main)


def test_an_ignored_signal_stays_ignored():
    """`nohup chat.py ...` starts with SIGHUP ignored: the wrapper must not turn it back on."""
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        def main(argv):
            os.kill(os.getpid(), signal.SIGHUP)
            return 0

        assert run_cli(main) == 0
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
